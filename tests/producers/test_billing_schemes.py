"""The signature schemes of ``POST /v1/billing-events``, checked against vectors made by each
scheme's own library (``stripe``, ``standardwebhooks``); which schemes a deployment accepts;
and the example Stripe rules turning Stripe's own events into the right requests."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import stripe
from multidict import CIMultiDict
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook

from cancelflow.contract import CancellationRequest
from cancelflow.settings import BillingSettings, Settings
from producers.billing_auth import BadSignature, BillingVerifier
from producers.billing_rules import load_rules
from producers.secret_cmd import new_callback_secret
from producers.signatures import expected_signature
from producers.submit import validate_request
from tests.producers import stripe_events
from tests.producers.conftest import providers

EXAMPLES = Path(__file__).parents[2] / "examples"
STRIPE_SECRET = "whsec_" + "Zk3q9TtV2mB8xWcR4yLp6nHs1dJf0aGu"  # Stripe's form: whsec_ + 32
STRIPE_ROLLED = "whsec_" + "Q7wE2rT9yU4iO1pA6sD3fG8hJ5kL0zXc"  # the endpoint's next secret
SW_SECRET = new_callback_secret()
SW_OTHER = new_callback_secret()
CF_SECRET = "cancelflow-billing-secret"

BODY = json.dumps(stripe_events.deleted({"cancelflow_provider": "payway"})).encode()


def _verifier(**conf: Any) -> BillingVerifier:
    return BillingVerifier.from_settings(BillingSettings(**conf))


def _stripe_header(body: bytes, secret: str = STRIPE_SECRET, *, at: int | None = None) -> str:
    """``Stripe-Signature`` as Stripe's library makes it."""
    header: str = stripe.WebhookSignature.generate_signature_header(
        body.decode(), secret, timestamp=at
    )
    return header


def _headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict(values)


def _stripe(header: str) -> CIMultiDict[str]:
    return CIMultiDict({"Stripe-Signature": header})


def _reason(verifier: BillingVerifier, headers: CIMultiDict[str], body: bytes = BODY) -> str:
    with pytest.raises(BadSignature) as caught:
        verifier.verify(headers, body)
    return caught.value.reason


# --- Stripe ------------------------------------------------------------------------------------


def test_a_stripe_signature_made_by_stripes_library_verifies() -> None:
    verifier = _verifier(stripe_secret=STRIPE_SECRET)
    header = _stripe_header(BODY)
    assert verifier.verify(_stripe(header), BODY) == "stripe"
    # And Stripe's own verifier agrees with what we sign (the same construction).
    t = int(time.time())
    ours = f"t={t},v1={expected_signature(BODY, t, STRIPE_SECRET)}"
    event = stripe.Webhook.construct_event(BODY, ours, STRIPE_SECRET)
    assert event.type == "customer.subscription.deleted"


def test_stripe_signatures_that_do_not_hold_are_refused_and_named() -> None:
    verifier = _verifier(stripe_secret=STRIPE_SECRET)
    assert _reason(verifier, _stripe(_stripe_header(BODY, "whsec_someone_else"))) == "mismatch"
    assert _reason(verifier, _stripe(_stripe_header(BODY)), BODY + b" ") == "mismatch"
    assert _reason(verifier, _stripe("v1=abc")) == "malformed"
    assert _reason(verifier, _stripe("t=now,v1=abc")) == "malformed"
    assert _reason(verifier, _stripe("")) == "missing"
    assert _reason(verifier, _headers()) == "missing"


def test_stripes_tolerance_is_five_minutes_by_default() -> None:
    verifier = _verifier(stripe_secret=STRIPE_SECRET)
    now = int(time.time())
    fresh = _stripe_header(BODY, at=now - 290)
    assert verifier.verify(_stripe(fresh), BODY) == "stripe"
    stale = _stripe_header(BODY, at=now - 310)
    assert _reason(verifier, _stripe(stale)) == "stale"
    # Stripe's library judges both the same at its default tolerance (construct_event's).
    assert stripe.Webhook.DEFAULT_TOLERANCE == 300
    stripe.Webhook.construct_event(BODY, fresh, STRIPE_SECRET)
    with pytest.raises(stripe.SignatureVerificationError, match="tolerance"):
        stripe.Webhook.construct_event(BODY, stale, STRIPE_SECRET)


