"""Redis clients from a URL: a plain ``redis://`` one, or the master behind Sentinel.

For ``sentinel://`` (``cancelflow.broker_urls.parse_sentinel``), the client asks the
sentinels for the master and, after a failover, for the new one: redis-py's Sentinel
connection turns the old master's ``READONLY`` answer (it came back as a replica) into a
connection error, and the client's retry runs the command again on the new master. A Lua
script the new master has never seen answers ``NOSCRIPT``: redis-py's ``Script`` loads it and
runs it again. Both are safe to retry: a command refused by a replica or for a missing
script did nothing.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from cancelflow.broker_urls import parse_sentinel, scheme_of

SentinelArgs = tuple[list[tuple[str, int]], dict[str, Any], str, dict[str, Any]]


def _sentinel_args(url: str, kwargs: dict[str, Any]) -> SentinelArgs:
    """The sentinels, their options, the master's name, and the master client's options."""
    found = parse_sentinel(url)
    timeouts: dict[str, Any] = {
        k: kwargs[k] for k in ("socket_timeout", "socket_connect_timeout") if k in kwargs
    }
    master_kwargs = {
        **kwargs,
        "db": found.db,
        "username": found.username,
        "password": found.password,
    }
    # The sentinels themselves take the same timeouts (and, as is usual, no password).
    sentinel_kwargs: dict[str, Any] = {"sentinel_kwargs": timeouts, **timeouts}
    return list(found.sentinels), sentinel_kwargs, found.master, master_kwargs


def async_client(url: str, **kwargs: Any) -> redis.asyncio.Redis:
    """An asyncio client for ``url`` (``redis://``, ``rediss://``, ``unix://``, ``sentinel://``)."""
    if scheme_of(url) != "sentinel":
        client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(url, **kwargs)
        return client
    sentinels, sentinel_kwargs, master, master_kwargs = _sentinel_args(url, kwargs)
    sentinel = redis.asyncio.sentinel.Sentinel(sentinels, **sentinel_kwargs)  # type: ignore[no-untyped-call]
    master_client: redis.asyncio.Redis = sentinel.master_for(
        master, redis_class=redis.asyncio.Redis, **master_kwargs
    )
    return master_client


def sync_client(url: str, **kwargs: Any) -> redis.Redis:
    """A blocking client for ``url`` (as ``async_client``)."""
    if scheme_of(url) != "sentinel":
        return redis.Redis.from_url(url, **kwargs)
    sentinels, sentinel_kwargs, master, master_kwargs = _sentinel_args(url, kwargs)
    # redis-py leaves its blocking Sentinel unannotated.
    sentinel = redis.sentinel.Sentinel(sentinels, **sentinel_kwargs)  # type: ignore[no-untyped-call]
    master_client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        master, redis_class=redis.Redis, **master_kwargs
    )
    return master_client
