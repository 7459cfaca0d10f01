"""The job store on fakeredis (with Lua): atomic, forward-only, idempotent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast

import fakeredis
import pytest

from cancelflow import lifecycle
from cancelflow.contract import CancellationRequest, Outcome, OutcomeType, Status, TimelineEntry
from cancelflow.store import (
    AWAITING,
    WORKERS,
    IdempotencyConflict,
    JobStore,
    confirm_lease_key,
    inflight_key,
)


def store(redis: fakeredis.FakeAsyncRedis) -> JobStore:
    return JobStore(redis, retention_s=3600, idempotency_ttl_s=86400)


def request(**extra: Any) -> CancellationRequest:
    return CancellationRequest(provider="payway", subscription={"account_id": "a" * 24}, **extra)


def entry(event: str) -> TimelineEntry:
    return TimelineEntry(at="2026-01-01T00:00:00Z", step="test", event=event)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_create_then_get(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    async def go() -> None:
        s = store(fake_redis)
        created = await s.create(request(metadata={"k": 1}), identity="sub-1")
        assert created.how == "created"
        job = await s.get(created.job.id)
        assert job.status is Status.QUEUED
        assert job.metadata == {"k": 1}
        assert [e.event for e in job.timeline] == ["queued"]

    run(go())


def test_idempotency_same_body_same_job_other_body_conflict(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async def go() -> None:
        s = store(fake_redis)
        first = await s.create(request(idempotency_key="k1"), identity="sub-1")
        again = await s.create(request(idempotency_key="k1"), identity="sub-1")
        assert (again.how, again.job.id) == ("existing", first.job.id)
        with pytest.raises(IdempotencyConflict) as err:
            await s.create(request(idempotency_key="k1", metadata={"x": 1}), identity="sub-1")
        assert err.value.job_id == first.job.id
        # The key is the caller's own: namespaced (the default one here), not bare.
        key = __import__("hashlib").sha256(b"default\x00k1").hexdigest()
        assert (
            await fake_redis.ttl(f"cf:idem:{__import__('hashlib').sha256(b'k1').hexdigest()}") == -2
        )
        ttl = await fake_redis.ttl(f"cf:idem:{key}")
        assert 86000 < ttl <= 86400

    run(go())


def test_second_request_for_a_subscription_in_flight_joins_until_it_ends(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async def go() -> None:
        s = store(fake_redis)
        first = await s.create(request(), identity="sub-1")
        joined = await s.create(request(metadata={"second": True}), identity="sub-1")
        assert (joined.how, joined.job.id) == ("joined", first.job.id)
        other = await s.create(request(), identity="sub-2")
        assert other.how == "created"
        job = first.job
        await s.transition(job, lifecycle.Event.CHECK)
        await s.transition(
            job,
            lifecycle.Event.FINISH,
            identity="sub-1",
            outcome=Outcome(type=OutcomeType.CANCELLED),
        )
        assert not await fake_redis.exists(inflight_key("payway", "sub-1"))
        fresh = await s.create(request(), identity="sub-1")
        assert fresh.how == "created" and fresh.job.id != first.job.id

    run(go())


def test_transitions_only_move_forward(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    async def go() -> None:
        s = store(fake_redis)
        job = (await s.create(request(), identity="sub-1")).job
        assert (await s.transition(job, lifecycle.Event.CHECK)).applied
        assert (await s.transition(job, lifecycle.Event.CONFIRM)).applied
        # A late, duplicate eligibility task cannot move the job back.
        late = await s.transition(job, lifecycle.Event.CHECK, entry=entry("late"))
        assert not late.applied and late.previous is Status.CONFIRMING
        done = await s.transition(
            job,
            lifecycle.Event.FINISH,
            outcome=Outcome(type=OutcomeType.CANCELLED),
            identity="sub-1",
        )
        assert done.applied
        for event in (
            lifecycle.Event.CHECK,
            lifecycle.Event.CONFIRM,
            lifecycle.Event.PARK,
            lifecycle.Event.FINISH,
            lifecycle.Event.DEAD_LETTER,
        ):
            assert not (await s.transition(job, event)).applied
        record = await s.get(job.id)
        assert record.status is Status.FINISHED
        assert record.outcome is not None and record.outcome.type is OutcomeType.CANCELLED
        assert "late" not in [e.event for e in record.timeline]

    run(go())


@dataclass(frozen=True)
class Pushed:
    """A next step's message, as ``transition(push=...)`` takes it."""

    key: str
    payload: str


