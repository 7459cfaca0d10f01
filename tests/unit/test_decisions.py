"""The decision deadline sweep: stale entries never stop it."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from cancelflow import decisions, errors, lifecycle
from cancelflow.contract import CancellationRequest, TimelineEntry, utcnow
from cancelflow.settings import Settings
from cancelflow.store import AWAITING
from cancelflow.wiring import build_deps


def test_a_deadline_whose_job_is_gone_or_moved_on_is_dropped_not_fatal() -> None:
    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        deps = build_deps(Settings(), redis=redis)
        job = (
            await deps.store.create(
                CancellationRequest(provider="payway", subscription={"account_id": "a" * 24}),
                identity="sub-1",
            )
        ).job
        await deps.store.begin(
            job.id,
            lifecycle.Event.CHECK,
            entry=TimelineEntry(at="2026-01-01T00:00:00Z", step="t", event="started"),
        )
        # Left by a crash of an older version between a decision and the index: one job that
        # expired since, one that moved on.
        await redis.zadd(AWAITING, {"job_expired": 1.0, job.id: 2.0})
        assert await decisions.due_decisions(deps, utcnow()) == ["job_expired", job.id]
        for job_id in ("job_expired", job.id):
            with pytest.raises(errors.DecisionConflict):
                await decisions.expire_decision(deps, job_id)
        assert await decisions.due_decisions(deps, utcnow()) == []

    asyncio.run(go())
