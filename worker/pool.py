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
``worker_prefetch_multiplier``), as with threads. ``grow`` and ``shrink`` (Celery's
``pool_grow`` / ``pool_shrink`` control commands, Flower's pool buttons) change the pool's
concurrency, from which Celery's command then moves the prefetch by as many steps.

Time limits (Celery's ``task_soft_time_limit`` / ``task_time_limit`` or a task's own, given
to ``on_apply`` as ``soft_timeout`` / ``timeout``; Celery's own pools apply them, its threads
pool drops them). A step's coroutine half runs under ``asyncio.timeout`` at the hard limit:
past it the coroutine is cancelled and the task raises ``TimeLimitExceeded`` (Celery then
requeues the acks_late message). Within it, ``soft_time_limit()`` bounds what the step calls
by the soft limit and raises ``SoftTimeLimitExceeded`` there, so the step can still record a
retry before the hard limit. A task run in a thread waits on the loop through
``run_limited``, bounded by its soft limit; a thread still running at its hard limit (stuck
outside the loop: threads cannot be stopped) is failed with ``TimeLimitExceeded`` by a timer
on the loop, and its late end is ignored.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from celery.concurrency.base import apply_target
from celery.concurrency.thread import ApplyResult
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from kombu.serialization import loads, prepare_accept_content

from cancelflow import tracing
from messaging.patches import LoopPoolBase, trace_args, with_decoded_body

if TYPE_CHECKING:
    from worker.runtime import Runtime

T = TypeVar("T")

# (task id, what its coroutine half came to, or the exception it raised), for the task body
# the tracer runs right after, in the same context.
_PREPARED: contextvars.ContextVar[tuple[str, Any, BaseException | None] | None] = (
    contextvars.ContextVar("cancelflow_prepared", default=None)
)


# The running task's soft limit: a deadline on the loop's clock (a step) or on
# time.monotonic (a task in a thread), and the limit in seconds, for the error.
_SOFT_AT: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "cancelflow_soft_at", default=None
)


@asynccontextmanager
async def soft_time_limit() -> AsyncIterator[None]:
    """Bound the block by the running step's soft time limit: past it, the block is
    cancelled and ``SoftTimeLimitExceeded`` raised (no limit outside the pool)."""
    found = _SOFT_AT.get()
    if found is None:
        yield
        return
    deadline, limit = found
    timeout = asyncio.timeout_at(deadline)
    try:
        async with timeout:
            yield
    except TimeoutError as exc:
        if timeout.expired():
            raise SoftTimeLimitExceeded(limit) from exc
        raise


def run_limited(runtime: Runtime, coro: Coroutine[Any, Any, T]) -> T:
    """``runtime.run(coro)`` from a task's thread, bounded by the task's soft time limit:
    past it, the coroutine is cancelled and ``SoftTimeLimitExceeded`` raised."""
    found = _SOFT_AT.get()
    if found is None:
        return runtime.run(coro)
    deadline, limit = found
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        coro.close()
        raise SoftTimeLimitExceeded(limit)
    try:
        return runtime.run(coro, timeout=remaining)
    except FutureTimeout as exc:  # runtime.run cancelled the coroutine on the loop
        raise SoftTimeLimitExceeded(limit) from exc


def prepared(task_id: str | None) -> Any:
    """What the pool's run of task ``task_id``'s coroutine half returned (None if it did not
    run it); an exception it raised is raised here, in the task, as if raised by the task."""
    found = _PREPARED.get()
    if found is None or found[0] != task_id:
        return None
    if found[2] is not None:
        raise found[2]
    return found[1]


