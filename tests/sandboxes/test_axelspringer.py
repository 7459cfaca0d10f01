"""Axel Springer sandbox: Cognito token, bearer + partner checks, cancel by link status."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from sandboxes.axelspringer import (
    AXELSPRINGER_STATE,
    DEMO,
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
)
from tests.sandboxes.support import Client, provider_app, sandbox_client, state

TOKEN_URL = "/axelspringer/oauth2/token?grant_type=client_credentials"
API = "/axelspringer/api/v1"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def basic(client_id: str = DEMO_CLIENT_ID, secret: str = DEMO_CLIENT_SECRET) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


async def bearer(client: Client) -> dict[str, str]:
    response = await client.post(TOKEN_URL, headers={**FORM, "Authorization": basic()})
    assert response.status == 200
    return {"Authorization": f"Bearer {(await response.json())['access_token']}"}


def purchase_url(ref: str, partner: str = DEMO.partner_id) -> str:
    return f"{API}/partners/{partner}/purchases/{ref}"


async def cancel(client: Client, ref: str, **headers: str) -> tuple[int, dict[str, Any]]:
    response = await client.post(
        purchase_url(ref) + "/cancel", headers=headers or await bearer(client)
    )
    return response.status, await response.json()


# --- token endpoint ----------------------------------------------------------------------------


async def test_token_is_cognito_shaped() -> None:
    async with sandbox_client(token_ttl_s=3600) as client:
        response = await client.post(TOKEN_URL, headers={**FORM, "Authorization": basic()})
        body = await response.json()
        assert set(body) == {"access_token", "expires_in", "token_type"}
        assert (body["expires_in"], body["token_type"]) == (3600, "Bearer")


@pytest.mark.parametrize(
    ("url", "headers", "status", "error"),
    [
        (TOKEN_URL, {**FORM, "Authorization": basic(secret="nope")}, 401, "invalid_client"),
        (TOKEN_URL, {**FORM, "Authorization": basic(client_id="who")}, 401, "invalid_client"),
        (TOKEN_URL, {**FORM, "Authorization": "Basic !!!"}, 401, "invalid_client"),
        (TOKEN_URL, FORM, 401, "invalid_client"),
        ("/axelspringer/oauth2/token", {**FORM, "Authorization": basic()}, 400, ""),
        (TOKEN_URL, {"Authorization": basic()}, 400, "invalid_request"),
    ],
)
async def test_token_refusals(url: str, headers: dict[str, str], status: int, error: str) -> None:
    async with sandbox_client() as client:
        response = await client.post(url, headers=headers)
        assert response.status == status
        assert await response.json() == {"error": error or "unsupported_grant_type"}


async def test_grant_type_may_come_in_the_form_body() -> None:
    async with sandbox_client() as client:
        response = await client.post(
            "/axelspringer/oauth2/token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": basic()},
        )
        assert response.status == 200


# --- bearer and partner ------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer unknown"])
async def test_missing_or_unknown_token_is_401(header: str | None) -> None:
    async with sandbox_client() as client:
        headers = {"Authorization": header} if header else {}
        response = await client.get(purchase_url(DEMO.created), headers=headers)
        assert response.status == 401
        assert (await response.json())["code"] == "UNAUTHORIZED"


async def test_expired_token_is_401() -> None:
    async with sandbox_client() as client:
        headers = await bearer(client)
        await client.post("/axelspringer/_sandbox/expire-tokens")
        response = await client.get(purchase_url(DEMO.created), headers=headers)
        assert response.status == 401
        assert "expired" in (await response.json())["message"]


async def test_another_partners_path_is_403() -> None:
    async with sandbox_client() as client:
        headers = await bearer(client)
        for method, suffix in (("GET", ""), ("POST", "/cancel")):
            url = purchase_url(DEMO.created, DEMO.other_partner_id) + suffix
            response = await client.request(method, url, headers=headers)
            assert response.status == 403
            assert (await response.json())["code"] == "FORBIDDEN"
        assert (await state(client, "axelspringer"))["effective_cancels"] == {}


# --- purchases ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "status"),
    [(DEMO.created, "Created"), (DEMO.redeemed, "Redeemed"), (DEMO.canceled, "Canceled")],
)
async def test_read_purchase(ref: str, status: str) -> None:
    async with sandbox_client() as client:
        response = await client.get(purchase_url(ref), headers=await bearer(client))
        assert await response.json() == {"purchaseRef": ref, "status": status}


async def test_unknown_purchase_is_404() -> None:
    async with sandbox_client() as client:
        headers = await bearer(client)
        response = await client.get(purchase_url(DEMO.unknown), headers=headers)
        assert response.status == 404
        body = await response.json()
        assert set(body) == {"code", "message"}
        assert body["code"] == "PURCHASE_NOT_FOUND"
        status, _ = await cancel(client, DEMO.unknown, **headers)
        assert status == 404


@pytest.mark.parametrize(
    ("ref", "previous", "action"),
    [
        (DEMO.created, "Created", "link_invalidated"),
        (DEMO.redeemed, "Redeemed", "subscription_cancelled_and_link_revoked"),
    ],
)
async def test_cancel_by_link_status(ref: str, previous: str, action: str) -> None:
    async with sandbox_client() as client:
        status, body = await cancel(client, ref)
        assert status == 200
        assert body == {"purchaseRef": ref, "previousStatus": previous, "status": "Canceled"}
        snapshot = await state(client, "axelspringer")
        assert snapshot["effective_cancels"] == {ref: 1}
        assert snapshot["actions"] == [
            {"purchaseRef": ref, "previousStatus": previous, "action": action}
        ]


async def test_cancel_of_a_canceled_purchase_is_409() -> None:
    async with sandbox_client() as client:
        status, body = await cancel(client, DEMO.canceled)
        assert status == 409
        assert body["code"] == "ALREADY_CANCELED"
        assert body["message"]


async def test_repeated_and_concurrent_cancels_count_once() -> None:
    async with sandbox_client() as client:
        headers = await bearer(client)
        results = await asyncio.gather(
            *(cancel(client, DEMO.redeemed, **headers) for _ in range(8))
        )
        assert sorted(status for status, _ in results) == [200] + [409] * 7
        assert (await state(client, "axelspringer"))["effective_cancels"] == {DEMO.redeemed: 1}


async def test_tests_can_add_purchases_directly() -> None:
    async with sandbox_client() as client:
        sandbox = provider_app(client, "axelspringer")[AXELSPRINGER_STATE]
        purchase = sandbox.add_purchase("created")
        status, body = await cancel(client, purchase.purchase_ref)
        assert (status, body["previousStatus"]) == (200, "Created")
