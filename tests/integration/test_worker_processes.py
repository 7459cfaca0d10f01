"""``cancelflow worker --processes 2``: two real worker processes under one command share the
jobs, a killed one is replaced without losing its jobs, and SIGTERM stops them all warmly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from messaging.config import create_celery
from producers.local import cancelflow_command, free_port, wait_until
from producers.supervisor import MIN_UPTIME_S, child_hostname
from tests.fixtures.system import StartSystem, wait_for_workers
from tests.integration.test_crash_safety import payway_jobs

pytestmark = pytest.mark.integration


def test_two_processes_share_the_jobs_and_survive_a_killed_one(
    start_system: StartSystem,
) -> None:
    system = start_system(workers=0, isolated=True)
    hostname = f"sup-{free_port()}@{socket.gethostname()}"
    supervisor = system.procs.start(
        "supervisor",
        cancelflow_command("worker", "-c", "8", "--processes", "2", "-n", hostname),
    )
    children = [child_hostname(hostname, i) for i in range(2)]
    wait_for_workers(system.redis_url, children, broker_url=system.broker_url)
    started = time.monotonic()
    app = create_celery(system.settings())
    try:
        jobs = payway_jobs(system, 40)
        for job_id in jobs:
            assert system.wait(job_id, timeout_s=60)["status"] == "finished"
        stats = app.control.inspect(destination=children, timeout=2).stats() or {}
        assert sorted(stats) == children
        # Both processes ran steps, each in a process of its own.
        assert all(sum(s["total"].values()) > 0 for s in stats.values()), stats
        pids = {h: s["pid"] for h, s in stats.items()}
        assert len(set(pids.values())) == 2

        # A child that dies after it had run a while is replaced; the jobs it held move on.
        more = payway_jobs(system, 20)
        time.sleep(max(0.0, MIN_UPTIME_S - (time.monotonic() - started)) + 0.5)
        subprocess.run(["kill", "-KILL", str(pids[children[1]])], check=True)
        for job_id in more:
            assert system.wait(job_id, timeout_s=90)["status"] == "finished"
        wait_for_workers(system.redis_url, children, broker_url=system.broker_url)
        replaced = app.control.inspect(destination=[children[1]], timeout=2).stats() or {}
        assert replaced[children[1]]["pid"] != pids[children[1]]
        assert supervisor.poll() is None
    finally:
        app.close()

    # SIGTERM to the command: a warm shutdown of every child, and status 0.
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0
    for pid in pids.values():
        wait_until(lambda pid=pid: not _alive(pid), timeout_s=5, what=f"child {pid} gone")
    log = system.procs.log_tail("supervisor", lines=400)
    assert "supervisor.process.restarting" in log
    assert log.count("supervisor.process.stopped") == 2


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_child_that_cannot_start_stops_the_command_with_its_status() -> None:
    """A worker option Celery refuses: the command ends at once, with Celery's usage status,
    instead of restarting children forever."""
    proc = subprocess.run(
        [*cancelflow_command("worker", "--processes", "2", "--pool", "no-such-pool")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CANCELFLOW_LOG_FORMAT": "json", "CANCELFLOW_WORKER__METRICS_PORT": "0"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("supervisor.process.failed") == 1
    assert proc.stderr.count("supervisor.process.started") == 2


# A worker whose consumer fails past what Celery recovers from (here, its task-consuming
# bootstep raises as it starts; at a Sentinel failover it was kombu's AttributeError).
UNRECOVERABLE = """
import sys
from celery.worker.consumer.tasks import Tasks

def start(self, c):
    raise RuntimeError("the consumer cannot go on")

Tasks.start = start
from producers.cli.main import main
sys.argv = ["cancelflow", "worker", "--concurrency", "2"]
main()
"""


def test_a_worker_stopped_by_an_unrecoverable_error_exits_with_a_failure_status(
    redis_url: str,
) -> None:
    """Celery logs "Unrecoverable error" and stops; the command says so by its status, as
    ``celery worker`` does, so that what runs it (systemd's on-failure, the supervisor)
    starts it again."""
    proc = subprocess.run(
        [sys.executable, "-c", UNRECOVERABLE],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "CANCELFLOW_REDIS_URL": redis_url,
            "CANCELFLOW_LOG_FORMAT": "json",
            "CANCELFLOW_WORKER__METRICS_PORT": "0",
        },
    )
    assert "Unrecoverable error" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1, proc.stderr[-3000:]
