"""Fault injection at scale: nothing lost, nothing cancelled twice.

Jobs across every provider while the sandboxes answer 20% 5xx, hang 5% of calls past the
client timeout and throw bursts of 429, and worker processes are SIGKILLed at random and
restarted. Then the faults stop and every dead letter is replayed.

``make test`` runs it at 500 jobs; ``make chaos`` at 5,000 (``CANCELFLOW_CHAOS_JOBS``). The
figures are printed and written to ``$CANCELFLOW_CHAOS_REPORT`` (JSON) when set.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from producers.local import cancelflow_command, free_port, http_json
from tests.conftest import StartSystem, wait_for_workers
from tests.integration.test_crash_safety import FAST_REDELIVERY
from tests.support import System

pytestmark = pytest.mark.integration

JOBS = int(os.environ.get("CANCELFLOW_CHAOS_JOBS", "500"))
FAULTS = {"error_rate": 0.20, "hang_rate": 0.05, "hang_s": 1.5}
BURST = {**FAULTS, "error_rate": 0.15, "rate_limit_rate": 0.5, "retry_after_s": 1}
# (provider, sandbox kind, how a sandbox reference becomes the subscription)
MIX: list[tuple[str, str, Any]] = [
    (
        "payway",
        "end_of_period",
        lambda r: {**r, "cancellation_reason_id": "5cb80481c00000000000000a"},
    ),
    ("payway", "immediate", lambda r: {**r, "cancellation_reason_id": "5cb80481c00000000000000a"}),
    ("azotte", "processed", lambda r: {"order_identifier": r}),
    ("azotte", "app_store", lambda r: {"order_identifier": r}),
    ("appdirect", "active", lambda r: {"subscription_id": r}),
    ("axelspringer", "created", lambda r: {"purchase_ref": r}),
    ("axelspringer", "redeemed", lambda r: {"purchase_ref": r}),
]
FINAL = {b"finished", b"dead_lettered"}
# No job moved for this long: what is not final then is stuck. Longer than the watchdog's
# quiet period under FAST_REDELIVERY (countdown 2.5 s + time limit 2.5 s + visibility 10 s).
QUIET_S = 60.0


INJECTED: dict[str, Counter[str]] = {}


def set_faults(system: System, faults: dict[str, Any]) -> None:
    """Change every sandbox's faults, keeping the count of what they injected so far (a
    sandbox's counters restart with each change)."""
    for provider in {p for p, _, _ in MIX}:
        counted = system.sandbox.state(provider)["faults_injected"]
        INJECTED.setdefault(provider, Counter()).update({k: v for k, v in counted.items() if v})
        system.sandbox.faults(provider, **faults)


class Chaos(threading.Thread):
    """Kills a random worker every few seconds and starts a fresh one; bursts of 429."""

    def __init__(self, system: System, workers: list[str]) -> None:
        super().__init__(daemon=True)
        self.system, self.workers = system, workers
        self.stop_event = threading.Event()
        self.kills = 0
        self.bursts = 0
        self.rng = random.Random(7)

    def run(self) -> None:
        n = 0
        while not self.stop_event.wait(self.rng.uniform(1.5, 3)):
            victim = self.rng.choice(self.workers)
            self.system.procs.kill(victim)
            self.kills += 1
            n += 1
            name = f"chaos-{n}"
            hostname = f"{name}-{free_port()}@{socket.gethostname()}"
            self.system.procs.start(name, cancelflow_command("worker", "-c", "16", "-n", hostname))
            self.workers[self.workers.index(victim)] = name
            # The next kill only once the replacement consumes: on a loaded machine a worker
            # killed while starting would make the run measure start-up, not recovery.
            wait_for_workers(self.system.redis_url, [hostname], timeout_s=120)
            self.bursts += 1
            set_faults(self.system, BURST)
            self.stop_event.wait(1.5)
            set_faults(self.system, FAULTS)


def statuses(client: redis.Redis, jobs: list[str]) -> list[bytes | None]:
    with client.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.hget(f"cf:job:{job}", "status")
        return pipe.execute()  # type: ignore[no-any-return]


