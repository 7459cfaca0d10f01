"""Payway end to end: API -> real Celery worker on real Redis -> Payway sandbox over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sandboxes.payway import DEMO
from tests.support import System, payway_body

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def fresh_payway(system: System) -> Iterator[None]:
    system.sandbox.reset("payway")
    system.sandbox.faults("payway")
    yield
    system.sandbox.faults("payway")


CANCELLED = [
    ("end_of_period", "at_end_of_period"),
    ("autogiro", "at_end_of_period"),
    ("immediate", "immediate"),
    ("end_of_period_with_credit", "at_end_of_period"),
]
NOT_ELIGIBLE = [
    "account_not_found",
    "account_does_not_belong_to_organisation",
    "no_customer_number",
    "user_product_not_found",
    "user_product_does_not_belong_to_organisation",
    "no_subscription_number",
    "no_external_service",
    "not_web_originated",
]


@pytest.mark.parametrize(("kind", "cancellation_type"), CANCELLED)
def test_cancelled_with_the_type_the_invoice_rules_give(
    system: System, kind: str, cancellation_type: str
) -> None:
    job = system.wait(system.enqueue(payway_body(getattr(DEMO, kind)))["id"])
    assert job["status"] == "finished"
    assert job["outcome"]["type"] == "cancelled"
    assert job["outcome"]["cancellation_type"] == cancellation_type
    assert job["outcome"]["subscription_end_date"]
    steps = [(e["step"], e["event"]) for e in job["timeline"]]
    assert steps == [
        ("enqueue", "queued"),
        ("eligibility", "started"),
        ("eligibility", "eligible"),
        ("confirm", "started"),
        ("confirm", "finished"),
    ]
    effective = system.sandbox.state("payway")["effective_cancels"]
    assert effective == {getattr(DEMO, kind).user_product_id: 1}


@pytest.mark.parametrize("reason", NOT_ELIGIBLE)
def test_every_reason_ends_not_eligible_without_retry(system: System, reason: str) -> None:
    job = system.wait(system.enqueue(payway_body(getattr(DEMO, reason)))["id"])
    assert job["outcome"]["type"] == "not_eligible"
    assert job["outcome"]["reason"] == reason
    assert not any(e["event"] == "retry_scheduled" for e in job["timeline"])
    assert system.sandbox.state("payway")["effective_cancels"] == {}


def test_already_cancelled_subscription(system: System) -> None:
    job = system.wait(system.enqueue(payway_body(DEMO.already_cancelled))["id"])
    assert job["outcome"]["type"] == "already_cancelled"


def test_expired_token_is_fetched_anew(system: System) -> None:
    first = system.wait(system.enqueue(payway_body(DEMO.end_of_period))["id"])
    assert first["outcome"]["type"] == "cancelled"
    tokens_before = system.sandbox.state("payway")["calls"].get("access_token", 0)
    system.sandbox.expire_tokens("payway")
    second = system.wait(system.enqueue(payway_body(DEMO.immediate))["id"])
    assert second["outcome"]["type"] == "cancelled"
    state = system.sandbox.state("payway")
    # The worker's cached token was refused (401) and exactly one new token was fetched
    # (more if several worker threads raced; never zero).
    assert state["calls"]["access_token"] > tokens_before


def test_5xx_then_success_is_retried(system: System) -> None:
    system.sandbox.faults("payway", fail_once_rate=1.0)
    job = system.wait(system.enqueue(payway_body(DEMO.autogiro))["id"], timeout_s=60)
    assert job["outcome"]["type"] == "cancelled"
    retries = [e for e in job["timeline"] if e["event"] == "retry_scheduled"]
    assert retries, job["timeline"]
    assert all(r["error"]["type"] == "ProviderUnavailable" for r in retries)
    assert system.sandbox.state("payway")["effective_cancels"] == {DEMO.autogiro.user_product_id: 1}


def test_bad_input_is_rejected_with_each_field_named(system: System) -> None:
    status, problem = system.post(
        "/v1/cancellations",
        {
            "provider": "payway",
            "subscription": {
                "account_id": "xyz",
                "user_product_id": DEMO.immediate.user_product_id,
            },
            "reason": {"code": ""},
            "surprise": 1,
        },
    )
    assert status == 422
    fields = {e["field"] for e in problem["errors"]}
    assert {"reason.code", "surprise"} <= fields
    status, problem = system.post(
        "/v1/cancellations",
        {
            "provider": "payway",
            "subscription": {
                "account_id": "xyz",
                "user_product_id": DEMO.immediate.user_product_id,
            },
        },
    )
    assert status == 422
    assert {e["field"] for e in problem["errors"]} == {
        "subscription.account_id",
        "subscription.cancellation_reason_id",
    }
    status, problem = system.post("/v1/cancellations", raw=b"{not json")
    assert status == 400
    status, problem = system.post("/v1/cancellations", {"provider": "nope", "subscription": {}})
    assert status == 422 and problem["errors"][0]["field"] == "provider"


def test_idempotency_key_returns_the_same_job_or_422(system: System) -> None:
    request = payway_body(DEMO.end_of_period, idempotency_key="order-42-cancel")
    first = system.enqueue(request)
    again = system.enqueue(request)
    assert again["id"] == first["id"]
    status, problem = system.post("/v1/cancellations", {**request, "metadata": {"changed": True}})
    # The status the IETF idempotency-key draft names for a key reused with another body.
    assert status == 422 and problem["type"].endswith("/idempotency-key-reused")
    assert problem["job_id"] == first["id"]
    system.wait(first["id"])
    assert system.sandbox.state("payway")["effective_cancels"] == {
        DEMO.end_of_period.user_product_id: 1
    }


def test_a_second_request_for_a_subscription_in_flight_joins_it(system: System) -> None:
    system.sandbox.faults("payway", latency_ms=300)
    first = system.enqueue(payway_body(DEMO.immediate))
    second = system.enqueue(payway_body(DEMO.immediate, metadata={"from": "billing"}))
    assert second["id"] == first["id"]
    system.wait(first["id"])


def test_routes_need_a_token_but_health_does_not(system: System) -> None:
    from producers.local import http_json

    assert http_json("GET", f"{system.api_url}/healthz")[0] == 200
    assert http_json("GET", f"{system.api_url}/v1/cancellations/job_{'0' * 32}")[0] == 401
    assert (
        http_json("GET", f"{system.api_url}/v1/cancellations/job_{'0' * 32}", token="wrong")[0]
        == 401
    )
    assert (
        http_json("GET", f"{system.api_url}/v1/cancellations/job_{'0' * 32}", token=system.token)[0]
        == 404
    )
    status, _ = http_json(
        "POST",
        f"{system.api_url}/v1/cancellations",
        payway_body(DEMO.immediate),
        token="read-token",
    )
    assert status == 403


def test_stats_count_how_jobs_ended(system: System) -> None:
    def cancelled() -> int:
        status, found = system.get("/v1/stats?since_s=3600")
        assert status == 200, found
        return int(found["outcomes"].get("payway", {}).get("cancelled", 0))

    before = cancelled()
    job = system.wait(system.enqueue(payway_body(DEMO.immediate))["id"])
    assert job["outcome"]["type"] == "cancelled", job
    assert cancelled() == before + 1
