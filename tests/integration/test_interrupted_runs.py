"""An interrupted test run leaves nothing behind: no process it started, no Redis DB locked.

Runs ``pytest`` on ``interrupted/run_a_system.py`` in a session of its own, interrupts it once
its system is up, then looks for every process carrying the run's marker in its environment
(every descendant inherits it, whatever its parent or session became) and for the DB locks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import pytest
import redis

from producers.local import DB_LOCK, LOCK_TTL_S, wait_until, with_db
from tests.support import default_sigint

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
MARKER = "CANCELFLOW_INTERRUPT_MARKER"


def marked(marker: str) -> list[int]:
    """Pids of the processes whose environment carries ``MARKER=marker``."""
    wanted = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or another user's
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


def describe(pids: list[int]) -> list[str]:
    lines = []
    for pid in pids:
        with contextlib.suppress(OSError):
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
            lines.append(f"{pid}: {cmdline.decode(errors='replace')}")
    return lines


@contextlib.contextmanager
def interrupted_run(
    tmp_path: Path, *prefix: str, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """The pytest to interrupt (run by ``prefix``), its marker and its ready file; whatever it
    left is killed."""
    marker = uuid.uuid4().hex
    ready = tmp_path / "ready.json"
    env = {
        **os.environ,
        # What is interrupted is the harness (its processes, its Redis DB locks): on the Redis
        # leg. A rabbitmq-server the tests start (tests/rabbitmq.py, when the machine has no
        # RabbitMQ they may use) is a session of its own whose Erlang VM outlives a SIGKILLed
        # run, and on a loaded machine its shutdown alone outlasts this test's waits.
        "CANCELFLOW_TEST_BROKERS": "redis",
        **env,
        MARKER: marker,
        "CANCELFLOW_INTERRUPT_READY": str(ready),
    }
    log = (tmp_path / "pytest.log").open("wb")
    argv = [*prefix, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    proc = subprocess.Popen(  # its own session: Ctrl-C goes to its process group only
        [*argv, str(HERE / "interrupted" / "run_a_system.py")],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=default_sigint,  # the Ctrl-C this test sends must reach it
    )
    try:
        yield proc, marker, ready
    finally:
        for pid in marked(marker):  # only processes this test started carry the marker
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        log.close()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    with interrupted_run(tmp_path) as found:
        yield found


def redis_servers_on(port: int) -> list[str]:
    """The redis-server processes serving ``port`` (a server retitles itself
    ``redis-server HOST:PORT``, over its environment too: no marker to find it by)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if (
                entry.name.isdigit()
                and cmdline.startswith("redis-server")
                and f":{port}" in cmdline
            ):
                found.append(f"{entry.name}: {cmdline}")
    return found


def interrupt(proc: subprocess.Popen[bytes], how: str) -> None:
    if how == "ctrl-c":  # what a terminal does: SIGINT to the whole foreground process group
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_run_leaves_no_process_and_no_lock(
    run: tuple[subprocess.Popen[bytes], str, Path], how: str, tmp_path: Path
) -> None:
    proc, marker, ready = run
    wait_until(lambda: ready.exists() or proc.poll() is not None, timeout_s=120, what="system")
    assert ready.exists(), (tmp_path / "pytest.log").read_text()
    dbs = json.loads(ready.read_text())["dbs"]
    started = marked(marker)
    assert len(started) >= 4, describe(started)  # pytest, sandbox, API, worker at least

    interrupt(proc, how)
    proc.wait(90)

    log = (tmp_path / "pytest.log").read_text()
    assert "KeyboardInterrupt" in log, log
    # The children stop on their own SIGTERM, or are killed: give the kernel a moment to reap.
    deadline = time.monotonic() + 5
    while (left := marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], describe(left)
    admin = redis.Redis.from_url(with_db(dbs[0], 0))
    for url in dbs:
        db = int(urlsplit(url).path.strip("/"))
        assert admin.exists(DB_LOCK.format(db=db)) == 0, url


def test_a_killed_run_takes_its_children_along_and_its_locks_expire(
    run: tuple[subprocess.Popen[bytes], str, Path], tmp_path: Path
) -> None:
    """SIGKILL leaves no teardown to run: the children die with their parent (Linux's
    PR_SET_PDEATHSIG), and the locks, no longer refreshed, expire within LOCK_TTL_S."""
    proc, marker, ready = run
    wait_until(lambda: ready.exists() or proc.poll() is not None, timeout_s=120, what="system")
    assert ready.exists(), (tmp_path / "pytest.log").read_text()
    dbs = json.loads(ready.read_text())["dbs"]
    proc.kill()
    proc.wait(10)

    deadline = time.monotonic() + 10
    while (left := marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], describe(left)
    admin = redis.Redis.from_url(with_db(dbs[0], 0))
    for url in dbs:
        ttl = cast(int, admin.ttl(DB_LOCK.format(db=int(urlsplit(url).path.strip("/")))))
        assert 0 < ttl <= LOCK_TTL_S, (url, ttl)


def test_ctrl_c_on_make_test_stops_its_redis_after_the_teardown(tmp_path: Path) -> None:
    """``make test`` runs pytest under ``scripts/with-redis``: Ctrl-C reaches pytest, whose
    teardown (stopping its processes, releasing and flushing its DBs) still finds its Redis,
    and the server is stopped after."""
    no_url = {"CANCELFLOW_REDIS_URL": "", "CANCELFLOW_TEST_REDIS_URL": ""}
    with interrupted_run(tmp_path, str(ROOT / "scripts" / "with-redis"), **no_url) as found:
        proc, marker, ready = found
        wait_until(lambda: ready.exists() or proc.poll() is not None, timeout_s=120, what="system")
        assert ready.exists(), (tmp_path / "pytest.log").read_text()
        port = urlsplit(json.loads(ready.read_text())["dbs"][0]).port
        assert port is not None
        assert redis_servers_on(port), "the run's own server"

        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(90)

        log = (tmp_path / "pytest.log").read_text()
        assert "KeyboardInterrupt" in log, log
        # pytest's "interrupted", with no teardown error: Redis still answered it.
        assert proc.returncode == pytest.ExitCode.INTERRUPTED, log
        assert "Error" not in log, log
        deadline = time.monotonic() + 5
        while (left := marked(marker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == [], describe(left)
        assert redis_servers_on(port) == []
