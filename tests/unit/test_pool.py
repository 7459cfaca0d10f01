"""worker.pool: a task's coroutine half runs on the loop, then Celery's tracer runs the task
there with its outcome; other tasks run in threads; a stop waits for steps under way.

The pool is driven as a Celery worker drives it (``apply_async`` with Celery's own tracer and
the task message's parts), on a real event loop in its own thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from celery import Celery, Task
from celery.app.trace import trace_task_ret
from celery.exceptions import Retry, SoftTimeLimitExceeded, TimeLimitExceeded

from cancelflow.settings import Settings
from worker import pool as pool_module
from worker.pool import TaskPool
from worker.runtime import Runtime

app = Celery("pool-test", broker="memory://", set_as_current=False)
app.conf.accept_content = ["json"]
seen: dict[str, Any] = {}
# Longer than any wait on a result below: a step that sleeps this long and still answers in
# time was ended by its limit (no wall-clock bound in the assertions).
ENDLESS_S = 600
gate = asyncio.Event()
unstuck = threading.Event()  # lets a maintenance task stuck outside the loop end


class TwoHalves(Task):  # type: ignore[misc]
    async def run_async(self, args: Any, kwargs: Any, request: Any) -> str | BaseException:
        seen["coroutine"] = threading.current_thread()
        seen["request_id"] = request["id"]
        if args[0] == "fail":
            raise ValueError("the coroutine failed")
        if args[0] == "wait":
            await gate.wait()
        if args[0] in ("slow", "endless"):  # a step's call, in its soft limit
            try:
                async with pool_module.soft_time_limit():
                    await asyncio.sleep(1 if args[0] == "slow" else ENDLESS_S)
            except SoftTimeLimitExceeded as exc:
                limit: BaseException = exc  # Celery is untyped
                return limit  # the body retries, as a step's does
        if args[0] == "stuck":  # ignores its soft limit: only the hard one ends it
            try:
                await asyncio.sleep(ENDLESS_S)
            except asyncio.CancelledError:
                seen["cancelled"] = True
                raise
        return f"prepared {args[0]}"


@app.task(base=TwoHalves, bind=True, name="test.two_halves")  # type: ignore[untyped-decorator]
def two_halves(self: Task, *args: Any) -> Any:
    seen["body"] = threading.current_thread()
    outcome = pool_module.prepared(self.request.id)
    if isinstance(outcome, SoftTimeLimitExceeded):
        raise self.retry(countdown=1, exc=outcome, max_retries=None)
    return outcome


runtime: Runtime | None = None


@app.task(name="test.sweep")  # type: ignore[untyped-decorator]
def sweep(how: str) -> str:
    """A maintenance task: waits on the runtime's loop, or (stuck) outside it."""
    if how == "stuck":
        unstuck.wait(ENDLESS_S)
        seen["sweep_ended_late"] = True
        return "ended late"

    async def slow() -> None:
        try:
            await asyncio.sleep(ENDLESS_S)
        except asyncio.CancelledError:
            seen["sweep_cancelled"] = True
            raise

    assert runtime is not None
    pool_module.run_limited(runtime, slow())
    return "ran its full second"


@app.task(name="test.plain")  # type: ignore[untyped-decorator]
def plain(x: int) -> int:
    seen["plain"] = threading.current_thread()
    return x * 2


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture
def pool(loop: asyncio.AbstractEventLoop) -> Iterator[TaskPool]:
    seen.clear()
    p = TaskPool(limit=4, app=app, loop=loop)
    p.start()
    yield p
    p.stop()


def apply(pool: TaskPool, name: str, task_id: str, *args: Any, **options: Any) -> Future[Any]:
    """Hand one task message to the pool as Celery's worker does; resolves to the tracer's
    (failed, result, runtime) given to the callback. ``options``: Celery's (soft_timeout,
    timeout, timeout_callback)."""
    done: Future[Any] = Future()
    accepted: list[int] = []
    body = json.dumps([list(args), {}, {}])
    pool.apply_async(
        trace_task_ret,
        args=(name, task_id, {"id": task_id}, body, "application/json", "utf-8"),
        kwargs={"app": app},
        callback=done.set_result,
        accept_callback=lambda pid, when: accepted.append(pid),
        **options,
    )
    done.add_done_callback(lambda _: seen.setdefault("accepted", accepted))
    return done


