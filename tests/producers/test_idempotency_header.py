"""The ``Idempotency-Key`` header on ``POST /v1/cancellations``
(draft-ietf-httpapi-idempotency-key-header): the same key as the body's ``idempotency_key``,
through the same per-token namespace of ``JobStore.create``."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from producers.submit import KeyRefused, header_key, with_header_key
from tests.producers.test_problem_types import _payway, _type
from tests.support import System


def _post(api: System, body: Any, key: str | None) -> tuple[int, Any]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return api.post("/v1/cancellations", body, headers=headers)


def test_header_values_as_the_draft_writes_them() -> None:
    assert header_key([]) is None
    assert header_key(['"8e03978e-40d5-43e8-bc93-6894a57f9324"']) == (
        "8e03978e-40d5-43e8-bc93-6894a57f9324"
    )
    assert header_key(["order-1042"]) == "order-1042"  # a bare token, as many clients send
    assert header_key(['"a\\"b\\\\c"']) == 'a"b\\c'
    for bad in (['"open'], ['"a"b"'], ['""'], ["x" * 256], ["a", "b"], ["caf\u00e9"]):
        with pytest.raises(KeyRefused):
            header_key(bad)
    assert with_header_key({"provider": "p"}, "k") == {"provider": "p", "idempotency_key": "k"}
    assert with_header_key({"idempotency_key": "k"}, "k") == {"idempotency_key": "k"}
    with pytest.raises(KeyRefused) as err:
        with_header_key({"idempotency_key": "other"}, "k")
    assert err.value.mismatch


@pytest.mark.integration
def test_same_key_same_body_is_the_same_job_another_body_is_refused(system: System) -> None:
    key = f"hdr-{secrets.token_hex(6)}"
    body = _payway()
    status, first = _post(system, body, key)
    assert status == 202 and first["how"] == "created", first
    assert first["idempotency_key"] == key
    status, again = _post(system, body, key)
    assert (status, again["id"], again["how"]) == (202, first["id"], "existing")
    # The header and the body field are one key: a retry may send either.
    status, by_field = _post(system, {**body, "idempotency_key": key}, None)
    assert (status, by_field["id"]) == (202, first["id"])
    status, problem = _post(system, _payway(), key)
    assert (status, _type(problem), problem["job_id"]) == (
        422,
        "idempotency-key-reused",
        first["id"],
    )


@pytest.mark.integration
def test_header_and_body_field_must_agree(system: System) -> None:
    body = _payway(idempotency_key="in-the-body")
    status, problem = _post(system, body, "in-the-header")
    assert (status, _type(problem)) == (400, "idempotency-key-mismatch")
    status, job = _post(system, body, '"in-the-body"')
    assert status == 202 and job["idempotency_key"] == "in-the-body"


@pytest.mark.integration
def test_a_malformed_or_reserved_header_key_is_a_validation_error(system: System) -> None:
    status, problem = _post(system, _payway(), '"unterminated')
    assert (status, _type(problem)) == (422, "validation-error")
    assert [e["field"] for e in problem["errors"]] == ["header.Idempotency-Key"]
    status, problem = _post(system, _payway(), "billing:evt_1")
    assert (status, _type(problem)) == (422, "validation-error")
    assert [e["field"] for e in problem["errors"]] == ["idempotency_key"]


@pytest.mark.integration
def test_concurrent_requests_with_one_key_make_one_job(system: System) -> None:
    # No 409 "still in flight": JobStore.create records the job and its key in one Redis
    # script, so no request can see the key taken without its job. Racing requests all get
    # the one job, exactly one of them "created".
    key = f"race-{secrets.token_hex(6)}"
    body = _payway()
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: _post(system, body, key), range(16)))
    assert {status for status, _ in answers} == {202}
    assert len({job["id"] for _, job in answers}) == 1
    assert sorted(job["how"] for _, job in answers) == ["created"] + ["existing"] * 15
