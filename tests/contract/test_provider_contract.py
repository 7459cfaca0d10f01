"""The provider contract: every adapter in the registry, against its sandbox over real HTTP.

One suite for all providers (like dramatiq's one suite over every broker): a provider added to
the registry runs it by itself, and fails until ``tests/contract/providers/<key>.py`` gives its
demo references.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog
from aiohttp import web
from pydantic import SecretStr

from cancelflow.contract import OutcomeType, Status
from cancelflow.errors import (
    ProviderAuthError,
    ProviderError,
    ProviderProtocolError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)
from cancelflow.logging import redact
from cancelflow.providers import REGISTRY
from tests.contract.providers import ContractFixture, contract_for
from tests.contract.support import Harness, answering, harness, job_for

KEYS = sorted(REGISTRY)
TOKEN_KEYS = [k for k in KEYS if (c := contract_for(k)) is not None and c.token_route]


@pytest.fixture(params=KEYS)
def key(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def contract(key: str) -> ContractFixture:
    found = contract_for(key)
    if found is None:
        pytest.fail(f"{key!r} has no contract table: add tests/contract/providers/{key}.py")
    return found


def secrets_of(h: Harness) -> list[str]:
    return [
        value.get_secret_value()
        for name in type(h.settings).model_fields
        if isinstance(value := getattr(h.settings, name), SecretStr)
    ]


async def test_check_then_confirm_cancels_once(key: str, contract: ContractFixture) -> None:
    async with harness(key, **contract.settings) as h:
        with structlog.testing.capture_logs() as logs:
            answer, job = await h.check(job_for(key, contract.success))
            assert answer.kind == "eligible", answer
            done = await h.confirm(job)
        assert done.outcome.type is OutcomeType.CANCELLED, done.outcome
        assert (await h.state())["effective_cancels"] == {contract.cancel_key: 1}

        # A redelivered confirm never cancels twice, and still ends as a cancellation.
        again = await h.confirm(job)
        assert again.outcome.type in (OutcomeType.CANCELLED, OutcomeType.ALREADY_CANCELLED)
        assert (await h.state())["effective_cancels"] == {contract.cancel_key: 1}

        # What reaches the timeline and the logs is JSON and carries no secret.
        assert any(e["event"] == "provider.http_response" for e in logs)
        seen = json.dumps([redact(answer.response), redact(done.response), logs], default=str)
        seen += done.outcome.model_dump_json()
        for secret in secrets_of(h):
            assert secret not in seen
        assert "Bearer " not in seen


async def test_already_cancelled(key: str, contract: ContractFixture) -> None:
    async with harness(key, **contract.settings) as h:
        answer, _ = await h.check(job_for(key, contract.already_cancelled))
        assert answer.kind == "final"
        assert answer.outcome is not None
        assert answer.outcome.type is OutcomeType.ALREADY_CANCELLED
        assert (await h.state())["effective_cancels"] == {}


async def test_not_found_or_not_eligible(key: str, contract: ContractFixture) -> None:
    async with harness(key, **contract.settings) as h:
        answer, _ = await h.check(job_for(key, contract.not_found))
        assert answer.kind == "final"
        assert answer.outcome is not None
        assert answer.outcome.type is contract.not_found_outcome
        assert (await h.state())["effective_cancels"] == {}


async def raises(h: Harness, contract: ContractFixture, cls: type[ProviderError]) -> list[Any]:
    """Both calls raise ``cls``; the errors."""
    errors = []
    job = job_for(h.key, contract.success)
    for call in (h.check, h.confirm):
        with pytest.raises(cls) as caught:
            await call(job)
        errors.append(caught.value)
    return errors


async def test_429_is_rate_limited_with_retry_after(key: str, contract: ContractFixture) -> None:
    async with harness(key, **contract.settings) as h:
        await h.faults(rate_limit_rate=1.0, retry_after_s=7)
        for error in await raises(h, contract, ProviderRateLimited):
            assert error.retryable
            assert error.retry_after == 7
            assert error.provider == key
            assert not error.may_have_acted  # refused before acting


async def test_5xx_is_unavailable(key: str, contract: ContractFixture) -> None:
    async with harness(key, **contract.settings) as h:
        await h.faults(error_rate=1.0)
        for error in await raises(h, contract, ProviderUnavailable):
            assert error.retryable
            assert error.status == 503
            assert error.may_have_acted


async def test_a_hang_past_the_timeout_is_a_timeout(key: str, contract: ContractFixture) -> None:
    async with harness(key, **{**contract.settings, "timeout_s": 0.2}) as h:
        await h.faults(hang_rate=1.0, hang_s=0.6)
        with pytest.raises(ProviderTimeout) as caught:
            await h.check(job_for(key, contract.success))
        assert caught.value.retryable
        assert caught.value.may_have_acted


async def test_a_cancel_that_acted_and_lost_its_answer_reads_cancelled_after(
    key: str, contract: ContractFixture
) -> None:
    async with harness(key, **contract.settings) as h:
        await h.faults(lost_answer_rate=1.0)
        # Calls that cancel nothing (a token, a read, Azotte's request phase) never lose
        # their answer: only a cancel can have acted.
        answer, job = await h.check(job_for(key, contract.success))
        assert answer.kind == "eligible", answer
        assert (await h.state())["faults_injected"]["lost_answer"] == 0
        with pytest.raises(ProviderUnavailable) as caught:
            await h.confirm(job)
        assert caught.value.status == 502
        assert caught.value.may_have_acted and caught.value.as_dict()["may_have_acted"] is True
        state = await h.state()
        assert state["faults_injected"]["lost_answer"] == 1
        assert state["effective_cancels"] == {contract.cancel_key: 1}
        await h.faults()

        # The retry's reconcile read (the job is confirming) finds it cancelled...
        confirming = job.model_copy(update={"status": Status.CONFIRMING})
        read, _ = await h.check(confirming)
        assert read.kind == "final", read
        assert read.outcome is not None
        assert read.outcome.type is OutcomeType.ALREADY_CANCELLED
        # ...and a cancel sent again all the same is never an error, nor a second effect.
        again = await h.confirm(confirming)
        assert again.outcome.type in (OutcomeType.CANCELLED, OutcomeType.ALREADY_CANCELLED)
        assert (await h.state())["effective_cancels"] == {contract.cancel_key: 1}


async def test_refused_credentials_are_an_auth_error(key: str, contract: ContractFixture) -> None:
    async with harness(key, **{**contract.settings, **contract.bad_credentials}) as h:
        with pytest.raises(ProviderAuthError) as caught:
            await h.check(job_for(key, contract.success))
        assert not caught.value.retryable
        assert caught.value.status in (400, 401, 403)
        for secret in secrets_of(h):
            assert secret not in json.dumps(caught.value.as_dict())
        assert (await h.state())["effective_cancels"] == {}


@pytest.mark.parametrize("key", TOKEN_KEYS, indirect=True)
async def test_an_expired_token_is_fetched_again_once(key: str, contract: ContractFixture) -> None:
    assert contract.token_route is not None
    async with harness(key, **contract.settings) as h:
        _, job = await h.check(job_for(key, contract.success))
        assert (await h.state())["calls"][contract.token_route] == 1
        await h.expire_tokens()
        done = await h.confirm(job)
        assert done.outcome.type is OutcomeType.CANCELLED
        state = await h.state()
        assert state["calls"][contract.token_route] == 2
        assert state["effective_cancels"] == {contract.cancel_key: 1}


GARBAGE = {
    "not_json": (b"<html><body>502 says the proxy, with a 200</body></html>", "text/html"),
    "missing_fields": (b'{"unexpected": true}', "application/json"),
    "not_an_object": (b"[1, 2, 3]", "application/json"),
}


@pytest.mark.parametrize("garbage", sorted(GARBAGE))
async def test_a_malformed_answer_is_a_protocol_error(
    key: str, contract: ContractFixture, garbage: str
) -> None:
    body, content_type = GARBAGE[garbage]

    async def answer(request: web.Request) -> web.Response:
        # A real token where the provider has a token endpoint: the garbage is the API's.
        if contract.token_path and request.path.endswith(contract.token_path):
            return web.json_response({"access_token": "t0k3n", "expires_in": 3600})
        return web.Response(body=body, content_type=content_type)

    async with harness(key, app=answering(answer), **contract.settings) as h:
        job = job_for(key, contract.success)
        calls = {"check": h.check, "confirm": h.confirm}
        for name in contract.parses_body:
            with pytest.raises(ProviderProtocolError) as caught:
                await calls[name](job)
            assert not caught.value.retryable, name