def wait_final(client: redis.Redis, jobs: list[str], *, quiet_s: float) -> list[bytes | None]:
    """Statuses once every job is final, or once none has moved for ``quiet_s`` (longer than
    the watchdog's quiet period): a slow machine is not a lost job, a stuck one is."""
    last, last_change = None, time.monotonic()
    while True:
        current = statuses(client, jobs)
        if all(s in FINAL for s in current):
            return current
        if current != last:
            last, last_change = current, time.monotonic()
        elif time.monotonic() - last_change > quiet_s:
            return current
        time.sleep(0.5)


@pytest.mark.timeout(600 + JOBS)
def test_chaos(start_system: StartSystem) -> None:
    system = start_system(
        isolated=True,
        workers=2,
        concurrency=16,
        beat=True,
        CANCELFLOW_API__RATE_LIMIT_PER_S="100000",
        CANCELFLOW_API__RATE_LIMIT_BURST="100000",
        # Few attempts, so some jobs do end in the dead-letter store and get replayed.
        **{
            f"CANCELFLOW_PROVIDERS__{k}__MAX_ATTEMPTS": "3"
            for k in ("PAYWAY", "AZOTTE", "APPDIRECT", "AXELSPRINGER")
        },
        **FAST_REDELIVERY,
    )
    client = redis.Redis.from_url(system.redis_url)
    for provider in {p for p, _, _ in MIX}:
        system.sandbox.reset(provider)
    INJECTED.clear()
    subscriptions: list[tuple[str, dict[str, Any]]] = []
    per_kind = JOBS // len(MIX) + 1
    for provider, kind, to_sub in MIX:
        status, created = http_json(
            "POST",
            f"{system.sandbox.url}/{provider}/_sandbox/subscriptions",
            {"count": per_kind, "kind": kind},
        )
        assert status == 200, created
        subscriptions += [(provider, to_sub(r)) for r in created["references"]]
    subscriptions = subscriptions[:JOBS]

    set_faults(system, FAULTS)
    chaos = Chaos(system, ["worker", "worker1"])
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
        first = wait_final(client, jobs, quiet_s=QUIET_S)
    finally:
        chaos.stop_event.set()
        chaos.join()
        set_faults(system, {})
    faults = {p: dict(c) for p, c in INJECTED.items()}
    lost = [j for j, s in zip(jobs, first, strict=True) if s not in FINAL]
    dead = [j for j, s in zip(jobs, first, strict=True) if s == b"dead_lettered"]

    # Faults over: replay every dead letter of a job; each must finish.
    status, listing = system.get("/v1/dead-letters?kind=job&limit=100000")
    assert status == 200
    for dl in listing["items"]:
        assert system.post(f"/v1/dead-letters/{dl['id']}/replay")[0] == 202
    final = wait_final(client, jobs, quiet_s=QUIET_S)
    outcomes = Counter()
    for job_id in jobs:
        raw = client.hget(f"cf:job:{job_id}", "outcome")
        outcomes[json.loads(raw)["type"] if raw else "none"] += 1
    effective: Counter[int] = Counter()
    for provider in {p for p, _, _ in MIX}:
        for count in system.sandbox.state(provider)["effective_cancels"].values():
            effective[count] += 1
    figures = {
        "jobs": JOBS,
        "seconds": round(time.monotonic() - started, 1),
        "faults_injected": faults,
        "worker_kills": chaos.kills,
        "bursts_of_429": chaos.bursts,
        "lost": len(lost),
        "dead_lettered": len(dead),
        "replayed": len(listing["items"]),
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
    assert lost == [], f"{len(lost)} jobs neither final nor dead-lettered: {lost[:5]}"
    assert all(s == b"finished" for s in final), Counter(final)
    assert figures["subscriptions_cancelled_more_than_once"] == 0
    assert set(outcomes) <= {"cancelled", "already_cancelled", "pending_provider_confirmation"}, (
        outcomes
    )
    assert effective[1] == JOBS
    assert (
        chaos.kills >= 1 and chaos.bursts >= 1 and sum(sum(f.values()) for f in faults.values()) > 0
    )