class TaskPool(LoopPoolBase):
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
            from worker.app import settings_of
            from worker.runtime import get_runtime

            self._loop = get_runtime(settings_of(self.app)).loop
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
        soft = options.get("soft_timeout") or None
        hard = options.get("timeout") or None
        if args is None or getattr(task, "run_async", None) is None:
            return self._in_thread(
                target,
                args,
                kwargs,
                callback,
                accept_callback,
                soft,
                hard,
                options.get("timeout_callback"),
            )
        future = asyncio.run_coroutine_threadsafe(
            self._apply(task, target, args, kwargs, callback, accept_callback, soft, hard),
            self.loop(),
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
        soft: float | None = None,
        hard: float | None = None,
    ) -> None:
        task_id, request, body, content_type, content_encoding = trace_args(args)
        if accept_callback:
            accept_callback(os.getpid(), time.monotonic())
        result: Any = None
        error: BaseException | None = None
        # The step's span (cancelflow.tracing, off by default), parented by its message's
        # traceparent: opened here, where the step's I/O starts, not at Celery's
        # task_prerun, and current until the tracer sent the next step (its child).
        scope = tracing.step_scope(task.name, request) if tracing.enabled else None
        now = asyncio.get_running_loop().time()
        if soft:
            # This coroutine runs in a context of its own (a task of the loop's).
            _SOFT_AT.set((now + soft, soft))
        limit = asyncio.timeout_at(now + hard if hard else None)
        try:
            if content_type:
                body = loads(  # type: ignore[no-untyped-call]  # kombu leaves it unannotated
                    body, content_type, content_encoding, accept=self._accept
                )
                # Decoded once: the tracer takes it as it is.
                args = with_decoded_body(args, body)
            task_args, task_kwargs, _embed = body
            async with limit:
                result = await task.run_async(task_args, task_kwargs, request)
        except TimeoutError as exc:
            error = TimeLimitExceeded(hard) if limit.expired() else exc
        except Exception as exc:  # raised in the task by the tracer, as a thread would
            error = exc
        token = _PREPARED.set((task_id, result, error))
        try:
            apply_target(target, args, kwargs, callback)
        finally:
            _PREPARED.reset(token)
            if scope is not None:
                scope.end(error)

    def _in_thread(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None,
        kwargs: dict[str, Any] | None,
        callback: Callable[..., Any] | None,
        accept_callback: Callable[..., Any] | None,
        soft: float | None,
        hard: float | None,
        timeout_callback: Callable[..., Any] | None,
    ) -> ApplyResult:
        """Run the task in one of the threads, under its limits (see the module)."""
        ended = threading.Lock()  # taken once: by the task's end or by its hard limit

        def run(*a: Any, **kw: Any) -> Any:
            token = _SOFT_AT.set((time.monotonic() + soft, soft) if soft else None)
            try:
                return target(*a, **kw)
            finally:
                _SOFT_AT.reset(token)

        def on_end(result: Any) -> None:
            if ended.acquire(blocking=False) and callback is not None:
                callback(result)

        future = self.executor.submit(apply_target, run, args, kwargs, on_end, accept_callback)
        if hard and timeout_callback is not None:

            def at_hard_limit() -> None:
                if not future.done() and ended.acquire(blocking=False):
                    # Celery's handling of a hard limit: the task fails with
                    # TimeLimitExceeded and, acks_late, its message is requeued.
                    timeout_callback(False, hard)

            loop = self.loop()
            loop.call_soon_threadsafe(loop.call_later, hard, at_hard_limit)
        return ApplyResult(future)

    def grow(self, n: int = 1) -> None:
        """Run ``n`` more steps at once: Celery's ``pool_grow`` command raises the consumer's
        prefetch right after, from ``num_processes`` (``Consumer._update_prefetch_count``).
        The maintenance tasks' threads stay as many (they are few and short)."""
        if n < 1:
            raise ValueError(f"cannot grow the pool by {n}: give a positive number of steps")
        self.limit += n

    def shrink(self, n: int = 1) -> None:
        """Run ``n`` fewer steps at once (the prefetch follows, as for ``grow``); steps
        already taken run to their end. Refused below one step at once."""
        if n < 1 or n >= self.limit:
            raise ValueError(
                f"cannot shrink the pool by {n}: it runs {self.limit} step(s) at once, "
                "and must keep at least one"
            )
        self.limit -= n

    def on_stop(self) -> None:
        # A warm shutdown lets the steps under way end (and be acknowledged) first.
        wait(list(self._on_loop))
        super().on_stop()

    def on_loop_count(self) -> int:
        return len(self._on_loop)
