"""Azotte, AppDirect and Axel Springer end to end: API -> real Celery worker on real Redis ->
each provider's sandbox over HTTP. (Azotte's offer and decision flow is tested elsewhere.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from sandboxes import appdirect, axelspringer, azotte
from tests.support import System

pytestmark = pytest.mark.integration

KEYS = ("azotte", "appdirect", "axelspringer")
CANCELLED_STEPS = [
    ("enqueue", "queued"),
    ("eligibility", "started"),
    ("eligibility", "eligible"),
    ("confirm", "started"),
    ("confirm", "finished"),
]
FINAL_AT_CHECK_STEPS = [
    ("enqueue", "queued"),
    ("eligibility", "started"),
    ("eligibility", "finished"),
]


@pytest.fixture(autouse=True)
def fresh_sandboxes(system: System) -> Iterator[None]:
    for key in KEYS:
        system.sandbox.reset(key)
        system.sandbox.faults(key)
    yield
    for key in KEYS:
        system.sandbox.faults(key)


def run(system: System, provider: str, subscription: dict[str, Any], **extra: Any) -> Any:
    job = system.enqueue({"provider": provider, "subscription": subscription, **extra})
    return system.wait(job["id"], timeout_s=60)


def steps_of(job: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["step"], e["event"]) for e in job["timeline"]]


# --- Azotte ---------------------------------------------------------------------------------


def test_azotte_processed_order_is_cancelled_with_the_reason_as_survey(system: System) -> None:
    job = run(
        system,
        "azotte",
        {"order_identifier": azotte.DEMO.processed, "cancelation_method": "EndOfPeriod"},
        reason={"code": "PRICE", "comment": "Too dear"},
    )
    assert job["status"] == "finished"
    assert job["outcome"]["type"] == "cancelled"
    assert steps_of(job) == CANCELLED_STEPS
    eligible = job["timeline"][2]
    assert {r["code"] for r in eligible["response"]["cancellationReasons"]} >= {"PRICE"}
    state = system.sandbox.state("azotte")
    assert state["effective_cancels"] == {azotte.DEMO.processed: 1}
    cancellation = state["cancellations"][azotte.DEMO.processed]
    assert cancellation["method"] == "EndOfPeriod"
    assert json.loads(cancellation["survey"]) == {"reasonCode": "PRICE", "comment": "Too dear"}
    assert azotte.DEMO_API_KEY not in json.dumps(job)


@pytest.mark.parametrize(
    ("kind", "by"),
    [("app_store", "app_store"), ("play_store", "play_store"), ("third_party", "payment_provider")],
)
def test_azotte_store_billed_order_ends_pending_the_provider(
    system: System, kind: str, by: str
) -> None:
    job = run(system, "azotte", {"order_identifier": getattr(azotte.DEMO, kind)})
    assert job["outcome"]["type"] == "pending_provider_confirmation"
    assert job["outcome"]["details"] == {"billing_channel": kind, "pending_confirmation_by": by}
    assert system.sandbox.state("azotte")["pending_confirmation"] == {
        getattr(azotte.DEMO, kind): by
    }


def test_azotte_already_cancelled_order(system: System) -> None:
    job = run(system, "azotte", {"order_identifier": azotte.DEMO.already_cancelled})
    assert job["outcome"]["type"] == "already_cancelled"
    assert steps_of(job) == FINAL_AT_CHECK_STEPS
    assert system.sandbox.state("azotte")["calls"].get("cancel_confirm", 0) == 0


def test_azotte_unknown_order_is_not_found_without_retry(system: System) -> None:
    job = run(system, "azotte", {"order_identifier": azotte.DEMO.not_found})
    assert job["outcome"]["type"] == "not_found"
    assert not any(e["event"] == "retry_scheduled" for e in job["timeline"])


def test_azotte_5xx_then_success_is_retried(system: System) -> None:
    system.sandbox.faults("azotte", fail_once_rate=1.0)
    job = run(system, "azotte", {"order_identifier": azotte.DEMO.processed})
    assert job["outcome"]["type"] == "cancelled"
    retries = [e for e in job["timeline"] if e["event"] == "retry_scheduled"]
    assert {r["step"] for r in retries} == {"eligibility", "confirm"}
    assert all(r["error"]["type"] == "ProviderUnavailable" for r in retries)
    assert system.sandbox.state("azotte")["effective_cancels"] == {azotte.DEMO.processed: 1}


# --- AppDirect ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["active", "free_trial"])
def test_appdirect_live_subscription_is_deleted(system: System, kind: str) -> None:
    subscription_id = getattr(appdirect.DEMO, kind)
    job = run(system, "appdirect", {"subscription_id": subscription_id})
    assert job["outcome"]["type"] == "cancelled"
    assert steps_of(job) == CANCELLED_STEPS
    assert system.sandbox.state("appdirect")["effective_cancels"] == {subscription_id: 1}


def test_appdirect_cancelled_subscription_is_already_cancelled(system: System) -> None:
    job = run(system, "appdirect", {"subscription_id": appdirect.DEMO.cancelled})
    assert job["outcome"]["type"] == "already_cancelled"
    assert system.sandbox.state("appdirect")["calls"].get("delete_subscription", 0) == 0


def test_appdirect_unknown_subscription_is_not_found(system: System) -> None:
    job = run(system, "appdirect", {"subscription_id": appdirect.DEMO.not_found})
    assert job["outcome"]["type"] == "not_found"
    # The provider's XML error, parsed, is on the timeline.
    assert job["timeline"][-1]["response"]["code"] == "NOT_FOUND"


def test_appdirect_5xx_then_success_is_retried_with_a_fresh_signature(system: System) -> None:
    system.sandbox.faults("appdirect", fail_once_rate=1.0)
    job = run(system, "appdirect", {"subscription_id": appdirect.DEMO.active})
    assert job["outcome"]["type"] == "cancelled"
    assert any(e["event"] == "retry_scheduled" for e in job["timeline"])
    assert system.sandbox.state("appdirect")["effective_cancels"] == {appdirect.DEMO.active: 1}


def test_appdirect_rejects_a_malformed_subscription_id_at_the_api(system: System) -> None:
    status, problem = system.post(
        "/v1/cancellations", {"provider": "appdirect", "subscription": {"subscription_id": "a/b"}}
    )
    assert status == 422
    assert problem["errors"][0]["field"] == "subscription.subscription_id"


# --- Axel Springer --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "details"),
    [
        ("created", {"link_invalidated": True}),
        ("redeemed", {"subscription_cancelled": True, "link_revoked": True}),
    ],
)
def test_axelspringer_purchase_is_cancelled_by_link_status(
    system: System, kind: str, details: dict[str, bool]
) -> None:
    ref = getattr(axelspringer.DEMO, kind)
    job = run(system, "axelspringer", {"purchase_ref": ref})
    assert job["outcome"]["type"] == "cancelled"
    assert job["outcome"]["details"] == details
    assert steps_of(job) == CANCELLED_STEPS
    # The link status the check saw is on the timeline.
    assert job["timeline"][2]["response"]["status"] == kind.capitalize()
    state = system.sandbox.state("axelspringer")
    assert state["effective_cancels"] == {ref: 1}
    assert axelspringer.DEMO_CLIENT_SECRET not in json.dumps(job)


def test_axelspringer_canceled_purchase_is_already_cancelled_without_a_cancel_call(
    system: System,
) -> None:
    job = run(system, "axelspringer", {"purchase_ref": axelspringer.DEMO.canceled})
    assert job["outcome"]["type"] == "already_cancelled"
    assert system.sandbox.state("axelspringer")["calls"].get("cancel_purchase", 0) == 0


def test_axelspringer_unknown_purchase_is_not_found(system: System) -> None:
    job = run(system, "axelspringer", {"purchase_ref": axelspringer.DEMO.unknown})
    assert job["outcome"]["type"] == "not_found"


def test_axelspringer_expired_token_is_fetched_anew(system: System) -> None:
    first = run(system, "axelspringer", {"purchase_ref": axelspringer.DEMO.created})
    assert first["outcome"]["type"] == "cancelled"
    before = system.sandbox.state("axelspringer")["calls"].get("token", 0)
    system.sandbox.expire_tokens("axelspringer")
    second = run(system, "axelspringer", {"purchase_ref": axelspringer.DEMO.redeemed})
    assert second["outcome"]["type"] == "cancelled"
    # The cached token was refused (401) and a new one fetched (more if worker threads raced).
    assert system.sandbox.state("axelspringer")["calls"]["token"] > before
    assert not any(e["event"] == "retry_scheduled" for e in second["timeline"])
