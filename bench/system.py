"""What a bench run stands on: a Redis DB of its own, the sandboxes, the workers, the API.

Redis: the server at ``CANCELFLOW_REDIS_URL`` when one answers, else a ``redis-server`` started
here (as ``scripts/with-redis`` does). Either way the bench takes one DB (1-15) under the same
lock the test fixtures use (``producers.local.locked_db``), so a bench and test sessions running
on one server never share a DB, and it flushes only that DB.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from cancelflow.settings import Settings
from messaging.config import create_celery
from producers.local import (
    ProcessGroup,
    cancelflow_command,
    free_port,
    http_ok,
    locked_db,
    redis_answers,
    wait_until,
    with_db,
)
from producers.supervisor import child_hostname
from sandboxes.env import provider_env

API_TOKEN = "bench-token"  # noqa: S105 - the local API of a bench run
# The baseline's stock pool on each broker, as ``(pool, processes)``: the fastest stock pool
# for this load there (``python -m bench.pools``; bench/README.md, "Which pool for the
# baseline"). On both, prefork with four processes per core (on RabbitMQ threads also stalls
# for its connection every 30 s: README, "RabbitMQ leg").
BASELINE_POOLS: dict[str, tuple[str, int]] = {
    "redis": ("prefork", 8),
    "amqp": ("prefork", 8),
}
# ``BENCH_BASELINE_POOL`` (or ``bench.pools``) makes the baseline use another pool, at the
# concurrency it is started with.
BASELINE_POOL = os.environ.get("BENCH_BASELINE_POOL", "")


def baseline_pool(broker: str, concurrency: int) -> tuple[str, int]:
    """The baseline's pool and concurrency on ``broker``, the bench's being ``concurrency``."""
    if BASELINE_POOL:
        return BASELINE_POOL, concurrency
    return BASELINE_POOLS[broker]


@contextmanager
def redis_server(base_url: str, *, log: Callable[[str], None]) -> Iterator[str]:
    """The URL of a Redis that answers: ``base_url``'s, or a ``redis-server`` started here."""
    if redis_answers(with_db(base_url, 0)):
        log(f"Redis: using {base_url}")
        yield base_url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            f"no Redis answers at {base_url} and redis-server is not installed: "
            "run `make bench` (scripts/with-redis installs it) or start one"
        )
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="cancelflow-bench-redis-")
    proc = subprocess.Popen(  # noqa: S603 - a fixed binary and our own arguments
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--logfile",
            os.path.join(workdir, "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"
    try:
        wait_until(lambda: redis_answers(url), timeout_s=10, what="redis-server")
        log(f"Redis: none answered at {base_url}; started redis-server on port {port}")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def bench_db(server_url: str) -> Iterator[str]:
    """A DB of the bench's own on ``server_url``, flushed before and after (only that DB)."""
    with locked_db(server_url, owner="bench") as url:
        yield url


@dataclass(frozen=True)
class BrokerLeg:
    """The broker a leg of the bench runs on: the job store's Redis (``url`` None), or a
    RabbitMQ vhost of the bench's own (``url``, and its management API)."""

    kind: str  # "redis" | "amqp"
    url: str | None = None
    management_url: str | None = None
    server_pid: int | None = None  # a RabbitMQ server of the bench's own

    def env(self) -> dict[str, str]:
        if self.url is None:
            return {}
        env = {"CANCELFLOW_BROKER_URL": self.url}
        if self.management_url is not None:
            env["CANCELFLOW_BROKER_MANAGEMENT_URL"] = self.management_url
        return env


@contextmanager
def broker_leg(kind: str, *, log: Callable[[str], None]) -> Iterator[BrokerLeg]:
    """The broker of a leg: Redis as is, or a RabbitMQ vhost made for the leg and deleted
    after it, on the server ``tests/rabbitmq.py`` picks (``CANCELFLOW_TEST_AMQP_URL``, the
    machine's when its ``guest`` may make vhosts, else a ``rabbitmq-server`` of its own on
    free ports): the machine's existing vhosts are never touched."""
    if kind == "redis":
        yield BrokerLeg("redis")
        return
    if kind != "amqp":
        raise ValueError(f"unknown broker {kind!r}: redis or amqp")
    from tests.rabbitmq import rabbit_server

    with rabbit_server() as server, server.vhost() as url:
        log(f"RabbitMQ: vhost {url.rsplit('/', 1)[-1]} on {server.amqp_url.split('@')[-1]}")
        yield BrokerLeg("amqp", url, server.management.with_credentials(), server.pid)


def system_env(redis_url: str, sandbox_url: str, broker: BrokerLeg | None = None) -> dict[str, str]:
    """Cancelflow's settings for the bench: the sandboxes, default worker settings (README),
    the leg's broker."""
    return {
        **(broker.env() if broker is not None else {}),
        "CANCELFLOW_REDIS_URL": redis_url,
        "CANCELFLOW_API_TOKENS": API_TOKEN,
        "CANCELFLOW_LOG_FORMAT": "json",
        "CANCELFLOW_CALLBACKS__ALLOW_HTTP": "true",
        "CANCELFLOW_CALLBACKS__ALLOWED_HOSTS": "127.0.0.1",
        # The enqueue benchmark measures the API, not its per-token limit.
        "CANCELFLOW_API__RATE_LIMIT_PER_S": "1000000",
        "CANCELFLOW_API__RATE_LIMIT_BURST": "1000000",
        **provider_env(sandbox_url),
    }


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process and its live child processes (a prefork worker's pool, a
    ``--processes`` worker's processes), from /proc, in MB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            own = next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")), None)
    except OSError:
        return None
    if own is None:
        return None
    return own / 1024 + sum(rss_mb(child) or 0.0 for child in child_pids(pid))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time so far of a process and its live child processes (a prefork
    worker's pool processes, a ``--processes`` worker's), from /proc (None once it is gone).
    This process (the driver) alone: its children are the system under test, each counted
    under its own name."""
    if pid == os.getpid():
        return _own_cpu_seconds(pid)
    own = _own_cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(cpu_seconds(child) or 0.0 for child in child_pids(pid))


def _own_cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The live children of a process, from each of its threads' /proc ``children``."""
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return found


class RssSampler(threading.Thread):
    """Samples the RSS of some processes every ``interval_s``, with the jobs in flight then;
    and the CPU time the processes of ``cpu_pids`` spend meanwhile."""

    def __init__(
        self,
        pids: Mapping[str, int],
        in_flight: Callable[[], int],
        interval_s: float = 0.2,
        *,
        cpu_pids: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pids = dict(pids)
        self.cpu_pids = {**self.pids, **(cpu_pids or {})}
        self._cpu_start = {name: cpu_seconds(pid) for name, pid in self.cpu_pids.items()}
        self.cpu_s: dict[str, float] = {}
        self.in_flight = in_flight
        self.interval_s = interval_s
        self.peak: dict[str, float] = {}
        self.peak_at_window: dict[str, float] = {}  # while the most jobs were in flight
        self.max_in_flight = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval_s)

    def sample(self) -> None:
        flying = self.in_flight()
        if flying > self.max_in_flight:
            self.max_in_flight = flying
            self.peak_at_window.clear()
        for name, pid in self.pids.items():
            mb = rss_mb(pid)
            if mb is None:
                continue
            self.peak[name] = max(self.peak.get(name, 0.0), mb)
            if flying == self.max_in_flight:
                self.peak_at_window[name] = max(self.peak_at_window.get(name, 0.0), mb)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.sample()
        for name, pid in self.cpu_pids.items():
            now, then = cpu_seconds(pid), self._cpu_start.get(name)
            if now is not None and then is not None:
                self.cpu_s[name] = now - then


def wait_for_workers(
    redis_url: str, hostnames: list[str], timeout_s: float = 90, *, broker_url: str | None = None
) -> None:
    """Until every worker answers a control ping (its queues are declared and consumed)."""
    app = create_celery(Settings(redis_url=redis_url, broker_url=broker_url))

    def all_answer() -> bool:
        try:
            return len(app.control.ping(destination=hostnames, timeout=0.5)) == len(hostnames)
        except (redis.RedisError, OSError):
            return False

    try:
        wait_until(all_answer, timeout_s=timeout_s, what=f"workers {hostnames}", interval_s=0.2)
    finally:
        app.close()


@dataclass
class Workers:
    """A set of worker processes of one kind, started together."""

    kind: str
    names: list[str]
    pids: dict[str, int] = field(default_factory=dict)


@dataclass
class BenchSystem:
    """The processes of a bench run, in one ProcessGroup; ``close`` stops them all."""

    redis_url: str
    log_dir: Path
    sandbox_url: str = ""
    api_url: str = ""
    broker: BrokerLeg = field(default_factory=lambda: BrokerLeg("redis"))
    procs: ProcessGroup = field(init=False)

    def __post_init__(self) -> None:
        self.procs = ProcessGroup(env={}, log_dir=self.log_dir)

    @property
    def env(self) -> dict[str, str]:
        return system_env(self.redis_url, self.sandbox_url, self.broker)

    def start_sandbox(self) -> None:
        port = free_port()
        self.sandbox_url = f"http://127.0.0.1:{port}"
        self.procs.start("sandbox", [sys.executable, "-m", "bench.sandbox", str(port)])
        wait_until(lambda: http_ok(f"{self.sandbox_url}/healthz"), timeout_s=30, what="sandbox")

    def start_api(self, processes: int = 1) -> None:
        """``cancelflow api --processes``; returns once every process listens (the first to
        would otherwise take every connection of the first rounds)."""
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        argv = cancelflow_command("api", "--port", str(port), "--processes", str(processes))
        self.procs.start("api", argv, extra_env=self.env)
        wait_until(
            lambda: self.procs.log_tail("api", lines=400).count('"api.listening"') >= processes,
            timeout_s=30,
            what=f"{processes} API process(es) listening",
        )
        wait_until(lambda: http_ok(f"{self.api_url}/readyz"), timeout_s=30, what="API")

    def stop(self, name: str) -> None:
        self.procs.stop(name)

    def other_pids(self) -> dict[str, int]:
        """Processes whose CPU time a run reports besides the workers': the sandboxes, this
        driver, Redis when it runs on this machine (shared with whoever else uses it), and
        RabbitMQ when the bench runs a server of its own."""
        pids = {"driver": os.getpid()}
        if "sandbox" in self.procs.procs:
            pids["sandbox"] = self.procs.procs["sandbox"].pid
        if self.broker.server_pid is not None:
            pids["rabbitmq"] = self.broker.server_pid
        try:
            info: dict[str, Any] = redis.Redis.from_url(self.redis_url).info("server")  # type: ignore[assignment]
            if urlsplit(self.redis_url).hostname in ("127.0.0.1", "localhost"):
                pids["redis"] = int(info["process_id"])
        except (redis.RedisError, KeyError, ValueError):
            pass
        return pids

    def start_workers(
        self,
        kind: str,
        count: int,
        concurrency: int,
        *,
        processes: int = 1,
        probe_dir: Path | None = None,
    ) -> Workers:
        """``kind``: "cancelflow" (``cancelflow worker --processes``), "probe" (one process,
        counted by ``bench.probe``) or "baseline" (``celery -A bench.baseline worker``, its
        pool from ``baseline_pool``)."""
        workers = Workers(kind, [])
        hostnames = []
        for n in range(count):
            name = f"{kind}-{n}"
            hostname = f"bench-{name}-{free_port()}@{socket.gethostname()}"
            extra = {**self.env}
            if kind in ("baseline", "baseline-probe"):
                pool, pool_concurrency = baseline_pool(self.broker.kind, concurrency)
                if kind == "baseline-probe":
                    assert probe_dir is not None
                    extra["BENCH_PROBE_OUT"] = str(probe_dir / f"{name}.json")
                argv = [
                    sys.executable,
                    "-m",
                    "bench.probe" if kind == "baseline-probe" else "celery",
                    *(["celery"] if kind == "baseline-probe" else []),
                    "-A",
                    "bench.baseline",
                    "worker",
                    f"--pool={pool}",
                    f"--concurrency={pool_concurrency}",
                    "--queues=bench.baseline",
                    "--task-events",
                    "--without-gossip",
                    "--without-mingle",
                    "--loglevel=INFO",
                    "-n",
                    hostname,
                ]
            elif kind == "probe":
                assert probe_dir is not None
                extra["BENCH_PROBE_OUT"] = str(probe_dir / f"{name}.json")
                argv = [
                    sys.executable,
                    "-m",
                    "bench.probe",
                    "worker",
                    "-c",
                    str(concurrency),
                    "-n",
                    hostname,
                ]
            else:
                argv = cancelflow_command(
                    "worker", "-c", str(concurrency), "--processes", str(processes), "-n", hostname
                )
            proc = self.procs.start(name, argv, extra_env=extra)
            workers.names.append(name)
            workers.pids[name] = proc.pid
            if kind == "cancelflow" and processes > 1:
                hostnames += [child_hostname(hostname, i) for i in range(processes)]
            else:
                hostnames.append(hostname)
        wait_for_workers(self.redis_url, hostnames, broker_url=self.broker.url)
        return workers

    def stop_workers(self, workers: Workers) -> None:
        for name in workers.names:
            self.procs.stop(name, sig=signal.SIGTERM, timeout_s=30)

    def close(self) -> None:
        self.procs.stop_all()


def wait_idle(settings: Settings, queues: list[str], timeout_s: float = 30) -> None:
    """Until the given queues are empty (leftovers of a run do not spill into the next), on
    the settings' broker: Redis lists, or RabbitMQ queues (a passive declare's count)."""
    deadline = time.monotonic() + timeout_s
    if settings.broker_kind() != "amqp":
        client = redis.Redis.from_url(settings.broker())
        while time.monotonic() < deadline and any(client.llen(q) for q in queues):
            time.sleep(0.2)
        return
    app = create_celery(settings)
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel

            def ready(queue: str) -> int:
                return int(channel.queue_declare(queue, passive=True).message_count)

            while time.monotonic() < deadline and any(ready(q) for q in queues):
                time.sleep(0.2)
    finally:
        app.close()
