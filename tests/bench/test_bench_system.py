"""The bench's own accounting: what it counts as a worker's CPU, which pool the baseline uses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import system
from bench.system import baseline_pool, child_pids, cpu_seconds, rss_mb

SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"


def test_a_process_cpu_counts_its_live_children() -> None:
    """A prefork worker's steps run in its children: their CPU is the worker's CPU."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"child = subprocess.Popen([sys.executable, '-c', {SPIN!r} + 'time.sleep(30)'])\n"
            "time.sleep(30)\n",
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            children = child_pids(parent.pid)
            if children and (cpu_seconds(children[0]) or 0.0) >= 0.5:
                break
            assert time.monotonic() < deadline, "the child did not spin"
            time.sleep(0.05)
        own = cpu_seconds(parent.pid)
        assert own is not None
        # The parent itself only sleeps: most of what is counted is the child's.
        assert own >= 0.5
    finally:
        for pid in child_pids(parent.pid):
            subprocess.run(["kill", str(pid)], check=False)
        parent.kill()
        parent.wait()
    assert cpu_seconds(parent.pid) is None


def test_the_driver_counts_its_own_cpu_only() -> None:
    """The bench's children (the API, the workers) are measured under their own names: the
    driver's figure must not count them again."""
    child = subprocess.Popen([sys.executable, "-c", SPIN + "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while (cpu_seconds(child.pid) or 0.0) < 0.5:
            assert time.monotonic() < deadline, "the child did not spin"
            time.sleep(0.05)
        before = time.process_time()
        driver = cpu_seconds(os.getpid())
        assert driver is not None
        assert driver <= time.process_time() + 0.05
        assert driver >= before - 0.05
    finally:
        child.kill()
        child.wait()


def test_a_worker_rss_counts_its_processes() -> None:
    """A ``--processes`` worker's memory is its supervisor's and its children's."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c',"
            " 'x = bytearray(64 << 20); import time; time.sleep(30)'])\n"
            "time.sleep(30)\n",
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while not (children := child_pids(parent.pid)) or (rss_mb(children[0]) or 0) < 64:
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.05)
        total, own = rss_mb(parent.pid), _own_rss_mb(parent.pid)
        assert total is not None and own is not None
        assert total >= own + 64
    finally:
        for pid in child_pids(parent.pid):
            subprocess.run(["kill", str(pid)], check=False)
        parent.kill()
        parent.wait()


def _own_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024


def test_the_baseline_pool_is_chosen_per_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system, "BASELINE_POOL", "")
    assert baseline_pool("redis", 100) == ("prefork", 8)
    assert baseline_pool("amqp", 100) == ("prefork", 8)
    # BENCH_BASELINE_POOL (or bench.pools) overrides it, at the bench's concurrency.
    monkeypatch.setattr(system, "BASELINE_POOL", "solo")
    assert baseline_pool("amqp", 1) == ("solo", 1)


def test_a_rabbitmq_server_of_the_benchs_own_is_counted(tmp_path: Path) -> None:
    """On RabbitMQ, the broker's CPU per job is one of the figures (when the bench runs the
    server: the machine's is shared with whoever else uses it, and never counted)."""
    leg = system.BrokerLeg("amqp", "amqp://guest:guest@127.0.0.1:1/v", None, server_pid=4242)
    ours = system.BenchSystem("redis://127.0.0.1:1/0", tmp_path, broker=leg)
    assert ours.other_pids()["rabbitmq"] == 4242
    shared = system.BenchSystem(
        "redis://127.0.0.1:1/0", tmp_path, broker=system.BrokerLeg("amqp", leg.url)
    )
    assert "rabbitmq" not in shared.other_pids()
