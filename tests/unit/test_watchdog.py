"""The watchdog: a job whose message was lost is re-sent once its queue has moved past it,
never while its message may still be waiting or a live process holds its step."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import fakeredis

from cancelflow import chain, lifecycle, sweeps, wiring
from cancelflow.contract import CancellationRequest, Step, TimelineEntry, isoformat, utcnow
from cancelflow.settings import Settings
from cancelflow.store import WORKERS
from cancelflow.wiring import build_deps

QUEUE = "cancellations.payway"


async def queued_job(deps: wiring.Deps, n: int = 0) -> tuple[str, float]:
    """A queued job whose first step was sent, and when it last moved (epoch s)."""
    job = (
        await deps.store.create(
            CancellationRequest(provider="payway", subscription={"account_id": f"{n:024x}"}),
            identity=f"sub-{n}",
        )
    ).job
    await deps.store.mark_dispatched(job.id)
    return job.id, datetime.fromisoformat(job.updated_at).timestamp()


async def sweep(deps: wiring.Deps, oldest: float, **options: float) -> list[str]:
    await asyncio.sleep(0.05)
    found = await sweeps.resume_stalled(
        deps, quiet_for_s=0.01, oldest_waiting={QUEUE: oldest}, **options
    )
    return [n.job_id for n in found]


def test_a_lost_message_is_resent_once_the_queue_moved_past_it() -> None:
    async def go() -> None:
        deps = build_deps(Settings(), redis=fakeredis.FakeAsyncRedis())
        job_id, moved = await queued_job(deps)
        # The oldest message waiting was sent before the job: its own may be behind it.
        assert await sweep(deps, oldest=moved - 30) == []
        # Only messages sent well after the job wait: its own was taken and lost.
        assert await sweep(deps, oldest=moved + 30) == [job_id]
        job = await deps.store.get(job_id)
        assert job.timeline[-1].event == "resent"
        assert job.timeline[-1].details["step"] == Step.ELIGIBILITY.value

    asyncio.run(go())


def test_an_empty_queue_means_the_message_is_gone() -> None:
    async def go() -> None:
        deps = build_deps(Settings(), redis=fakeredis.FakeAsyncRedis())
        job_id, _ = await queued_job(deps)
        assert await sweep(deps, oldest=float("inf")) == [job_id]

    asyncio.run(go())


async def held_by_w1(redis: fakeredis.FakeAsyncRedis) -> tuple[wiring.Deps, str, float]:
    """A job whose step the live process w1 began; and when w1 last beat (Redis's clock)."""
    deps = build_deps(Settings(), redis=redis, holder="w1")
    job_id, _ = await queued_job(deps)
    now = (await redis.time())[0]
    await redis.zadd(WORKERS, {"w1": now})
    began = await deps.store.begin(
        job_id,
        lifecycle.Event.CHECK,
        entry=TimelineEntry(at="2026-01-01T00:00:00Z", step="eligibility", event="started"),
    )
    assert began.job.held_by == "w1"
    return deps, job_id, now


def test_a_step_held_by_a_live_process_is_left_alone_a_dead_ones_is_not() -> None:
    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        deps, job_id, now = await held_by_w1(redis)
        assert await sweep(deps, oldest=float("inf")) == []
        await redis.zadd(WORKERS, {"w1": now - 60})  # w1 stopped beating
        assert await sweep(deps, oldest=float("inf")) == [job_id]

    asyncio.run(go())


def test_a_hold_older_than_a_step_can_run_is_a_leftover_of_a_live_process() -> None:
    """A step whose last write was lost with Redis, and whose message could not be given
    back, leaves its hold behind in a process that goes on beating: past the hard time limit
    (the worker task passes ``Limits.task_time_limit_s``, 300 s by default) it counts no more."""

    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        deps, job_id, _ = await held_by_w1(redis)
        limit = Settings().limits().task_time_limit_s
        assert limit == 300
        assert await sweep(deps, oldest=float("inf"), steps_run_at_most_s=limit) == []
        # Taken four minutes ago: it may still be running.
        await held_since(redis, job_id, isoformat_ago(240))
        assert await sweep(deps, oldest=float("inf"), steps_run_at_most_s=limit) == []
        # Taken past the hard limit (and the clock skew allowed): nothing runs it now.
        await held_since(redis, job_id, isoformat_ago(limit + 10))
        assert await sweep(deps, oldest=float("inf"), steps_run_at_most_s=limit) == [job_id]
        # The re-send's record let go of the hold.
        assert (await deps.store.get(job_id)).held_by is None

    asyncio.run(go())


async def held_since(redis: fakeredis.FakeAsyncRedis, job_id: str, at: str) -> None:
    await redis.hset(f"cf:job:{job_id}", "held_since", at)  # type: ignore[misc]  # redis-py's union


def isoformat_ago(seconds: float) -> str:
    return isoformat(utcnow() - timedelta(seconds=seconds))


def test_a_countdown_is_not_a_stall() -> None:
    async def go() -> None:
        deps = build_deps(Settings(), redis=fakeredis.FakeAsyncRedis())
        job_id, _ = await queued_job(deps)
        await chain.note_retry(
            deps, job_id, step=Step.ELIGIBILITY, attempt=0, error={"type": "X"}, delay_s=60
        )
        assert await sweep(deps, oldest=float("inf")) == []

    asyncio.run(go())
