"""Azotte adapter beyond the shared contract: offers, pending ends, survey, status codes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web

from cancelflow.contract import Decision, OutcomeType, Reason
from cancelflow.errors import ProviderAuthError, ProviderRejected, ProviderUnavailable
from sandboxes.azotte import DEMO
from tests.contract.support import answering, harness, job_for

KEY = "azotte"


def order(order_id: str, **extra: Any) -> dict[str, Any]:
    return {"order_identifier": order_id, **extra}


async def test_an_offer_carries_its_identifier_details_and_reasons() -> None:
    async with harness(KEY) as h:
        answer, job = await h.check(job_for(KEY, order(DEMO.offer)))
        assert answer.kind == "offer"
        assert answer.offer is not None
        assert answer.offer.kind == "offer"
        assert answer.offer.offer_identifier == DEMO.offer_identifier
        assert answer.offer.details["offerIdentifier"] == DEMO.offer_identifier
        assert "title" in answer.offer.details
        assert {r["code"] for r in answer.offer.cancellation_reasons} >= {"PRICE", "USAGE"}
        # The customer rejects it, with survey answers: confirm ends the order.
        rejected = job.model_copy(
            update={"decision": Decision(decision="reject", survey={"reasonCode": "USAGE"})}
        )
        done = await h.confirm(rejected)
        assert done.outcome.type is OutcomeType.CANCELLED
        survey = (await h.state())["cancellations"][DEMO.offer]["survey"]
        # The job's reason, then the customer's answers over it.
        assert json.loads(survey) == {"reasonCode": "USAGE", "comment": "Too expensive"}


async def test_a_presentation_step_is_an_offer_of_kind_presentation() -> None:
    async with harness(KEY) as h:
        answer, _ = await h.check(job_for(KEY, order(DEMO.presentation)))
        assert answer.kind == "offer"
        assert answer.offer is not None
        assert answer.offer.kind == "presentation"
        assert answer.offer.offer_identifier is None
        assert answer.offer.cancellation_reasons


async def test_processed_records_the_reasons_on_the_timeline() -> None:
    async with harness(KEY) as h:
        answer, job = await h.check(job_for(KEY, order(DEMO.processed)))
        assert answer.kind == "eligible"
        assert job.timeline[-1].response["cancellationReasons"]
        assert answer.details["cancellation_reasons"]


@pytest.mark.parametrize(
    ("kind", "by"),
    [("app_store", "app_store"), ("play_store", "play_store"), ("third_party", "payment_provider")],
)
async def test_store_and_third_party_billing_end_pending(kind: str, by: str) -> None:
    async with harness(KEY) as h:
        _, job = await h.check(job_for(KEY, order(getattr(DEMO, kind))))
        done = await h.confirm(job)
        assert done.outcome.type is OutcomeType.PENDING_PROVIDER_CONFIRMATION
        assert done.outcome.details == {"billing_channel": kind, "pending_confirmation_by": by}


async def test_method_and_reason_reach_the_provider() -> None:
    async with harness(KEY) as h:
        job = job_for(
            KEY,
            order(DEMO.processed, cancelation_method="Immediate"),
            reason=Reason(code="CONTENT"),
        )
        _, job = await h.check(job)
        await h.confirm(job)
        cancellation = (await h.state())["cancellations"][DEMO.processed]
        assert cancellation["method"] == "Immediate"
        assert json.loads(cancellation["survey"]) == {"reasonCode": "CONTENT"}


async def test_confirm_without_reason_sends_no_survey() -> None:
    async with harness(KEY) as h:
        _, job = await h.check(job_for(KEY, order(DEMO.processed), reason=None))
        await h.confirm(job)
        assert (await h.state())["cancellations"][DEMO.processed]["survey"] is None


async def test_confirm_of_an_already_cancelled_order() -> None:
    async with harness(KEY) as h:
        done = await h.confirm(job_for(KEY, order(DEMO.already_cancelled)))
        assert done.outcome.type is OutcomeType.ALREADY_CANCELLED


async def test_confirm_of_an_unknown_order_is_not_found() -> None:
    async with harness(KEY) as h:
        done = await h.confirm(job_for(KEY, order(DEMO.not_found)))
        assert done.outcome.type is OutcomeType.NOT_FOUND


async def test_another_conflict_is_a_typed_rejection_naming_the_request() -> None:
    async with harness(KEY) as h:
        # confirm without the request phase: 409 REQUEST_PHASE_REQUIRED, not "already cancelled".
        with pytest.raises(ProviderRejected) as caught:
            await h.confirm(job_for(KEY, order(DEMO.processed)))
        assert caught.value.status == 409
        assert caught.value.code == "REQUEST_PHASE_REQUIRED"
        assert "request_id req_" in caught.value.message
        assert not caught.value.retryable


async def test_a_wrong_tenant_is_an_auth_error() -> None:
    async with harness(KEY, tenant="00000000-0000-4000-8000-000000000000") as h:
        with pytest.raises(ProviderAuthError) as caught:
            await h.check(job_for(KEY, order(DEMO.processed)))
        assert caught.value.status == 403
        assert caught.value.field == "x-tn"


@pytest.mark.parametrize(
    ("code", "cls"),
    [("SUBSCRIPTION_LOCKED", ProviderRejected), ("SERVICE_UNAVAILABLE", ProviderUnavailable)],
)
async def test_a_non_success_message_code_on_a_200_is_a_failure(
    code: str, cls: type[Exception]
) -> None:
    async def answer(request: web.Request) -> web.Response:
        body = {"responseType": "Processed", "status": {"messageCode": code}}
        return web.json_response(body, content_type="application/clientOutput+Json")

    async with harness(KEY, app=answering(answer)) as h:
        for call in (h.check, h.confirm):
            with pytest.raises(cls) as caught:
                await call(job_for(KEY, order(DEMO.processed)))
            assert caught.value.code == code  # type: ignore[attr-defined]


@pytest.mark.parametrize(("status", "code"), [(200, "ALREADY_CANCELED"), (409, "ALREADY_CANCELED")])
async def test_every_already_cancelled_shape_is_already_cancelled(status: int, code: str) -> None:
    # A 200 with that messageCode, or a 409 with the other spelling (both assumed).
    async def answer(request: web.Request) -> web.Response:
        if status == 200:
            body: dict[str, Any] = {"status": {"messageCode": code}}
        else:
            body = {"error": {"type": "conflict_error", "code": code, "message": "cancelled"}}
        return web.json_response(body, status=status, content_type="application/clientOutput+Json")

    async with harness(KEY, app=answering(answer)) as h:
        job = job_for(KEY, order(DEMO.processed))
        answer_, _ = await h.check(job)
        assert answer_.outcome is not None
        assert answer_.outcome.type is OutcomeType.ALREADY_CANCELLED
        done = await h.confirm(job)
        assert done.outcome.type is OutcomeType.ALREADY_CANCELLED