def test_several_v1_while_stripe_rolls_the_secret() -> None:
    """While an endpoint's secret is rolled, Stripe signs with the old and the new secret: one
    ``v1`` each (and a ``v0`` in test mode, ignored)."""
    t = int(time.time())
    old, new = (_stripe_header(BODY, s, at=t) for s in (STRIPE_SECRET, STRIPE_ROLLED))
    test_mode = "v0=" + "6f" * 32
    both = f"{old},{new.split(',')[1]},{test_mode}"
    assert _verifier(stripe_secret=STRIPE_SECRET).verify(_stripe(both), BODY) == "stripe"
    assert _verifier(stripe_secret=STRIPE_ROLLED).verify(_stripe(both), BODY) == "stripe"
    # We roll ours too: the new secret, and the old one as previous.
    rolled = _verifier(stripe_secret=STRIPE_ROLLED, stripe_secret_previous=STRIPE_SECRET)
    assert rolled.verify(_stripe(old), BODY) == "stripe"


# --- Standard Webhooks -------------------------------------------------------------------------


def _standard(
    body: bytes = BODY, secret: str = SW_SECRET, *, at: float | None = None
) -> CIMultiDict[str]:
    """The three headers, signed by the standardwebhooks library."""
    when = datetime.fromtimestamp(time.time() if at is None else at, tz=UTC)
    msg_id = "msg_2b8c0f"
    signature = Webhook(secret).sign(msg_id, when, body.decode())
    return _headers(
        **{
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": signature,
        }
    )


def test_a_standard_webhooks_signature_made_by_its_library_verifies() -> None:
    verifier = _verifier(standard_webhooks_secret=SW_SECRET)
    assert verifier.verify(_standard(), BODY) == "standard-webhooks"
    # Rotation: the sender signs with both (space-separated); we hold the new and the old one.
    two = _standard(secret=SW_OTHER)
    two["webhook-signature"] += " " + _standard()["webhook-signature"]
    assert verifier.verify(two, BODY) == "standard-webhooks"
    rotated = _verifier(
        standard_webhooks_secret=SW_OTHER, standard_webhooks_secret_previous=SW_SECRET
    )
    assert rotated.verify(_standard(), BODY) == "standard-webhooks"


def test_standard_webhooks_signatures_that_do_not_hold_are_refused_and_named() -> None:
    verifier = _verifier(standard_webhooks_secret=SW_SECRET)
    assert _reason(verifier, _standard(secret=SW_OTHER)) == "mismatch"
    assert _reason(verifier, _standard(), BODY + b" ") == "mismatch"
    assert _reason(verifier, _standard(at=time.time() - 400)) == "stale"
    assert _reason(verifier, _standard(at=time.time() + 400)) == "stale"
    no_id = _standard()
    del no_id["webhook-id"]
    assert _reason(verifier, no_id) == "missing"
    for bad in ("v1", "v1,not base64!", "v2,AAAA", ""):
        headers = _standard()
        headers["webhook-signature"] = bad
        assert _reason(verifier, headers) in ("malformed", "missing"), bad
    headers = _standard()
    headers["webhook-timestamp"] = "1e9"
    assert _reason(verifier, headers) == "malformed"


def test_a_standard_webhooks_secret_must_be_whsec_base64() -> None:
    with pytest.raises(ValidationError, match="standard_webhooks_secret"):
        BillingSettings(standard_webhooks_secret="whsec_not-base64-at-all")


# --- which schemes are accepted ----------------------------------------------------------------


def test_only_the_schemes_with_a_secret_are_accepted_by_default() -> None:
    assert BillingSettings().accepted_schemes() == []
    only_stripe = _verifier(stripe_secret=STRIPE_SECRET)
    assert only_stripe.schemes == ["stripe"]
    t = int(time.time())
    ours = _headers(
        **{"Cancelflow-Signature": f"t={t},v1={expected_signature(BODY, t, CF_SECRET)}"}
    )
    assert _reason(only_stripe, ours) == "not-accepted"
    assert _reason(only_stripe, _standard()) == "not-accepted"
    every = _verifier(
        secret=CF_SECRET, stripe_secret=STRIPE_SECRET, standard_webhooks_secret=SW_SECRET
    )
    assert every.schemes == ["cancelflow", "standard-webhooks", "stripe"]
    assert every.verify(ours, BODY) == "cancelflow"
    assert every.verify(_standard(), BODY) == "standard-webhooks"
    assert every.verify(_stripe(_stripe_header(BODY)), BODY) == "stripe"


