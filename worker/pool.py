"""The workers' Celery pool: a step's work runs on the runtime's event loop, not in a thread.

Celery's threads pool gives every task a thread; a step's thread handed its coroutine to the
runtime's loop and waited for it, so each step crossed three threads (the consumer, the
task's, the loop's) and a hundred threads took turns at the GIL. Here a task that has a
coroutine half (``run_async``, the step tasks) is started on the loop straight from the
consumer; once that coroutine ended, Celery's own tracer runs the task on the loop (signals,
sending the next step or a retry, events) and its callback acknowledges the message, exactly
as it would in a thread. Only those last Redis writes block the loop, each one round trip.
Tasks without a coroutine half (the maintenance sweeps) run in threads as before.

How many steps run at once is the consumer's prefetch (``--concurrency`` x
``worker_prefetch_multiplier``), as with threads.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from celery.concurrency.base import apply_target
from celery.concurrency.thread import ApplyResult
from celery.concurrency.thread import TaskPool as ThreadsPool
from kombu.serialization import loads, prepare_accept_content

# (task id, what its coroutine half came to, or the exception it raised), for the task body
# the tracer runs right after, in the same context.
_PREPARED: contextvars.ContextVar[tuple[str, Any, BaseException | None] | None] = (
    contextvars.ContextVar("cancelflow_prepared", default=None)
)


def prepared(task_id: str | None) -> Any:
    """What the pool's run of task ``task_id``'s coroutine half returned (None if it did not
    run it); an exception it raised is raised here, in the task, as if raised by the task."""
    found = _PREPARED.get()
    if found is None or found[0] != task_id:
        return None
    if found[2] is not None:
        raise found[2]
    return found[1]


class TaskPool(ThreadsPool):  # type: ignore[misc]  # Celery is untyped
    """``worker_pool = "worker.pool:TaskPool"``; see the module's docstring."""

    def __init__(
        self, *args: Any, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._on_loop: set[Future[None]] = set()
        # The runtime's loop (built on first use); a test may give its own.
        self._loop = loop
        self._accept = prepare_accept_content(self.app.conf.accept_content)  # type: ignore[no-untyped-call]

    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            from worker.app import settings
            from worker.runtime import get_runtime

            self._loop = get_runtime(settings).loop
        return self._loop

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        **options: Any,
    ) -> ApplyResult:
        task = self.app.tasks.get(args[0]) if args else None
        if args is None or getattr(task, "run_async", None) is None:
            return super().on_apply(target, args, kwargs, callback, accept_callback, **options)
        future = asyncio.run_coroutine_threadsafe(
            self._apply(task, target, args, kwargs, callback, accept_callback), self.loop()
        )
        self._on_loop.add(future)
        future.add_done_callback(self._on_loop.discard)
        return ApplyResult(future)

    async def _apply(
        self,
        task: Any,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        callback: Callable[..., Any] | None,
        accept_callback: Callable[..., Any] | None,
    ) -> None:
        # The tracer's arguments: (task name, task id, request, body, content type, encoding).
        _, task_id, request, body, content_type, content_encoding = args
        if accept_callback:
            accept_callback(os.getpid(), time.monotonic())
        result: Any = None
        error: BaseException | None = None
        try:
            if content_type:
                body = loads(  # type: ignore[no-untyped-call]  # kombu leaves it unannotated
                    body, content_type, content_encoding, accept=self._accept
                )
            task_args, task_kwargs, _embed = body
            result = await task.run_async(task_args, task_kwargs, request)
        except Exception as exc:  # raised in the task by the tracer, as a thread would
            error = exc
        token = _PREPARED.set((task_id, result, error))
        try:
            apply_target(target, args, kwargs, callback)
        finally:
            _PREPARED.reset(token)

    def on_stop(self) -> None:
        # A warm shutdown lets the steps under way end (and be acknowledged) first.
        wait(list(self._on_loop))
        super().on_stop()

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info["on-loop"] = len(self._on_loop)
        return info
