"""How many messages wait on each queue, read from the broker itself.

On Redis a queue is a list: its length and its head (the oldest message, with the
``sent_at`` header ``send_step`` sets) are read with ``LLEN``/``LINDEX`` (``cancelflow.metrics``
when the broker is the job store's Redis; ``RedisQueues`` when it is another Redis). On
RabbitMQ, ``AmqpQueues`` reads ``messages_ready`` from the management API when
``CANCELFLOW_BROKER_MANAGEMENT_URL`` is set, else the message count of a passive declare
(no management plugin needed). Neither shows a quorum queue's oldest message without
delivering it (a delivery that counts towards the queue's delivery limit), so on RabbitMQ the
oldest message's age is known only for an empty queue (0); the series is left out otherwise.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from kombu.connection import Connection
from kombu.exceptions import ChannelError
from redis.asyncio import Redis

from cancelflow.metrics import sent_at_of
from cancelflow.redis_clients import async_client
from cancelflow.settings import Settings


@dataclass(frozen=True)
class Waiting:
    """Per queue: messages waiting, and the oldest one's age in seconds when known."""

    depth: Mapping[str, int]
    oldest_age_s: Mapping[str, float]


class QueueReader(Protocol):
    async def read(self, names: Sequence[str], *, now: float) -> Waiting: ...

    async def close(self) -> None: ...


class RedisQueues:
    """A Redis broker apart from the job store: its lists."""

    def __init__(self, url: str) -> None:
        self._redis: Redis = async_client(url, socket_timeout=5, socket_connect_timeout=5)

    async def read(self, names: Sequence[str], *, now: float) -> Waiting:
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(name)
            for name in names:
                pipe.lindex(name, -1)  # kombu pushes on the left and pops on the right
            found: list[Any] = await pipe.execute()
        depths, heads = found[: len(names)], found[len(names) :]
        oldest: dict[str, float] = {}
        for name, head in zip(names, heads, strict=True):
            sent_at = 0.0 if head is None else sent_at_of(head)
            if head is None:
                oldest[name] = 0.0
            elif sent_at > 0:
                oldest[name] = max(0.0, now - sent_at)
        return Waiting(
            depth={n: int(d) for n, d in zip(names, depths, strict=True)}, oldest_age_s=oldest
        )

    async def close(self) -> None:
        await self._redis.aclose()


class AmqpQueues:
    """RabbitMQ: the management API when one is configured, else passive declares."""

    def __init__(self, settings: Settings) -> None:
        self.broker_url = settings.broker()
        self.management_url = settings.broker_management_url
        self.vhost = unquote(urlsplit(self.broker_url).path.lstrip("/")) or "/"
        self._session: aiohttp.ClientSession | None = None

    async def read(self, names: Sequence[str], *, now: float) -> Waiting:
        if self.management_url:
            depth = await self._from_management(names)
        else:
            depth = await asyncio.to_thread(passive_depths, self.broker_url, names)
        return Waiting(depth=depth, oldest_age_s={n: 0.0 for n, d in depth.items() if d == 0})

    async def _from_management(self, names: Sequence[str]) -> dict[str, int]:
        assert self.management_url is not None
        parts = urlsplit(self.management_url)
        auth = aiohttp.BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
        base = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        url = f"{base}/api/queues/{quote(self.vhost, safe='')}"
        params = {"columns": "name,messages_ready"}
        async with self._session.get(url, params=params, auth=auth) as response:
            response.raise_for_status()
            found = {q["name"]: int(q.get("messages_ready") or 0) for q in await response.json()}
        # A queue nobody declared yet holds nothing.
        return {name: found.get(name, 0) for name in names}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def passive_depths(broker_url: str, names: Sequence[str]) -> dict[str, int]:
    """Each queue's ready messages, from a passive declare (0 for one not declared yet)."""
    depths: dict[str, int] = {}
    with Connection(broker_url, connect_timeout=5) as conn:  # type: ignore[no-untyped-call]
        channel = conn.channel()
        try:
            for name in names:
                try:
                    depths[name] = int(channel.queue_declare(name, passive=True).message_count)
                except ChannelError:
                    depths[name] = 0  # RabbitMQ closed the channel with it: take a new one
                    channel = conn.channel()
        finally:
            channel.close()
    return depths


def oldest_waiting(broker_url: str, names: Sequence[str]) -> dict[str, float]:
    """The watchdog's view on RabbitMQ (``worker.tasks.oldest_waiting``): ``inf`` for an
    empty queue, 0 (unknown) for one that holds messages."""
    return {
        name: math.inf if depth == 0 else 0.0
        for name, depth in passive_depths(broker_url, names).items()
    }


def queue_reader(settings: Settings) -> QueueReader | None:
    """What reads the broker's queues, or None when the broker is the job store's Redis
    (``cancelflow.metrics.read_store`` reads its lists in the same round trip)."""
    if settings.broker_kind() == "amqp":
        return AmqpQueues(settings)
    if settings.broker() != settings.redis_url:
        return RedisQueues(settings.broker())
    return None
