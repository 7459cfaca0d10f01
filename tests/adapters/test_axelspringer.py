"""Axel Springer adapter beyond the shared contract: link statuses, tokens, the flow setting."""

from __future__ import annotations

import pytest
from aiohttp import web

from cancelflow.contract import OutcomeType
from cancelflow.errors import ConfigError, ProviderAuthError, ProviderProtocolError
from cancelflow.settings import load_settings
from sandboxes.axelspringer import DEMO
from sandboxes.env import provider_env
from sandboxes.server import build_app
from tests.contract.support import answering, harness, job_for

KEY = "axelspringer"


def purchase(ref: str) -> dict[str, str]:
    return {"purchase_ref": ref}


@pytest.mark.parametrize(
    ("ref", "details"),
    [
        (DEMO.created, {"link_invalidated": True}),
        (DEMO.redeemed, {"subscription_cancelled": True, "link_revoked": True}),
    ],
)
async def test_cancel_by_link_status(ref: str, details: dict[str, bool]) -> None:
    async with harness(KEY) as h:
        answer, job = await h.check(job_for(KEY, purchase(ref)))
        assert answer.kind == "eligible"
        assert answer.details["link_status"] == answer.response["status"]
        done = await h.confirm(job)
        assert done.outcome.type is OutcomeType.CANCELLED
        assert done.outcome.details == details


async def test_cancel_of_a_canceled_purchase_is_already_cancelled() -> None:
    async with harness(KEY) as h:
        done = await h.confirm(job_for(KEY, purchase(DEMO.canceled)))
        assert done.outcome.type is OutcomeType.ALREADY_CANCELLED


async def test_cancel_of_an_unknown_purchase_is_not_found() -> None:
    async with harness(KEY) as h:
        done = await h.confirm(job_for(KEY, purchase(DEMO.unknown)))
        assert done.outcome.type is OutcomeType.NOT_FOUND


async def test_the_token_is_fetched_once_and_reused() -> None:
    async with harness(KEY) as h:
        for ref in (DEMO.created, DEMO.redeemed, DEMO.canceled):
            await h.check(job_for(KEY, purchase(ref)))
        assert (await h.state())["calls"]["token"] == 1


async def test_a_second_401_after_a_fresh_token_is_final() -> None:
    # Every token the sandbox issues is born expired.
    async with harness(KEY, app=build_app(token_ttl_s=0)) as h:
        with pytest.raises(ProviderAuthError) as caught:
            await h.check(job_for(KEY, purchase(DEMO.redeemed)))
        assert caught.value.status == 401
        assert (await h.state())["calls"]["token"] == 2


async def test_another_partners_purchases_are_forbidden() -> None:
    async with harness(KEY, partner_id=DEMO.other_partner_id) as h:
        with pytest.raises(ProviderAuthError) as caught:
            await h.check(job_for(KEY, purchase(DEMO.redeemed)))
        assert caught.value.status == 403


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(__import__("os").environ):
        if name.startswith("CANCELFLOW_"):
            monkeypatch.delenv(name)
    for name, value in provider_env("http://127.0.0.1:9").items():
        if "AXELSPRINGER" in name:
            monkeypatch.setenv(name, value)
    return monkeypatch


def test_the_activation_link_flow_starts(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.provider(KEY).flow == "activation_link"  # type: ignore[attr-defined]


def test_a_partner_on_the_api_flow_is_refused_at_start_up(env: pytest.MonkeyPatch) -> None:
    env.setenv("CANCELFLOW_PROVIDERS__AXELSPRINGER__FLOW", "api")
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert "CANCELFLOW_PROVIDERS__AXELSPRINGER" in message
    assert "'api' flow" in message and "activation-link" in message


def answering_cancel(status: int, body: dict[str, str]) -> web.Application:
    """A provider that issues tokens and answers every other call ``status`` with ``body``."""

    async def answer(request: web.Request) -> web.Response:
        if request.path.endswith("/oauth2/token"):
            return web.json_response({"access_token": "t0k3n", "expires_in": 3600})
        return web.json_response(body, status=status)

    return answering(answer)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        # What the retry of a cancel whose answer was lost got in the fault-injection run.
        (200, {"purchaseRef": DEMO.redeemed, "previousStatus": "Canceled", "status": "Canceled"}),
        (409, {"code": "CONFLICT", "message": "Purchase is already canceled"}),
        (409, {"code": "ALREADY_CANCELED", "message": "Purchase is already canceled"}),
    ],
)
async def test_a_cancel_of_a_canceled_purchase_in_any_shape_is_already_cancelled(
    status: int, body: dict[str, str]
) -> None:
    async with harness(KEY, app=answering_cancel(status, body)) as h:
        done = await h.confirm(job_for(KEY, purchase(DEMO.redeemed)))
        assert done.outcome.type is OutcomeType.ALREADY_CANCELLED


async def test_an_unknown_previous_status_is_still_a_protocol_error() -> None:
    body = {"purchaseRef": DEMO.redeemed, "previousStatus": "Expired", "status": "Canceled"}
    async with harness(KEY, app=answering_cancel(200, body)) as h:
        with pytest.raises(ProviderProtocolError):
            await h.confirm(job_for(KEY, purchase(DEMO.redeemed)))
