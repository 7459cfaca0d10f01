"""AppDirect sandbox: OAuth 1.0 HMAC-SHA1 verification, read/list, DELETE outcomes, XML 404s."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from xml.etree import ElementTree

import aiohttp
import pytest
from oauthlib import oauth1

from sandboxes.appdirect import (
    APPDIRECT_STATE,
    DEMO,
    DEMO_CONSUMER_KEY,
    DEMO_CONSUMER_SECRET,
)
from tests.sandboxes.support import Client, provider_app, sandbox_client, state

API = "/appdirect/api/billing/v1"


def signed_headers(
    client: Client,
    method: str,
    path: str,
    *,
    key: str = DEMO_CONSUMER_KEY,
    secret: str = DEMO_CONSUMER_SECRET,
    **oauth: Any,
) -> dict[str, str]:
    """Headers of a request signed like a real client: oauthlib over the absolute URL."""
    oauth.setdefault("signature_method", oauth1.SIGNATURE_HMAC_SHA1)
    signer = oauth1.Client(key, client_secret=secret, **oauth)
    _, headers, _ = signer.sign(str(client.make_url(path)), http_method=method)
    return {**headers, "Accept": "application/json", "Content-Type": "application/json"}


async def call(client: Client, method: str, path: str, **oauth: Any) -> aiohttp.ClientResponse:
    return await client.request(method, path, headers=signed_headers(client, method, path, **oauth))


def xml_error(text: str) -> tuple[str, str]:
    # Parsing the sandbox's own output, not untrusted input.
    error = ElementTree.fromstring(text).find("error")  # noqa: S314
    assert error is not None
    return error.findtext("code", ""), error.findtext("message", "")


# --- OAuth 1.0 ---------------------------------------------------------------------------------


async def test_a_correctly_signed_request_is_accepted() -> None:
    async with sandbox_client() as client:
        response = await call(client, "GET", f"{API}/subscriptions/{DEMO.active}")
        assert response.status == 200


async def test_query_parameters_are_part_of_the_signature() -> None:
    async with sandbox_client() as client:
        path = f"{API}/companies/{DEMO.company_id}/subscriptions?start=0&count=50"
        assert (await call(client, "GET", path)).status == 200
        # Signed without the query, sent with it: the base strings differ.
        headers = signed_headers(client, "GET", f"{API}/companies/{DEMO.company_id}/subscriptions")
        response = await client.get(path, headers=headers)
        assert response.status == 401


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"secret": "wrong-secret"}, "Invalid signature"),
        ({"key": "someone-else"}, "Unknown consumer key"),
        # Offsets from the time the test runs (not when it is collected).
        ({"timestamp": -301}, "oauth_timestamp"),
        ({"timestamp": +400}, "oauth_timestamp"),
        ({"signature_method": oauth1.SIGNATURE_PLAINTEXT}, "HMAC-SHA1"),
    ],
)
async def test_bad_signatures_are_401(overrides: dict[str, Any], message: str) -> None:
    if "timestamp" in overrides:
        overrides = {**overrides, "timestamp": str(int(time.time()) + overrides["timestamp"])}
    async with sandbox_client() as client:
        response = await call(client, "DELETE", f"{API}/subscriptions/{DEMO.active}", **overrides)
        assert response.status == 401
        body = await response.json()
        assert body["code"] == "UNAUTHORIZED"
        assert message in body["message"]
        assert (await state(client, "appdirect"))["effective_cancels"] == {}


async def test_missing_authorization_is_401() -> None:
    async with sandbox_client() as client:
        response = await client.delete(f"{API}/subscriptions/{DEMO.active}")
        assert response.status == 401


async def test_a_tampered_path_is_401() -> None:
    async with sandbox_client() as client:
        headers = signed_headers(client, "DELETE", f"{API}/subscriptions/{DEMO.free_trial}")
        response = await client.delete(f"{API}/subscriptions/{DEMO.active}", headers=headers)
        assert response.status == 401


async def test_a_reused_nonce_is_401() -> None:
    async with sandbox_client() as client:
        path = f"{API}/subscriptions/{DEMO.active}"
        headers = signed_headers(client, "GET", path, nonce="fixed-nonce-0001")
        assert (await client.get(path, headers=headers)).status == 200
        replay = await client.get(path, headers=headers)
        assert replay.status == 401
        assert "nonce" in (await replay.json())["message"]


# --- read and list -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subscription_id", "status"),
    [(DEMO.active, "ACTIVE"), (DEMO.free_trial, "FREE_TRIAL"), (DEMO.cancelled, "CANCELLED")],
)
async def test_read_subscription(subscription_id: str, status: str) -> None:
    async with sandbox_client() as client:
        response = await call(client, "GET", f"{API}/subscriptions/{subscription_id}")
        body = await response.json()
        assert (body["id"], body["status"]) == (subscription_id, status)


async def test_unknown_subscription_is_an_xml_404_even_for_json_requests() -> None:
    async with sandbox_client() as client:
        for method in ("GET", "DELETE"):
            response = await call(client, method, f"{API}/subscriptions/{DEMO.not_found}")
            assert response.status == 404
            assert response.content_type == "application/xml"
            code, message = xml_error(await response.text())
            assert code == "NOT_FOUND"
            assert DEMO.not_found in message


async def test_lists_by_company_and_by_user() -> None:
    async with sandbox_client() as client:
        company = await call(client, "GET", f"{API}/companies/{DEMO.company_id}/subscriptions")
        ids = {item["id"] for item in await company.json()}
        assert ids == {DEMO.active, DEMO.free_trial, DEMO.cancelled}
        user = await call(
            client, "GET", f"{API}/companies/{DEMO.company_id}/users/{DEMO.user_id}/subscriptions"
        )
        assert {item["id"] for item in await user.json()} == ids
        unknown = await call(client, "GET", f"{API}/companies/{DEMO.not_found}/subscriptions")
        assert unknown.status == 404


# --- DELETE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("subscription_id", [DEMO.active, DEMO.free_trial])
async def test_delete_cancels_with_204(subscription_id: str) -> None:
    async with sandbox_client() as client:
        response = await call(client, "DELETE", f"{API}/subscriptions/{subscription_id}")
        assert response.status == 204
        after = await call(client, "GET", f"{API}/subscriptions/{subscription_id}")
        assert (await after.json())["status"] == "CANCELLED"
        assert (await state(client, "appdirect"))["effective_cancels"] == {subscription_id: 1}


async def test_delete_of_a_cancelled_subscription_is_400_not_editable() -> None:
    async with sandbox_client() as client:
        response = await call(client, "DELETE", f"{API}/subscriptions/{DEMO.cancelled}")
        assert response.status == 400
        assert await response.json() == {
            "code": "SUBSCRIPTION_NOT_EDITABLE",
            "message": "Cannot cancel a subscription in CANCELLED status",
        }


async def test_repeated_and_concurrent_deletes_count_once() -> None:
    async with sandbox_client() as client:
        path = f"{API}/subscriptions/{DEMO.active}"
        statuses = await asyncio.gather(*(call(client, "DELETE", path) for _ in range(10)))
        assert sorted(response.status for response in statuses) == [204] + [400] * 9
        assert (await state(client, "appdirect"))["effective_cancels"] == {DEMO.active: 1}


async def test_tests_can_add_subscriptions_directly() -> None:
    async with sandbox_client() as client:
        sandbox = provider_app(client, "appdirect")[APPDIRECT_STATE]
        added = sandbox.add_subscription("active", company_id="acme")
        response = await call(client, "DELETE", f"{API}/subscriptions/{added.id}")
        assert response.status == 204


async def test_fail_once_lets_a_re_signed_retry_through() -> None:
    async with sandbox_client() as client:
        await client.put("/appdirect/_sandbox/faults", json={"fail_once_rate": 1})
        path = f"{API}/subscriptions/{DEMO.active}"
        assert (await call(client, "DELETE", path)).status == 503
        # The retry carries a new nonce and timestamp: still the same request for fail-once.
        assert (await call(client, "DELETE", path)).status == 204
