"""Sending jobs and timing them.

Cancelflow jobs go through the producers' enqueue path (``producers.submit.submit``: the job
record, then the first step by name), baseline chains through ``apply_async``; both from this
process, at most ``window`` jobs in flight. A Cancelflow job is complete when its callback is
recorded (its last task), a baseline chain when its last task ran. Times come from the job
timelines (ms precision) and the driver's clock; all processes share one machine's clock.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis.asyncio as aredis
from celery import Celery

from bench import baseline
from cancelflow.contract import CancellationRequest, JobRecord
from cancelflow.settings import Settings
from cancelflow.store import Created, job_key
from cancelflow.wiring import Deps, build_deps, redis_client
from messaging.config import create_celery
from producers.local import http_json
from producers.submit import submit
from sandboxes.server import SANDBOXES


def kind_of(key: str) -> str:
    """The sandbox kind a job of ``key`` is made of: eligible, and it cancels (eligibility ->
    confirm -> callback, three tasks, as the baseline's chains)."""
    return SANDBOXES[key].succeeding_kinds[0]


def make_requests(
    sandbox_url: str, count: int, providers: Iterable[str], tag: str
) -> list[CancellationRequest]:
    """``count`` requests for fresh sandbox subscriptions, round-robin over ``providers``, each
    with a callback to the sandbox's receiver."""
    keys = list(providers)
    refs: dict[str, list[Any]] = {}
    for n, key in enumerate(keys):
        share = count // len(keys) + (1 if n < count % len(keys) else 0)
        if share == 0:
            continue
        status, body = http_json(
            "POST",
            f"{sandbox_url}/{key}/_sandbox/subscriptions",
            {"count": share, "kind": kind_of(key)},
        )
        if status != 200:
            raise RuntimeError(f"sandbox refused {share} {key} subscriptions: {body}")
        refs[key] = list(body["references"])
    out = []
    for i in range(count):
        key = keys[i % len(keys)]
        out.append(
            CancellationRequest.model_validate(
                {
                    "provider": key,
                    "subscription": SANDBOXES[key].subscription(refs[key].pop()),
                    "reason": {"code": "too_expensive"},
                    "callback_url": f"{sandbox_url}/receiver/events",
                    "idempotency_key": f"bench-{tag}-{i}",
                }
            )
        )
    return out


@dataclass
class Flight:
    """Jobs sent and not yet seen complete (read by the RSS sampler's thread)."""

    count: int = 0


async def drive(
    n: int,
    send: Callable[[int], Awaitable[str]],
    completed: Callable[[set[str]], Awaitable[set[str]]],
    *,
    window: int,
    flight: Flight,
    timeout_s: float,
    poll_s: float = 0.1,
) -> dict[str, float]:
    """Send ``n`` jobs, never more than ``window`` in flight; the time each was sent."""
    sent: dict[str, float] = {}
    pending: set[str] = set()
    room = asyncio.Event()
    deadline = time.monotonic() + timeout_s
    sending_done = False

    async def poll() -> None:
        while (not sending_done or pending) and time.monotonic() < deadline:
            if pending:
                pending.difference_update(await completed(set(pending)))
                flight.count = len(pending)
                if len(pending) < window:
                    room.set()
            await asyncio.sleep(poll_s)

    poller = asyncio.create_task(poll())
    try:
        for i in range(n):
            while len(pending) >= window:
                room.clear()
                await asyncio.wait_for(room.wait(), timeout=max(0.1, deadline - time.monotonic()))
            started = time.time()
            job_id = await send(i)
            sent[job_id] = started
            pending.add(job_id)
            flight.count = len(pending)
        sending_done = True
        await poller
    finally:
        sending_done = True
        poller.cancel()
    flight.count = len(pending)
    return sent


# The 1-based indices of KEYS whose list is not empty: the jobs whose callback step recorded
# an attempt.
_DELIVERED = """
local found = {}
for i, key in ipairs(KEYS) do
    if redis.call('LLEN', key) > 0 then found[#found + 1] = i end
end
return found
"""

Enqueue = Callable[[Deps, Celery, CancellationRequest], Awaitable[Created]]


async def send_cancelflow(
    settings: Settings,
    requests: list[CancellationRequest],
    *,
    window: int,
    flight: Flight,
    timeout_s: float,
    enqueue: Enqueue = submit,
) -> tuple[dict[str, float], list[JobRecord]]:
    """Enqueue each request as a producer does (``enqueue``: ``producers.submit.submit``);
    the send times and the final job records."""
    redis = redis_client(settings)
    deps = build_deps(settings, redis=redis)
    celery = create_celery(settings)

    async def send(i: int) -> str:
        return (await enqueue(deps, celery, requests[i])).job.id

    async def completed(pending: set[str]) -> set[str]:
        # One command for every pending job (up to the window, ten times a second): as a
        # pipeline of an LLEN each, the harness's own polling cost the driver and Redis a
        # tenth of a core each, on the cores the workers share (the baseline's is one LRANGE).
        ids = list(pending)
        found = await redis.eval(  # type: ignore[misc]  # redis-py's union of sync and async
            _DELIVERED, len(ids), *(f"{job_key(job_id)}:callbacks" for job_id in ids)
        )
        return {ids[int(i) - 1] for i in found}

    try:
        sent = await drive(
            len(requests), send, completed, window=window, flight=flight, timeout_s=timeout_s
        )
        records = []
        ids = list(sent)
        for start in range(0, len(ids), 200):
            records += await asyncio.gather(*(deps.store.get(j) for j in ids[start : start + 200]))
        return sent, records
    finally:
        celery.close()
        await redis.aclose()


async def send_baseline(
    settings: Settings, n: int, tag: str, *, window: int, flight: Flight, timeout_s: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Start ``n`` baseline chains; the send and completion times of each."""
    celery = baseline.create_baseline(settings)
    redis = aredis.Redis.from_url(settings.redis_url)
    done: dict[str, float] = {}
    cursor = 0

    async def send(i: int) -> str:
        job_id = f"{tag}-{i}"
        baseline.send_chain(celery, job_id)
        return job_id

    async def completed(pending: set[str]) -> set[str]:
        nonlocal cursor
        items = await redis.lrange(baseline.DONE_KEY, cursor, -1)
        cursor += len(items)
        found = set()
        for item in items:
            job_id, at = item.decode().split(" ")
            done[job_id] = float(at)
            found.add(job_id)
        return found

    try:
        await redis.delete(baseline.DONE_KEY)
        sent = await drive(n, send, completed, window=window, flight=flight, timeout_s=timeout_s)
        return sent, done
    finally:
        celery.close()
        await redis.aclose()


# --- what a run measured -----------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _epoch(at: str) -> float:
    return datetime.fromisoformat(at).timestamp()


# The stretches of a job's life, from its timeline: (name, from, to), as "event@step" marks.
SEGMENTS = (
    ("broker wait: eligibility", "queued@enqueue", "started@eligibility"),
    ("eligibility step", "started@eligibility", "eligible@eligibility"),
    ("broker wait: confirm", "eligible@eligibility", "started@confirm"),
    ("confirm step", "started@confirm", "finished@confirm"),
    ("broker wait: callback", "finished@confirm", "callback_sent"),
    ("callback POST", "callback_sent", "callback_done"),
)


def _marks(job: JobRecord, sent: float) -> dict[str, float]:
    """When each point of a job's life was reached (the first time, for retried steps; the
    provider's answer the last time)."""
    marks = {"sent": sent}
    for e in job.timeline:
        name = f"{e.event}@{e.step}"
        if e.event in ("started", "queued"):
            marks.setdefault(name, _epoch(e.at))
        else:
            marks[name] = _epoch(e.at)
    delivered = [c for c in job.callbacks if c.result == "delivered"]
    if delivered:
        c = delivered[-1]
        marks["callback_done"] = _epoch(c.at)
        marks["callback_sent"] = marks["callback_done"] - (c.latency_ms or 0) / 1000
    return marks


@dataclass
class Run:
    """One run of one scenario: what each job took, and the machine's state while it ran."""

    system: str
    scenario: str
    jobs: int
    sent: dict[str, float]
    final: dict[str, float]  # status final (Cancelflow: finished; baseline: chain done)
    done: dict[str, float]  # last task done
    outcomes: Counter[str] = field(default_factory=Counter)
    segments: dict[str, list[float]] = field(default_factory=dict)
    retries: int = 0
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    peak_rss_at_max_in_flight_mb: dict[str, float] = field(default_factory=dict)
    max_in_flight: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)  # by process: workers, sandbox, ...
    # The machine's 1-minute load average when the run ended (how busy others kept it).
    load_1m: float | None = None

    @classmethod
    def of_cancelflow(cls, scenario: str, sent: dict[str, float], records: list[JobRecord]) -> Run:
        run = cls("cancelflow", scenario, len(sent), sent, {}, {})
        segments: dict[str, list[float]] = {name: [] for name, _, _ in SEGMENTS}
        for job in records:
            marks = _marks(job, sent[job.id])
            final = [e for e in job.timeline if e.status in ("finished", "dead_lettered")]
            if final:
                run.final[job.id] = _epoch(final[-1].at)
            if "callback_done" in marks:
                run.done[job.id] = marks["callback_done"]
            run.outcomes[job.outcome.type.value if job.outcome else job.status.value] += 1
            run.retries += sum(e.event == "retry_scheduled" for e in job.timeline)
            for name, start, end in SEGMENTS:
                if start in marks and end in marks:
                    segments[name].append((marks[end] - marks[start]) * 1000)
        run.segments = segments
        return run

    @classmethod
    def of_baseline(cls, sent: dict[str, float], done: dict[str, float]) -> Run:
        run = cls("baseline", "baseline", len(sent), sent, dict(done), dict(done))
        run.outcomes["done"] = len(done)
        return run

    def summary(self) -> dict[str, Any]:
        """The figures of this run (JSON-ready)."""
        latencies = [(self.final[j] - self.sent[j]) * 1000 for j in self.final if j in self.sent]
        completions = [(self.done[j] - self.sent[j]) * 1000 for j in self.done if j in self.sent]
        span = (max(self.done.values()) - min(self.sent.values())) if self.done else None
        return {
            "jobs": self.jobs,
            "completed": len(self.done),
            "seconds": round(span, 3) if span else None,
            "jobs_per_s": round(len(self.done) / span, 2) if span else None,
            "latency_ms": _pcts(latencies),
            "completion_ms": _pcts(completions),
            "peak_rss_mb": round(max(self.peak_rss_mb.values()), 1) if self.peak_rss_mb else None,
            "peak_rss_mb_by_worker": {k: round(v, 1) for k, v in sorted(self.peak_rss_mb.items())},
            "peak_rss_at_max_in_flight_mb": round(
                max(self.peak_rss_at_max_in_flight_mb.values()), 1
            )
            if self.peak_rss_at_max_in_flight_mb
            else None,
            "max_in_flight": self.max_in_flight,
            "cpu_ms_per_job": self._cpu_per_job(),
            "load_1m": self.load_1m,
            "outcomes": dict(self.outcomes),
            "retries": self.retries,
            "segments_ms": {name: _pcts(v, (50, 95)) for name, v in self.segments.items() if v},
        }

    def _cpu_per_job(self) -> dict[str, float]:
        """CPU milliseconds per completed job: the workers together, and each other process."""
        if not self.done:
            return {}
        by: dict[str, float] = {}
        for name, seconds in self.cpu_s.items():
            kind = "workers" if name.startswith(("cancelflow-", "baseline-", "probe-")) else name
            by[kind] = by.get(kind, 0.0) + seconds
        return {k: round(v / len(self.done) * 1000, 2) for k, v in by.items()}


def _pcts(values: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in qs:
        p = percentile(values, q)
        out[f"p{q}"] = round(p, 1) if p is not None else None
    return out
