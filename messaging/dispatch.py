"""Sending a job's next step: ``dispatch``, by task name on the step's queue, with the
headers the workers and the watchdog read; Celery's ``task-sent`` events batched per app.
``dispatch_async``: the same message, written by an asyncio Redis client on the sender's
own loop (the API's, the billing consumer's) instead of kombu's blocking publish.
``ConfirmedPublisher``: on RabbitMQ, the same ``send_task`` from a thread of the loop's, which
waits for the broker's confirms of every message sent meanwhile at once."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from celery import Celery
from kombu.exceptions import OperationalError
from redis.asyncio import Redis

from cancelflow import tracing
from cancelflow.contract import CALLBACKS_QUEUE, STEP_TASKS, Step, provider_queue
from cancelflow.lifecycle import Next
from cancelflow.logging import get_logger
from messaging.patches import (
    SentEvents,
    StepMessage,
    StepRoute,
    step_message,
    step_message_route,
    step_message_sent,
)

log = get_logger(__name__)
T = TypeVar("T")


def queue_for(step: Step, provider: str) -> str:
    """The queue a step of a job of ``provider`` is sent on."""
    return CALLBACKS_QUEUE if step is Step.CALLBACK else provider_queue(provider)


_made_lock = threading.Lock()


def _one_per_app(
    made: weakref.WeakKeyDictionary[Celery, T], app: Celery, make: Callable[[Celery], T]
) -> T:
    """``made[app]``, made by ``make`` on first use (once, whichever thread asks first)."""
    found = made.get(app)
    if found is None:
        with _made_lock:
            found = made.get(app)
            if found is None:
                found = made[app] = make(app)
    return found


_sent_events: weakref.WeakKeyDictionary[Celery, SentEvents] = weakref.WeakKeyDictionary()


def sent_events(app: Celery) -> SentEvents:
    """The app's batching dispatcher of ``task-sent`` events (one per app, made on first use)."""
    return _one_per_app(_sent_events, app, SentEvents)


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
    with app.producer_or_acquire() as producer:
        _send(app, nxt, _step_headers(nxt), producer, sent_events(app))


def _send(
    app: Celery, nxt: Next, headers: dict[str, Any], producer: Any, events: Any, **kw: Any
) -> None:
    """``send_task`` of ``nxt``'s step (it has one) with ``producer``; its ``task-sent`` event
    to ``events``."""
    assert nxt.step is not None
    task_args = [nxt.job_id, *nxt.args]
    queue_name = queue_for(nxt.step, nxt.provider)
    # kombu declares a queue once per connection (``kombu.common._maybe_declare``, see
    # messaging.patches.UPSTREAM), but finds it declared only after binding a copy of the
    # queue and its exchange to the channel, on every publish: a fifth of the publish's
    # CPU. Its cache is asked here first, by its own key (a queue's hash, its name's);
    # not found there, kombu declares as before.
    entity = app.amqp.queues[queue_name]
    declared = (
        entity.can_cache_declaration and hash(entity) in producer.connection.declared_entities
    )
    app.send_task(
        STEP_TASKS[nxt.step],
        args=task_args,
        # Our own repr of the arguments (short strings): Celery's saferepr costs more.
        argsrepr=repr(task_args),
        kwargsrepr="{}",
        queue=queue_name,
        # Shown in Flower, and lets a poison-message handler name the job; ``sent_at``
        # tells the watchdog (and queue-latency metrics) how long the oldest message has
        # waited.
        headers=headers,
        # Nobody waits on a step's result (the job store has it). Without this, a
        # producer's send_task subscribes to the task's result channel and unsubscribes
        # again: two more Redis round trips per message (the Redis backend's on_task_call).
        ignore_result=True,
        event_dispatcher=events,
        producer=producer,
        declare=[] if declared else None,
        **kw,
    )


# --- RabbitMQ: a producer loop's steps sent from a thread, confirmed in batches -----------------


