"""Fault injection: each kind, its counters, fail-once semantics, seeding, runtime changes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from sandboxes.faults import FaultInjector, FaultSettings
from sandboxes.payway import CANCEL_PATH, DEMO
from sandboxes.server import SANDBOXES
from tests.contract.providers import contract_for
from tests.sandboxes.support import Client, sandbox_client, state
from tests.sandboxes.test_payway import auth, cancel

KEYS = sorted(SANDBOXES)


def probe_of(key: str) -> tuple[str, str]:
    """One provider call of `key` that needs no set-up (its contract table's): faults strike
    before auth, so the answer is the injected fault whenever there is one."""
    contract = contract_for(key)
    if contract is None:
        pytest.fail(f"{key!r} has no contract table: add tests/contract/providers/{key}.py")
    method, path = contract.probe
    return method, f"/{key}{path}"


async def error_code_in(response: aiohttp.ClientResponse, code: str) -> bool:
    """Whether the provider's own error body (its shape, JSON or XML) carries `code`."""
    return code in (await response.text()).lower()


async def put_faults(client: Client, key: str, **fields: Any) -> aiohttp.ClientResponse:
    return await client.put(f"/{key}/_sandbox/faults", json=fields)


async def probe(client: Client, key: str, **kwargs: Any) -> aiohttp.ClientResponse:
    method, path = probe_of(key)
    return await client.request(method, path, **kwargs)


@pytest.mark.parametrize("key", KEYS)
async def test_error_rate_answers_503_in_the_provider_shape(key: str) -> None:
    async with sandbox_client() as client:
        assert (await put_faults(client, key, error_rate=1)).status == 200
        response = await probe(client, key)
        assert response.status == 503
        assert await error_code_in(response, "service_unavailable")
        snapshot = await state(client, key)  # control routes are never faulted
        assert snapshot["faults_injected"]["error"] == 1
        assert sum(snapshot["calls"].values()) == 1


@pytest.mark.parametrize("key", KEYS)
async def test_rate_limit_answers_429_with_retry_after(key: str) -> None:
    async with sandbox_client() as client:
        await put_faults(client, key, rate_limit_rate=1, retry_after_s=7)
        response = await probe(client, key)
        assert response.status == 429
        assert response.headers["Retry-After"] == "7"
        assert await error_code_in(response, "rate_limited")
        assert (await state(client, key))["faults_injected"]["rate_limit"] == 1


async def test_hang_goes_past_the_client_timeout() -> None:
    async with sandbox_client(faults=FaultSettings(hang_rate=1, hang_s=0.5)) as client:
        with pytest.raises(asyncio.TimeoutError):
            await probe(client, "payway", timeout=aiohttp.ClientTimeout(total=0.1))
        assert (await state(client, "payway"))["faults_injected"]["hang"] == 1
        await client.put("/payway/_sandbox/faults", json={})
        assert (await probe(client, "payway")).status == 401  # no fault: auth answers


async def test_latency_is_added_to_every_provider_call_only() -> None:
    async with sandbox_client(faults=FaultSettings(latency_ms=150)) as client:
        started = time.monotonic()
        await probe(client, "payway")
        assert time.monotonic() - started >= 0.15
        snapshot = await state(client, "payway")
        assert snapshot["faults_injected"]["latency"] == 1, "the state call got none"


async def test_fail_once_fails_a_request_the_first_time_only() -> None:
    async with sandbox_client(faults=FaultSettings(fail_once_rate=1)) as client:
        params = {"account_id": "a" * 24}
        assert (await probe(client, "payway", params=params)).status == 503
        assert (await probe(client, "payway", params=params)).status == 401
        assert (await probe(client, "payway", params=params)).status == 401
        assert (await probe(client, "payway", params={"account_id": "b" * 24})).status == 503
        assert (await state(client, "payway"))["faults_injected"]["fail_once"] == 2


async def test_fail_once_rate_is_the_share_of_distinct_requests() -> None:
    settings = FaultSettings(fail_once_rate=0.2, seed=7)
    async with sandbox_client(faults=settings) as client:
        ids = [f"{n:024x}" for n in range(300)]
        first = [(await probe(client, "payway", params={"account_id": i})).status for i in ids]
        again = [(await probe(client, "payway", params={"account_id": i})).status for i in ids]
        assert 30 <= first.count(503) <= 90
        assert 503 not in again


def test_a_seed_makes_the_faults_reproducible() -> None:
    settings = FaultSettings(error_rate=0.3, rate_limit_rate=0.2, fail_once_rate=0.5, seed=42)

    def outcomes() -> list[str | None]:
        injector = FaultInjector(settings)
        draws = [injector.draw("GET", f"/x?{n % 50}", b"") for n in range(200)]
        return [fault.value if fault else None for fault in draws]

    assert outcomes() == outcomes()
    assert len(set(outcomes())) == 4  # None, error, rate_limit, fail_once all occur


def test_exclusive_rates_are_the_real_shares() -> None:
    injector = FaultInjector(FaultSettings(error_rate=0.5, rate_limit_rate=0.5, seed=1))
    draws = [injector.draw("GET", "/", b"") for _ in range(1000)]
    assert None not in draws


@pytest.mark.parametrize(
    "body",
    [
        {"error_rate": 1.5},
        {"latency_ms": -1},
        {"error_rate": 0.6, "hang_rate": 0.6},
        {"errors": 0.1},
        {"retry_after_s": "soon"},
        "not an object",
    ],
)
async def test_invalid_faults_are_422_and_change_nothing(body: Any) -> None:
    async with sandbox_client(faults=FaultSettings(latency_ms=1)) as client:
        response = await client.put("/payway/_sandbox/faults", json=body)
        assert response.status == 422
        assert (await response.json())["errors"]
        current = await (await client.get("/payway/_sandbox/faults")).json()
        assert current["latency_ms"] == 1


async def test_put_replaces_the_faults_and_get_reads_them() -> None:
    async with sandbox_client(faults=FaultSettings(latency_ms=5, error_rate=0.1)) as client:
        response = await put_faults(client, "payway", hang_rate=0.25, hang_s=2, seed=3)
        assert response.status == 200
        current = await (await client.get("/payway/_sandbox/faults")).json()
        assert current == FaultSettings(hang_rate=0.25, hang_s=2, seed=3).model_dump()


async def test_faults_of_one_provider_leave_the_others_alone() -> None:
    async with sandbox_client() as client:
        await put_faults(client, "payway", error_rate=1)
        healthy = await client.get("/healthz")
        assert healthy.status == 200
        other = [key for key in KEYS if key != "payway"]
        for key in other:
            assert (await probe(client, key)).status != 503


async def test_a_hung_call_still_takes_effect_and_a_retry_counts_once() -> None:
    async with sandbox_client() as client:
        headers = await auth(client)
        await put_faults(client, "payway", hang_rate=1, hang_s=0.3)
        with pytest.raises(asyncio.TimeoutError):
            await client.put(
                f"/payway{CANCEL_PATH}",
                json={**DEMO.end_of_period.as_json(), "cancellation_reason_id": DEMO.reason_id},
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=0.1),
            )
        await asyncio.sleep(0.4)  # the server did not give up: the cancel happened anyway
        expected = {DEMO.end_of_period.user_product_id: 1}
        assert (await state(client, "payway"))["effective_cancels"] == expected
        await put_faults(client, "payway")
        status, _ = await cancel(client, DEMO.end_of_period, **headers)  # the client's retry
        assert status == 200
        snapshot = await state(client, "payway")
        assert snapshot["calls"]["cancel_subscription"] == 2
        assert snapshot["effective_cancels"] == expected


async def test_a_provider_path_naming_the_control_segment_is_still_faulted() -> None:
    async with sandbox_client(faults=FaultSettings(error_rate=1)) as client:
        response = await client.get("/appdirect/api/billing/v1/companies/_sandbox/subscriptions")
        assert response.status == 503
        assert (await state(client, "appdirect"))["calls"] == {"company_subscriptions": 1}
