"""Fault injection at scale, at the settings a deployment uses: nothing lost, nothing
failed by a fault, nothing cancelled twice, every job final within two minutes of the end.

The visibility timeout (an hour) and the provider timeouts (10 s) are the defaults. Jobs
across every provider while the sandboxes answer 20% 5xx, hang 5% of calls past the client
timeout, answer 5% with 429 (and bursts of more), and act on 10% of cancel calls and then
lose the answer (a 502); a worker process is SIGKILLed every 3 to 8 s for a minute and
replaced. Then the faults stop: every job must be final within two minutes, and every dead
letter is replayed and finishes.

``make test`` runs it at 500 jobs; ``make chaos`` at 5,000 (``CANCELFLOW_CHAOS_JOBS``). The
figures are printed and written to ``$CANCELFLOW_CHAOS_REPORT`` (JSON) when set.
"""

from __future__ import annotations

import json
import os
import random
import socket
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from messaging.config import create_celery
from producers.local import cancelflow_command, free_port, http_json
from sandboxes.server import SANDBOXES
from tests.fixtures.system import StartSystem
from tests.integration.test_crash_safety import recovery_s
from tests.support import System

pytestmark = pytest.mark.integration

JOBS = int(os.environ.get("CANCELFLOW_CHAOS_JOBS", "500"))
# hang_s: past the default 10 s client timeout.
FAULTS = {
    "error_rate": 0.20,
    "hang_rate": 0.05,
    "hang_s": 12,
    "rate_limit_rate": 0.05,
    "retry_after_s": 1,
    "lost_answer_rate": 0.10,
}
BURST = {**FAULTS, "error_rate": 0.15, "rate_limit_rate": 0.4}
CHAOS_S = 60.0  # how long workers are killed and faults injected
SETTLE_S = 120.0  # every job final this long after the faults stop
# (provider, sandbox kind, how a sandbox reference becomes the subscription): every
# provider's kinds that succeed without a customer's decision.
MIX: list[tuple[str, str, Any]] = [
    (key, kind, spec.subscription)
    for key, spec in SANDBOXES.items()
    for kind in spec.succeeding_kinds
]
FINAL = {b"finished", b"dead_lettered"}


INJECTED: dict[str, Counter[str]] = {}


def set_faults(system: System, faults: dict[str, Any]) -> None:
    """Change every sandbox's faults, keeping the count of what they injected so far (a
    sandbox's counters restart with each change)."""
    for provider in {p for p, _, _ in MIX}:
        counted = system.sandbox.state(provider)["faults_injected"]
        INJECTED.setdefault(provider, Counter()).update({k: v for k, v in counted.items() if v})
        system.sandbox.faults(provider, **faults)


