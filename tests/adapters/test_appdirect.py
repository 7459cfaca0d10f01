"""AppDirect adapter beyond the shared contract: DELETE outcomes and JSON or XML error bodies."""

from __future__ import annotations

import pytest

from cancelflow.contract import OutcomeType
from cancelflow.errors import ProviderAuthError, ProviderProtocolError
from cancelflow.http import HttpResponse
from cancelflow.providers.appdirect import parse_error
from sandboxes.appdirect import DEMO
from tests.contract.support import harness, job_for

KEY = "appdirect"


def sub(subscription_id: str) -> dict[str, str]:
    return {"subscription_id": subscription_id}


async def test_a_free_trial_is_eligible_and_deleted() -> None:
    async with harness(KEY) as h:
        answer, job = await h.check(job_for(KEY, sub(DEMO.free_trial)))
        assert answer.kind == "eligible"
        assert answer.response["status"] == "FREE_TRIAL"
        assert (await h.confirm(job)).outcome.type is OutcomeType.CANCELLED
        assert (await h.state())["effective_cancels"] == {DEMO.free_trial: 1}


async def test_delete_of_a_previously_deleted_subscription_is_already_cancelled() -> None:
    async with harness(KEY) as h:
        done = await h.confirm(job_for(KEY, sub(DEMO.cancelled)))
        assert done.outcome.type is OutcomeType.ALREADY_CANCELLED
        assert done.outcome.details["code"] == "SUBSCRIPTION_NOT_EDITABLE"


async def test_delete_of_an_unknown_subscription_is_not_found_from_an_xml_body() -> None:
    async with harness(KEY) as h:
        done = await h.confirm(job_for(KEY, sub(DEMO.not_found)))
        assert done.outcome.type is OutcomeType.NOT_FOUND
        assert done.response == {
            "code": "NOT_FOUND",
            "message": f"Subscription {DEMO.not_found} not found",
        }


async def test_an_unknown_consumer_key_is_an_auth_error() -> None:
    async with harness(KEY, consumer_key="someone-else") as h:
        with pytest.raises(ProviderAuthError) as caught:
            await h.confirm(job_for(KEY, sub(DEMO.active)))
        assert caught.value.code == "UNAUTHORIZED"
        assert (await h.state())["effective_cancels"] == {}


def response(body: bytes, content_type: str) -> HttpResponse:
    return HttpResponse(400, {"Content-Type": content_type}, body)


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b'{"code": "BAD", "message": "no"}', "application/json", {"code": "BAD", "message": "no"}),
        (
            b"<?xml version='1.0'?><errors><error><code>NOT_FOUND</code>"
            b"<message>gone</message></error></errors>",
            "application/xml",
            {"code": "NOT_FOUND", "message": "gone"},
        ),
        # XML whatever the content type says, and a bare <error>.
        (b"<error><code>X</code></error>", "application/json", {"code": "X"}),
        (b"<errors/>", "application/xml", {}),
        (b"", "application/json", {}),
        (b"Service says no", "text/plain", {}),
    ],
)
def test_error_bodies_in_json_or_xml(
    body: bytes, content_type: str, expected: dict[str, str]
) -> None:
    assert parse_error(response(body, content_type), KEY) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"<errors><error><code>unclosed</error></errors>",
        b'<?xml version="1.0"?><!DOCTYPE lol [<!ENTITY a "aaaa">]><errors>&a;</errors>',
        b"<errors>" + b"x" * 70_000 + b"</errors>",
        b'{"code": ',
        b'["a list"]',
    ],
)
def test_a_malformed_error_body_is_a_protocol_error(body: bytes) -> None:
    content_type = "application/xml" if body.startswith(b"<") else "application/json"
    with pytest.raises(ProviderProtocolError) as caught:
        parse_error(response(body, content_type), KEY)
    assert not caught.value.retryable
