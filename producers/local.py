"""Running the whole system on one machine: an embedded Redis and a group of child processes.

Used by ``cancelflow demo``, the integration tests and the benchmark.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_answers(url: str, *, timeout_s: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


@dataclass
class EmbeddedRedis:
    """fakeredis's TCP server (with Lua) in a thread: a Redis for machines that have none."""

    port: int = field(default_factory=free_port)
    _server: Any = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        from fakeredis import TcpFakeServer

        self._server = TcpFakeServer(("127.0.0.1", self.port), server_type="redis")
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, name="embedded-redis"
        )
        self._thread.start()
        wait_until(lambda: redis_answers(self.url), timeout_s=10, what="embedded redis")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def with_db(url: str, db: int) -> str:
    """``url`` pointing at Redis database ``db``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


# One lock key for test sessions and bench runs alike: they share Redis servers, and a DB
# taken by one must never be flushed by another.
DB_LOCK = "cancelflow:test-db-lock:{db}"


class NoFreeDb(RuntimeError):
    """Every Redis DB 1-15 is held by another test session or bench run."""


def _sync_client(url: str) -> redis.Redis:
    # The defaults of CANCELFLOW_REDIS_CONNECT_TIMEOUT_S and _READ_TIMEOUT_S: a test session
    # or bench run against a Redis that stopped answering fails instead of hanging.
    return redis.Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=10.0)


@contextmanager
def locked_db(server_url: str, *, owner: str) -> Iterator[str]:
    """A Redis DB (1-15) on ``server_url`` no other holder of the lock uses meanwhile,
    flushed before and after use (only that DB)."""
    admin = _sync_client(with_db(server_url, 0))
    for db in range(1, 16):
        lock = DB_LOCK.format(db=db)
        if admin.set(lock, f"{owner}:{os.getpid()}", nx=True, ex=3 * 3600):
            url = with_db(server_url, db)
            _sync_client(url).flushdb()
            try:
                yield url
            finally:
                _sync_client(url).flushdb()
                admin.delete(lock)
            return
    raise NoFreeDb("every Redis DB 1-15 is locked by a test session or a bench run")


def wait_until(check: Any, *, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not ready after {timeout_s}s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - our own localhost URL
            status: int = resp.status
            return 200 <= status < 300
    except OSError:
        return False


def http_json(
    method: str,
    url: str,
    body: Any = None,
    *,
    token: str | None = None,
    raw: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30,
) -> tuple[int, Any]:
    """One JSON request with the standard library: (status, decoded body or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - caller's URL
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310
            payload, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        payload, status = exc.read(), exc.code
    try:
        return status, json.loads(payload) if payload else None
    except ValueError:
        return status, payload.decode(errors="replace")


def cancelflow_command(*args: str) -> list[str]:
    """``cancelflow ARGS`` run by this interpreter, so it works without the venv on PATH."""
    return [sys.executable, "-m", "producers.cli", *args]


@dataclass
class ProcessGroup:
    """Child processes started together and stopped together (SIGTERM, then SIGKILL)."""

    env: Mapping[str, str]
    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(
        self, name: str, argv: Sequence[str], *, extra_env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(  # noqa: S603 - argv built by us
            list(argv),
            env={**os.environ, **self.env, **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def stop(self, name: str, *, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def kill(self, name: str) -> None:
        """SIGKILL the process and its children at once, as a crashing machine would."""
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