def test_the_coroutine_runs_on_the_loop_and_the_task_settles_its_outcome(
    pool: TaskPool, loop: asyncio.AbstractEventLoop
) -> None:
    failed, result, _ = apply(pool, "test.two_halves", "id-1", "a").result(10)
    assert (failed, result) == (0, "'prepared a'")
    loop_thread = seen["coroutine"]
    assert loop_thread.name == "test-loop"
    assert seen["body"] is loop_thread, "Celery's tracer ran the task on the loop too"
    assert seen["request_id"] == "id-1"
    assert seen["accepted"], "the worker was told the task started"


def test_an_exception_of_the_coroutine_is_raised_by_the_task(pool: TaskPool) -> None:
    failed, info, _ = apply(pool, "test.two_halves", "id-2", "fail").result(10)
    assert failed == 1
    assert isinstance(info.exception, ValueError)
    assert "the coroutine failed" in str(info.exception)


def test_a_task_without_a_coroutine_half_runs_in_a_thread(pool: TaskPool) -> None:
    failed, result, _ = apply(pool, "test.plain", "id-3", 21).result(10)
    assert (failed, result) == (0, "42")
    assert seen["plain"].name != "test-loop"
    assert seen["plain"] is not threading.main_thread()


def test_outside_the_pool_a_task_finds_nothing_prepared() -> None:
    assert pool_module.prepared("id-4") is None


def test_stop_waits_for_the_steps_under_way(
    pool: TaskPool, loop: asyncio.AbstractEventLoop
) -> None:
    loop.call_soon_threadsafe(gate.clear)
    done = apply(pool, "test.two_halves", "id-5", "wait")
    stopper = threading.Thread(target=pool.stop)
    stopper.start()
    stopper.join(0.5)
    assert stopper.is_alive(), "stop returned while a step was still running"
    assert not done.done()
    loop.call_soon_threadsafe(gate.set)
    stopper.join(10)
    assert not stopper.is_alive()
    assert done.result(0)[:2] == (0, "'prepared wait'")


LIMITS = {"soft_timeout": 0.1, "timeout": 0.2}


def test_a_step_past_its_soft_limit_is_cancelled_there_and_retried(pool: TaskPool) -> None:
    failed, info, _ = apply(pool, "test.two_halves", "id-6", "endless", **LIMITS).result(30)
    assert failed == 1
    retry = getattr(info.exception, "exc", info.exception)  # Celery's ExceptionWithTraceback
    assert isinstance(retry, Retry)
    assert isinstance(retry.exc, SoftTimeLimitExceeded)


def test_a_step_past_its_hard_limit_is_cancelled_and_fails_with_time_limit_exceeded(
    pool: TaskPool,
) -> None:
    failed, info, _ = apply(pool, "test.two_halves", "id-7", "stuck", **LIMITS).result(30)
    assert failed == 1
    assert isinstance(info.exception, TimeLimitExceeded)
    assert seen["cancelled"], "the coroutine was cancelled, not left running"


def test_without_limits_a_step_runs_to_its_end(pool: TaskPool) -> None:
    failed, info, _ = apply(pool, "test.two_halves", "id-8", "slow").result(10)
    assert (failed, info) == (0, "'prepared slow'")


@pytest.fixture
def real_runtime() -> Iterator[Runtime]:
    """The worker's runtime (its own loop; Redis is not reached by these tests)."""
    global runtime
    runtime = Runtime(Settings(redis_url="redis://127.0.0.1:1/0"))
    yield runtime
    runtime.close()
    runtime = None


def test_a_maintenance_task_past_its_soft_limit_is_cancelled_there_and_fails(
    pool: TaskPool, real_runtime: Runtime
) -> None:
    failed, info, _ = apply(pool, "test.sweep", "id-9", "slow", **LIMITS).result(30)
    assert failed == 1
    assert isinstance(info.exception, SoftTimeLimitExceeded)
    deadline = time.monotonic() + 2
    while "sweep_cancelled" not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen["sweep_cancelled"], "its coroutine was cancelled on the loop"


def test_a_maintenance_task_stuck_past_its_hard_limit_is_failed_by_the_pool(
    pool: TaskPool,
) -> None:
    timed_out: Future[tuple[bool, float]] = Future()
    unstuck.clear()
    done = apply(
        pool,
        "test.sweep",
        "id-10",
        "stuck",
        **LIMITS,
        timeout_callback=lambda soft, limit: timed_out.set_result((soft, limit)),
    )
    try:
        assert timed_out.result(30) == (False, 0.2), "Celery's hard-limit handler was called"
        assert not done.done(), "reported while the task is still stuck in its thread"
    finally:
        unstuck.set()
    deadline = time.monotonic() + 30
    while "sweep_ended_late" not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen["sweep_ended_late"]
    time.sleep(0.1)  # the pool's handling of the thread's return, if it had any
    assert not done.done(), "the thread's late end was not reported as well"
