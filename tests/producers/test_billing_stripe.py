"""Billing events straight from Stripe and from a Standard Webhooks sender, over HTTP against a
running API with the example Stripe rules: signed by each scheme's own library, refused with a
problem naming the scheme and the reason, and checked before any rate limit."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import stripe
from standardwebhooks.webhooks import Webhook

from producers.problems import Problem
from producers.secret_cmd import new_callback_secret
from tests.fixtures.system import StartSystem
from tests.producers import stripe_events
from tests.producers.test_auth_and_namespaces import call
from tests.support import System

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).parents[2] / "examples"
STRIPE_SECRET = "whsec_" + "Vb7Nq2Wx5Lm8Rt1Yc4Kp9Hg3Df6Sa0Ze"
SW_SECRET = new_callback_secret()
PAYWAY_META = {
    "cancelflow_provider": "payway",
    "payway_account_id": "5f1e0c2a9b3d4e5f6a7b8c9d",
    "payway_user_product_id": "6a7b8c9d0e1f2a3b4c5d6e7f",
}


@pytest.fixture(scope="module")
def stripe_api(start_system: StartSystem) -> System:
    """Stripe's and Standard Webhooks' secrets set, ours not: those two schemes are accepted."""
    return start_system(
        workers=0,
        isolated=True,
        CANCELFLOW_BILLING__RULES_PATH=str(EXAMPLES / "billing-rules-stripe.yaml"),
        CANCELFLOW_BILLING__STRIPE_SECRET=STRIPE_SECRET,
        CANCELFLOW_BILLING__STANDARD_WEBHOOKS_SECRET=SW_SECRET,
    )


def _stripe_signed(raw: bytes, *, secret: str = STRIPE_SECRET, at: int | None = None) -> Any:
    header = stripe.WebhookSignature.generate_signature_header(raw.decode(), secret, timestamp=at)
    return {"Stripe-Signature": header}


def _post(system: System, raw: bytes, headers: dict[str, str], **kw: Any) -> tuple[int, Any]:
    return call(system, "POST", "/v1/billing-events", raw=raw, headers=headers, **kw)


def test_a_stripe_event_makes_its_job(stripe_api: System) -> None:
    event = stripe_events.deleted(PAYWAY_META)
    raw = json.dumps(event).encode()
    status, result = _post(stripe_api, raw, _stripe_signed(raw))
    assert status == 202, result
    assert result["result"] == "enqueued" and result["rule"] == "stripe-deleted-payway"
    # Stripe retries an event until it gets a 2xx: the retry finds the same job.
    status, again = _post(stripe_api, raw, _stripe_signed(raw))
    assert status == 202 and again["job_id"] == result["job_id"], again
    status, job = stripe_api.get(f"/v1/cancellations/{result['job_id']}")
    assert status == 200
    assert job["idempotency_key"] == f"billing:{event['id']}"
    assert job["provider"] == "payway"
    assert job["subscription"] == {
        "account_id": PAYWAY_META["payway_account_id"],
        "user_product_id": PAYWAY_META["payway_user_product_id"],
        "cancellation_reason_id": "5cb80481c00000000000000a",
    }
    assert job["metadata"]["stripe_subscription"] == event["data"]["object"]["id"]
    assert job["metadata"]["billing_event"]["type"] == "customer.subscription.deleted"


def test_a_standard_webhooks_event_makes_its_job(stripe_api: System) -> None:
    event = stripe_events.cancel_at_period_end(
        {"cancelflow_provider": "azotte", "azotte_order_id": "ORD-88-104"}
    )
    raw = json.dumps(event).encode()
    now = datetime.now(UTC)
    headers = {
        "webhook-id": "msg_" + event["id"],
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(SW_SECRET).sign("msg_" + event["id"], now, raw.decode()),
    }
    status, result = _post(stripe_api, raw, headers)
    assert status == 202, result
    assert result["rule"] == "stripe-cancel-at-period-end-azotte"
    status, job = stripe_api.get(f"/v1/cancellations/{result['job_id']}")
    assert job["subscription"] == {
        "order_identifier": "ORD-88-104",
        "cancelation_method": "EndOfPeriod",
    }


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no signature", "missing"),
        ("wrong secret", "mismatch"),
        ("stale", "stale"),
        ("malformed", "malformed"),
        ("our scheme, not configured here", "not-accepted"),
    ],
)
def test_bad_stripe_signatures_get_401_naming_why(
    stripe_api: System, case: str, reason: str
) -> None:
    raw = json.dumps(stripe_events.deleted(PAYWAY_META)).encode()
    headers = {
        "no signature": {},
        "wrong secret": _stripe_signed(raw, secret="whsec_not_the_endpoints"),
        "stale": _stripe_signed(raw, at=int(datetime.now(UTC).timestamp()) - 360),
        "malformed": {"Stripe-Signature": "v1=deadbeef"},
        "our scheme, not configured here": {"Cancelflow-Signature": "t=1,v1=00"},
    }[case]
    status, problem = _post(stripe_api, raw, headers)
    assert status == 401, problem
    assert problem["type"] == Problem.BAD_SIGNATURE.uri
    assert problem["reason"] == reason, problem
    if reason not in ("missing",):
        assert problem["scheme"] == ("cancelflow" if "our" in case else "stripe")
    assert STRIPE_SECRET not in json.dumps(problem)


def test_a_stripe_event_gets_through_an_unsigned_flood(stripe_api: System) -> None:
    """The signature is checked before any rate limit: a flood of unsigned events from
    Stripe's address spends that address's failures (then 429), never a signed event's way."""
    source = "127.0.0.6"
    flood = [_post(stripe_api, b'{"id": "x"}', {}, source=source)[0] for _ in range(120)]
    assert set(flood) <= {401, 429} and 429 in flood, flood
    raw = json.dumps(stripe_events.deleted(PAYWAY_META)).encode()
    status, result = _post(stripe_api, raw, _stripe_signed(raw), source=source)
    assert status == 202, result
