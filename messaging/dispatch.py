"""Sending a job's next step: ``dispatch``, by task name on the step's queue, with the
headers the workers and the watchdog read; Celery's ``task-sent`` events batched per app."""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import structlog
from celery import Celery

from cancelflow.contract import CALLBACKS_QUEUE, STEP_TASKS, Step, provider_queue
from cancelflow.lifecycle import Next
from messaging.patches import SentEvents


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


def dispatch(app: Celery, nxt: Next) -> None:
    """Enqueue ``nxt`` (a step of a job, with its arguments) by task name on its queue; a
    ``Next`` without a step sends nothing."""
    if nxt.step is None:
        return
    task_args = [nxt.job_id, *nxt.args]
    headers: dict[str, Any] = {
        "job_id": nxt.job_id,
        "provider": nxt.provider,
        "sent_at": round(time.time(), 3),
    }
    # The API request (or earlier step) that caused this one: the worker binds it to its lines.
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if request_id is not None:
        headers["request_id"] = request_id
    app.send_task(
        STEP_TASKS[nxt.step],
        args=task_args,
        # Our own repr of the arguments (short strings): Celery's saferepr costs more.
        argsrepr=repr(task_args),
        kwargsrepr="{}",
        queue=queue_for(nxt.step, nxt.provider),
        # Shown in Flower, and lets a poison-message handler name the job; ``sent_at`` tells
        # the watchdog (and queue-latency metrics) how long the oldest message has waited.
        headers=headers,
        # Nobody waits on a step's result (the job store has it). Without this, a producer's
        # send_task subscribes to the task's result channel and unsubscribes again: two
        # more Redis round trips per message (the Redis backend's on_task_call).
        ignore_result=True,
        event_dispatcher=sent_events(app),
    )
