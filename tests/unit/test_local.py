"""producers.local's DB locks (on an embedded Redis) and process groups: nothing outlives its
holder for long."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from producers import local
from producers.local import DB_LOCK, EmbeddedRedis, ProcessGroup, locked_db, wait_until


@pytest.fixture
def server() -> Iterator[str]:
    embedded = EmbeddedRedis().start()
    try:
        yield embedded.url
    finally:
        embedded.stop()


def lock_of(url: str) -> str:
    return DB_LOCK.format(db=int(url.rsplit("/", 1)[-1]))


def test_a_db_lock_is_short_lived_and_refreshed_while_held(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "LOCK_TTL_S", 1)
    monkeypatch.setattr(local, "LOCK_REFRESH_S", 0.1)
    admin = redis.Redis.from_url(server)
    with locked_db(server, owner="t") as url:
        assert 0 < cast(int, admin.ttl(lock_of(url))) <= 1
        time.sleep(1.5)  # past the TTL: only the refresh keeps it
        assert admin.exists(lock_of(url))
    assert not admin.exists(lock_of(url))


def test_a_db_lock_is_freed_and_its_db_flushed_on_ctrl_c(server: str) -> None:
    admin = redis.Redis.from_url(server)
    with pytest.raises(KeyboardInterrupt), locked_db(server, owner="t") as url:
        redis.Redis.from_url(url).set("left", "behind")
        raise KeyboardInterrupt
    assert not admin.exists(lock_of(url))
    assert not redis.Redis.from_url(url).exists("left")


def test_a_lock_another_holder_took_is_neither_freed_nor_its_db_flushed(server: str) -> None:
    """A holder suspended past the TTL comes back to a DB someone else holds: hands off."""
    admin = redis.Redis.from_url(server)
    with locked_db(server, owner="t") as url:
        admin.set(lock_of(url), "other:1:x")  # expired meanwhile, and taken
        redis.Redis.from_url(url).set("theirs", "1")
    assert admin.get(lock_of(url)) == b"other:1:x"
    assert redis.Redis.from_url(url).exists("theirs")


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stop_takes_what_the_child_left_in_its_process_group(tmp_path: Path) -> None:
    procs = ProcessGroup(env={}, log_dir=tmp_path)
    child = (
        "import subprocess, time\n"
        "grandchild = subprocess.Popen(['sleep', '60'])\n"
        "print(grandchild.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    procs.start("parent", [sys.executable, "-c", child])
    log = tmp_path / "parent.log"
    wait_until(lambda: log.read_text().strip().isdigit(), timeout_s=10, what="grandchild")
    grandchild = int(log.read_text())
    assert running(grandchild)
    procs.stop("parent")  # SIGTERM ends the parent; its sleep would carry on
    wait_until(lambda: not running(grandchild), timeout_s=5, what="the grandchild's end")
