"""Payway sandbox: token endpoint, bearer auth, can_cancel reasons, cancel rules of seed 001."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pytest

from sandboxes import payway
from sandboxes.payway import (
    CAN_CANCEL_PATH,
    CANCEL_PATH,
    DEMO,
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    DEMO_SCOPE,
    PAYWAY_STATE,
    REASONS_PATH,
    SCOPE_SUBSCRIPTION_READ,
    PaywayRef,
)
from tests.sandboxes.support import Client, provider_app, sandbox_client, state

BASE = "/payway"
NOT_ELIGIBLE = [
    "account_not_found",
    "account_does_not_belong_to_organisation",
    "no_customer_number",
    "user_product_not_found",
    "user_product_does_not_belong_to_organisation",
    "no_subscription_number",
    "no_external_service",
    "not_web_originated",
]


async def token_response(client: Client, **overrides: str) -> Any:
    form = {
        "client_id": DEMO_CLIENT_ID,
        "client_secret": DEMO_CLIENT_SECRET,
        "grant_type": "none",
        "scope": DEMO_SCOPE,
        **overrides,
    }
    return await client.post(f"{BASE}/api/authorization/access_token", data=form)


async def auth(client: Client, scope: str = DEMO_SCOPE) -> dict[str, str]:
    response = await token_response(client, scope=scope)
    assert response.status == 200
    return {"Authorization": f"Bearer {(await response.json())['access_token']}"}


def cancel_body(ref: PaywayRef, reason_id: str = DEMO.reason_id) -> dict[str, str]:
    return {**ref.as_json(), "cancellation_reason_id": reason_id}


async def can_cancel(client: Client, ref: PaywayRef) -> dict[str, Any]:
    response = await client.get(
        f"{BASE}{CAN_CANCEL_PATH}", json=ref.as_json(), headers=await auth(client)
    )
    assert response.status == 200
    body: dict[str, dict[str, Any]] = await response.json()
    return body["item"]


async def cancel(client: Client, ref: PaywayRef, **headers: str) -> tuple[int, dict[str, Any]]:
    response = await client.put(
        f"{BASE}{CANCEL_PATH}", json=cancel_body(ref), headers=headers or await auth(client)
    )
    return response.status, await response.json()


# --- token endpoint ----------------------------------------------------------------------------


async def test_token_is_issued_for_the_demo_client() -> None:
    async with sandbox_client(token_ttl_s=120) as client:
        response = await token_response(client)
        assert response.status == 200
        body = await response.json()
        assert body["token_type"] == "bearer"
        assert body["expires_in"] == 120
        assert body["scope"] == DEMO_SCOPE
        assert body["access_token"]


@pytest.mark.parametrize(
    ("overrides", "status", "code"),
    [
        ({"client_secret": "wrong"}, 401, "invalid_client"),
        ({"client_id": "nobody"}, 401, "invalid_client"),
        ({"grant_type": "client_credentials"}, 400, "unsupported_grant_type"),
        ({"scope": "/external/admin/w"}, 400, "invalid_scope"),
        ({"scope": ""}, 400, "invalid_scope"),
    ],
)
async def test_token_refusals(overrides: dict[str, str], status: int, code: str) -> None:
    async with sandbox_client() as client:
        response = await token_response(client, **overrides)
        assert response.status == status
        body = await response.json()
        assert body["code"] == code
        assert body["message"]


# --- bearer auth -------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer not-a-token", "Basic abc"])
async def test_missing_or_unknown_token_is_401(header: str | None) -> None:
    async with sandbox_client() as client:
        headers = {"Authorization": header} if header else {}
        response = await client.get(
            f"{BASE}{CAN_CANCEL_PATH}", params=DEMO.end_of_period.as_json(), headers=headers
        )
        assert response.status == 401
        assert (await response.json())["code"] == "invalid_token"


async def test_expired_tokens_are_401_and_a_new_token_works() -> None:
    async with sandbox_client() as client:
        headers = await auth(client)
        expired = await client.post(f"{BASE}/_sandbox/expire-tokens")
        assert (await expired.json())["expired"] >= 1
        response = await client.get(f"{BASE}{REASONS_PATH}", headers=headers)
        assert response.status == 401
        body = await response.json()
        assert body == {"code": "invalid_token", "message": "Access token has expired"}
        fresh = await client.get(f"{BASE}{REASONS_PATH}", headers=await auth(client))
        assert fresh.status == 200


async def test_tokens_expire_after_their_ttl() -> None:
    async with sandbox_client(token_ttl_s=0) as client:
        response = await client.get(f"{BASE}{REASONS_PATH}", headers=await auth(client))
        assert response.status == 401


async def test_token_without_the_route_scope_is_403() -> None:
    async with sandbox_client() as client:
        read_only = await auth(client, scope=SCOPE_SUBSCRIPTION_READ)
        status, body = await cancel(client, DEMO.end_of_period, **read_only)
        assert status == 403
        assert body["code"] == "insufficient_scope"
        reasons = await client.get(f"{BASE}{REASONS_PATH}", headers=read_only)
        assert reasons.status == 403


# --- can_cancel_subscription -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["end_of_period", "autogiro", "immediate", "end_of_period_with_credit"]
)
async def test_cancellable_demo_products(kind: str) -> None:
    async with sandbox_client() as client:
        item = await can_cancel(client, DEMO.refs()[kind])
        assert item == {"can_cancel": True, "reason": None}


@pytest.mark.parametrize("reason", [*NOT_ELIGIBLE, "already_cancelled"])
async def test_every_reason_is_reachable_through_demo_data(reason: str) -> None:
    async with sandbox_client() as client:
        item = await can_cancel(client, DEMO.refs()[reason])
        assert item == {"can_cancel": False, "reason": reason}


async def test_parameters_come_from_the_query_string_too() -> None:
    async with sandbox_client() as client:
        response = await client.get(
            f"{BASE}{CAN_CANCEL_PATH}",
            params=DEMO.not_web_originated.as_json(),
            headers=await auth(client),
        )
        assert (await response.json())["item"]["reason"] == "not_web_originated"


async def test_ids_match_case_insensitively() -> None:
    async with sandbox_client() as client:
        ref = DEMO.end_of_period
        upper = PaywayRef(ref.account_id.upper(), ref.user_product_id.upper())
        assert (await can_cancel(client, upper))["can_cancel"] is True


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({}, "no_account_id"),
        ({"user_product_id": DEMO.end_of_period.user_product_id}, "no_account_id"),
        ({"account_id": DEMO.end_of_period.account_id}, "no_user_product_id"),
        ({"account_id": "", "user_product_id": ""}, "no_account_id"),
    ],
)
async def test_missing_parameters_are_reasons(params: dict[str, str], reason: str) -> None:
    async with sandbox_client() as client:
        response = await client.get(
            f"{BASE}{CAN_CANCEL_PATH}", params=params, headers=await auth(client)
        )
        assert response.status == 200
        assert await response.json() == {"item": {"can_cancel": False, "reason": reason}}


async def test_malformed_id_is_400_invalid_parameter() -> None:
    async with sandbox_client() as client:
        response = await client.get(
            f"{BASE}{CAN_CANCEL_PATH}",
            json={"account_id": "12345", "user_product_id": DEMO.end_of_period.user_product_id},
            headers=await auth(client),
        )
        assert response.status == 400
        assert await response.json() == {
            "code": "invalid_parameter",
            "field": "account_id",
            "message": "Parameter must match format (/^[a-f\\d]{24}$/)",
        }


async def test_unexpected_parameter_is_400_unknown_parameter() -> None:
    async with sandbox_client() as client:
        response = await client.get(
            f"{BASE}{CAN_CANCEL_PATH}",
            params={**DEMO.end_of_period.as_json(), "force": "1"},
            headers=await auth(client),
        )
        assert response.status == 400
        body = await response.json()
        assert body["code"] == "unknown_parameter"
        assert body["field"] == "force"


# --- cancel_subscription -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cancellation_type", "credited_period"),
    [
        ("end_of_period", "at_end_of_period", None),
        ("autogiro", "at_end_of_period", None),
        ("immediate", "immediate", "current"),
        ("end_of_period_with_credit", "at_end_of_period", "upcoming"),
    ],
)
async def test_cancel_rules_of_seed_001(
    kind: str, cancellation_type: str, credited_period: str | None
) -> None:
    async with sandbox_client() as client:
        ref = DEMO.refs()[kind]
        before = datetime.now().astimezone()
        status, body = await cancel(client, ref)
        assert status == 200
        item = body["item"]
        assert item["user_product_id"] == ref.user_product_id
        assert item["cancellation_type"] == cancellation_type
        end = datetime.fromisoformat(item["subscription_end_date"])
        assert end.utcoffset() is not None
        assert item["subscription_end_date"].endswith("+01:00")
        if cancellation_type == "immediate":
            assert abs((end - before).total_seconds()) < 5
        else:
            assert end > before
            assert item["subscription_end_date"].endswith("T23:59:59.000+01:00")
        snapshot = await state(client, "payway")
        assert snapshot["effective_cancels"] == {ref.user_product_id: 1}
        credits = [c["credited_period"] for c in snapshot["credit_invoices"]]
        assert credits == ([credited_period] if credited_period else [])
        assert snapshot["cancellations"][0]["cancellation_reason_id"] == DEMO.reason_id
        assert (await can_cancel(client, ref))["reason"] == "already_cancelled"


async def test_repeated_cancel_replays_the_first_answer_and_counts_once() -> None:
    async with sandbox_client() as client:
        first = await cancel(client, DEMO.immediate)
        second = await cancel(client, DEMO.immediate)
        assert first == second
        snapshot = await state(client, "payway")
        assert snapshot["effective_cancels"] == {DEMO.immediate.user_product_id: 1}
        assert len(snapshot["credit_invoices"]) == 1


async def test_concurrent_cancels_count_once() -> None:
    async with sandbox_client() as client:
        headers = await auth(client)
        results = await asyncio.gather(
            *(cancel(client, DEMO.end_of_period, **headers) for _ in range(20))
        )
        assert {status for status, _ in results} == {200}
        snapshot = await state(client, "payway")
        assert snapshot["effective_cancels"] == {DEMO.end_of_period.user_product_id: 1}


async def test_already_cancelled_demo_product_is_an_idempotent_success() -> None:
    async with sandbox_client() as client:
        status, body = await cancel(client, DEMO.already_cancelled)
        assert status == 200
        assert body["item"]["user_product_id"] == DEMO.already_cancelled.user_product_id
        assert (await state(client, "payway"))["effective_cancels"] == {}


@pytest.mark.parametrize("reason", NOT_ELIGIBLE)
async def test_not_eligible_products_are_400_not_cancellable(reason: str) -> None:
    async with sandbox_client() as client:
        status, body = await cancel(client, DEMO.refs()[reason])
        assert status == 400
        assert body["code"] == "not_cancellable"
        assert reason in body["message"]
        assert body["field"] in {"account_id", "user_product_id"}
        assert (await state(client, "payway"))["effective_cancels"] == {}


@pytest.mark.parametrize("missing", ["account_id", "user_product_id", "cancellation_reason_id"])
async def test_cancel_requires_every_field(missing: str) -> None:
    async with sandbox_client() as client:
        body = cancel_body(DEMO.end_of_period)
        del body[missing]
        response = await client.put(f"{BASE}{CANCEL_PATH}", json=body, headers=await auth(client))
        assert response.status == 400
        error = await response.json()
        assert (error["code"], error["field"]) == ("invalid_parameter", missing)


@pytest.mark.parametrize("field", ["account_id", "user_product_id", "cancellation_reason_id"])
async def test_cancel_validates_the_format_of_every_field(field: str) -> None:
    async with sandbox_client() as client:
        body = {**cancel_body(DEMO.end_of_period), field: "not-hex"}
        response = await client.put(f"{BASE}{CANCEL_PATH}", json=body, headers=await auth(client))
        assert response.status == 400
        error = await response.json()
        assert (error["code"], error["field"]) == ("invalid_parameter", field)


async def test_unknown_cancellation_reason_is_400() -> None:
    async with sandbox_client() as client:
        body = cancel_body(DEMO.end_of_period, DEMO.unknown_reason_id)
        response = await client.put(f"{BASE}{CANCEL_PATH}", json=body, headers=await auth(client))
        assert response.status == 400
        error = await response.json()
        assert (error["code"], error["field"]) == ("invalid_parameter", "cancellation_reason_id")
        assert (await state(client, "payway"))["effective_cancels"] == {}


async def test_cancel_rejects_unknown_fields_and_non_json_bodies() -> None:
    async with sandbox_client() as client:
        headers = await auth(client)
        extra = {**cancel_body(DEMO.end_of_period), "when": "now"}
        response = await client.put(f"{BASE}{CANCEL_PATH}", json=extra, headers=headers)
        assert (response.status, (await response.json())["code"]) == (400, "unknown_parameter")
        garbage = await client.put(f"{BASE}{CANCEL_PATH}", data=b"{nope", headers=headers)
        assert garbage.status == 400
        assert "message" in await garbage.json()


# --- cancellation reasons, added records -------------------------------------------------------


async def test_cancellation_reasons_list() -> None:
    async with sandbox_client() as client:
        response = await client.get(f"{BASE}{REASONS_PATH}", headers=await auth(client))
        items = (await response.json())["items"]
        assert DEMO.reason_id in {item["id"] for item in items}
        assert set(items[0]) == {
            "id",
            "name",
            "code",
            "integration_code",
            "visible_to_end_customer",
            "internal",
        }


async def test_tests_can_add_subscriptions_directly() -> None:
    async with sandbox_client() as client:
        sandbox = provider_app(client, "payway")[PAYWAY_STATE]
        ref = sandbox.add_subscription("immediate")
        status, body = await cancel(client, ref)
        assert (status, body["item"]["cancellation_type"]) == (200, "immediate")


async def test_demo_names_match_the_outcome_kinds() -> None:
    assert set(DEMO.refs()) == set(payway.RECIPES)
    ids = [ref.user_product_id for ref in DEMO.refs().values()]
    assert len(set(ids)) == len(ids)
