"""Crash safety: SIGKILLed workers, a crashed Redis with AOF, and warm shutdown lose no job."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from cancelflow.providers import REGISTRY
from producers.local import cancelflow_command, free_port, redis_answers, wait_until
from sandboxes.payway import DEMO
from tests.fixtures.system import StartSystem, wait_for_workers
from tests.support import System

pytestmark = pytest.mark.integration

# A short visibility timeout so a dead worker's messages come back within seconds; provider
# calls must then be short too (two must fit in the 2 s soft time limit).
FAST_REDELIVERY = {
    "CANCELFLOW_WORKER__VISIBILITY_TIMEOUT_S": "10",
    **{f"CANCELFLOW_PROVIDERS__{key.upper()}__TIMEOUT_S": "0.9" for key in REGISTRY},
}


def payway_jobs(system: System, count: int, kind: str = "end_of_period") -> list[str]:
    status, created = system.sandbox_post(
        "/payway/_sandbox/subscriptions", {"count": count, "kind": kind}
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


def start_worker(system: System, name: str, *args: str) -> str:
    hostname = f"{name}-{free_port()}@{socket.gethostname()}"
    system.procs.start(name, cancelflow_command("worker", "-c", "8", "-n", hostname, *args))
    wait_for_workers(system.redis_url, [hostname], broker_url=system.settings().broker_url)
    return hostname


def liveness_probe(system: System, name: str, hostname: str) -> str:
    """What the orchestrator does (deploy/: ``cancelflow healthcheck worker``): a worker that
    stops answering pings is replaced. Celery's consumer has been seen, rarely, not to come
    back after a Redis crash with tasks in flight; its messages are safe in Redis either way."""
    try:
        wait_for_workers(
            system.redis_url, [hostname], broker_url=system.settings().broker_url, timeout_s=30
        )
        return hostname
    except TimeoutError:
        print(f"liveness probe: {hostname} stopped answering after the Redis crash; replacing it")
        system.procs.kill(name)
        return start_worker(system, f"{name}-replaced")


def assert_cancelled_once(
    system: System, jobs: list[str], timeout_s: float = 90
) -> list[dict[str, Any]]:
    done = [system.wait(j, timeout_s=timeout_s) for j in jobs]
    assert all(j["status"] == "finished" for j in done), [j["status"] for j in done]
    # A confirm replayed after a crash may find the cancel already made: still a success.
    assert {j["outcome"]["type"] for j in done} <= {"cancelled", "already_cancelled"}
    effective = system.sandbox.state("payway")["effective_cancels"]
    assert all(n == 1 for n in effective.values()), effective
    assert len(effective) == len(jobs)
    return done


Crash = tuple[float, int | None]  # when, and the pid of the worker killed (None: Redis)


def recovery_s(jobs: list[dict[str, Any]], crashes: list[Crash]) -> list[float]:
    """For each step a crash interrupted (it started, the process running it was killed, or
    Redis crashed, and the job's next entry is that step starting again), the seconds from
    that crash to the step's new start."""
    out = []
    for job in jobs:
        entries = [(datetime.fromisoformat(e["at"]).timestamp(), e) for e in job["timeline"]]
        for (began, first), (again, second) in itertools.pairwise(entries):
            if first["event"] != "started" or second["event"] != "started":
                continue
            if first["step"] != second["step"]:
                continue
            worker = (first.get("details") or {}).get("worker") or ""
            pid = int(worker.split(":")[1]) if worker.count(":") == 2 else None
            crash = next(
                (
                    at
                    for at, killed in sorted(crashes)
                    if began < at < again and killed in (None, pid)
                ),
                None,
            )
            if crash is not None:
                out.append(again - crash)
    return out


def test_sigkill_mid_step_resumes_within_a_lease_at_the_default_settings(
    start_system: StartSystem,
) -> None:
    # The visibility timeout is the default hour: nothing here waits for it.
    system = start_system(isolated=True, concurrency=8, beat=True)
    assert "VISIBILITY_TIMEOUT_S" not in str(system.env)
    system.sandbox.reset("payway")
    system.sandbox.faults("payway", latency_ms=600)
    try:
        jobs = payway_jobs(system, 24)
        time.sleep(1.5)  # steps are in flight, some provider calls half done
        pid = system.procs.procs["worker"].pid
        system.procs.kill("worker")
        killed_at = time.time()
        start_worker(system, "worker-after-kill")
        done = assert_cancelled_once(system, jobs)
    finally:
        system.sandbox.faults("payway")
    waits = recovery_s(done, [(killed_at, pid)])
    print(
        f"RECOVERY after SIGKILL: {len(waits)} steps interrupted, "
        f"median {statistics.median(waits):.1f}s, max {max(waits):.1f}s"
    )
    # Some job was in flight when the worker died and ran again on the new one, within
    # the lease (20 s) and a sweep (3 s) of the kill: well inside a minute.
    assert waits, "no job was in flight at the kill"
    assert max(waits) < 60, waits


def test_a_dead_workers_retry_countdowns_come_back_at_once(start_system: StartSystem) -> None:
    """A retry waiting on its countdown is a message the worker holds unacknowledged: when
    the worker dies it goes back to the queue, countdown kept, not an hour later."""
    # Countdowns drawn up to 20 s: most are still waiting when the worker dies.
    system = start_system(
        isolated=True, concurrency=8, beat=True, CANCELFLOW_PROVIDERS__PAYWAY__RETRY_BASE_S="20"
    )
    system.sandbox.reset("payway")
    # Every call fails once: each job's first check is retried after a countdown.
    system.sandbox.faults("payway", fail_once_rate=1.0)
    try:
        jobs = payway_jobs(system, 6)
        wait_until(
            lambda: all(
                any(e["event"] == "retry_scheduled" for e in system.job(j)["timeline"])
                for j in jobs
            ),
            timeout_s=30,
            what="every job's first retry scheduled",
        )
        system.procs.kill("worker")
        waiting = [
            j for j in jobs if sum(e["event"] == "started" for e in system.job(j)["timeline"]) == 1
        ]
        assert waiting, "every retry ran before the kill: nothing was tested"
        start_worker(system, "worker-after-kill")
        assert_cancelled_once(system, jobs, timeout_s=75)
    finally:
        system.sandbox.faults("payway")


@pytest.fixture
def aof_redis() -> Iterator[tuple[str, Any]]:
    """A redis-server of this test's own with AOF (fsync always), and a way to crash and
    restart it on the same port and data directory."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make test installs Debian's package)")
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="cancelflow-aof-"))
    url = f"redis://127.0.0.1:{port}/0"
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(data),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--save",
                    "",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_until(lambda: redis_answers(url), timeout_s=10, what="redis with AOF")

    def crash_and_restart(down_s: float = 1.0) -> None:
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait(5)
        time.sleep(down_s)
        start()

    start()
    try:
        yield url, crash_and_restart
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        shutil.rmtree(data, ignore_errors=True)


def test_redis_crash_with_aof_loses_no_queued_or_running_job(
    start_system: StartSystem, aof_redis: tuple[str, Any]
) -> None:
    url, crash_and_restart = aof_redis
    system = start_system(db_url=url, concurrency=8, beat=True)
    system.sandbox.reset("payway")
    system.sandbox.faults("payway", latency_ms=300)
    try:
        # Queued jobs: no worker consumes while they are enqueued.
        system.procs.stop("worker")
        queued = payway_jobs(system, 10, "immediate")
        crash_and_restart()
        hostname = start_worker(system, "worker-2")
        # Running jobs: Redis dies under a working worker.
        running = payway_jobs(system, 10, "autogiro")
        time.sleep(1.0)
        crashed_at = time.time()
        crash_and_restart()
        liveness_probe(system, "worker-2", hostname)
        done = assert_cancelled_once(system, queued + running)
    finally:
        system.sandbox.faults("payway")
    waits = recovery_s(done, [(crashed_at, None)])
    if waits:
        print(
            f"RECOVERY after a Redis crash (down 1 s): {len(waits)} steps interrupted, "
            f"median {statistics.median(waits):.1f}s, max {max(waits):.1f}s"
        )


def test_warm_shutdown_finishes_or_returns_in_flight_work(start_system: StartSystem) -> None:
    # A long visibility timeout: had SIGTERM dropped in-flight messages, they would not come
    # back within this test's wait.
    system = start_system(
        isolated=True, concurrency=8, CANCELFLOW_WORKER__VISIBILITY_TIMEOUT_S="600"
    )
    system.sandbox.reset("payway")
    system.sandbox.faults("payway", latency_ms=700)
    try:
        jobs = payway_jobs(system, 16)
        time.sleep(1.0)
        code = system.procs.stop("worker", sig=signal.SIGTERM, timeout_s=60)
        assert code == 0
        start_worker(system, "worker-after-term")
        assert_cancelled_once(system, jobs, timeout_s=60)
    finally:
        system.sandbox.faults("payway")


class Partition:
    """A TCP proxy to Redis that can cut the network: while cut, every connection through it
    stays open and carries nothing either way (packets dropped, as a lost route or a failed
    switch does: no reset, no error, only silence), and new connections are accepted and left
    silent. ``heal`` closes those connections, as a routing change the peers notice, and
    forwards again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._cut = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._serve, daemon=True, name="partition")
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(client)
            if self._cut.is_set():
                continue  # accepted, never answered
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.add(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._cut.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._cut.set()

    def heal(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._cut.clear()

    def close(self) -> None:
        self._server.close()
        self.heal()


def test_a_worker_cut_off_from_redis_is_taken_over_within_a_lease(
    start_system: StartSystem,
) -> None:
    """A worker that loses its route to Redis mid-step (not killed: it goes on running, its
    provider calls may still succeed) stops beating; another worker resumes its jobs after
    the lease, and no subscription is cancelled twice, also once the network is back and the
    cut-off worker's late writes arrive. On RabbitMQ the cut-off worker keeps its broker
    connection: it stops taking messages while it cannot beat, and takes them again after."""
    system = start_system(isolated=True, concurrency=8, beat=True, workers=0)
    assert "VISIBILITY_TIMEOUT_S" not in str(system.env)
    parts = urlsplit(system.redis_url)
    assert parts.hostname is not None and parts.port is not None
    partition = Partition((parts.hostname, parts.port))
    via_partition = f"redis://127.0.0.1:{partition.port}{parts.path}"
    system.sandbox.reset("payway")
    system.sandbox.faults("payway", latency_ms=600)
    try:
        hostname = f"cut-off-{free_port()}@{socket.gethostname()}"
        proc = system.procs.start(
            "worker-cut-off",
            cancelflow_command("worker", "-c", "8", "-n", hostname),
            extra_env={"CANCELFLOW_REDIS_URL": via_partition},
        )
        wait_for_workers(system.redis_url, [hostname], broker_url=system.settings().broker_url)
        jobs = payway_jobs(system, 24)
        time.sleep(1.5)  # steps are in flight, some provider calls half done
        partition.cut()
        cut_at = time.time()
        start_worker(system, "worker-b")
        done = assert_cancelled_once(system, jobs)
        assert proc.poll() is None, "the cut-off worker was not killed: it kept running"
        # The network comes back: whatever the cut-off worker still had to write lands now,
        # fenced by the store (a step it held was taken over), and nothing moves back.
        partition.heal()
        wait_for_workers(
            system.redis_url, [hostname], broker_url=system.settings().broker_url, timeout_s=60
        )
        time.sleep(5)
        again = assert_cancelled_once(system, jobs)
        assert [j["outcome"] for j in again] == [j["outcome"] for j in done]
        if system.broker == "amqp":
            # Still connected to RabbitMQ, it took no messages while it could not beat, and
            # takes them again since (worker.leases).
            lines = system.log_lines("worker.consuming.")
            assert "worker-cut-off" in lines and "worker.consuming.held" in lines, lines
            assert "worker.consuming.resumed" in lines.splitlines()[-1], lines
    finally:
        system.sandbox.faults("payway")
        partition.close()
    waits = recovery_s(done, [(cut_at, proc.pid)])
    print(
        f"RECOVERY after a worker was cut off from Redis: {len(waits)} steps interrupted, "
        f"median {statistics.median(waits):.1f}s, max {max(waits):.1f}s"
    )
    assert waits, "no job was in flight at the cut"
    assert max(waits) < 60, waits
