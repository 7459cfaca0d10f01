"""Redis Sentinel: the master SIGKILLed while 500 jobs run; every job finishes, none twice.

A master, one replica and three sentinels, each a process of this test's own on a free port.
The system (API, two workers, beat) reaches Redis only through the sentinels
(``sentinel://...?master=cancelflow``), for the job store and the broker alike. Once jobs are
moving, the master is SIGKILLed; the sentinels promote the replica; the processes find it
(redis-py's and kombu's Sentinel clients), the job store's scripts are loaded again on it
(``NOSCRIPT``) and a write that reached the old master as it came back as a replica is
retried (``READONLY``). Replication is asynchronous: what the master acknowledged in its
last moments and had not yet sent is lost with it (see deploy/README.md); the watchdog and the
straggler sweep re-send what that leaves behind. Figures printed: jobs, failover time, lost,
doubled.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.sentinel

from cancelflow.contract import CALLBACKS_QUEUE
from cancelflow.store import ACTIVE, WORKERS
from producers.local import free_port, http_json, wait_until
from sandboxes.payway import DEMO
from tests.fixtures.system import StartSystem
from tests.support import System

# Redis itself fails over: the broker it runs on is Redis, whatever the suite's leg.
pytestmark = [pytest.mark.integration, pytest.mark.redis_broker]

MASTER = "cancelflow"
JOBS = 500


@dataclass
class Cluster:
    url: str  # the sentinel:// URL Cancelflow is given
    sentinels: list[int]
    procs: dict[str, subprocess.Popen[bytes]]
    ports: dict[str, int]

    def master_port(self) -> int | None:
        """The master's port as a sentinel names it (None if none answers)."""
        for port in self.sentinels:
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis(port=port, socket_timeout=1)
                # (redis-py's sentinel_get_master_addr_by_name fails on a plain client.)
                found = client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
                client.close()
                return int(found[1])
        return None

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(5)


