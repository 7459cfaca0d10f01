"""Two ``POST /v1/dead-letters/{id}/replay`` at once, over HTTP: one replays, one is refused."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier
from typing import Any

import pytest
from redis.asyncio import Redis

from cancelflow import lifecycle
from cancelflow.dead_letters import DeadLetter
from cancelflow.store import JobStore
from producers.local import http_json
from tests.producers.test_api import payway_body
from tests.support import System

pytestmark = pytest.mark.integration


def dead_letter(system: System, job_id: str) -> str:
    """The job dead-lettered at eligibility, as a worker would leave it."""

    async def go() -> str:
        redis = Redis.from_url(system.redis_url)
        try:
            store = JobStore(redis, retention_s=3600, idempotency_ttl_s=3600)
            job = await store.get(job_id)
            dl = DeadLetter(
                kind="job",
                job_id=job_id,
                provider="payway",
                step="eligibility",
                error_type="ProviderUnavailable",
                error="503",
            )
            assert (
                await store.transition(job, lifecycle.Event.DEAD_LETTER, dead_letter=dl)
            ).applied
            return dl.id
        finally:
            await redis.aclose()

    return asyncio.run(go())


def test_two_replays_at_once_replay_once(billing_api: System) -> None:
    status, job = billing_api.post("/v1/cancellations", payway_body())
    assert status == 202, job
    dl_id = dead_letter(billing_api, job["id"])
    barrier = Barrier(2)

    def replay(_: int) -> tuple[int, Any]:
        barrier.wait()
        return http_json(
            "POST",
            f"{billing_api.api_url}/v1/dead-letters/{dl_id}/replay",
            token=billing_api.token,
        )

    with ThreadPoolExecutor(2) as pool:
        answers = sorted(pool.map(replay, range(2)), key=lambda a: a[0])

    (ok, replayed), (refused, problem) = answers
    assert (ok, replayed["job_id"], replayed["next"]) == (202, job["id"], "eligibility")
    # 409 if it read the entry before the other claimed it, 404 if after: either way, not twice.
    assert refused in (404, 409), problem
    assert "already replayed" in problem["detail"]
    timeline = billing_api.job(job["id"])["timeline"]
    assert [e["event"] for e in timeline].count("replayed") == 1
    assert (
        http_json("GET", f"{billing_api.api_url}/v1/dead-letters/{dl_id}", token=billing_api.token)[
            0
        ]
        == 404
    )
