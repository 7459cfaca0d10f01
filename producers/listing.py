"""Reading many jobs at once: filtered, cursor-paginated listing and live counts.

Listing walks ``cf:jobs`` (job ids scored by creation time) and reads only the few hash fields
it needs, pipelined. Provider and status are not indexed: a page reads a bounded stretch of the
index (``SCAN_BUDGET`` ids) and may come back short, with a cursor to go on from. Counts read
the hourly stats hashes the job store keeps, never the jobs (``stats``).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from cancelflow.contract import Status, isoformat, utcnow
from cancelflow.dead_letters import INDEX as DEAD_LETTER_INDEX
from cancelflow.store import (
    JOBS_INDEX,
    STATS_BUCKET_S,
    STATS_WINDOW_S,
    job_key,
    stats_hour,
    stats_key,
)
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
    wanted = _matcher(query)
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
            if wanted(summary):
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


def _leaves(value: Any) -> list[str]:
    """Every scalar of a JSON value, as text."""
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [] if value is None else [str(value)]


def _text(value: Any) -> str:
    # A metadata value as ``key=value`` names it: JSON's true/false/null, strings unquoted.
    return value if isinstance(value, str) else json.dumps(value)


def _matcher(query: JobQuery) -> Callable[[JobSummary], bool]:
    """Whether a job matches every filter of ``query`` but the time range and cursor."""
    statuses = {s.value for s in query.status} if query.status else None
    outcomes = {o.value for o in query.outcome} if query.outcome else None
    needle = query.reference.lower() if query.reference else None
    pairs = query.metadata_pairs()

    def matches(job: JobSummary) -> bool:
        return (
            (query.provider is None or job.provider == query.provider)
            and (statuses is None or job.status.value in statuses)
            and (outcomes is None or (job.outcome is not None and job.outcome.value in outcomes))
            and (query.idempotency_key is None or job.idempotency_key == query.idempotency_key)
            and all(k in job.metadata and _text(job.metadata[k]) == v for k, v in pairs.items())
            and (
                needle is None or any(needle in leaf.lower() for leaf in _leaves(job.subscription))
            )
        )

    return matches


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
        metadata=request.get("metadata") or {},
        created_at=h.get("created_at", ""),
        updated_at=h.get("updated_at", ""),
    )


# The stats hash's fields of how jobs ended ("provider|outcome:<type>"), next to the statuses.
OUTCOME_FIELD = "outcome:"


async def stats(redis: Redis, *, since_s: float) -> Stats:
    """Jobs created since the start of the hour ``since_s`` seconds ago, by provider and
    current status and, of those finished, by outcome; the totals of dead letters and
    billing events.

    Read from the hourly counts the job store keeps as it creates and moves jobs
    (``cancelflow.store.stats_key``): at most ``STATS_WINDOW_S / STATS_BUCKET_S + 1`` hashes
    (745 for 31 days), whatever the number of jobs. A job whose record has expired since is
    still counted; jobs created before the counts existed are not."""
    since_s = min(since_s, STATS_WINDOW_S)
    now = utcnow().timestamp()
    first, last = stats_hour(now - since_s), stats_hour(now)
    async with redis.pipeline(transaction=False) as pipe:
        for hour in range(first, last + 1):
            pipe.hgetall(stats_key(hour))
        pipe.zcard(DEAD_LETTER_INDEX)
        pipe.hgetall(COUNTS_KEY)
        pipe.hgetall(IGNORED_KEY)
        *hours, dead, billing, ignored = await pipe.execute()
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    ended: dict[str, Counter[str]] = defaultdict(Counter)
    for found in hours:
        for field, value in found.items():
            provider, _, status = _s(field).rpartition("|")
            if status.startswith(OUTCOME_FIELD):
                ended[provider][status.removeprefix(OUTCOME_FIELD)] += int(value)
            else:
                counts[provider][status] += int(value)
    jobs = {
        provider: {status: n for status, n in sorted(c.items()) if n}
        for provider, c in sorted(counts.items())
    }
    jobs = {provider: c for provider, c in jobs.items() if c}
    outcomes = {
        provider: {kind: n for kind, n in sorted(c.items()) if n}
        for provider, c in sorted(ended.items())
        if any(c.values())
    }
    return Stats(
        since=isoformat(datetime.fromtimestamp(first * STATS_BUCKET_S, UTC)),
        jobs=jobs,
        outcomes=outcomes,
        total=sum(sum(c.values()) for c in jobs.values()),
        dead_letters=int(dead),
        billing={_s(k): int(v) for k, v in billing.items()},
        billing_ignored={_s(k): int(v) for k, v in ignored.items()},
    )


async def recent_outcomes(redis: Redis) -> dict[str, dict[str, Any]]:
    """Per provider, the jobs created since the start of the previous hour (from the hourly
    counts: two small hashes), how many of them are dead-lettered now, and the error rate:
    ``dead_lettered / (finished + dead_lettered)``, None while none of them has ended."""
    found = await stats(redis, since_s=STATS_BUCKET_S)
    out: dict[str, dict[str, Any]] = {}
    for provider, counts in found.jobs.items():
        dead = counts.get(Status.DEAD_LETTERED.value, 0)
        ended = dead + counts.get(Status.FINISHED.value, 0)
        out[provider] = {
            "jobs_last_hour": sum(counts.values()),
            "dead_lettered_last_hour": dead,
            "error_rate": round(dead / ended, 4) if ended else None,
        }
    return out
