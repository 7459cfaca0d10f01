"""The dead-letter store: jobs, callbacks and messages that could not finish, kept until purged.

Keys: ``cf:dl:{id}`` (the entry as JSON) and ``cf:dl:index`` (ids by time). Nothing here
expires: an operator lists, shows, replays or purges.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from cancelflow.contract import isoformat, utcnow

INDEX = "cf:dl:index"
# "billing_event": a billing event that could not become a job (see producers/billing.py).
Kind = Literal["job", "callback", "poison", "billing_event"]


def _key(dl_id: str) -> str:
    return f"cf:dl:{dl_id}"


class DeadLetter(BaseModel):
    id: str = Field(default_factory=lambda: f"dl_{uuid.uuid4().hex}")
    kind: Kind
    job_id: str | None = None
    provider: str | None = None
    step: str | None = None
    queue: str | None = None
    error_type: str
    error: str
    # Every attempt's error, oldest first, and the last traceback.
    errors: list[dict[str, Any]] = Field(default_factory=list)
    traceback: str | None = None
    # What arrived: the task's arguments, or a poison message's body and headers.
    payload: Any = None
    # For callbacks: which event to deliver again on replay.
    event: str | None = None
    created_at: str = Field(default_factory=lambda: isoformat(utcnow()))


class DeadLetterFilter(BaseModel):
    provider: str | None = None
    kind: Kind | None = None
    error_type: str | None = None
    older_than: datetime | None = None
    newer_than: datetime | None = None

    def matches(self, dl: DeadLetter) -> bool:
        return (
            (self.provider is None or dl.provider == self.provider)
            and (self.kind is None or dl.kind == self.kind)
            and (self.error_type is None or dl.error_type == self.error_type)
        )


class DeadLetterStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def add(self, dl: DeadLetter) -> DeadLetter:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(_key(dl.id), dl.model_dump_json())
            pipe.zadd(INDEX, {dl.id: utcnow().timestamp()})
            await pipe.execute()
        return dl

    @staticmethod
    def add_sync(client: SyncRedis, dl: DeadLetter) -> DeadLetter:
        """``add`` for synchronous callers (the broker transport has no event loop)."""
        with client.pipeline(transaction=True) as pipe:
            pipe.set(_key(dl.id), dl.model_dump_json())
            pipe.zadd(INDEX, {dl.id: utcnow().timestamp()})
            pipe.execute()
        return dl

    async def get(self, dl_id: str) -> DeadLetter | None:
        raw = await self.redis.get(_key(dl_id))
        return DeadLetter.model_validate_json(raw) if raw else None

    async def list(self, flt: DeadLetterFilter | None = None, *, limit: int = 100) -> list[DeadLetter]:
        """Newest first, filtered by provider, kind, error type and age."""
        flt = flt or DeadLetterFilter()
        high = flt.older_than.timestamp() if flt.older_than else "+inf"
        low = flt.newer_than.timestamp() if flt.newer_than else "-inf"
        found: list[DeadLetter] = []
        offset, page = 0, 500
        while len(found) < limit:
            ids = await self.redis.zrevrangebyscore(INDEX, high, low, start=offset, num=page)
            if not ids:
                break
            offset += len(ids)
            raws = await self.redis.mget([_key(i.decode() if isinstance(i, bytes) else i) for i in ids])
            for raw in raws:
                if raw is None:
                    continue
                dl = DeadLetter.model_validate_json(raw)
                if flt.matches(dl):
                    found.append(dl)
                    if len(found) >= limit:
                        break
        return found

    async def delete(self, dl_id: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(_key(dl_id))
            pipe.zrem(INDEX, dl_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def purge(self, flt: DeadLetterFilter | None = None) -> int:
        """Delete every entry the filter matches; returns how many."""
        count = 0
        while batch := await self.list(flt, limit=500):
            for dl in batch:
                count += await self.delete(dl.id)
        return count

    async def count(self) -> int:
        return int(await self.redis.zcard(INDEX))


def poison_payload(body: Any, headers: dict[str, Any] | None, content_type: str | None) -> dict[str, Any]:
    """A message's body as JSON-safe data: text when it decodes, else its repr."""
    if isinstance(body, bytes | bytearray):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            body = repr(bytes(body))
    try:
        json.dumps(body)
    except (TypeError, ValueError):
        body = repr(body)
    return {"body": body, "headers": {k: str(v) for k, v in (headers or {}).items()}, "content_type": content_type}
