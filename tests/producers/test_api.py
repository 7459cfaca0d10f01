"""The hardened API, over HTTP against running API processes: the OpenAPI document, body size
limits, per-token rate limits shared by every API process, listing with filters and cursors,
read-only tokens, and signed billing events."""

from __future__ import annotations

import http.client
import json
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from cancelflow.contract import CancellationRequest
from cancelflow.settings import Settings
from producers import openapi
from producers.api import create_app
from producers.local import http_json
from producers.signatures import expected_signature
from sandboxes.payway import DEMO
from tests.fixtures.system import READ_TOKEN, StartSystem
from tests.producers.conftest import BILLING_SECRET
from tests.support import System

pytestmark = pytest.mark.integration


def payway_body(**extra: Any) -> dict[str, Any]:
    return {
        "provider": "payway",
        "subscription": {
            "account_id": secrets.token_hex(12),
            "user_product_id": secrets.token_hex(12),
            "cancellation_reason_id": DEMO.reason_id,
        },
        **extra,
    }


def signed(body: bytes, *, secret: str = BILLING_SECRET, at: int | None = None) -> dict[str, str]:
    t = int(time.time()) if at is None else at
    return {"Cancelflow-Signature": f"t={t},v1={expected_signature(body, t, secret)}"}


# --- OpenAPI ---------------------------------------------------------------------------------


def test_openapi_is_public_and_made_from_the_models(billing_api: System) -> None:
    status, doc = http_json("GET", f"{billing_api.api_url}/openapi.json")
    assert status == 200
    assert doc["openapi"] == "3.1.0"
    schemas = doc["components"]["schemas"]
    expected = CancellationRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    payway = schemas["PaywayCancellationRequest"]["properties"]
    assert payway["reason"] == expected["properties"]["reason"]
    assert payway["subscription"] == {"$ref": "#/components/schemas/PaywayRef"}
    assert {"PaywayRef", "AzotteRef", "JobRecord", "JobPage", "Problem", "BillingEvent"} <= set(
        schemas
    )
    # Billing events here are signed with Cancelflow-Signature only (the one secret set).
    billing = doc["paths"]["/v1/billing-events"]["post"]
    assert billing["security"] == [{"cancelflowSignature": []}]
    operations = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert {
        ("/v1/cancellations", "post"),
        ("/v1/cancellations", "get"),
        ("/v1/cancellations/{job_id}", "get"),
        ("/v1/cancellations/{job_id}/decision", "post"),
        ("/v1/billing-events", "post"),
        ("/v1/stats", "get"),
    } <= operations
    created = doc["paths"]["/v1/cancellations"]["post"]["responses"]
    assert created["422"]["content"]["application/problem+json"]["schema"] == {
        "$ref": "#/components/schemas/Problem"
    }
    assert created["429"]["headers"]["Retry-After"]["required"] is True


def test_openapi_describes_every_route() -> None:
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    # The web console is not part of the API (its own pages, behind its own sign-in).
    routes = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    doc = openapi.document(max_body_bytes=1024)
    described = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routes == described


# --- body size -------------------------------------------------------------------------------


def test_bodies_over_the_limit_get_413(billing_api: System) -> None:
    big = payway_body(metadata={"note": "x" * 5000})
    status, problem = billing_api.post("/v1/cancellations", big)
    assert status == 413
    assert problem["status"] == 413 and "4096" in problem["detail"]
    # Chunked, so the size is only known while reading.
    parts = urlsplit(billing_api.api_url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    payload = json.dumps(big).encode()
    conn.request(
        "POST",
        "/v1/cancellations",
        body=iter([payload[:3000], payload[3000:]]),
        encode_chunked=True,
        headers={
            "Authorization": f"Bearer {billing_api.token}",
            "Content-Type": "application/json",
        },
    )
    resp = conn.getresponse()
    assert resp.status == 413
    assert resp.getheader("Content-Type", "").startswith("application/problem+json")
    conn.close()


# --- rate limits -----------------------------------------------------------------------------


def _burst(api_url: str, token: str, n: int) -> list[tuple[int, Any, dict[str, str]]]:
    out = []
    parts = urlsplit(api_url)
    assert parts.hostname is not None
    for _ in range(n):
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request(
            "GET", "/v1/cancellations?limit=1", headers={"Authorization": f"Bearer {token}"}
        )
        resp = conn.getresponse()
        out.append((resp.status, json.loads(resp.read()), dict(resp.getheaders())))
        conn.close()
    return out


def test_each_token_is_rate_limited_across_every_api_process(
    limited_api: System, start_system: StartSystem
) -> None:
    # A second API process on the same Redis shares the counts (2/s, burst 5).
    twin = start_system(
        workers=0,
        db_url=limited_api.redis_url,
        CANCELFLOW_API__RATE_LIMIT_PER_S="2",
        CANCELFLOW_API__RATE_LIMIT_BURST="5",
    )
    token = READ_TOKEN
    first = _burst(limited_api.api_url, token, 4)
    second = _burst(twin.api_url, token, 4)
    statuses = [s for s, _, _ in first + second]
    assert statuses.count(200) <= 6, statuses  # 5 at once, plus what 2/s refilled meanwhile
    assert 429 in statuses
    _, problem, headers = next(r for r in first + second if r[0] == 429)
    assert int(headers["Retry-After"]) >= 1
    assert 0 < problem["retry_after"] <= 1
    assert headers["Content-Type"].startswith("application/problem+json")
    # Another token has a budget of its own.
    assert _burst(twin.api_url, limited_api.token, 1)[0][0] == 200
    time.sleep(1.1)
    assert _burst(limited_api.api_url, token, 1)[0][0] == 200


# --- listing ---------------------------------------------------------------------------------


def _list(system: System, **query: Any) -> tuple[int, Any]:
    return system.get(f"/v1/cancellations?{urlencode(query, doseq=True)}")


def test_listing_filters_and_cursor_pagination(billing_api: System) -> None:
    since = (datetime.now(UTC) - timedelta(milliseconds=50)).isoformat()
    mine = [billing_api.enqueue(payway_body(metadata={"n": n}))["id"] for n in range(7)]
    azotte = billing_api.enqueue(
        {"provider": "azotte", "subscription": {"order_identifier": f"o-{secrets.token_hex(6)}"}}
    )
    until = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query: dict[str, Any] = {
            "provider": "payway",
            "created_after": since,
            "created_before": until,
            "limit": 3,
        }
        if cursor:
            query["cursor"] = cursor
        status, page = _list(billing_api, **query)
        assert status == 200, page
        assert len(page["items"]) <= 3
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(mine)), "newest first, each once"
    assert pages >= 3
    status, page = _list(billing_api, created_after=since, status=["queued", "finished"], limit=50)
    ids = [i["id"] for i in page["items"]]
    assert azotte["id"] in ids and set(mine) <= set(ids)
    item = next(i for i in page["items"] if i["id"] == azotte["id"])
    assert item["provider"] == "azotte" and item["status"] == "queued" and item["outcome"] is None
    status, page = _list(billing_api, created_after=since, status="finished")
    assert status == 200 and not {i["id"] for i in page["items"]} & {*mine, azotte["id"]}
    status, page = _list(billing_api, provider="azotte", created_after=since)
    assert [i["id"] for i in page["items"]] == [azotte["id"]]

    bad_queries: list[tuple[dict[str, Any], str]] = [
        ({"status": "lost"}, "query.status.0"),
        ({"limit": 0}, "query.limit"),
        ({"cursor": "nonsense!"}, "query.cursor"),
        ({"created_after": "yesterday"}, "query.created_after"),
        ({"colour": "red"}, "query.colour"),
    ]
    for bad, field in bad_queries:
        status, problem = _list(billing_api, **bad)
        assert status == 422, (bad, problem)
        assert field in {e["field"] for e in problem["errors"]}, (bad, problem)

    status, found = billing_api.get("/v1/stats?since_s=300")
    assert status == 200
    assert found["jobs"]["payway"]["queued"] >= 7 and found["jobs"]["azotte"]["queued"] >= 1


