"""Azotte sandbox: API key + tenant auth, request phase outcomes, confirm rules, pending ends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sandboxes.azotte import (
    AZOTTE_STATE,
    CONFIRM_PATH,
    DEMO,
    DEMO_API_KEY,
    DEMO_TENANT,
    REQUEST_PATH,
)
from tests.sandboxes.support import Client, provider_app, sandbox_client, state

HEADERS = {"x-api-key": DEMO_API_KEY, "x-tn": DEMO_TENANT}
REQUEST = f"/azotte{REQUEST_PATH}"
CONFIRM = f"/azotte{CONFIRM_PATH}"


async def post(
    client: Client, url: str, body: Any, headers: dict[str, str] = HEADERS
) -> tuple[int, dict[str, Any]]:
    response = await client.post(url, json=body, headers=headers)
    assert response.headers["Content-Type"].startswith("application/clientOutput+Json")
    # Parse whatever the JSON-ish content type, as a client must.
    return response.status, json.loads(await response.text())


async def request_cancel(client: Client, order: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    return await post(client, REQUEST, {"orderIdentifier": order, **fields})


async def confirm_cancel(client: Client, order: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    body = {"orderIdentifier": order, "cancelationMethod": "Normal", "currentStep": 1, **fields}
    return await post(client, CONFIRM, body)


def assert_error(body: dict[str, Any], code: str) -> dict[str, Any]:
    error: dict[str, Any] = body["error"]
    assert set(error) == {"type", "code", "message", "details", "request_id"}
    assert set(error["details"]) == {"field", "value", "constraint"}
    assert error["code"] == code
    return error


# --- auth --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "INVALID_API_KEY"),
        ({"x-tn": DEMO_TENANT}, 401, "INVALID_API_KEY"),
        ({"x-api-key": "sk_live_wrong", "x-tn": DEMO_TENANT}, 401, "INVALID_API_KEY"),
        ({"x-api-key": DEMO_API_KEY}, 403, "TENANT_MISMATCH"),
        ({"x-api-key": DEMO_API_KEY, "x-tn": "00000000-0000-0000-0000-000000000000"}, 403, ""),
    ],
)
async def test_api_key_and_tenant_are_required(
    headers: dict[str, str], status: int, code: str
) -> None:
    async with sandbox_client() as client:
        got, body = await post(client, REQUEST, {"orderIdentifier": DEMO.processed}, headers)
        assert got == status
        assert_error(body, code or "TENANT_MISMATCH")


# --- request phase -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "response_type", "channel"),
    [
        (DEMO.processed, "Processed", "web"),
        (DEMO.offer, "Offer", "web"),
        (DEMO.presentation, "Presentation", "web"),
        (DEMO.app_store, "Processed", "app_store"),
        (DEMO.play_store, "Processed", "play_store"),
        (DEMO.third_party, "Processed", "third_party"),
    ],
)
async def test_request_phase_outcomes(order: str, response_type: str, channel: str) -> None:
    async with sandbox_client() as client:
        status, body = await request_cancel(client, order, cancelationMethod="Immediate")
        assert status == 200
        assert body["responseType"] == response_type
        assert body["status"] == {"messageCode": "SUCCESS"}
        assert body["subscription"] == {"billingChannel": channel}
        assert {"code": "PRICE", "label": "Too expensive"} in body["cancellationReasons"]
        assert ("offer" in body) == (response_type == "Offer")


async def test_offer_carries_its_identifier_and_terms() -> None:
    async with sandbox_client() as client:
        _, body = await request_cancel(client, DEMO.offer)
        offer = body["offer"]
        assert offer["offerIdentifier"] == DEMO.offer_identifier
        assert set(offer) == {
            "offerIdentifier",
            "title",
            "description",
            "discountPercent",
            "durationMonths",
        }


async def test_request_phase_changes_nothing_by_itself() -> None:
    async with sandbox_client() as client:
        await request_cancel(client, DEMO.processed)
        assert (await state(client, "azotte"))["effective_cancels"] == {}


async def test_unknown_order_is_404() -> None:
    async with sandbox_client() as client:
        status, body = await request_cancel(client, DEMO.not_found)
        assert status == 404
        error = assert_error(body, "ORDER_NOT_FOUND")
        assert error["details"]["value"] == DEMO.not_found


async def test_another_tenants_order_is_404() -> None:
    async with sandbox_client() as client:
        sandbox = provider_app(client, "azotte")[AZOTTE_STATE]
        order = sandbox.add_order(tenant="11111111-2222-3333-4444-555555555555")
        status, _ = await request_cancel(client, order.id)
        assert status == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "orderIdentifier"),
        ({"orderIdentifier": ""}, "orderIdentifier"),
        ({"orderIdentifier": DEMO.processed, "cancelationMethod": "Later"}, "cancelationMethod"),
        ({"orderIdentifier": DEMO.processed, "currentStep": "one"}, "currentStep"),
        ({"orderIdentifier": DEMO.processed, "currentStep": -1}, "currentStep"),
    ],
)
async def test_request_validation_is_422_with_details(body: dict[str, Any], field: str) -> None:
    async with sandbox_client() as client:
        status, answer = await post(client, REQUEST, body)
        assert status == 422
        error = assert_error(answer, "VALIDATION_ERROR")
        assert error["type"] == "validation_error"
        assert error["details"]["field"] == field
        assert error["details"]["constraint"]


async def test_non_json_body_is_400() -> None:
    async with sandbox_client() as client:
        response = await client.post(REQUEST, data=b"{nope", headers=HEADERS)
        assert response.status == 400
        assert_error(json.loads(await response.text()), "INVALID_JSON")


# --- confirm phase -----------------------------------------------------------------------------


@pytest.mark.parametrize("order", [DEMO.processed, DEMO.offer, DEMO.presentation])
async def test_confirm_after_request_ends_the_order(order: str) -> None:
    async with sandbox_client() as client:
        await request_cancel(client, order, cancelationMethod="EndOfPeriod")
        survey = json.dumps({"reasonCode": "PRICE", "comment": "too much"})
        status, body = await confirm_cancel(
            client, order, cancelationMethod="EndOfPeriod", survey=survey
        )
        assert (status, body) == (200, {"status": {"messageCode": "SUCCESS"}})
        snapshot = await state(client, "azotte")
        assert snapshot["effective_cancels"] == {order: 1}
        assert snapshot["cancellations"][order] == {
            "method": "EndOfPeriod",
            "survey": survey,
            "pendingConfirmation": None,
        }
        assert snapshot["pending_confirmation"] == {}


@pytest.mark.parametrize(
    ("order", "pending"),
    [
        (DEMO.app_store, "app_store"),
        (DEMO.play_store, "play_store"),
        (DEMO.third_party, "payment_provider"),
    ],
)
async def test_store_and_third_party_orders_stay_pending(order: str, pending: str) -> None:
    async with sandbox_client() as client:
        await request_cancel(client, order)
        status, body = await confirm_cancel(client, order)
        assert (status, body) == (200, {"status": {"messageCode": "SUCCESS"}})
        snapshot = await state(client, "azotte")
        assert snapshot["pending_confirmation"] == {order: pending}
        assert snapshot["effective_cancels"] == {order: 1}


async def test_confirm_without_request_phase_is_409() -> None:
    async with sandbox_client() as client:
        status, body = await confirm_cancel(client, DEMO.processed)
        assert status == 409
        assert_error(body, "REQUEST_PHASE_REQUIRED")
        assert (await state(client, "azotte"))["effective_cancels"] == {}


async def test_confirm_with_another_method_is_422() -> None:
    async with sandbox_client() as client:
        await request_cancel(client, DEMO.processed, cancelationMethod="Immediate")
        status, body = await confirm_cancel(client, DEMO.processed, cancelationMethod="Normal")
        assert status == 422
        error = assert_error(body, "METHOD_MISMATCH")
        assert error["details"]["field"] == "cancelationMethod"


async def test_survey_must_be_a_string() -> None:
    async with sandbox_client() as client:
        await request_cancel(client, DEMO.processed)
        status, body = await confirm_cancel(client, DEMO.processed, survey={"reasonCode": "X"})
        assert status == 422
        assert assert_error(body, "VALIDATION_ERROR")["details"]["field"] == "survey"


async def test_second_confirm_is_409_already_cancelled_and_counts_once() -> None:
    async with sandbox_client() as client:
        await request_cancel(client, DEMO.processed)
        assert (await confirm_cancel(client, DEMO.processed))[0] == 200
        status, body = await confirm_cancel(client, DEMO.processed)
        assert status == 409
        assert_error(body, "ALREADY_CANCELLED")
        again, _ = await request_cancel(client, DEMO.processed)
        assert again == 409
        assert (await state(client, "azotte"))["effective_cancels"] == {DEMO.processed: 1}


async def test_already_cancelled_demo_order_is_409_in_both_phases() -> None:
    async with sandbox_client() as client:
        status, body = await request_cancel(client, DEMO.already_cancelled)
        assert status == 409
        assert_error(body, "ALREADY_CANCELLED")
        status, _ = await confirm_cancel(client, DEMO.already_cancelled)
        assert status == 409


async def test_concurrent_confirms_count_once() -> None:
    async with sandbox_client() as client:
        await request_cancel(client, DEMO.processed)
        results = await asyncio.gather(*(confirm_cancel(client, DEMO.processed) for _ in range(10)))
        assert sorted(status for status, _ in results) == [200] + [409] * 9
        assert (await state(client, "azotte"))["effective_cancels"] == {DEMO.processed: 1}
