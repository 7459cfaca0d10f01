"""Commands of the async Redis client packed by hiredis, as the sync client's already are.

redis-py's sync connections pack each command into the Redis protocol with hiredis's C
``pack_command`` when hiredis is installed (``redis.connection.HiredisRespSerializer``); its
asyncio connections always pack in Python (``redis.asyncio.connection.Connection
.pack_command``), joining the bytes again for every argument. A job's creation sends some
forty arguments and a Lua script in one MULTI: packing it in Python costs the API more CPU
than the rest of the round trip. The bytes are the same either way (tested); so are the
errors (``DataError`` for a value Redis cannot take). Written against redis-py 6.4
(``tests/unit/test_redis_packing.py`` fails when the method replaced here changes).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

_SERIALIZER = HiredisRespSerializer()


class HiredisPacking:
    """Mixed into an async ``Connection`` class (TCP, TLS or Unix socket alike): its commands
    (and a pipeline's, which ``pack_commands`` packs one by one) packed by hiredis."""

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = _SERIALIZER.pack(*args)
        return packed


_classes: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def use_hiredis_packing(client: Redis) -> Redis:
    """``client`` with its pool's connections packing commands by hiredis (when installed and
    the client encodes strings as UTF-8, strictly: what hiredis does); returned for chaining."""
    pool = client.connection_pool
    encoding = pool.connection_kwargs.get("encoding", "utf-8")
    errors = pool.connection_kwargs.get("encoding_errors", "strict")
    if not HIREDIS_AVAILABLE or encoding.lower() not in ("utf-8", "utf8") or errors != "strict":
        return client
    base = pool.connection_class
    if not issubclass(base, HiredisPacking):
        found = _classes.get(base)
        if found is None:
            found = _classes[base] = type(f"Hiredis{base.__name__}", (HiredisPacking, base), {})
        pool.connection_class = found
    return client