class Chaos(threading.Thread):
    """For ``CHAOS_S``: every 3 to 8 s, SIGKILLs a random worker among those consuming and
    starts a fresh one (never the last consuming one: a run with no worker at all would
    measure start-up, not recovery); a burst of 429 after each kill."""

    def __init__(self, system: System, workers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.system, self.workers = system, workers  # name -> Celery hostname
        self.stop_event = threading.Event()
        # Set once the minute of kills is over. The thread itself lives on until the test
        # ends: the workers it started die with it (ProcessGroup's PR_SET_PDEATHSIG).
        self.over = threading.Event()
        self.kills: list[tuple[float, int | None]] = []  # (when, pid)
        self.bursts = 0
        self.rng = random.Random(7)
        self.app = create_celery(system.settings())

    def consuming(self) -> list[str]:
        try:
            replies = self.app.control.ping(destination=list(self.workers.values()), timeout=1)
        except (redis.RedisError, OSError):
            return []
        up = {host for reply in replies for host in reply}
        return [name for name, host in self.workers.items() if host in up]

    def run(self) -> None:
        n = 0
        ends = time.monotonic() + CHAOS_S
        while not self.stop_event.wait(self.rng.uniform(3, 8)) and time.monotonic() < ends:
            ready = self.consuming()
            if len(ready) < 2:
                continue
            victim = self.rng.choice(ready)
            pid = self.system.procs.procs[victim].pid
            self.system.procs.kill(victim)
            self.kills.append((time.time(), pid))
            del self.workers[victim]
            n += 1
            name = f"chaos-{n}"
            self.workers[name] = f"{name}-{free_port()}@{socket.gethostname()}"
            self.system.procs.start(name, cancelflow_command("worker", "-n", self.workers[name]))
            self.bursts += 1
            set_faults(self.system, BURST)
            self.stop_event.wait(1.5)
            set_faults(self.system, FAULTS)
        self.app.close()
        self.over.set()
        self.stop_event.wait()


def statuses(client: redis.Redis, jobs: list[str]) -> list[bytes | None]:
    with client.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.hget(f"cf:job:{job}", "status")
        return cast("list[bytes | None]", pipe.execute())


def wait_final(client: redis.Redis, jobs: list[str], *, deadline: float) -> list[bytes | None]:
    """Statuses once every job is final, or at ``deadline`` (monotonic)."""
    while True:
        current = statuses(client, jobs)
        if all(s in FINAL for s in current) or time.monotonic() > deadline:
            return current
        time.sleep(0.5)


@pytest.mark.timeout(600 + JOBS)
def test_chaos(start_system: StartSystem) -> None:
    system = start_system(
        isolated=True,
        workers=3,
        concurrency=100,  # the default
        beat=True,
        CANCELFLOW_API__RATE_LIMIT_PER_S="100000",
        CANCELFLOW_API__RATE_LIMIT_BURST="100000",
    )
    # The settings a deployment runs with: an hour's visibility timeout, 10 s providers.
    assert not any("VISIBILITY" in k or k.endswith("__TIMEOUT_S") for k in system.env)
    client = redis.Redis.from_url(system.redis_url)
    for provider in {p for p, _, _ in MIX}:
        system.sandbox.reset(provider)
    INJECTED.clear()
    per_kind = JOBS // len(MIX) + 1
    by_kind: list[list[tuple[str, dict[str, Any]]]] = []
    for provider, kind, to_sub in MIX:
        status, created = http_json(
            "POST",
            f"{system.sandbox.url}/{provider}/_sandbox/subscriptions",
            {"count": per_kind, "kind": kind},
        )
        assert status == 200, created
        by_kind.append([(provider, to_sub(r)) for r in created["references"]])
    # Interleaved: every provider's jobs spread over the whole enqueue, so that each one's
    # cancel calls meet the faults. One provider's after another's, the last one's confirms
    # came once the faults had stopped where the workers are slower (RabbitMQ), and none of
    # its answers was lost.
    subscriptions = [sub for group in zip(*by_kind, strict=True) for sub in group][:JOBS]

    set_faults(system, FAULTS)
    chaos = Chaos(
        system,
        {
            name: f"{name}-{system.api_url.rsplit(':', 1)[1]}@{socket.gethostname()}"
            for name in ("worker", "worker1", "worker2")
        },
    )
    chaos.start()
    started = time.monotonic()
    jobs = []
    try:
        for i, (provider, sub) in enumerate(subscriptions):
            jobs.append(
                system.enqueue(
                    {"provider": provider, "subscription": sub, "idempotency_key": f"chaos-{i}"}
                )["id"]
            )
        assert len(set(jobs)) == len(jobs) == JOBS
        chaos.over.wait(CHAOS_S + 300)
    except BaseException:
        chaos.stop_event.set()
        raise
    finally:
        set_faults(system, {})
    faults_stopped = time.monotonic()
    first = wait_final(client, jobs, deadline=faults_stopped + SETTLE_S)
    settled_s = time.monotonic() - faults_stopped
    faults = {p: dict(c) for p, c in INJECTED.items()}
    lost = [j for j, s in zip(jobs, first, strict=True) if s not in FINAL]
    dead = [j for j, s in zip(jobs, first, strict=True) if s == b"dead_lettered"]

    # Faults over: replay every dead letter of a job (a page at a time: a replayed one
    # leaves the list); each must finish.
    replayed = 0
    while True:
        status, listing = system.get("/v1/dead-letters?kind=job&limit=1000")
        assert status == 200, listing
        if not listing["items"]:
            break
        for dl in listing["items"]:
            assert system.post(f"/v1/dead-letters/{dl['id']}/replay")[0] == 202
        replayed += len(listing["items"])
    final = wait_final(client, jobs, deadline=time.monotonic() + SETTLE_S)
    outcomes: Counter[str] = Counter()
    for job_id in jobs:
        raw = cast("bytes | None", client.hget(f"cf:job:{job_id}", "outcome"))
        outcomes[json.loads(raw)["type"] if raw else "none"] += 1
    effective: Counter[int] = Counter()
    for provider in {p for p, _, _ in MIX}:
        for count in system.sandbox.state(provider)["effective_cancels"].values():
            effective[count] += 1
    records = [system.job(j) for j in jobs]
    chaos.stop_event.set()  # the replacement workers stop with the thread
    chaos.join()
    waits = recovery_s(records, chaos.kills)
    figures = {
        "jobs": JOBS,
        "seconds": round(time.monotonic() - started, 1),
        "final_within_s_of_faults_stopping": round(settled_s, 1),
        "faults_injected": faults,
        "worker_kills": len(chaos.kills),
        "steps_interrupted_by_kills": len(waits),
        "recovery_after_kill_s": {
            "median": round(statistics.median(waits), 1) if waits else None,
            "max": round(max(waits), 1) if waits else None,
        },
        "failed": sum((r.get("outcome") or {}).get("type") == "failed" for r in records),
        "bursts_of_429": chaos.bursts,
        "lost": len(lost),
        "dead_lettered": len(dead),
        "replayed": replayed,
        "finished_after_replay": sum(s == b"finished" for s in final),
        "outcomes": dict(outcomes),
        "subscriptions_cancelled_once": effective[1],
        "subscriptions_cancelled_more_than_once": sum(n for c, n in effective.items() if c > 1),
    }
    print("CHAOS", json.dumps(figures))
    if report := os.environ.get("CANCELFLOW_CHAOS_REPORT"):
        Path(report).write_text(json.dumps(figures, indent=2))

    stuck = [j for j, st in zip(jobs, final, strict=True) if st != b"finished"]
    for job_id in stuck[:3]:
        _, job = system.get(f"/v1/cancellations/{job_id}")
        print(
            "STUCK",
            job_id,
            job["status"],
            [(e["step"], e["event"], e["at"]) for e in job["timeline"]],
        )
        print(system.log_lines(job_id))
    assert lost == [], (
        f"{len(lost)} jobs not final {SETTLE_S:g}s after the faults stopped: {lost[:5]}"
    )
    assert figures["failed"] == 0
    assert all(s == b"finished" for s in final), Counter(final)
    assert figures["subscriptions_cancelled_more_than_once"] == 0
    assert set(outcomes) <= {"cancelled", "already_cancelled", "pending_provider_confirmation"}, (
        outcomes
    )
    assert effective[1] == JOBS
    assert len(chaos.kills) >= 5 and chaos.bursts >= 1, chaos.kills
    assert all(f.get("lost_answer") for f in faults.values()), faults
    assert all(f.get("hang") and f.get("error") for f in faults.values()), faults
    # Every step a kill interrupted moved again within a minute, on another worker.
    assert waits and max(waits) < 60, waits
