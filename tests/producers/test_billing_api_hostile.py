"""``POST /v1/billing-events`` over HTTP with signed bodies that are not billing events: each
gets a 4xx problem (never a 500), and nothing is stored: no job, no dead letter, no count."""

from __future__ import annotations

import http.client
import json
import secrets
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import redis

from cancelflow.dead_letters import INDEX as DEAD_LETTERS
from cancelflow.store import JOBS_INDEX
from producers.billing import COUNTS_KEY
from producers.problems import PROBLEM_TYPE
from tests.producers.test_api import _event, signed
from tests.support import System

pytestmark = pytest.mark.integration

# billing_api limits bodies to 4 KiB: 2,000 levels fit in it (the depth limit is 32).
HOSTILE: dict[str, tuple[bytes, int]] = {
    "nested 2,000 deep": (b"[" * 2000 + b"]" * 2000, 400),
    "an event nested 1,000 deep": (
        b'{"id": "evt_deep", "type": "payment.final_failure", "data": {"v": '
        + b"[" * 1000
        + b"]" * 1000
        + b"}}",
        400,
    ),
    "a lone surrogate in its id": (json.dumps({**_event(), "id": "e-\ud800"}).encode(), 400),
    "a lone surrogate in its data": (json.dumps(_event(note="\udfff")).encode(), 400),
    "a surrogate as UTF-8 bytes": (b'{"id": "e-\xed\xa0\x80", "type": "x"}', 400),
    "Latin-1": ('{"id": "é", "type": "x"}'.encode("latin-1"), 400),
    "UTF-16": (json.dumps(_event()).encode("utf-16"), 400),
    "binary": (bytes(range(256)), 400),
    "not JSON": (b"{nope", 400),
    "NaN": (b'{"id": "e-nan", "type": "x", "data": {"v": NaN}}', 400),
    "a float too large": (b'{"id": "e-inf", "type": "x", "data": {"v": 1e999}}', 400),
    "empty": (b"", 400),
    "not an object": (b"[1, 2]", 422),
    "the wrong field types": (json.dumps({"id": 5, "type": ["x"], "data": "x"}).encode(), 422),
    "no id": (json.dumps({"type": "payment.final_failure", "data": {}}).encode(), 422),
    "an id too long": (json.dumps({**_event(), "id": "e" * 300}).encode(), 422),
}


def _stored(system: System) -> tuple[int, int, dict[bytes, bytes]]:
    client = redis.Redis.from_url(system.redis_url)
    try:
        return (
            cast(int, client.zcard(JOBS_INDEX)),
            cast(int, client.zcard(DEAD_LETTERS)),
            cast("dict[bytes, bytes]", client.hgetall(COUNTS_KEY)),
        )
    finally:
        client.close()


def _post(system: System, raw: bytes) -> tuple[int, str, Any]:
    parts = urlsplit(system.api_url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", "/v1/billing-events", body=raw, headers=signed(raw))
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_body_that_is_no_billing_event_gets_4xx_and_stores_nothing(
    billing_api: System, name: str
) -> None:
    raw, expected = HOSTILE[name]
    before = _stored(billing_api)
    status, content_type, problem = _post(billing_api, raw)
    assert status == expected, (name, problem)
    assert content_type.startswith(PROBLEM_TYPE)
    assert problem["status"] == status and problem["errors"], problem
    assert "dead_letter_id" not in problem
    assert _stored(billing_api) == before, name


def test_the_depth_limit_is_exact_and_the_api_still_answers(billing_api: System) -> None:
    """32 levels pass (the event is then ignored: no rule matches); 33 do not."""
    for levels, expected in ((31, 200), (32, 400)):  # the event object is one level itself
        inner = "[" * levels + "]" * levels
        event_id = f"evt_{secrets.token_hex(6)}"
        raw = f'{{"id": "{event_id}", "type": "invoice.paid", "v": {inner}}}'.encode()
        status, _, body = _post(billing_api, raw)
        assert status == expected, (levels, body)
    event = _event()
    status, _, result = _post(billing_api, json.dumps(event).encode())
    assert status == 202 and result["result"] == "enqueued", result