def test_the_setting_narrows_the_schemes_and_refuses_one_without_its_secret() -> None:
    narrowed = _verifier(secret=CF_SECRET, stripe_secret=STRIPE_SECRET, signature_schemes="stripe")
    assert narrowed.schemes == ["stripe"]
    with pytest.raises(ValidationError, match="CANCELFLOW_BILLING__STANDARD_WEBHOOKS_SECRET"):
        BillingSettings(secret=CF_SECRET, signature_schemes=["standard-webhooks"])
    with pytest.raises(ValidationError):
        BillingSettings(signature_schemes=["stripe-v2"])


def test_a_bad_signature_never_shows_a_secret() -> None:
    verifier = _verifier(stripe_secret=STRIPE_SECRET, standard_webhooks_secret=SW_SECRET)
    for headers in (_stripe(_stripe_header(BODY, "whsec_x")), _standard(secret=SW_OTHER)):
        with pytest.raises(BadSignature) as caught:
            verifier.verify(headers, BODY)
        for secret in (STRIPE_SECRET, SW_SECRET, SW_SECRET.removeprefix("whsec_")):
            assert secret not in str(caught.value)


# --- the example Stripe rules ------------------------------------------------------------------

PAYWAY_META = {
    "cancelflow_provider": "payway",
    "payway_account_id": "5f1e0c2a9b3d4e5f6a7b8c9d",
    "payway_user_product_id": "6a7b8c9d0e1f2a3b4c5d6e7f",
}


def _job_body(event: dict[str, Any]) -> dict[str, Any]:
    """What the example rules make of ``event``, after Stripe's library read it as an event."""
    raw = json.dumps(event).encode()
    parsed = stripe.Webhook.construct_event(raw, _stripe_header(raw), STRIPE_SECRET)
    assert parsed.id == event["id"] and parsed.type == event["type"]
    rules = load_rules(
        EXAMPLES / "billing-rules-stripe.yaml", configured=["payway", "azotte", "appdirect"]
    )
    rule = rules.match(event)
    assert rule is not None, event["type"]
    body = rule.request_body(event)
    checked = validate_request(body, Settings(providers=providers()))
    assert isinstance(checked, CancellationRequest), checked
    return {"rule": rule.name, **body}


def test_stripes_deleted_subscription_cancels_its_provider_subscription() -> None:
    event = stripe_events.deleted(PAYWAY_META)
    body = _job_body(event)
    sub = event["data"]["object"]
    assert body == {
        "rule": "stripe-deleted-payway",
        "provider": "payway",
        "subscription": {
            "account_id": PAYWAY_META["payway_account_id"],
            "user_product_id": PAYWAY_META["payway_user_product_id"],
            "cancellation_reason_id": "5cb80481c00000000000000a",
        },
        "reason": {"code": "stripe_subscription_deleted", "comment": f"Stripe {sub['id']} deleted"},
        "metadata": {"stripe_subscription": sub["id"], "stripe_customer": sub["customer"]},
    }


def test_cancel_at_period_end_cancels_at_the_period_end_where_the_provider_lets_us() -> None:
    meta = {"cancelflow_provider": "azotte", "azotte_order_id": "ORD-2024-7731"}
    body = _job_body(stripe_events.cancel_at_period_end(meta))
    assert body["rule"] == "stripe-cancel-at-period-end-azotte"
    assert body["subscription"] == {
        "order_identifier": "ORD-2024-7731",
        "cancelation_method": "EndOfPeriod",
    }
    deleted = _job_body(stripe_events.deleted(meta))
    assert deleted["subscription"]["cancelation_method"] == "Immediate"


def test_other_stripe_events_and_updates_are_ignored() -> None:
    rules = load_rules(EXAMPLES / "billing-rules-stripe.yaml")
    # Another update of a subscription already set to end (cancel_at_period_end was true before).
    again = stripe_events.cancel_at_period_end(PAYWAY_META)
    again["data"]["previous_attributes"] = {"quantity": 2}
    assert rules.match(again) is None
    # Turned back on (the customer changed their mind): no cancellation.
    resumed = stripe_events.event(
        "customer.subscription.updated",
        stripe_events.subscription(PAYWAY_META),
        previous={"cancel_at_period_end": True},
    )
    assert rules.match(resumed) is None
    assert rules.match(stripe_events.event("invoice.paid", {"id": "in_1"})) is None
    # A Stripe subscription that names no provider of ours.
    assert rules.match(stripe_events.deleted({})) is None
