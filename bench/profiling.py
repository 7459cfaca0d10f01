"""The profile run: where a job's time goes, and the Redis round trips it costs.

Cancelflow workers run under ``bench.probe`` (counted) for ``profile_jobs`` jobs with no added
latency; py-spy samples the first worker's CPU meanwhile (when it is installed and allowed to
attach). The job timelines give the stretches between steps (broker waits); the probes give
each step's time in the job store, the guard, the provider, the callback and sending the next
step, and the round trips per job of the producer (``submit``) and of the workers.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery

from bench import load, probe
from bench.load import Flight, Run, make_requests
from cancelflow.contract import CancellationRequest
from cancelflow.settings import Settings
from cancelflow.store import Created
from cancelflow.wiring import Deps
from producers.submit import submit

if TYPE_CHECKING:
    from bench.run import Config
    from bench.system import BenchSystem

STEPS = ("eligibility", "confirm", "callback", "consumer")
# Categories of the CPU profile, by the leaf frame's top-level package.
PACKAGES = {
    "redis": "redis-py",
    "kombu": "celery/kombu",
    "celery": "celery/kombu",
    "billiard": "celery/kombu",
    "vine": "celery/kombu",
    "amqp": "celery/kombu",
    "aiohttp": "aiohttp",
    "yarl": "aiohttp",
    "multidict": "aiohttp",
    "aiosignal": "aiohttp",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic",
    "structlog": "logging",
    "logging": "logging",
    "json": "json",
    "asyncio": "asyncio/threads/sockets",
    "selectors": "asyncio/threads/sockets",
    "concurrent": "asyncio/threads/sockets",
    "threading.py": "asyncio/threads/sockets",
    "queue.py": "asyncio/threads/sockets",
    "socket.py": "asyncio/threads/sockets",
    "cancelflow": "cancelflow + worker",
    "worker": "cancelflow + worker",
}
# Inclusive shares: samples with any frame in these files.
INCLUSIVE = {
    "task shells + steps (worker/tasks.py)": "worker/tasks.py",
    "job store (cancelflow/store.py)": "cancelflow/store.py",
    "provider HTTP (cancelflow/http.py)": "cancelflow/http.py",
    "callbacks (cancelflow/callbacks.py)": "cancelflow/callbacks.py",
    "logging (structlog + logging)": ("structlog/", "logging/"),
    "Celery task events (celery/events/)": "celery/events/",
    "publishing a message (kombu/messaging.py)": "kombu/messaging.py",
    "consuming + acking (kombu/transport/)": "kombu/transport/",
    "Celery tracing (celery/app/trace.py)": "celery/app/trace.py",
    "pydantic": "pydantic",
}


def _diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _read(paths: list[Path]) -> dict[str, dict[str, float]]:
    total: dict[str, dict[str, float]] = {"round_trips": {}, "seconds": {}, "tasks": {}}
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for key, into in total.items():
            for name, value in data[key].items():
                into[name] = into.get(name, 0.0) + value
    return total


def _fresh(paths: list[Path]) -> dict[str, dict[str, float]]:
    """The counters once every worker wrote them after this call."""
    time.sleep(1.2)
    return _read(paths)


def round_trips(
    worker: Mapping[str, float], producer: Mapping[str, float], jobs: int
) -> dict[str, Any]:
    """Round trips per job: totals, by side, and by step and command."""
    by_step: dict[str, dict[str, float]] = defaultdict(dict)
    sides: dict[str, float] = defaultdict(float)
    for key, n in worker.items():
        step, side, what = key.split("|", 2)
        by_step[f"worker {step}"][f"{side}: {what}"] = round(n / jobs, 2)
        sides[f"worker_{side}"] += n
    for key, n in producer.items():
        _, side, what = key.split("|", 2)
        by_step["producer (submit)"][what] = round(n / jobs, 2)
        sides["producer"] += n
    return {
        "total": round(sum(sides.values()) / jobs, 2),
        **{k: round(v / jobs, 2) for k, v in sorted(sides.items())},
        "by_step": {
            step: dict(sorted(v.items(), key=lambda kv: -kv[1]))
            for step, v in sorted(by_step.items())
        },
    }


def time_by_step(
    seconds: Mapping[str, float], tasks: Mapping[str, float]
) -> dict[str, dict[str, float]]:
    """Mean milliseconds per task of each step, by category (``other``: the rest of the task:
    Celery, loading the record into models, handing the coroutine to the loop)."""
    out: dict[str, dict[str, float]] = {}
    for step, n in tasks.items():
        cats = {k.split("|", 1)[1]: v for k, v in seconds.items() if k.split("|", 1)[0] == step}
        total = cats.pop("task", 0.0)
        row = {"tasks": n, "task_ms": round(total / n * 1000, 2)}
        for cat, value in sorted(cats.items()):
            row[f"{cat}_ms"] = round(value / n * 1000, 2)
        row["other_ms"] = round((total - sum(cats.values())) / n * 1000, 2)
        out[step] = row
    return out


def cpu_profile(raw: Path) -> dict[str, Any] | None:
    """py-spy's collapsed stacks as shares: self time by package, inclusive time of parts of
    Cancelflow, and the busiest leaf functions."""
    try:
        lines = raw.read_text().splitlines()
    except OSError:
        return None
    samples = 0
    by_package: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        samples += count
        frames = stack.split(";")
        leaf = frames[-1]
        path = leaf[leaf.rfind("(") + 1 :].split(":")[0]
        top = path.split("/")[0]
        by_package[PACKAGES.get(top, f"other ({top})")] += count
        leaves[leaf.rsplit(":", 1)[0] + ")"] += count
        for name, marker in INCLUSIVE.items():
            markers = marker if isinstance(marker, tuple) else (marker,)
            if any(m in stack for m in markers):
                inclusive[name] += count
    if not samples:
        return None

    def shares(c: Counter[str], k: int) -> dict[str, float]:
        return {name: round(v / samples, 3) for name, v in c.most_common(k)}

    return {
        "samples": samples,
        "self_by_package": shares(by_package, 12),
        "inclusive": shares(inclusive, len(INCLUSIVE)),
        "top_leaf_functions": shares(leaves, 15),
    }


def profile(
    system: BenchSystem, settings: Settings, cfg: Config, *, log: Callable[[str], None]
) -> dict[str, Any]:
    """Run ``cfg.profile_jobs`` jobs on counted workers; the profile (JSON-ready)."""
    probe_dir = Path(tempfile.mkdtemp(prefix="cancelflow-bench-probe-"))
    workers = system.start_workers("probe", cfg.workers, cfg.concurrency, probe_dir=probe_dir)
    paths = [probe_dir / f"{name}.json" for name in workers.names]
    producing: contextvars.ContextVar[bool] = contextvars.ContextVar("producing", default=False)
    probe.install_round_trips(enabled=producing.get)

    async def counted_submit(deps: Deps, celery: Celery, request: CancellationRequest) -> Created:
        token = producing.set(True)
        try:
            return await submit(deps, celery, request)
        finally:
            producing.reset(token)

    spy = start_py_spy(next(iter(workers.pids.values())), probe_dir / "py-spy.txt")
    try:
        requests = make_requests(system.sandbox_url, cfg.profile_jobs, cfg.providers, "profile")
        before = _fresh(paths)
        probe.ROUND_TRIPS.clear()
        flight = Flight()
        sent, records = asyncio.run(
            load.send_cancelflow(
                settings,
                requests,
                window=cfg.window,
                flight=flight,
                timeout_s=120 + cfg.profile_jobs,
                enqueue=counted_submit,
            )
        )
        after = _fresh(paths)
        producer = dict(probe.ROUND_TRIPS)
    finally:
        if spy is not None:
            stop_py_spy(spy)
        system.stop_workers(workers)
    run = Run.of_cancelflow("profile", sent, records)
    summary = run.summary()
    jobs = len(run.done)
    worker_rt = _diff(after["round_trips"], before["round_trips"])
    out = {
        "jobs": jobs,
        "jobs_per_s": summary["jobs_per_s"],
        "note": "counted workers (bench.probe) and py-spy slow the workers: figures are for "
        "proportions, not speed",
        "segments_ms": summary["segments_ms"],
        "time_by_step_ms": time_by_step(
            _diff(after["seconds"], before["seconds"]),
            _diff(after["tasks"], before["tasks"]),
        ),
        "round_trips_per_job": round_trips(worker_rt, producer, max(jobs, 1)),
        "cpu": cpu_profile(probe_dir / "py-spy.txt") if spy is not None else None,
    }
    rt = out["round_trips_per_job"]
    log(
        f"profile: {jobs} jobs, {rt['total']} Redis round trips per job "
        f"(producer {rt.get('producer')}, worker broker {rt.get('worker_broker')}, "
        f"worker store {rt.get('worker_store')})"
    )
    shutil.rmtree(probe_dir, ignore_errors=True)
    if cfg.baseline:
        out["baseline"] = profile_baseline(system, settings, cfg, log=log)
    return out


def profile_baseline(
    system: BenchSystem, settings: Settings, cfg: Config, *, log: Callable[[str], None]
) -> dict[str, Any]:
    """The baseline's cost per job, as ``profile`` counts Cancelflow's: ``cfg.profile_jobs``
    chains on baseline workers whose Redis round trips ``bench.probe`` counts (every one is
    the broker's: the baseline has no job store), the driver's ``apply_async`` counted too,
    and py-spy on the first worker."""
    probe_dir = Path(tempfile.mkdtemp(prefix="cancelflow-bench-probe-"))
    workers = system.start_workers(
        "baseline-probe", cfg.workers, cfg.concurrency, probe_dir=probe_dir
    )
    paths = [probe_dir / f"{name}.json" for name in workers.names]
    producing: contextvars.ContextVar[bool] = contextvars.ContextVar("producing", default=False)
    probe.install_round_trips(enabled=producing.get)
    spy = start_py_spy(next(iter(workers.pids.values())), probe_dir / "py-spy.txt")
    try:
        before = _fresh(paths)
        probe.ROUND_TRIPS.clear()
        token = producing.set(True)
        try:
            _, done = asyncio.run(
                load.send_baseline(
                    settings,
                    cfg.profile_jobs,
                    "profile",
                    window=cfg.window,
                    flight=Flight(),
                    timeout_s=120 + cfg.profile_jobs,
                )
            )
        finally:
            producing.reset(token)
        after = _fresh(paths)
        # ``apply_async`` is kombu's, synchronous; the driver's asyncio client (polling the
        # done list) is the bench's, not the baseline's.
        producer = {k: v for k, v in probe.ROUND_TRIPS.items() if k.split("|")[1] == "broker"}
    finally:
        if spy is not None:
            stop_py_spy(spy)
        system.stop_workers(workers)
    jobs = max(len(done), 1)
    worker_rt = _diff(after["round_trips"], before["round_trips"])
    rt = round_trips(worker_rt, producer, jobs)
    out = {
        "jobs": len(done),
        "round_trips_per_job": rt,
        "cpu": cpu_profile(probe_dir / "py-spy.txt") if spy is not None else None,
    }
    log(
        f"baseline profile: {len(done)} chains, {rt['total']} Redis round trips per job "
        f"(producer {rt.get('producer')}, worker broker {rt.get('worker_broker')})"
    )
    shutil.rmtree(probe_dir, ignore_errors=True)
    return out


def start_py_spy(
    pid: int, out: Path, *, gil: bool = True, pause: bool = False
) -> subprocess.Popen[bytes] | None:
    """py-spy sampling ``pid`` into ``out`` (raw stacks) until ``stop_py_spy``; None when it
    is not installed or may not attach. ``gil``: only samples holding the GIL (CPU work);
    ``pause``: stop the process for each sample (slower, but no stack is read half-changed)."""
    binary = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    if not Path(binary).exists():
        return None
    proc = subprocess.Popen(  # noqa: S603 - py-spy from the venv, our own arguments
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--format",
            "raw",
            *([] if pause else ["--nonblocking"]),
            *(["--gil"] if gil else []),
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return None if proc.poll() is not None else proc


def stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    """Stop sampling; py-spy writes its output as it stops."""
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
