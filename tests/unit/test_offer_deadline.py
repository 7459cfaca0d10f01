"""An offer shows when its decision is due: on the job record and in offer_presented."""

from __future__ import annotations

import asyncio
from datetime import datetime

import fakeredis

from cancelflow import callbacks, chain, lifecycle
from cancelflow.contract import CancellationRequest, Offer, Status, TimelineEntry, utcnow
from cancelflow.settings import Settings
from cancelflow.store import AWAITING
from cancelflow.wiring import build_deps


def test_an_offer_carries_its_decision_deadline_on_the_record_and_in_the_event() -> None:
    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        settings = Settings(
            providers={
                "azotte": {
                    "base_url": "http://127.0.0.1:9",
                    "api_key": "k",
                    "tenant": "00000000-0000-0000-0000-000000000000",
                }
            }
        )
        deps = build_deps(settings, redis=redis)
        req = CancellationRequest(provider="azotte", subscription={"order_identifier": "o-1"})
        job = (await deps.store.create(req, identity="o-1")).job
        await deps.store.begin(
            job.id,
            lifecycle.Event.CHECK,
            entry=TimelineEntry(at="2026-01-01T00:00:00Z", step="t", event="started"),
        )
        # What the eligibility step records when the provider answers with an offer.
        offer = Offer(kind="offer", offer_identifier="of_1", details={"discount": "50%"})
        entry = TimelineEntry(at="2026-01-01T00:00:01Z", step="t", event="offer")
        await deps.store.record(job.id, entry, offer=offer)
        assert (await deps.store.get(job.id)).offer == offer  # no deadline before it waits

        before = utcnow()
        nxt = await chain.retention_offer(deps, job.id)
        assert nxt.args == (lifecycle.EVENT_OFFER,)
        parked = await deps.store.get(job.id)
        assert parked.status is Status.AWAITING_DECISION and parked.offer is not None
        deadline = parked.offer.decision_deadline
        assert deadline is not None and deadline.endswith("Z")  # ISO 8601, UTC
        due = datetime.fromisoformat(deadline)
        expected_s = deps.settings.provider("azotte").decision_deadline_s
        assert abs((due - before).total_seconds() - expected_s) < 5
        # The same moment the deadline sweep is indexed by (to the millisecond shown).
        (_, score), *_ = await redis.zrange(AWAITING, 0, -1, withscores=True)
        assert abs(score - due.timestamp()) < 0.001
        # The provider's own offer fields are kept as they were.
        assert parked.offer.model_copy(update={"decision_deadline": None}) == offer

        event = callbacks.build_event(parked, callbacks.OFFER_PRESENTED)
        assert event["data"]["offer"]["decision_deadline"] == deadline
        assert event["data"]["offer"]["offer_identifier"] == "of_1"

    asyncio.run(go())
