"""A callback attempt for a job that is gone records nothing (issue 14, point 9)."""

from __future__ import annotations

import fakeredis
import pytest

from cancelflow import lifecycle
from cancelflow.contract import CallbackAttempt, CancellationRequest, Outcome, OutcomeType
from cancelflow.errors import JobNotFound
from cancelflow.store import JobStore, job_key


def attempt() -> CallbackAttempt:
    return CallbackAttempt(
        at="2026-01-01T00:00:00Z", event_id="e", event_type="t", url=None, result="delivered"
    )


async def test_an_attempt_for_a_missing_job_raises_job_not_found_and_writes_nothing(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    store = JobStore(fake_redis, retention_s=3600, idempotency_ttl_s=86400)
    gone = "job_" + "0" * 26
    with pytest.raises(JobNotFound):
        await store.add_callback_attempt(gone, attempt(), unwatch=True)
    assert await fake_redis.exists(job_key(gone), f"{job_key(gone)}:callbacks") == 0
    # And reading it is still a plain "not found", not a half record.
    with pytest.raises(JobNotFound):
        await store.get(gone)


async def test_an_attempt_for_an_existing_job_is_kept_as_long_as_the_record(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    store = JobStore(fake_redis, retention_s=3600, idempotency_ttl_s=86400)
    req = CancellationRequest(provider="payway", subscription={"account_id": "a" * 24})
    job = (await store.create(req, identity="sub-1")).job
    await store.transition(job, lifecycle.Event.CHECK)
    await store.transition(job, lifecycle.Event.FINISH, outcome=Outcome(type=OutcomeType.CANCELLED))
    await store.add_callback_attempt(job.id, attempt())
    assert [c.result for c in (await store.get(job.id)).callbacks] == ["delivered"]
    assert 0 < await fake_redis.ttl(f"{job_key(job.id)}:callbacks") <= 3600
