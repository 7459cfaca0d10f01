"""Sending a job's next step: ``dispatch``, by task name on the step's queue, with the
headers the workers and the watchdog read; Celery's ``task-sent`` events batched per app.
``dispatch_async``: the same message, written by an asyncio Redis client on the sender's
own loop (the API's, the billing consumer's) instead of kombu's blocking publish."""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import structlog
from celery import Celery
from redis.asyncio import Redis

from cancelflow import tracing
from cancelflow.contract import CALLBACKS_QUEUE, STEP_TASKS, Step, provider_queue
from cancelflow.lifecycle import Next
from messaging.patches import (
    SentEvents,
    StepMessage,
    StepRoute,
    step_message,
    step_message_route,
    step_message_sent,
)


def queue_for(step: Step, provider: str) -> str:
    """The queue a step of a job of ``provider`` is sent on."""
    return CALLBACKS_QUEUE if step is Step.CALLBACK else provider_queue(provider)


_sent_events: weakref.WeakKeyDictionary[Celery, SentEvents] = weakref.WeakKeyDictionary()
_sent_events_lock = threading.Lock()


def sent_events(app: Celery) -> SentEvents:
    """The app's batching dispatcher of ``task-sent`` events (one per app, made on first use)."""
    found = _sent_events.get(app)
    if found is None:
        with _sent_events_lock:
            found = _sent_events.get(app)
            if found is None:
                found = _sent_events[app] = SentEvents(app)
    return found


def flush_sent_events(app: Celery | None = None) -> None:
    """Publish the waiting ``task-sent`` events of ``app`` (of every app if None), as a
    process stops: its loop will not run the timer that would have."""
    for found in [_sent_events.get(app)] if app is not None else list(_sent_events.values()):
        if found is not None:
            found.flush_sent()


def _step_headers(nxt: Next) -> dict[str, Any]:
    """The headers of ``nxt``'s message besides Celery's own."""
    headers: dict[str, Any] = {
        "job_id": nxt.job_id,
        "provider": nxt.provider,
        "sent_at": round(time.time(), 3),
    }
    # The API request (or earlier step) that caused this one: the worker binds it to its lines.
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if request_id is not None:
        headers["request_id"] = request_id
    if tracing.enabled:
        # The span it is sent from (a step's, the API request's) is its parent; from outside
        # any span (a sweep) or from another trace's (a decision's request), the job's own
        # trace context.
        tracing.inject(headers, job_traceparent=nxt.trace)
    return headers


# app -> (task name, queue) -> how ``step_message`` builds its messages, None where only
# ``send_task`` may send: read once per app (the settings' lookups cost more than the rest).
_routes: weakref.WeakKeyDictionary[Celery, dict[tuple[str, str], StepRoute | None]] = (
    weakref.WeakKeyDictionary()
)


def _route(app: Celery, name: str, queue: str) -> StepRoute | None:
    known = _routes.setdefault(app, {})
    if (name, queue) not in known:
        known[name, queue] = step_message_route(app, name, queue)
    return known[name, queue]


def step_message_for(
    app: Celery, nxt: Next, *, parent: tuple[str, str] | None = None
) -> StepMessage | None:
    """The message ``send_task`` would write for ``nxt`` (``messaging.patches.step_message``),
    built but not sent; None where the copy does not apply (no step, ``step_message_route``,
    a worker's task as parent): send it with ``dispatch``. Sent by ``LPUSH``ing
    ``payload`` onto ``key`` of the broker's own Redis, then ``step_message_sent_by``.
    ``parent``: the (parent id, root id) of the worker's task whose step makes ``nxt`` due,
    as ``send_task`` in that task would set them."""
    if nxt.step is None:
        return None
    name, queue = STEP_TASKS[nxt.step], queue_for(nxt.step, nxt.provider)
    route = _route(app, name, queue)
    if route is None or app.current_worker_task is not None:
        return None
    task_args = [nxt.job_id, *nxt.args]
    return step_message(
        app,
        name,
        task_args,
        route=route,
        headers=_step_headers(nxt),
        argsrepr=repr(task_args),
        kwargsrepr="{}",
        parent_id=parent[0] if parent else None,
        root_id=parent[1] if parent else None,
    )


def step_message_sent_by(app: Celery, message: StepMessage) -> None:
    """What follows a ``step_message_for`` message's ``LPUSH``, as ``send_task`` does once it
    published: Celery's after-publish signals, its ``task-sent`` event into the app's batch
    (as ``dispatch``'s)."""
    step_message_sent(message)
    if message.sent_event is not None:
        sent_events(app).publish("task-sent", message.sent_event, None)


async def dispatch_async(app: Celery, redis: Redis, nxt: Next) -> None:
    """As ``dispatch``, sent on the running loop: the message ``send_task`` would write
    (``step_message_for``), ``LPUSH``ed by ``redis``, an asyncio client of the broker's own
    Redis (the caller knows it is: same URL), without blocking the loop on a round trip and
    kombu's publish. Returns once the message is in Redis; its ``task-sent`` event goes into
    the app's batch as ``dispatch``'s does. Sent by ``dispatch`` where the copy does not
    apply."""
    if nxt.step is None:
        return
    message = step_message_for(app, nxt)
    if message is None:
        dispatch(app, nxt)
        return
    await redis.lpush(message.key, message.payload)  # type: ignore[misc]  # redis-py's union
    step_message_sent_by(app, message)


def dispatch(app: Celery, nxt: Next) -> None:
    """Enqueue ``nxt`` (a step of a job, with its arguments) by task name on its queue; a
    ``Next`` without a step sends nothing."""
    if nxt.step is None:
        return
    task_args = [nxt.job_id, *nxt.args]
    headers = _step_headers(nxt)
    queue = queue_for(nxt.step, nxt.provider)
    with app.producer_or_acquire() as producer:
        # kombu declares a queue once per connection (``kombu.common._maybe_declare``, see
        # messaging.patches.UPSTREAM), but finds it declared only after binding a copy of the
        # queue and its exchange to the channel, on every publish: a fifth of the publish's
        # CPU. Its cache is asked here first, by its own key (a queue's hash, its name's);
        # not found there, kombu declares as before.
        entity = app.amqp.queues[queue]
        declared = (
            entity.can_cache_declaration and hash(entity) in producer.connection.declared_entities
        )
        app.send_task(
            STEP_TASKS[nxt.step],
            args=task_args,
            # Our own repr of the arguments (short strings): Celery's saferepr costs more.
            argsrepr=repr(task_args),
            kwargsrepr="{}",
            queue=queue,
            # Shown in Flower, and lets a poison-message handler name the job; ``sent_at``
            # tells the watchdog (and queue-latency metrics) how long the oldest message has
            # waited.
            headers=headers,
            # Nobody waits on a step's result (the job store has it). Without this, a
            # producer's send_task subscribes to the task's result channel and unsubscribes
            # again: two more Redis round trips per message (the Redis backend's on_task_call).
            ignore_result=True,
            event_dispatcher=sent_events(app),
            producer=producer,
            declare=[] if declared else None,
        )