def test_read_only_tokens_read_but_do_not_write(billing_api: System) -> None:
    url = billing_api.api_url
    assert http_json("GET", f"{url}/v1/cancellations?limit=1", token=READ_TOKEN)[0] == 200
    assert http_json("GET", f"{url}/v1/stats", token=READ_TOKEN)[0] == 200
    status, problem = http_json("POST", f"{url}/v1/cancellations", payway_body(), token=READ_TOKEN)
    assert status == 403 and problem["title"] == "Forbidden"
    assert http_json("GET", f"{url}/v1/cancellations?limit=1")[0] == 401


# --- billing events over HTTP ----------------------------------------------------------------


def _event(**data: Any) -> dict[str, Any]:
    return {
        "id": f"evt_{secrets.token_hex(8)}",
        "type": "payment.final_failure",
        "data": {
            "provider": "payway",
            "account_id": secrets.token_hex(12),
            "user_product_id": secrets.token_hex(12),
            **data,
        },
    }


def _post_event(system: System, raw: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    return http_json("POST", f"{system.api_url}/v1/billing-events", raw=raw, headers=headers)


def test_signed_billing_events_make_one_job_each(billing_api: System) -> None:
    event = _event()
    raw = json.dumps(event).encode()
    status, result = _post_event(billing_api, raw, signed(raw))
    assert status == 202, result
    assert result["result"] == "enqueued" and result["rule"] == "payway-final-failure"
    status, again = _post_event(billing_api, raw, signed(raw))
    assert status == 202 and again["job_id"] == result["job_id"]
    status, job = billing_api.get(f"/v1/cancellations/{result['job_id']}")
    assert job["idempotency_key"] == f"billing:{event['id']}"

    ignored = json.dumps(
        {**event, "id": f"evt_{secrets.token_hex(8)}", "type": "invoice.paid"}
    ).encode()
    status, result = _post_event(billing_api, ignored, signed(ignored))
    assert status == 200 and result["result"] == "ignored"

    invalid = json.dumps(_event(account_id="nope")).encode()
    status, problem = _post_event(billing_api, invalid, signed(invalid))
    assert status == 422
    assert [e["field"] for e in problem["errors"]] == ["subscription.account_id"]
    status, dl = billing_api.get(f"/v1/dead-letters/{problem['dead_letter_id']}")
    assert status == 200 and dl["kind"] == "billing_event"

    status, problem = _post_event(billing_api, b"{nope", signed(b"{nope"))
    assert status == 400


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Cancelflow-Signature": "garbage"},
        {"Cancelflow-Signature": "t=1,v1=00"},
        "wrong-secret",
        "stale",
    ],
)
def test_billing_events_with_a_bad_signature_get_401(billing_api: System, headers: Any) -> None:
    raw = json.dumps(_event()).encode()
    if headers == "wrong-secret":
        headers = signed(raw, secret="not-ours")
    elif headers == "stale":
        headers = signed(raw, at=int(time.time()) - 3600)
    status, problem = _post_event(billing_api, raw, headers)
    assert status == 401, problem
    assert problem["title"] == "Bad signature"


def test_billing_events_are_refused_when_not_configured(system: System) -> None:
    raw = json.dumps(_event()).encode()
    status, problem = _post_event(system, raw, signed(raw))
    assert status == 503, problem
