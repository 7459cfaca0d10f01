"""``/v1/stats`` from the counts the store keeps: equal to counting every job, and reading a
bounded number of keys however many jobs there are (issue 14, point 9)."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Awaitable
from typing import Any, cast

import fakeredis
from redis.asyncio.client import Pipeline

from cancelflow import lifecycle
from cancelflow.contract import CancellationRequest, Outcome, OutcomeType, TimelineEntry
from cancelflow.store import (
    STATS_BUCKET_S,
    STATS_PREFIX,
    STATS_WINDOW_S,
    JobStore,
    job_key,
)
from producers import listing
from producers.schemas import StatsQuery


class Recording(fakeredis.FakeAsyncRedis):
    """fakeredis that notes the name and first key of every command it is sent."""

    sent: list[tuple[str, str]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent = []

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(_named(args))
        return await super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        outer = self

        class Noted(Pipeline):
            async def execute(self, raise_on_error: bool = True) -> list[Any]:
                outer.sent.extend(_named(args) for args, _ in self.command_stack)
                return await super().execute(raise_on_error)

            async def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
                outer.sent.append(_named(args))
                return await super().immediate_execute_command(*args, **options)

        return Noted(self.connection_pool, self.response_callbacks, transaction, shard_hint)


def _named(args: tuple[Any, ...]) -> tuple[str, str]:
    name = str(args[0]).upper()
    first = args[1] if len(args) > 1 else ""
    return name, first.decode() if isinstance(first, bytes) else str(first)


def entry() -> TimelineEntry:
    return TimelineEntry(at="2026-01-01T00:00:00Z", step="test", event="moved")


async def make_jobs(store: JobStore, n: int, rng: random.Random) -> None:
    """``n`` jobs on two providers, moved at random through every status (and replayed),
    with repeated and joined requests that make no job."""
    for i in range(n):
        provider = rng.choice(["payway", "azotte"])
        req = CancellationRequest(
            provider=provider,
            subscription={"account_id": f"{i:024x}"},
            idempotency_key=f"key-{i}",
        )
        job = (await store.create(req, identity=f"sub-{i}")).job
        # The same request again, and another one for the same subscription: no new job.
        assert (await store.create(req, identity=f"sub-{i}")).how == "existing"
        other = CancellationRequest(provider=provider, subscription={"account_id": "0" * 24})
        assert (await store.create(other, identity=f"sub-{i}")).how == "joined"
        path = rng.choice(["queued", "checking", "awaiting", "finished", "dead", "replayed"])
        if path == "queued":
            continue
        await store.transition(job, lifecycle.Event.CHECK, entry=entry())
        if path == "checking":
            continue
        if path == "awaiting":
            await store.transition(job, lifecycle.Event.PARK, entry=entry(), deadline=1.0)
            # A move that is refused (not allowed from here) counts nothing.
            assert not (await store.transition(job, lifecycle.Event.CHECK)).applied
        elif path == "finished":
            await store.transition(
                job,
                lifecycle.Event.FINISH,
                identity=f"sub-{i}",
                outcome=Outcome(
                    type=rng.choice([OutcomeType.CANCELLED, OutcomeType.ALREADY_CANCELLED])
                ),
            )
            # A late duplicate finish is refused: the outcome counts once.
            assert not (
                await store.transition(
                    job,
                    lifecycle.Event.FINISH,
                    identity=f"sub-{i}",
                    outcome=Outcome(type=OutcomeType.CANCELLED),
                )
            ).applied
        else:
            await store.transition(job, lifecycle.Event.DEAD_LETTER, identity=f"sub-{i}")
            if path == "replayed":
                await store.replay(job.id, lifecycle.Event.REPLAY, entry())
                await store.transition(job, lifecycle.Event.CHECK, entry=entry())
        # A redelivered step: the record changes, the status does not.
        await store.record(job.id, entry())


async def brute_force_outcomes(redis: fakeredis.FakeAsyncRedis) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for raw in await redis.zrange("cf:jobs", 0, -1):
        provider, outcome = await cast(
            "Awaitable[list[Any]]", redis.hmget(job_key(raw.decode()), ["provider", "outcome"])
        )
        if outcome:
            counts[provider.decode()][json.loads(outcome)["type"]] += 1
    return {p: dict(sorted(c.items())) for p, c in sorted(counts.items())}


async def brute_force(redis: fakeredis.FakeAsyncRedis) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for raw in await redis.zrange("cf:jobs", 0, -1):
        job_id = raw.decode()
        provider, status = await cast(
            "Awaitable[list[Any]]", redis.hmget(job_key(job_id), ["provider", "status"])
        )
        counts[provider.decode()][status.decode()] += 1
    return {p: dict(sorted(c.items())) for p, c in sorted(counts.items())}


async def test_stats_equal_a_count_of_every_job() -> None:
    redis = fakeredis.FakeAsyncRedis()
    store = JobStore(redis, retention_s=3600, idempotency_ttl_s=3600)
    await make_jobs(store, 60, random.Random(14))

    found = await listing.stats(redis, since_s=3600)

    expected = await brute_force(redis)
    assert found.jobs == expected
    assert found.total == 60
    assert found.outcomes == await brute_force_outcomes(redis)
    assert {k for c in found.outcomes.values() for k in c} == {"cancelled", "already_cancelled"}
    # Every status a job can rest in is among them: every kind of move was counted.
    statuses = {s for c in expected.values() for s in c}
    assert {"queued", "checking", "awaiting_decision", "finished", "dead_lettered"} <= statuses


async def test_stats_read_the_same_few_keys_whatever_the_number_of_jobs() -> None:
    reads = []
    for n in (3, 60):
        redis = Recording()
        store = JobStore(redis, retention_s=3600, idempotency_ttl_s=3600)
        await make_jobs(store, n, random.Random(n))
        redis.sent.clear()
        found = await listing.stats(redis, since_s=STATS_WINDOW_S)
        assert found.total == n
        reads.append(sorted(redis.sent))
    assert reads[0] == reads[1]
    stats_reads = [key for name, key in reads[1] if key.startswith(STATS_PREFIX)]
    assert len(stats_reads) <= STATS_WINDOW_S // STATS_BUCKET_S + 1
    assert not [key for _, key in reads[1] if key.startswith("cf:job")]
    # No command but the one pipeline's reads: the stats hashes and three totals.
    assert len(reads[1]) == len(stats_reads) + 3


def test_the_stats_window_is_the_widest_the_api_accepts() -> None:
    assert StatsQuery.model_fields["since_s"].metadata[-1].le == STATS_WINDOW_S


async def test_jobs_created_before_the_window_are_not_counted() -> None:
    redis = fakeredis.FakeAsyncRedis()
    store = JobStore(redis, retention_s=3600, idempotency_ttl_s=3600)
    await make_jobs(store, 3, random.Random(1))
    # Move the counts three hours back, as if the jobs were created then.
    (key,) = [k.decode() for k in await redis.keys(f"{STATS_PREFIX}*")]
    hour = int(key.rsplit(":", 1)[1])
    await redis.rename(key, f"{STATS_PREFIX}{hour - 3}")
    assert (await listing.stats(redis, since_s=STATS_BUCKET_S)).total == 0
    assert (await listing.stats(redis, since_s=4 * STATS_BUCKET_S)).total == 3


async def test_a_job_and_its_count_are_one_round_trip_even_after_a_script_flush() -> None:
    redis = Recording()
    store = JobStore(redis, retention_s=3600, idempotency_ttl_s=3600)
    await make_jobs(store, 1, random.Random(2))
    redis.sent.clear()
    req = CancellationRequest(provider="payway", subscription={"account_id": "f" * 24})
    await store.create(req, identity="one-trip")
    # The MULTI's two scripts and nothing before them (no SCRIPT EXISTS).
    assert [name for name, _ in redis.sent] == ["EVALSHA", "EVAL"]
    # Redis lost its scripts (a restart): the create is sent again, once, and counted once.
    await redis.script_flush()
    redis.sent.clear()
    other = CancellationRequest(provider="payway", subscription={"account_id": "e" * 24})
    assert (await store.create(other, identity="after-flush")).how == "created"
    assert [name for name, _ in redis.sent] == ["EVALSHA", "EVAL", "SCRIPT LOAD", "EVALSHA", "EVAL"]
    found = await listing.stats(redis, since_s=3600)
    assert found.jobs == await brute_force(redis)
    assert found.total == 3
