"""Stripe subscription events as Stripe sends them (API version 2024-06-20), for the billing
tests: the fields a rule reads and the ones around them."""

from __future__ import annotations

import secrets
import time
from typing import Any


def subscription(metadata: dict[str, str], **changed: Any) -> dict[str, Any]:
    """A Stripe subscription object."""
    now = int(time.time())
    return {
        "id": f"sub_{secrets.token_hex(12)}",
        "object": "subscription",
        "application": None,
        "billing_cycle_anchor": now - 86400,
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "cancellation_details": {"comment": None, "feedback": None, "reason": None},
        "collection_method": "charge_automatically",
        "created": now - 86400 * 40,
        "currency": "eur",
        "current_period_end": now + 86400 * 20,
        "current_period_start": now - 86400 * 10,
        "customer": f"cus_{secrets.token_hex(7)}",
        "ended_at": None,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": f"si_{secrets.token_hex(7)}",
                    "object": "subscription_item",
                    "price": {"id": "price_1PmonthlyNews", "object": "price", "unit_amount": 990},
                    "quantity": 1,
                }
            ],
            "has_more": False,
            "url": "/v1/subscription_items",
        },
        "livemode": False,
        "metadata": metadata,
        "status": "active",
        **changed,
    }


def event(kind: str, obj: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Stripe event of ``kind`` about ``obj``."""
    data: dict[str, Any] = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return {
        "id": f"evt_{secrets.token_hex(12)}",
        "object": "event",
        "api_version": "2024-06-20",
        "created": int(time.time()),
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": kind,
    }


def deleted(metadata: dict[str, str]) -> dict[str, Any]:
    """``customer.subscription.deleted``: the subscription ended just now."""
    now = int(time.time())
    return event(
        "customer.subscription.deleted",
        subscription(
            metadata,
            status="canceled",
            canceled_at=now,
            ended_at=now,
            cancellation_details={
                "comment": None,
                "feedback": "too_expensive",
                "reason": "cancellation_requested",
            },
        ),
    )


def cancel_at_period_end(metadata: dict[str, str]) -> dict[str, Any]:
    """``customer.subscription.updated``: the customer asked to stop at the period's end."""
    now = int(time.time())
    sub = subscription(metadata, cancel_at_period_end=True, canceled_at=now)
    sub["cancel_at"] = sub["current_period_end"]
    return event(
        "customer.subscription.updated",
        sub,
        previous={"cancel_at": None, "cancel_at_period_end": False, "canceled_at": None},
    )
