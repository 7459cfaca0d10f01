"""Lost answers (`lost_answer_rate`): every sandbox's cancel call takes effect, then the client
gets a proxy's 502; the effect counts once, the fault is counted, other calls are untouched."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest

from sandboxes import appdirect, axelspringer, azotte, payway
from sandboxes.faults import FaultInjector, FaultSettings
from tests.sandboxes.support import Client, sandbox_client, state
from tests.sandboxes.test_appdirect import API as APPDIRECT_API
from tests.sandboxes.test_appdirect import signed_headers
from tests.sandboxes.test_axelspringer import bearer, purchase_url
from tests.sandboxes.test_azotte import CONFIRM, HEADERS, request_cancel
from tests.sandboxes.test_payway import auth, cancel_body

Call = Callable[[Client], Awaitable[aiohttp.ClientResponse]]


@dataclass(frozen=True)
class CancelCall:
    """One provider's cancel call on a cancellable demo record, and what a repeat answers."""

    # Calls that must come first and are not cancels (a token, Azotte's request phase).
    prepare: Call
    cancel: Call
    cancelled: str  # the record's key in effective_cancels
    # Status of the same cancel sent again once the first took effect.
    repeat_status: int


async def nothing(client: Client) -> aiohttp.ClientResponse:
    return await client.get("/healthz")


async def payway_cancel(client: Client) -> aiohttp.ClientResponse:
    return await client.put(
        f"/payway{payway.CANCEL_PATH}",
        json=cancel_body(payway.DEMO.end_of_period),
        headers=await auth(client),
    )


async def payway_read(client: Client) -> aiohttp.ClientResponse:
    return await client.get(
        f"/payway{payway.CAN_CANCEL_PATH}",
        params=payway.DEMO.end_of_period.as_json(),
        headers=await auth(client),
    )


async def azotte_request(client: Client) -> aiohttp.ClientResponse:
    status, _ = await request_cancel(client, azotte.DEMO.processed)
    assert status == 200  # the request phase cancels nothing: never a lost answer
    return await nothing(client)


async def azotte_confirm(client: Client) -> aiohttp.ClientResponse:
    body = {"orderIdentifier": azotte.DEMO.processed, "cancelationMethod": "Normal"}
    return await client.post(CONFIRM, json=body, headers=HEADERS)


APPDIRECT_PATH = f"{APPDIRECT_API}/subscriptions/{appdirect.DEMO.active}"


async def appdirect_delete(client: Client) -> aiohttp.ClientResponse:
    headers = signed_headers(client, "DELETE", APPDIRECT_PATH)
    return await client.delete(APPDIRECT_PATH, headers=headers)


async def appdirect_read(client: Client) -> aiohttp.ClientResponse:
    headers = signed_headers(client, "GET", APPDIRECT_PATH)
    return await client.get(APPDIRECT_PATH, headers=headers)


async def axelspringer_cancel(client: Client) -> aiohttp.ClientResponse:
    url = purchase_url(axelspringer.DEMO.redeemed) + "/cancel"
    return await client.post(url, headers=await bearer(client))


async def axelspringer_read(client: Client) -> aiohttp.ClientResponse:
    return await client.get(purchase_url(axelspringer.DEMO.redeemed), headers=await bearer(client))


CANCELS = {
    # Payway replays the first answer to a repeated cancel (the sandbox's assumption).
    "payway": CancelCall(nothing, payway_cancel, payway.DEMO.end_of_period.user_product_id, 200),
    "azotte": CancelCall(azotte_request, azotte_confirm, azotte.DEMO.processed, 409),
    "appdirect": CancelCall(nothing, appdirect_delete, appdirect.DEMO.active, 400),
    "axelspringer": CancelCall(nothing, axelspringer_cancel, axelspringer.DEMO.redeemed, 409),
}
# A call of each provider that reads and cancels nothing.
READS: dict[str, Call] = {
    "payway": payway_read,
    "azotte": azotte_request,
    "appdirect": appdirect_read,
    "axelspringer": axelspringer_read,
}


async def put_faults(client: Client, key: str, **fields: float) -> None:
    response = await client.put(f"/{key}/_sandbox/faults", json=fields)
    assert response.status == 200, await response.text()


@pytest.mark.parametrize("key", sorted(CANCELS))
async def test_a_lost_answer_takes_effect_once_and_answers_502(key: str) -> None:
    call = CANCELS[key]
    async with sandbox_client() as client:
        await put_faults(client, key, lost_answer_rate=1)
        await call.prepare(client)
        lost = await call.cancel(client)
        assert lost.status == 502
        assert "Bad Gateway" in await lost.text()
        snapshot = await state(client, key)
        assert snapshot["faults_injected"]["lost_answer"] == 1
        assert snapshot["effective_cancels"] == {call.cancelled: 1}

        # The client's retry, the answer no longer lost: "already cancelled", no second effect.
        await put_faults(client, key)
        again = await call.cancel(client)
        assert again.status == call.repeat_status, await again.text()
        snapshot = await state(client, key)
        assert snapshot["effective_cancels"] == {call.cancelled: 1}
        assert snapshot["faults_injected"]["lost_answer"] == 0  # new faults, counters anew


@pytest.mark.parametrize("key", sorted(READS))
async def test_calls_that_cancel_nothing_never_lose_their_answer(key: str) -> None:
    async with sandbox_client(faults=FaultSettings(lost_answer_rate=1)) as client:
        response = await READS[key](client)
        assert response.status == 200, await response.text()
        snapshot = await state(client, key)
        assert snapshot["faults_injected"]["lost_answer"] == 0
        assert snapshot["effective_cancels"] == {}


async def test_a_refused_cancel_stays_refused_behind_the_502() -> None:
    # The provider refuses (AppDirect's 400 for a cancelled subscription); the proxy still
    # answers 502, and nothing is cancelled.
    path = f"{APPDIRECT_API}/subscriptions/{appdirect.DEMO.cancelled}"
    async with sandbox_client(faults=FaultSettings(lost_answer_rate=1)) as client:
        response = await client.delete(path, headers=signed_headers(client, "DELETE", path))
        assert response.status == 502
        snapshot = await state(client, "appdirect")
        assert snapshot["faults_injected"]["lost_answer"] == 1
        assert snapshot["effective_cancels"] == {}


def test_the_lost_answer_rate_is_the_share_of_cancel_calls() -> None:
    injector = FaultInjector(FaultSettings(lost_answer_rate=0.3, error_rate=0.2, seed=5))
    cancels = [injector.draw("PUT", "/cancel", b"", cancels=True) for _ in range(2000)]
    assert 500 <= sum(f is not None and f.value == "lost_answer" for f in cancels) <= 700
    reads = [injector.draw("GET", "/read", b"") for _ in range(2000)]
    assert not any(f is not None and f.value == "lost_answer" for f in reads)
    # The error share is unchanged by the lost-answer slice on calls that cancel nothing.
    assert 300 <= sum(f is not None and f.value == "error" for f in reads) <= 500


def test_lost_answers_share_the_exclusive_budget() -> None:
    with pytest.raises(ValueError, match="lost_answer_rate"):
        FaultSettings(error_rate=0.5, hang_rate=0.3, lost_answer_rate=0.3)
