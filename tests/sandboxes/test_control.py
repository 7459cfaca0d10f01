"""Control routes shared by every sandbox, and the server that mounts them."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from cancelflow.providers import REGISTRY
from sandboxes import server
from sandboxes.control import SANDBOX
from sandboxes.faults import FaultSettings
from sandboxes.payway import DEMO, PaywayRef
from tests.sandboxes.support import provider_app, sandbox_client, state
from tests.sandboxes.test_payway import auth, cancel

KEYS = sorted(server.SANDBOXES)


def test_every_registered_provider_has_one_sandbox() -> None:
    assert sorted(REGISTRY) == KEYS, "one sandboxes/<key>.py SPEC per registry key"
    assert all(spec.key == key for key, spec in server.SANDBOXES.items())


@pytest.mark.parametrize("key", KEYS)
async def test_succeeding_kinds_make_requests_the_provider_accepts(key: str) -> None:
    spec = server.SANDBOXES[key]
    assert spec.succeeding_kinds, "the chaos run and the benchmark need one at least"
    async with sandbox_client() as client:
        assert set(spec.succeeding_kinds) <= set(provider_app(client, key)[SANDBOX].bulk_kinds)
        for kind in spec.succeeding_kinds:
            response = await client.post(
                f"/{key}/_sandbox/subscriptions", json={"count": 1, "kind": kind}
            )
            (ref,) = (await response.json())["references"]
            REGISTRY[key].reference.model_validate(spec.subscription(ref))


async def test_healthz_lists_the_providers() -> None:
    async with sandbox_client() as client:
        response = await client.get("/healthz")
        assert await response.json() == {"status": "ok", "providers": KEYS}


@pytest.mark.parametrize("key", KEYS)
async def test_state_has_the_shared_fields(key: str) -> None:
    async with sandbox_client() as client:
        snapshot = await state(client, key)
        assert snapshot["provider"] == key
        assert snapshot["calls"] == {}
        assert snapshot["effective_cancels"] == {}
        assert set(snapshot["faults_injected"]) == {
            "latency",
            "error",
            "rate_limit",
            "hang",
            "fail_once",
            "lost_answer",
        }


@pytest.mark.parametrize("key", KEYS)
async def test_bulk_creates_every_kind(key: str) -> None:
    async with sandbox_client() as client:
        for kind in provider_app(client, key)[SANDBOX].bulk_kinds:
            response = await client.post(
                f"/{key}/_sandbox/subscriptions", json={"count": 3, "kind": kind}
            )
            assert response.status == 200, kind
            body = await response.json()
            assert (body["kind"], body["count"], len(body["references"])) == (kind, 3, 3)
            assert len({str(ref) for ref in body["references"]}) == 3


@pytest.mark.parametrize(
    "body", [{"count": 0, "kind": "x"}, {"count": 2}, {"count": 1, "kind": "no-such-kind"}]
)
@pytest.mark.parametrize("key", KEYS)
async def test_bulk_rejects_bad_input(key: str, body: dict[str, Any]) -> None:
    async with sandbox_client() as client:
        response = await client.post(f"/{key}/_sandbox/subscriptions", json=body)
        assert response.status == 422


async def test_bulk_makes_thousands_quickly() -> None:
    async with sandbox_client() as client:
        response = await client.post(
            "/payway/_sandbox/subscriptions", json={"count": 5000, "kind": "immediate"}
        )
        references = (await response.json())["references"]
        assert len({ref["user_product_id"] for ref in references}) == 5000


async def test_bulk_payway_references_have_their_outcome() -> None:
    async with sandbox_client() as client:
        response = await client.post(
            "/payway/_sandbox/subscriptions", json={"count": 2, "kind": "immediate"}
        )
        for ref in (await response.json())["references"]:
            status, body = await cancel(client, PaywayRef(**ref))
            assert (status, body["item"]["cancellation_type"]) == (200, "immediate")


async def test_reset_restores_demo_data_and_zeroes_counters_but_keeps_faults() -> None:
    async with sandbox_client(faults=FaultSettings(latency_ms=1)) as client:
        await cancel(client, DEMO.immediate)
        before = await state(client, "payway")
        assert before["effective_cancels"] and before["credit_invoices"] and before["calls"]
        assert (await client.post("/payway/_sandbox/reset")).status == 200
        after = await state(client, "payway")
        assert after["effective_cancels"] == {}
        assert after["credit_invoices"] == []
        assert after["calls"] == {}
        assert after["faults_injected"]["latency"] == 0
        status, body = await cancel(client, DEMO.immediate)
        assert (status, body["item"]["cancellation_type"]) == (200, "immediate")
        faults = await (await client.get("/payway/_sandbox/faults")).json()
        assert faults["latency_ms"] == 1


async def test_calls_are_counted_by_route() -> None:
    async with sandbox_client() as client:
        headers = await auth(client)
        await cancel(client, DEMO.end_of_period, **headers)
        await cancel(client, DEMO.end_of_period, **headers)
        calls = (await state(client, "payway"))["calls"]
        assert calls == {"access_token": 1, "cancel_subscription": 2}


async def test_start_serves_on_a_real_port() -> None:
    runner = await server.start("127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        urls = server.base_urls(host, port)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{host}:{port}/healthz") as response:
                assert response.status == 200
            async with session.get(f"{urls['payway']}/_sandbox/state") as response:
                assert (await response.json())["provider"] == "payway"
    finally:
        await runner.cleanup()