async def queued(redis: fakeredis.FakeAsyncRedis, key: str) -> list[bytes]:
    return await cast("Awaitable[list[bytes]]", redis.lrange(key, 0, -1))


def test_a_move_pushes_the_next_message_with_it_only_when_it_applies(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async def go() -> None:
        s = store(fake_redis)
        job = (await s.create(request(), identity="sub-1")).job
        assert (await s.transition(job, lifecycle.Event.CHECK)).applied
        first = Pushed("provider.payway", '{"step": "confirm"}')
        moved = await s.transition(
            job, lifecycle.Event.CONFIRM, entry=entry("eligible"), push=first
        )
        assert moved.applied
        assert await queued(fake_redis, "provider.payway") == [first.payload.encode()]
        assert (await s.get(job.id)).status is Status.CONFIRMING
        # A late duplicate's move is refused: its message is not pushed either.
        late = await s.transition(
            job, lifecycle.Event.CHECK, push=Pushed("provider.payway", "late")
        )
        assert not late.applied
        assert await queued(fake_redis, "provider.payway") == [first.payload.encode()]
        done = await s.transition(
            job,
            lifecycle.Event.FINISH,
            outcome=Outcome(type=OutcomeType.CANCELLED),
            identity="sub-1",
            push=Pushed("callbacks", "cb"),
        )
        assert done.applied and await queued(fake_redis, "callbacks") == [b"cb"]
        record = await s.get(job.id)
        assert record.outcome is not None and record.outcome.type is OutcomeType.CANCELLED

    run(go())


def test_finished_records_expire_after_the_retention(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    async def go() -> None:
        s = store(fake_redis)
        job = (await s.create(request(), identity="sub-1")).job
        assert await fake_redis.ttl(f"cf:job:{job.id}") == -1
        await s.transition(job, lifecycle.Event.CHECK)
        await s.transition(job, lifecycle.Event.FINISH, outcome=Outcome(type=OutcomeType.NOT_FOUND))
        assert 3500 < await fake_redis.ttl(f"cf:job:{job.id}") <= 3600
        assert 3500 < await fake_redis.ttl(f"cf:job:{job.id}:timeline") <= 3600

    run(go())


def test_replay_only_from_dead_lettered(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    async def go() -> None:
        s = store(fake_redis)
        job = (await s.create(request(), identity="sub-1")).job
        assert not (await s.replay(job.id, lifecycle.Event.REPLAY, entry("replayed"))).applied
        await s.transition(job, lifecycle.Event.DEAD_LETTER)
        assert (await s.replay(job.id, lifecycle.Event.REPLAY, entry("replayed"))).applied
        assert not (await s.replay(job.id, lifecycle.Event.REPLAY, entry("replayed"))).applied
        assert (await s.get(job.id)).status is Status.QUEUED

    run(go())


def test_concurrent_transitions_apply_once(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    async def go() -> None:
        s = store(fake_redis)
        job = (await s.create(request(), identity="sub-1")).job
        await s.transition(job, lifecycle.Event.CHECK)
        results = await asyncio.gather(
            *(s.transition(job, lifecycle.Event.PARK) for _ in range(20))
        )
        assert sum(r.applied for r in results) == 1

    run(go())


def test_begin_moves_and_reads_in_one_and_the_lease_is_exclusive(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async def go() -> None:
        s = store(fake_redis)
        job = (await s.create(request(), identity="sub-1")).job
        began = await s.begin(job.id, lifecycle.Event.CHECK, entry=entry("started"))
        assert began.applied and began.previous is Status.QUEUED and began.leased_for_ms is None
        assert began.job.status is Status.CHECKING
        assert [e.event for e in began.job.timeline] == ["queued", "started"]
        # Not in an allowed status: nothing written, the record still read.
        # Not where the event moves from (a confirm's start, for a job still checking).
        again = await s.begin(job.id, lifecycle.Event.CONFIRM_AGAIN, entry=entry("started"))
        assert not again.applied and again.previous is Status.CHECKING
        assert len(again.job.timeline) == 2

        lease = (confirm_lease_key(job.id), 30.0)
        first = await s.begin(
            job.id,
            lifecycle.Event.CHECK,
            entry=entry("confirm"),
            lease_s=lease[1],
        )
        second = await s.begin(
            job.id,
            lifecycle.Event.CHECK,
            entry=entry("confirm"),
            lease_s=lease[1],
        )
        assert first.applied and first.leased_for_ms is None
        assert (
            not second.applied
            and second.leased_for_ms is not None
            and 0 < second.leased_for_ms <= 30_000
        )
        assert [e.event for e in second.job.timeline].count("confirm") == 1
        # The move that ends the step gives the lease back, whether or not it applies.
        await s.transition(job, lifecycle.Event.PARK, release_lease=True)
        assert not await fake_redis.exists(lease[0])

    run(go())


def test_dispatch_marks_are_batched_and_flushed(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    async def go() -> None:
        s = store(fake_redis)
        jobs = [(await s.create(request(), identity=f"sub-{i}")).job.id for i in range(5)]
        assert all([not await s.dispatched(j) for j in jobs])
        for job_id in jobs:
            s.mark_dispatched_soon(job_id)
        await s.flush_marks()
        assert all([await s.dispatched(j) for j in jobs])

    run(go())


def test_a_step_records_its_process_and_a_dead_processs_lease_is_taken_over(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async def go() -> None:
        first = JobStore(fake_redis, retention_s=3600, idempotency_ttl_s=86400, holder="w1")
        second = JobStore(fake_redis, retention_s=3600, idempotency_ttl_s=86400, holder="w2")
        job = (await first.create(request(), identity="sub-1")).job
        now = (await fake_redis.time())[0]
        await fake_redis.zadd(WORKERS, {"w1": now, "w2": now})
        lease = (confirm_lease_key(job.id), 300.0)
        began = await first.begin(
            job.id,
            lifecycle.Event.CHECK,
            entry=entry("s"),
            lease_s=lease[1],
        )
        assert began.applied and began.job.held_by == "w1"
        assert await fake_redis.get(lease[0]) == b"w1"
        # w1 beats: its lease holds against another process.
        busy = await second.begin(job.id, lifecycle.Event.CHECK, entry=entry("s"), lease_s=lease[1])
        assert not busy.applied and busy.leased_for_ms is not None
        assert busy.job.held_by == "w1"
        # w1 stopped beating longer ago than the lease of a process (30 s): taken over.
        await fake_redis.zadd(WORKERS, {"w1": now - 31})
        taken = await second.begin(
            job.id, lifecycle.Event.CHECK, entry=entry("s"), lease_s=lease[1]
        )
        assert taken.applied and taken.leased_for_ms is None and taken.job.held_by == "w2"
        assert await fake_redis.get(lease[0]) == b"w2"
        # The step's next write clears the holder.
        await second.record(job.id, entry("retry_scheduled"))
        assert (await second.get(job.id)).held_by is None

    run(go())


def test_the_decision_index_moves_with_the_job(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    async def go() -> None:
        s = store(fake_redis)
        job = (await s.create(request(), identity="sub-1")).job
        await s.begin(job.id, lifecycle.Event.CHECK, entry=entry("s"))
        await s.transition(job, lifecycle.Event.PARK, deadline=1000.0)
        assert await fake_redis.zscore(AWAITING, job.id) == 1000.0
        assert await s.due_decisions(before=1001.0) == [job.id]
        # A redelivered park keeps the first deadline.
        await s.transition(job, lifecycle.Event.PARK, deadline=5000.0)
        assert await fake_redis.zscore(AWAITING, job.id) == 1000.0
        # The decision's move and the index's removal are one script: no crash between them.
        await s.transition(job, lifecycle.Event.CONFIRM)
        assert await fake_redis.zscore(AWAITING, job.id) is None
        assert await s.due_decisions(before=1001.0) == []

    run(go())


def test_stale_deadlines_are_dropped_and_live_ones_kept(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async def go() -> None:
        s = store(fake_redis)
        parked = (await s.create(request(), identity="sub-1")).job
        await s.begin(parked.id, lifecycle.Event.CHECK, entry=entry("s"))
        await s.transition(parked, lifecycle.Event.PARK, deadline=10.0)
        # What an older version's crash left: a deadline for a job that is gone.
        await fake_redis.zadd(AWAITING, {"job_gone": 5.0})
        assert not await s.drop_deadline(parked.id)
        assert await s.drop_deadline("job_gone")
        assert await s.due_decisions(before=100.0) == [parked.id]

    run(go())
