"""Tokens by scope and name, failed authentication limited per client address, billing
signatures checked before any rate limit, idempotency keys per caller, joiners told and heard."""

from __future__ import annotations

import http.client
import json
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from producers.signatures import expected_signature
from sandboxes.payway import DEMO
from tests.fixtures.system import StartSystem
from tests.producers.conftest import BILLING_SECRET
from tests.support import System

pytestmark = pytest.mark.integration

WRITER, READER, OTHER = "writer-secret-1", "reader-secret-1", "other-secret-1"


@pytest.fixture(scope="module")
def named_api(start_system: StartSystem, billing_rules_path: Path) -> System:
    return start_system(
        workers=0,
        isolated=True,
        CANCELFLOW_API_TOKENS=f"crm={WRITER}:write,dash={READER}:read,ops={OTHER}",
        CANCELFLOW_BILLING__RULES_PATH=str(billing_rules_path),
        CANCELFLOW_BILLING__SECRET=BILLING_SECRET,
    )


def call(
    system: System,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    source: str = "127.0.0.1",
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request from ``source`` (127.0.0.2 is loopback too on Linux: another client)."""
    url = urlsplit(system.api_url)
    conn = http.client.HTTPConnection(
        str(url.hostname), url.port, timeout=10, source_address=(source, 0)
    )
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        sent.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=sent)
        answer = conn.getresponse()
        text = answer.read()
        return answer.status, json.loads(text) if text else None
    finally:
        conn.close()


def payway(**extra: Any) -> dict[str, Any]:
    return {
        "provider": "payway",
        "subscription": {
            "account_id": secrets.token_hex(12),
            "user_product_id": secrets.token_hex(12),
            "cancellation_reason_id": DEMO.reason_id,
        },
        **extra,
    }


def test_read_tokens_cannot_write_and_write_tokens_can(named_api: System) -> None:
    status, problem = call(named_api, "POST", "/v1/cancellations", payway(), token=READER)
    assert status == 403, problem
    status, job = call(named_api, "POST", "/v1/cancellations", payway(), token=WRITER)
    assert status == 202 and job["how"] == "created", job
    status, _ = call(named_api, "GET", f"/v1/cancellations/{job['id']}", token=READER)
    assert status == 200


def test_logs_name_the_token_never_its_secret(named_api: System) -> None:
    status, job = call(named_api, "POST", "/v1/cancellations", payway(), token=WRITER)
    assert status == 202
    lines = named_api.log_lines(job["id"])
    assert "job.enqueued" in lines and "crm" in lines, lines
    call(named_api, "GET", "/v1/stats", token="wrong-guess-1")
    everything = named_api.log_lines("")
    assert "api.auth.failed" in everything
    for secret in (WRITER, READER, OTHER, "wrong-guess-1"):
        assert secret not in everything


def test_failed_authentication_is_limited_per_address(named_api: System) -> None:
    answers = [
        call(named_api, "GET", "/v1/stats", token=f"guess-{n}", source="127.0.0.3")[0]
        for n in range(130)
    ]
    assert answers[:100] == [401] * 100
    assert 429 in answers[100:]
    # While that address is held back, even a right token from it waits ...
    status, problem = call(named_api, "GET", "/v1/stats", token=WRITER, source="127.0.0.3")
    assert status == 429 and problem["title"] == "Too many requests"
    # ... and another address is not affected.
    status, _ = call(named_api, "GET", "/v1/stats", token=WRITER, source="127.0.0.2")
    assert status == 200


def _signed(raw: bytes) -> dict[str, str]:
    t = int(time.time())
    return {"Cancelflow-Signature": f"t={t},v1={expected_signature(raw, t, BILLING_SECRET)}"}


def _event() -> dict[str, Any]:
    return {
        "id": f"evt_{secrets.token_hex(8)}",
        "type": "payment.final_failure",
        "data": {
            "provider": "payway",
            "account_id": secrets.token_hex(12),
            "user_product_id": secrets.token_hex(12),
        },
    }


def test_a_signed_billing_event_gets_through_an_unsigned_flood(named_api: System) -> None:
    flood = [
        call(named_api, "POST", "/v1/billing-events", raw=b'{"id":"x"}', source="127.0.0.4")[0]
        for _ in range(400)
    ]
    assert set(flood) <= {401, 429} and 429 in flood
    raw = json.dumps(_event()).encode()
    # From the flooding address itself: a signature cannot be guessed, so it is not held back.
    status, result = call(
        named_api, "POST", "/v1/billing-events", raw=raw, headers=_signed(raw), source="127.0.0.4"
    )
    assert status == 202, result


def test_idempotency_keys_are_each_callers_own(named_api: System) -> None:
    body = payway(idempotency_key=f"order-{secrets.token_hex(4)}")
    status, mine = call(named_api, "POST", "/v1/cancellations", body, token=WRITER)
    assert status == 202 and mine["how"] == "created"
    status, again = call(named_api, "POST", "/v1/cancellations", body, token=WRITER)
    assert status == 202 and again["id"] == mine["id"] and again["how"] == "existing"
    # Another token, same key, another subscription: its own job, no 409.
    other = payway(idempotency_key=body["idempotency_key"])
    status, theirs = call(named_api, "POST", "/v1/cancellations", other, token=OTHER)
    assert status == 202 and theirs["id"] != mine["id"], theirs


def test_billing_keys_are_reserved_and_billing_events_keep_their_jobs(named_api: System) -> None:
    event = _event()
    crafted = payway(idempotency_key=f"billing:{event['id']}")
    status, problem = call(named_api, "POST", "/v1/cancellations", crafted, token=WRITER)
    assert status == 422, problem
    assert [e["field"] for e in problem["errors"]] == ["idempotency_key"]
    raw = json.dumps(event).encode()
    status, result = call(named_api, "POST", "/v1/billing-events", raw=raw, headers=_signed(raw))
    assert status == 202 and result["result"] == "enqueued", result


def test_a_joiner_is_told_and_its_callback_url_kept(named_api: System) -> None:
    first = payway()
    status, job = call(named_api, "POST", "/v1/cancellations", first, token=WRITER)
    assert status == 202 and job["how"] == "created"
    joiner = {**first, "callback_url": "https://hooks.example.com/joiner"}
    status, joined = call(named_api, "POST", "/v1/cancellations", joiner, token=OTHER)
    assert status == 202 and joined["how"] == "joined" and joined["id"] == job["id"], joined
    assert joined["extra_callbacks"] == ["https://hooks.example.com/joiner"]
    # A joiner's callback URL is checked like any other.
    bad = {**first, "callback_url": "ftp://hooks.example.com/x"}
    status, problem = call(named_api, "POST", "/v1/cancellations", bad, token=OTHER)
    assert status == 422, problem
