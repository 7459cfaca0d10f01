"""The audit log of console actions: a Redis list, newest first, and a log line for each."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from cancelflow.contract import isoformat, utcnow
from cancelflow.logging import get_logger

log = get_logger(__name__)

KEY = "cf:audit"
# The newest entries kept; older ones are trimmed as new ones come.
KEEP = 10_000
# How many of an action's dead-letter ids an entry names (its count is always whole).
IDS_KEPT = 50


class AuditEntry(BaseModel):
    at: str = Field(default_factory=lambda: isoformat(utcnow()))
    who: str
    action: str
    count: int
    reason: str
    selection: dict[str, Any] = Field(default_factory=dict)
    ids: list[str] = Field(default_factory=list)
    results: dict[str, int] = Field(default_factory=dict)


async def record(redis: Redis, entry: AuditEntry) -> None:
    """Log ``entry`` (``console.action``) and append it to ``cf:audit``."""
    entry = entry.model_copy(update={"ids": entry.ids[:IDS_KEPT]})
    # Logged first: an action Redis could not record is still in the logs.
    log.info(
        "console.action",
        who=entry.who,
        action=entry.action,
        count=entry.count,
        reason=entry.reason,
        selection=entry.selection,
        results=entry.results,
    )

    async with redis.pipeline(transaction=True) as pipe:
        pipe.lpush(KEY, entry.model_dump_json())
        pipe.ltrim(KEY, 0, KEEP - 1)
        await pipe.execute()


async def recent(redis: Redis, *, limit: int = 100) -> list[AuditEntry]:
    """The newest ``limit`` entries, newest first (entries that do not parse are skipped)."""
    found = []
    for raw in await redis.lrange(KEY, 0, limit - 1):  # type: ignore[misc]
        try:
            found.append(AuditEntry.model_validate(json.loads(raw)))
        except ValueError:
            continue
    return found
