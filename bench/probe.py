"""Counting inside a process: Redis round trips and where each task's time goes.

``python -m bench.probe worker ...`` runs ``cancelflow worker ...`` with this installed and
writes its counters to ``$BENCH_PROBE_OUT`` twice a second. Only the profile run uses it:
the scored scenarios run plain workers.

- A round trip is one write of commands to a Redis connection (``send_packed_command``): a
  command, a pipeline or a script call; labelled by its commands (scripts by name). Sync
  connections are the broker's (kombu, Celery events), async ones the job store's and the
  guard's (``redis.asyncio``).
- Each is counted against the step whose task made it (a context variable set when
  ``worker.pool`` starts the task on the loop; its coroutine, Celery's tracer, the next
  step's send and the acknowledgement all run in it), or ``consumer`` for the worker's own
  consuming and event sending.
- Time: per step, the task's whole run and the time spent awaiting the job store, the guard,
  the provider's HTTP, the callback's HTTP, and sending the next step.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEP: contextvars.ContextVar[str] = contextvars.ContextVar("bench_step", default="consumer")
_lock = threading.Lock()
ROUND_TRIPS: Counter[str] = Counter()  # "step|side|label"
SECONDS: dict[str, float] = defaultdict(float)  # "step|category"
TASKS: Counter[str] = Counter()  # step
_SCRIPTS: dict[str, str] = {}


def _script_names() -> dict[str, str]:
    from cancelflow import guard, store
    from producers import ratelimit

    scripts = {
        "create": store._CREATE,
        "transition": store._TRANSITION,
        "guard.admit": guard._ADMIT,
        "guard.release": guard._RELEASE,
        "ratelimit": ratelimit._GCRA,
        # Scripts a given version of the store may not have.
        **{
            name: script
            for name, attr in (("add_callback", "_ADD_CALLBACK"),)
            if (script := getattr(store, attr, None)) is not None
        },
    }
    return {hashlib.sha1(s.encode()).hexdigest(): name for name, s in scripts.items()}  # noqa: S324 - Redis's script id


def commands(packed: Any) -> list[str]:
    """The command names in a packed RESP payload (scripts by name)."""
    data = packed if isinstance(packed, bytes) else b"".join(bytes(p) for p in packed)
    names: list[str] = []
    i = 0
    while i < len(data) and data[i : i + 1] == b"*":
        j = data.index(b"\r\n", i)
        count, i = int(data[i + 1 : j]), j + 2
        for k in range(count):
            j = data.index(b"\r\n", i)
            size, i = int(data[i + 1 : j]), j + 2
            if k == 0:
                names.append(data[i : i + size].decode().upper())
            elif k == 1 and names[-1] in ("EVALSHA", "EVAL"):
                sha = data[i : i + size].decode()
                names[-1] = f"EVALSHA {_SCRIPTS.get(sha, sha[:8])}"
            i += size + 2
    return names


def label(packed: Any) -> str:
    names = commands(packed)
    return names[0] if len(names) == 1 else f"pipeline[{' '.join(names)}]"


def count(side: str, packed: Any) -> None:
    key = f"{STEP.get()}|{side}|{label(packed)}"
    with _lock:
        ROUND_TRIPS[key] += 1


def add_time(category: str, seconds: float) -> None:
    with _lock:
        SECONDS[f"{STEP.get()}|{category}"] += seconds


_ENABLED: list[Callable[[], bool]] = []


def install_round_trips(enabled: Callable[[], bool] = lambda: True) -> None:
    """Count every round trip of this process's Redis connections (while ``enabled()``; a
    second call only replaces ``enabled``)."""
    import redis.asyncio.connection as aconn
    import redis.connection as conn

    installed = bool(_ENABLED)
    _ENABLED[:] = [enabled]
    if installed:
        return
    _SCRIPTS.update(_script_names())
    sync_send = conn.AbstractConnection.send_packed_command
    async_send = aconn.AbstractConnection.send_packed_command

    @functools.wraps(sync_send)
    def send(self: Any, command: Any, check_health: bool = True) -> None:
        if _ENABLED[0]():
            count("broker", command)
        sync_send(self, command, check_health)  # type: ignore[no-untyped-call]

    @functools.wraps(async_send)
    async def asend(self: Any, command: Any, check_health: bool = True) -> None:
        if _ENABLED[0]():
            count("store", command)
        await async_send(self, command, check_health)

    conn.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
    aconn.AbstractConnection.send_packed_command = asend  # type: ignore[method-assign]


def _timed_async(owner: Any, name: str, category: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            add_time(category, time.perf_counter() - started)

    setattr(owner, name, timed)


def _timed_sync(owner: Any, name: str, category: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            add_time(category, time.perf_counter() - started)

    setattr(owner, name, timed)


def install_worker_timers() -> None:
    """Time the job store, the guard, provider and callback HTTP, and sending the next step,
    per step; and each task as a whole."""
    import worker.tasks
    from cancelflow import callbacks
    from cancelflow.guard import ProviderGuard
    from cancelflow.http import ProviderHttp
    from cancelflow.store import JobStore

    for name in ("get", "transition", "record", "add_callback_attempt", "status"):
        _timed_async(JobStore, name, "job_store")
    _timed_async(ProviderGuard, "admit", "guard")
    _timed_async(ProviderGuard, "release", "guard")
    _timed_async(ProviderHttp, "_send", "provider_http")
    _timed_async(callbacks, "deliver", "callback_http")
    _timed_async(callbacks, "check_url", "callback_url_check")
    _timed_sync(worker.tasks, "dispatch", "send_next_step")
    _time_tasks()


def _time_tasks() -> None:
    """Each step task as a whole, from the pool starting it on the loop to its ack; the
    step's name is set for everything it does (the tracer runs in the same context)."""
    from worker.pool import TaskPool

    apply = TaskPool._apply

    async def timed_apply(self: Any, task: Any, *args: Any, **kwargs: Any) -> Any:
        step = str(task.name).rsplit(".", 1)[-1]
        token = STEP.set(step)
        started = time.perf_counter()
        try:
            return await apply(self, task, *args, **kwargs)
        finally:
            add_time("task", time.perf_counter() - started)
            with _lock:
                TASKS[step] += 1
            STEP.reset(token)

    TaskPool._apply = timed_apply  # type: ignore[method-assign]


def snapshot() -> dict[str, Any]:
    with _lock:
        return {
            "pid": os.getpid(),
            "round_trips": dict(ROUND_TRIPS),
            "seconds": dict(SECONDS),
            "tasks": dict(TASKS),
        }


def _writer(path: Path) -> None:
    while True:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(snapshot()))
        tmp.replace(path)
        time.sleep(0.5)


def main() -> None:
    """``python -m bench.probe ARGS``: ``cancelflow ARGS``, counted; ``python -m bench.probe
    celery ARGS``: ``celery ARGS`` (the baseline's worker), its round trips counted."""
    baseline = sys.argv[1:2] == ["celery"]
    install_round_trips()
    if not baseline:
        install_worker_timers()
    out = os.environ.get("BENCH_PROBE_OUT")
    if out:
        threading.Thread(target=_writer, args=(Path(out),), daemon=True, name="bench-probe").start()
    if baseline:
        from celery.__main__ import main as celery

        sys.argv = ["celery", *sys.argv[2:]]
        celery()
        return
    from producers.cli import main as cancelflow

    sys.argv = ["cancelflow", *sys.argv[1:]]
    cancelflow()


if __name__ == "__main__":
    main()
