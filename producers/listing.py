"""Reading many jobs at once: filtered, cursor-paginated listing and live counts.

Both walk ``cf:jobs`` (job ids scored by creation time) and read only the few hash fields they
need, pipelined. Provider and status are not indexed: a page reads a bounded stretch of the
index (``SCAN_BUDGET`` ids) and may come back short, with a cursor to go on from.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from cancelflow.contract import Status, isoformat, utcnow
from cancelflow.dead_letters import INDEX as DEAD_LETTER_INDEX
from cancelflow.store import JOBS_INDEX, job_key
from producers.billing import COUNTS_KEY, IGNORED_KEY
from producers.schemas import CURSOR_RE, JobPage, JobQuery, JobSummary, Stats

SCAN_BUDGET = 5000
CHUNK = 250
_FIELDS = ("id", "provider", "status", "outcome", "request", "created_at", "updated_at")


class BadCursor(ValueError):
    """The cursor was not one this API handed out."""


def encode_cursor(score: float, member: str) -> str:
    """``<score>~<job id>``: the last index entry a page read (see ``schemas.CURSOR_RE``)."""
    return f"{score!r}~{member}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The ``(score, job id)`` of a cursor from ``encode_cursor``; ``BadCursor`` for anything
    else. A cursor is the client's to send back unchanged, so it is checked like any input:
    a NaN score, or a member that is no job id, would reach Redis."""
    found = CURSOR_RE.fullmatch(cursor)
    if found is None:
        raise BadCursor("not a cursor from a previous page")
    score = float(found["score"])
    if not math.isfinite(score):  # the format allows none, but say so here too
        raise BadCursor("not a cursor from a previous page")
    return score, found["job_id"]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _walk(
    redis: Redis, *, high: float | str, low: float | str, after: tuple[float, str] | None
) -> AsyncIterator[tuple[float, str]]:
    """Index entries newest first from ``high`` down to ``low``, strictly after ``after``.

    Entries of one score come in reverse member order; a cursor on a shared score skips the
    entries of that score already handed out.
    """
    while True:
        start = 0
        top: float | str = high
        if after is not None:
            score, member = after
            top = score
            ties = await redis.zrangebyscore(JOBS_INDEX, score, score)
            start = sum(1 for t in ties if _s(t) >= member)
        batch = await redis.zrevrangebyscore(
            JOBS_INDEX, top, low, start=start, num=CHUNK, withscores=True
        )
        for raw, score in batch:
            entry = (float(score), _s(raw))
            yield entry
            after = entry
        if len(batch) < CHUNK:
            return


async def list_jobs(redis: Redis, query: JobQuery) -> JobPage:
    """One page of ``query``'s jobs, newest first."""
    after = decode_cursor(query.cursor) if query.cursor else None
    high: float | str = f"({query.created_before.timestamp()!r}" if query.created_before else "+inf"
    low: float | str = query.created_after.timestamp() if query.created_after else "-inf"
    statuses = {s.value for s in query.status} if query.status else None
    items: list[JobSummary] = []
    pending: list[tuple[float, str]] = []
    last: tuple[float, str] | None = None
    scanned = 0
    exhausted = True

    async def flush() -> bool:
        """Read the pending entries; True once the page is full."""
        nonlocal last
        async with redis.pipeline(transaction=False) as pipe:
            for _, job_id in pending:
                pipe.hmget(job_key(job_id), list(_FIELDS))
            rows = await pipe.execute()
        gone = []
        for (score, job_id), row in zip(pending, rows, strict=True):
            last = (score, job_id)
            if row[0] is None:
                gone.append(job_id)
                continue
            summary = _summary(
                {k: _s(v) for k, v in zip(_FIELDS, row, strict=True) if v is not None}
            )
            if (query.provider is None or summary.provider == query.provider) and (
                statuses is None or summary.status.value in statuses
            ):
                items.append(summary)
                if len(items) >= query.limit:
                    break
        if gone:
            # Expired records (past their retention) leave their index entry behind.
            await redis.zrem(JOBS_INDEX, *gone)
        pending.clear()
        return len(items) >= query.limit

    async for entry in _walk(redis, high=high, low=low, after=after):
        pending.append(entry)
        scanned += 1
        if len(pending) >= min(CHUNK, query.limit - len(items)) and await flush():
            exhausted = False
            break
        if scanned >= SCAN_BUDGET:
            await flush()
            exhausted = False
            break
    else:
        if pending:
            await flush()
    if exhausted or last is None:
        return JobPage(items=items, next_cursor=None)
    return JobPage(items=items, next_cursor=encode_cursor(*last))


def _summary(h: dict[str, str]) -> JobSummary:
    request = json.loads(h.get("request") or "{}")
    outcome = json.loads(h["outcome"]) if h.get("outcome") else None
    return JobSummary(
        id=h["id"],
        provider=h.get("provider", ""),
        subscription=request.get("subscription") or {},
        status=Status(h["status"]),
        outcome=outcome["type"] if outcome else None,
        idempotency_key=request.get("idempotency_key"),
        created_at=h.get("created_at", ""),
        updated_at=h.get("updated_at", ""),
    )


async def stats(redis: Redis, *, since_s: float) -> Stats:
    """Jobs created in the last ``since_s`` seconds by provider and status, and the totals
    of dead letters and billing events."""
    since: datetime = utcnow() - timedelta(seconds=since_s)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    batch: list[str] = []

    async def flush() -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in batch:
                pipe.hmget(job_key(job_id), ["provider", "status"])
            rows = await pipe.execute()
        for provider, status in rows:
            if provider is not None and status is not None:
                counts[_s(provider)][_s(status)] += 1
        batch.clear()

    async for _, job_id in _walk(redis, high="+inf", low=since.timestamp(), after=None):
        batch.append(job_id)
        if len(batch) >= 1000:
            await flush()
    if batch:
        await flush()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(DEAD_LETTER_INDEX)
        pipe.hgetall(COUNTS_KEY)
        pipe.hgetall(IGNORED_KEY)
        dead, billing, ignored = await pipe.execute()
    return Stats(
        since=isoformat(since),
        jobs={p: dict(c) for p, c in sorted(counts.items())},
        total=sum(sum(c.values()) for c in counts.values()),
        dead_letters=int(dead),
        billing={_s(k): int(v) for k, v in billing.items()},
        billing_ignored={_s(k): int(v) for k, v in ignored.items()},
    )
