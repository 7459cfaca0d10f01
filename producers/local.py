"""Running the whole system on one machine: an embedded Redis and a group of child processes.

Used by ``cancelflow demo``, the integration tests and the benchmark.
"""

from __future__ import annotations

import atexit
import contextlib
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
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis

from producers.deathsig import DIE_WITH_PARENT


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
# A holder refreshes its lock every LOCK_REFRESH_S; a holder that died (SIGKILL, a lost machine)
# frees the DB within LOCK_TTL_S instead of holding it for hours.
LOCK_TTL_S = 60
LOCK_REFRESH_S = 10

# Only the holder's token extends or frees a lock: a holder that was suspended past the TTL
# must not take back (or delete) the lock another session took meanwhile.
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class NoFreeDb(RuntimeError):
    """Every Redis DB but 0 is held by another test session or bench run."""


def _sync_client(url: str) -> redis.Redis:
    # The defaults of CANCELFLOW_REDIS_CONNECT_TIMEOUT_S and _READ_TIMEOUT_S: a test session
    # or bench run against a Redis that stopped answering fails instead of hanging.
    return redis.Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=10.0)


class _LockRefresher(threading.Thread):
    """Extends a DB lock every LOCK_REFRESH_S while its holder runs; ``lost`` once it can't."""

    def __init__(self, admin: redis.Redis, key: str, token: str) -> None:
        super().__init__(daemon=True, name=f"refresh-{key}")
        self._admin, self._key, self._token = admin, key, token
        self._halt = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self._halt.wait(LOCK_REFRESH_S):
            try:
                extended = self._admin.eval(_EXTEND, 1, self._key, self._token, str(LOCK_TTL_S))
            except (redis.RedisError, OSError):
                continue  # Redis restarting: the TTL leaves time for the next try
            if not extended:
                self.lost = True
                return

    def stop(self) -> None:
        self._halt.set()
        self.join()


@contextmanager
def locked_db(server_url: str, *, owner: str) -> Iterator[str]:
    """A Redis DB (1 to the server's last) on ``server_url`` no other holder of the lock
    uses meanwhile, flushed before and after use (only that DB, and only while the lock is
    still this one's).

    The lock lives LOCK_TTL_S and is refreshed while held, and released on the way out,
    KeyboardInterrupt included."""
    interrupt_on_sigterm()
    admin = _sync_client(with_db(server_url, 0))
    token = f"{owner}:{os.getpid()}:{uuid.uuid4().hex}"
    for db in range(1, _databases(with_db(server_url, 0))):
        lock = DB_LOCK.format(db=db)
        if admin.set(lock, token, nx=True, ex=LOCK_TTL_S):
            url = with_db(server_url, db)
            refresher = _LockRefresher(admin, lock, token)
            refresher.start()
            try:
                _sync_client(url).flushdb()
                yield url
            finally:
                refresher.stop()
                if admin.get(lock) == token.encode():
                    _sync_client(url).flushdb()
                admin.eval(_RELEASE, 1, lock, token)
            return
    raise NoFreeDb("every Redis DB but 0 is locked by a test session or a bench run")


def _databases(url: str) -> int:
    # make test's own server has 64 (scripts/with-redis); a Redis that hides CONFIG, 16. A
    # client of its own: a server refusing CONFIG may close the connection.
    probe = _sync_client(url)
    try:
        found = cast("dict[str, str]", probe.config_get("databases"))
        return int(found.get("databases", 16))
    except redis.RedisError:
        return 16
    finally:
        probe.close()


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


# Every group with processes still running, so that an interrupted run stops them on its way out.
_running: weakref.WeakSet[ProcessGroup] = weakref.WeakSet()


def _kill_every_group() -> None:
    for group in list(_running):
        group.kill_all()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """SIGTERM is Ctrl-C to a process that started a group (unless it handles SIGTERM itself):
    its ``finally`` blocks and fixture teardowns run and stop the children, where the default
    action would end it at once and leave them running."""
    if threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _interrupt)


atexit.register(_kill_every_group)


@dataclass(eq=False)
class ProcessGroup:
    """Child processes started together and stopped together (SIGTERM, then SIGKILL).

    Each child leads a session (and process group) of its own, so that a signal to the group
    reaches the child's own children too: ``kill`` sends one, and so does ``stop``, to a child
    that would not stop and to whatever a stopped child left behind. None outlives this
    process: groups still running at exit are killed (after Ctrl-C too, and after SIGTERM,
    which ``start`` turns into a KeyboardInterrupt), and on Linux the kernel kills a child when
    the thread that started it ends (PR_SET_PDEATHSIG): start groups from a thread that lasts,
    such as the main one.
    """

    env: Mapping[str, str]
    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(
        self, name: str, argv: Sequence[str], *, extra_env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        interrupt_on_sigterm()
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(  # noqa: S603 - argv built by us
            list(argv),
            env={**os.environ, **self.env, **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=DIE_WITH_PARENT,  # one libc call between fork and exec, no lock taken
        )
        self.procs[name] = proc
        _running.add(self)
        return proc

    def stop(self, name: str, *, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
            finally:
                _killpg(proc)  # a child that would not stop, or what it left behind in its group
                proc.wait(5)
        return proc.returncode

    def kill(self, name: str) -> None:
        """SIGKILL the process and its children at once, as a crashing machine would."""
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            _killpg(proc)
            proc.wait(5)

    def stop_all(self) -> None:
        try:
            for name in list(self.procs):
                self.stop(name)
        finally:
            self.kill_all()  # an interrupted stop leaves nothing running

    def kill_all(self) -> None:
        """SIGKILL every process of the group and its children."""
        for name in list(self.procs):
            self.kill(name)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group ``proc`` leads (its session), if anything is left in it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