@pytest.fixture
def sentinel_cluster() -> Iterator[Cluster]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make test installs Debian's package)")
    home = Path(tempfile.mkdtemp(prefix="cancelflow-sentinel-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports = {"master": free_port(), "replica": free_port()}
    sentinels = [free_port() for _ in range(3)]

    def start(name: str, argv: list[str]) -> None:
        (home / name).mkdir()
        log = (home / f"{name}.log").open("ab")
        procs[name] = subprocess.Popen(argv, cwd=home / name, stdout=log, stderr=subprocess.STDOUT)

    def server(name: str, *extra: str) -> list[str]:
        return [
            "redis-server",
            "--port", str(ports[name]),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(home / name),
            *extra,
        ]  # fmt: skip

    try:
        start("master", server("master"))
        start("replica", server("replica", "--replicaof", "127.0.0.1", str(ports["master"])))
        for n, port in enumerate(sentinels):
            conf = home / f"sentinel-{n}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {ports['master']} 2\n"
                # The sentinels' own settings, as a deployment chooses them: a second of
                # silence marks the master down (Sentinel's default is 30 s).
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            start(f"sentinel-{n}", ["redis-server", str(conf), "--sentinel"])
        replica = redis.Redis(port=ports["replica"], socket_timeout=1)

        def replicating() -> bool:
            with contextlib.suppress(redis.RedisError):
                info: dict[str, Any] = replica.info("replication")  # type: ignore[assignment]
                return info.get("master_link_status") == "up"
            return False

        wait_until(replicating, timeout_s=20, what="the replica to sync")
        hosts = ";".join(f"sentinel://127.0.0.1:{p}" for p in sentinels)
        cluster = Cluster(f"{hosts}/0?master={MASTER}", sentinels, procs, ports)

        def all_see_the_replica() -> bool:
            for port in sentinels:
                with contextlib.suppress(redis.RedisError):
                    found = redis.Redis(port=port, socket_timeout=1).sentinel_slaves(MASTER)
                    if not found:
                        return False
                    continue
                return False
            return True

        wait_until(all_see_the_replica, timeout_s=30, what="every sentinel to see the replica")
        yield cluster
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(home, ignore_errors=True)


def payway_jobs(system: System, count: int) -> list[str]:
    status, created = http_json(
        "POST",
        f"{system.sandbox.url}/payway/_sandbox/subscriptions",
        {"count": count, "kind": "immediate"},
    )
    assert status == 200, created
    return [
        system.enqueue(
            {
                "provider": "payway",
                "subscription": {**ref, "cancellation_reason_id": DEMO.reason_id},
            }
        )["id"]
        for ref in created["references"]
    ]


def watchdog_view(client: Any, system: System, jobs: list[str]) -> str:
    """What the watchdog sees of the jobs not at their end: their record's hold, their entry
    in the index it sweeps, the queues' lengths and oldest messages, and what its runs did."""
    lines = ["--- the watchdog's view ---"]
    now = float(client.time()[0])
    for job_id in jobs:
        h = {k.decode(): v.decode() for k, v in client.hgetall(f"cf:job:{job_id}").items()}
        if h.get("status") == "finished" and client.llen(f"cf:job:{job_id}:callbacks"):
            continue
        score = client.zscore(ACTIVE, job_id)
        beat = client.zscore(WORKERS, h["held_by"]) if h.get("held_by") else None
        lines.append(
            f"{job_id}: status={h.get('status')} updated_at={h.get('updated_at')} "
            f"held_by={h.get('held_by')} held_since={h.get('held_since')} "
            f"holder_beat_age={None if beat is None else round(now - beat, 1)} "
            f"active_in={None if score is None else round(score - now, 1)}"
        )
    for queue in (CALLBACKS_QUEUE, "cancellations.payway", "maintenance"):
        head = client.lindex(queue, -1)
        lines.append(f"queue {queue}: {client.llen(queue)} waiting, oldest {head!r:.300}")
    lines.append(system.log_lines("resume_stalled"))
    lines.append(system.log_lines("job.stalled.resent"))
    return "\n".join(lines)


def test_a_sentinel_failover_under_load_finishes_every_job_and_cancels_none_twice(
    start_system: StartSystem, sentinel_cluster: Cluster
) -> None:
    cluster = sentinel_cluster
    system = start_system(
        db_url=cluster.url,
        workers=2,
        concurrency=50,
        beat=True,
        # The jobs are enqueued as fast as the API takes them: no token's rate limit answers.
        CANCELFLOW_API__RATE_LIMIT_PER_S="100000",
        CANCELFLOW_API__RATE_LIMIT_BURST="100000",
    )
    system.sandbox.reset("payway")
    system.sandbox.faults("payway", latency_ms=100)
    try:
        jobs = payway_jobs(system, JOBS)
        client = redis.sentinel.Sentinel(
            [("127.0.0.1", p) for p in cluster.sentinels], socket_timeout=2
        ).master_for(MASTER, socket_timeout=2)

        def finished() -> int:
            with contextlib.suppress(redis.RedisError):
                states = [client.hget(f"cf:job:{j}", "status") for j in jobs]
                return sum(s == b"finished" for s in states)
            return -1

        wait_until(lambda: finished() >= JOBS // 5, timeout_s=120, what="a fifth of the jobs")
        killed_at = time.monotonic()
        cluster.kill("master")
        wait_until(
            lambda: cluster.master_port() == cluster.ports["replica"],
            timeout_s=60,
            what="the sentinels to promote the replica",
        )
        failover_s = time.monotonic() - killed_at
        try:
            done = [system.wait(j, timeout_s=240) for j in jobs]
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{watchdog_view(client, system, jobs)}") from None
    finally:
        system.sandbox.faults("payway")
    effective = system.sandbox.state("payway")["effective_cancels"]
    unfinished = [j["id"] for j in done if j["status"] != "finished"]
    doubled = {k: n for k, n in effective.items() if n > 1}
    lost = JOBS - len(effective)
    print(
        f"SENTINEL FAILOVER: {JOBS} jobs, master SIGKILLed, replica promoted after "
        f"{failover_s:.1f}s; unfinished {len(unfinished)}, lost {lost}, doubled {len(doubled)}"
    )
    assert not unfinished, unfinished
    assert {j["outcome"]["type"] for j in done} <= {"cancelled", "already_cancelled"}
    assert not doubled, doubled
    assert lost == 0
