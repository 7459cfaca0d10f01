"""A producer that dies between recording a job and sending it loses nothing."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from cancelflow.contract import CancellationRequest
from cancelflow.settings import Settings
from cancelflow.store import UNDISPATCHED, JobStore
from cancelflow.wiring import redis_client
from messaging.config import create_celery
from sandboxes.payway import DEMO
from tests.support import System

pytestmark = pytest.mark.integration


def test_a_job_recorded_but_never_sent_is_sent_by_the_sweeper(system: System) -> None:
    system.sandbox.reset("payway")
    request = CancellationRequest(
        provider="payway",
        subscription={
            "account_id": DEMO.immediate.account_id,
            "user_product_id": DEMO.immediate.user_product_id,
            "cancellation_reason_id": DEMO.reason_id,
        },
    )

    async def record_only() -> str:
        # What the API does before it dies: the record, no message.
        settings = Settings(redis_url=system.redis_url)
        client = redis_client(settings)
        try:
            store = JobStore(client, retention_s=3600, idempotency_ttl_s=86400)
            created = await store.create(
                request, identity=f"{DEMO.immediate.account_id}|{DEMO.immediate.user_product_id}"
            )
            return created.job.id
        finally:
            await client.aclose()

    job_id = asyncio.run(record_only())
    time.sleep(1)
    _, job = system.get(f"/v1/cancellations/{job_id}")
    assert job["status"] == "queued"
    # A minute has passed (as far as the sweeper can tell), and beat fires the sweep.
    redis.Redis.from_url(system.redis_url).zadd(UNDISPATCHED, {job_id: time.time() - 120})
    celery = create_celery(system.settings())
    celery.send_task("cancelflow.dispatch_stragglers", queue="maintenance")
    done = system.wait(job_id)
    assert done["outcome"]["type"] == "cancelled"
    assert redis.Redis.from_url(system.redis_url).zscore(UNDISPATCHED, job_id) is None
