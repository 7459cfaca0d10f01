"""``cancelflow.redis_packing``: the async client's commands packed by hiredis, byte for byte
as redis-py's own Python packing would, with the same errors."""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from cancelflow.redis_packing import HiredisPacking, use_hiredis_packing
from cancelflow.settings import Settings
from cancelflow.wiring import redis_client

COMMANDS: list[tuple[Any, ...]] = [
    ("PING",),
    ("CONFIG GET", "save"),  # a command name of two words
    (b"CLIENT SETNAME", b"api"),
    ("SET", "k", "é ü 日本", "PX", 1500),
    ("ZADD", "cf:undispatched", 1764590000.123, "job_1", 0.1, "job_2", 1e20, "job_3"),
    ("HSET", "cf:job:1", "n", -(2**70), "f", -0.0, "b", b"\x00\xff", "m", memoryview(b"mv")),
    ("EVAL", "return redis.call('GET', KEYS[1])\n" * 400, 1, "cf:job:1"),  # over the cutoff
    ("LPUSH", "q", "x" * 10_000),
]


def _python() -> Connection:
    return Connection()


def _hiredis() -> Connection:
    made: Connection = type("HiredisConnection", (HiredisPacking, Connection), {})()
    return made


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: str(a[0])[:12])
def test_a_command_packs_to_the_same_bytes(args: tuple[Any, ...]) -> None:
    assert b"".join(_hiredis().pack_command(*args)) == b"".join(_python().pack_command(*args))


def test_a_pipeline_packs_to_the_same_bytes() -> None:
    assert b"".join(_hiredis().pack_commands(COMMANDS)) == b"".join(
        _python().pack_commands(COMMANDS)
    )


@pytest.mark.parametrize("value", [True, None, object(), {"a": 1}])
def test_what_redis_cannot_take_is_a_data_error_either_way(value: Any) -> None:
    for conn in (_python(), _hiredis()):
        with pytest.raises(DataError):
            conn.pack_command("SET", "k", value)


def test_the_upstream_methods_are_the_ones_this_was_written_against() -> None:
    # redis-py 6.4's asyncio Connection.pack_command (replaced) and pack_commands (which
    # calls it per command). Changed upstream: compare them with redis_packing again.
    def digest(method: Any) -> str:
        return hashlib.sha256(inspect.getsource(method).encode()).hexdigest()

    assert digest(Connection.pack_command) == (
        "9a0e503fdcf56314bc4acfdf1a45f5382356b83fef31be800ca7d127bcc78745"
    )
    assert digest(Connection.pack_commands) == (
        "6a0fb874993fb2e418f8d2c5e90381095f97826770e88e238270693ff30c1692"
    )


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://127.0.0.1:6390/0", Connection),
        ("rediss://127.0.0.1:6390/0", SSLConnection),
        ("unix:///tmp/redis.sock", UnixDomainSocketConnection),
    ],
)
def test_the_client_keeps_its_kind_of_connection(url: str, kind: type[Connection]) -> None:
    client = redis_client(Settings(redis_url=url))
    made = client.connection_pool.connection_class
    assert issubclass(made, kind) and issubclass(made, HiredisPacking)
    # Applied twice (a second client on the same pool): still one mixin.
    assert use_hiredis_packing(client).connection_pool.connection_class is made


def test_a_client_with_another_encoding_keeps_python_packing() -> None:
    client = Redis.from_url("redis://127.0.0.1:6390/0", encoding="latin-1")
    assert use_hiredis_packing(client).connection_pool.connection_class is Connection