class _SentEvent:
    """Where ``send_task`` in the publisher's thread leaves its ``task-sent`` event: handed
    to the app's batch on the caller's loop once RabbitMQ confirmed the message."""

    __slots__ = ("fields",)

    def __init__(self) -> None:
        self.fields: dict[str, Any] | None = None

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **kwargs: Any) -> None:
        self.fields = fields


@dataclass(eq=False)
class _Pending:
    """A step a caller waits on: its message's delivery tag on the channel it was last
    published on, and how it ended (``done``, with ``error`` None when confirmed)."""

    nxt: Next
    headers: dict[str, Any]
    parent: tuple[str, str] | None
    reply_to: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    event: _SentEvent = field(default_factory=_SentEvent)
    tag: int = 0
    done: bool = False
    error: BaseException | None = None


def _settle(item: _Pending) -> None:
    if item.future.done():  # the caller stopped waiting (its request's timeout)
        return
    if item.error is not None:
        item.future.set_exception(item.error)
    else:
        item.future.set_result(None)


class _ConfirmTimeout(OperationalError):
    """No confirm in time: the batch fails without retrying (RabbitMQ may be blocking
    publishers, on a resource alarm)."""


class ConfirmedPublisher:
    """The steps an event loop sends on RabbitMQ (the API's and the billing consumer's first
    steps, a worker's next ones), sent as ``dispatch`` sends them, by one thread of the
    process: it publishes every step waiting, on a channel of its own in confirm mode,
    without waiting in between, then waits once for RabbitMQ's confirms of them all.
    ``dispatch`` on the loop would stop it for each confirm (on a quorum queue, until a
    majority of its replicas wrote the message); here the loop serves other requests and
    steps meanwhile, and a burst of them waits for one confirm, not one each.

    ``send`` returns once RabbitMQ confirmed the message, as ``dispatch`` does, and raises
    kombu's ``OperationalError`` when RabbitMQ refused it (a nack), gave no confirm within
    ``confirm_timeout_s``, or could not be reached in the publish retry policy's retries.
    A batch cut short by a lost connection is published again on a new one: a step sent
    twice is harmless (a step that finds its job moved on does nothing). The connection is
    closed after ``idle_s`` with nothing to send (no heartbeats to keep)."""

    def __init__(
        self,
        app: Celery,
        *,
        limit: int = 256,
        confirm_timeout_s: float = 10.0,
        idle_s: float = 5.0,
    ) -> None:
        self.app = app
        self.limit = limit
        self.confirm_timeout_s = confirm_timeout_s
        self.idle_s = idle_s
        policy = dict(app.conf.task_publish_retry_policy or {})
        self.retries = int(policy.get("max_retries") or 3)
        self.interval_s = float(policy.get("interval_step") or 0.2)
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # The thread's alone:
        self._conn: Any = None
        self._producer: Any = None
        self._published = 0  # on the current channel: its last message's delivery tag
        self._unconfirmed: dict[int, _Pending] = {}

    async def send(self, nxt: Next, *, parent: tuple[str, str] | None = None) -> None:
        """Send ``nxt`` (nothing for a ``Next`` without a step); returns once RabbitMQ
        confirmed it. Cancelled (its caller's timeout), the message may still be sent.
        ``parent``: the (parent id, root id) of the worker's task whose step makes ``nxt``
        due, as ``send_task`` in that task would set them."""
        if nxt.step is None:
            return
        loop = asyncio.get_running_loop()
        # The headers on the caller's side: the request id and trace are its context's, and
        # so is the reply address Celery gives a message (its thread's).
        item = _Pending(
            nxt, _step_headers(nxt), parent, self.app.thread_oid, loop, loop.create_future()
        )
        self._start()
        self._queue.put(item)
        await item.future
        if item.event.fields is not None:
            sent_events(self.app).publish("task-sent", item.event.fields, None)

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what waits, then stop the thread and close its connection."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)
            self._thread = None  # a later send starts another

    def _start(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    thread = threading.Thread(
                        target=self._run, name="cancelflow-publisher", daemon=True
                    )
                    thread.start()
                    self._thread = thread

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self.idle_s if self._conn else None)
                except queue.Empty:
                    self._drop()
                    continue
                if item is None:
                    return
                batch, stopping = [item], False
                while len(batch) < self.limit:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stopping = True
                        break
                    batch.append(more)
                self._publish(batch)
                if stopping:
                    return
        finally:
            self._drop()

    def _publish(self, batch: list[_Pending]) -> None:
        todo = [item for item in batch if not item.future.cancelled()]
        for attempt in range(self.retries + 1):
            try:
                self._publish_once(todo)
                break
            except Exception as exc:  # the connection's, the channel's, a timeout's
                self._drop()
                todo = [item for item in todo if not item.done]
                last = attempt == self.retries or isinstance(exc, _ConfirmTimeout)
                log.warning(
                    "dispatch.publish.failed",
                    messages=len(todo),
                    error=type(exc).__name__,
                    detail=str(exc),
                    retrying=not last,
                )
                if last:
                    error = OperationalError(f"RabbitMQ did not confirm the message: {exc!r}")
                    for item in todo:
                        item.done, item.error = True, error
                    break
                time.sleep(self.interval_s)
        for item in batch:
            with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits
                item.loop.call_soon_threadsafe(_settle, item)

    def _publish_once(self, todo: list[_Pending]) -> None:
        if self._conn is None:
            self._connect()
        for item in todo:
            self._published += 1
            item.tag = self._published
            self._unconfirmed[item.tag] = item
            ids = {"parent_id": item.parent[0], "root_id": item.parent[1]} if item.parent else {}
            _send(
                self.app,
                item.nxt,
                item.headers,
                self._producer,
                item.event,
                retry=False,
                reply_to=item.reply_to,
                **ids,
            )
        deadline = time.monotonic() + self.confirm_timeout_s
        while self._unconfirmed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _ConfirmTimeout(f"no confirm within {self.confirm_timeout_s} s")
            try:
                self._conn.drain_events(timeout=remaining)
            except TimeoutError:
                continue

    def _connect(self) -> None:
        # Confirms asked for on the channel itself (``confirm_select``), not by the
        # connection's ``confirm_publish``, whose publish waits for each.
        conn = self.app.connection_for_write(transport_options={"confirm_publish": False})
        try:
            conn.connect()
            channel = conn.channel()
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        self._conn, self._producer, self._published = conn, self.app.amqp.Producer(channel), 0

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._confirmed(tag, multiple, None)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._confirmed(tag, multiple, OperationalError("RabbitMQ refused the message (nack)"))

    def _confirmed(self, tag: int, multiple: bool, error: BaseException | None) -> None:
        tags = [t for t in self._unconfirmed if t <= tag] if multiple else [tag]
        for t in tags:
            item = self._unconfirmed.pop(t, None)
            if item is not None:
                item.done, item.error = True, error

    def _drop(self) -> None:
        conn, self._conn, self._producer = self._conn, None, None
        self._unconfirmed.clear()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


_publishers: weakref.WeakKeyDictionary[Celery, ConfirmedPublisher] = weakref.WeakKeyDictionary()


def confirmed_publisher(app: Celery) -> ConfirmedPublisher:
    """The process's ``ConfirmedPublisher`` of ``app`` (made on first use)."""
    return _one_per_app(_publishers, app, ConfirmedPublisher)


def close_publishers(app: Celery | None = None) -> None:
    """Stop ``app``'s publisher (every app's if None), once what waits is sent: a producer
    stopping."""
    for found in [_publishers.pop(app, None)] if app is not None else list(_publishers.values()):
        if found is not None:
            found.close()
    if app is None:
        _publishers.clear()
