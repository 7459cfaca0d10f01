"""Payway adapter beyond the shared contract: can_cancel=false read after our own cancel."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from cancelflow.contract import JobRecord, OutcomeType, Status
from sandboxes.payway import DEMO, PaywayRef
from tests.contract.support import answering, harness, job_for

KEY = "payway"


def subscription(ref: PaywayRef) -> dict[str, str]:
    return {**ref.as_json(), "cancellation_reason_id": DEMO.reason_id}


def confirming(job: JobRecord) -> JobRecord:
    """The job as the confirm step holds it: past eligibility, which said can_cancel=true."""
    return job.model_copy(update={"status": Status.CONFIRMING})


async def test_after_our_own_cancel_the_read_says_already_cancelled() -> None:
    async with harness(KEY) as h:
        _, job = await h.check(job_for(KEY, subscription(DEMO.immediate)))
        await h.confirm(job)
        answer, _ = await h.check(confirming(job))
        assert answer.kind == "final"
        assert answer.outcome is not None
        assert answer.outcome.type is OutcomeType.ALREADY_CANCELLED


def can_cancel_false(reason: str | None) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        if request.path.endswith("/access_token"):
            return web.json_response({"access_token": "t0k3n", "expires_in": 3600})
        body: dict[str, Any] = {"item": {"can_cancel": False, "reason": reason}}
        return web.json_response(body)

    return answering(answer)


@pytest.mark.parametrize("reason", [None, "user_product_not_found", "no_subscription_number"])
async def test_can_cancel_false_after_our_cancel_is_already_cancelled_whatever_the_reason(
    reason: str | None,
) -> None:
    async with harness(KEY, app=can_cancel_false(reason)) as h:
        job = job_for(KEY, subscription(DEMO.end_of_period))
        answer, _ = await h.check(confirming(job))
        assert answer.outcome is not None
        assert answer.outcome.type is OutcomeType.ALREADY_CANCELLED
        assert answer.outcome.details == {"reason": reason}
        # At eligibility (before any cancel of ours) the same answer is the reason it says.
        answer, _ = await h.check(job)
        assert answer.outcome is not None
        assert answer.outcome.type is OutcomeType.NOT_ELIGIBLE
        assert answer.outcome.reason == str(reason)
