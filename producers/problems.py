"""RFC 9457 problem details: every API error is ``application/problem+json``, with a ``type``
of its own from ``Problem`` (each documented in docs/problems.md)."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from aiohttp import web
from pydantic import ValidationError

PROBLEM_TYPE = "application/problem+json"
# Absolute, so a client can compare it as it is and a person can open it (RFC 9457 §3.1.1).
TYPE_BASE = "https://cancelflow.dev/problems/"


class Problem(StrEnum):
    """Every kind of error the API answers; the value is the last segment of its type URI."""

    VALIDATION_ERROR = "validation-error"
    MALFORMED_JSON = "malformed-json"
    MALFORMED_REQUEST = "malformed-request"
    BAD_HEADER = "bad-header"
    CLIENT_DISCONNECTED = "client-disconnected"
    UNAUTHORIZED = "unauthorized"
    BAD_SIGNATURE = "bad-signature"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not-found"
    METHOD_NOT_ALLOWED = "method-not-allowed"
    HTTP_ERROR = "http-error"
    IDEMPOTENCY_KEY_REUSED = "idempotency-key-reused"
    IDEMPOTENCY_KEY_MISMATCH = "idempotency-key-mismatch"
    JOB_NOT_AWAITING_DECISION = "job-not-awaiting-decision"
    REPLAY_REFUSED = "replay-refused"
    ALREADY_REPLAYED = "already-replayed"
    INVALID_BILLING_EVENT = "invalid-billing-event"
    PAYLOAD_TOO_LARGE = "payload-too-large"
    RATE_LIMITED = "rate-limited"
    INTERNAL_ERROR = "internal-error"
    TIMED_OUT = "timed-out"
    UNAVAILABLE = "unavailable"
    NOT_READY = "not-ready"
    BILLING_NOT_CONFIGURED = "billing-not-configured"
    TOO_MANY_ENDPOINTS = "too-many-endpoints"

    @property
    def uri(self) -> str:
        return TYPE_BASE + self.value


# Each type's title: the same for every occurrence of it (RFC 9457 §3.1.3); `detail` varies.
TITLES: dict[Problem, str] = {
    Problem.VALIDATION_ERROR: "Invalid request",
    Problem.MALFORMED_JSON: "Malformed JSON",
    Problem.MALFORMED_REQUEST: "Malformed HTTP request",
    Problem.BAD_HEADER: "Bad header",
    Problem.CLIENT_DISCONNECTED: "Client disconnected",
    Problem.UNAUTHORIZED: "Unauthorized",
    Problem.BAD_SIGNATURE: "Bad signature",
    Problem.FORBIDDEN: "Forbidden",
    Problem.NOT_FOUND: "Not found",
    Problem.METHOD_NOT_ALLOWED: "Method not allowed",
    Problem.HTTP_ERROR: "HTTP error",
    Problem.IDEMPOTENCY_KEY_REUSED: "Idempotency key reused",
    Problem.IDEMPOTENCY_KEY_MISMATCH: "Idempotency keys differ",
    Problem.JOB_NOT_AWAITING_DECISION: "Not awaiting a decision",
    Problem.REPLAY_REFUSED: "Cannot replay",
    Problem.ALREADY_REPLAYED: "Already replayed",
    Problem.INVALID_BILLING_EVENT: "Invalid billing event",
    Problem.PAYLOAD_TOO_LARGE: "Payload too large",
    Problem.RATE_LIMITED: "Too many requests",
    Problem.INTERNAL_ERROR: "Internal error",
    Problem.TIMED_OUT: "Timed out",
    Problem.UNAVAILABLE: "Service unavailable",
    Problem.NOT_READY: "Not ready",
    Problem.BILLING_NOT_CONFIGURED: "Billing events not configured",
    Problem.TOO_MANY_ENDPOINTS: "Too many webhook endpoints",
}


def problem(
    status: int,
    kind: Problem,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """A problem+json answer of ``kind`` (its type URI and title) with ``status``."""
    body: dict[str, Any] = {"type": kind.uri, "title": TITLES[kind], "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.Response(
        status=status, text=json.dumps(body), content_type=PROBLEM_TYPE, headers=headers
    )


def unavailable(
    detail: str, *, retry_after_s: int, kind: Problem = Problem.UNAVAILABLE, **extra: Any
) -> web.Response:
    """503 with ``Retry-After`` (header, and ``retry_after`` in the body): try again later."""
    return problem(
        503,
        kind,
        detail,
        headers={"Retry-After": str(retry_after_s)},
        retry_after=retry_after_s,
        **extra,
    )


def field_errors(
    exc: ValidationError, *, prefix: tuple[str | int, ...] = ()
) -> list[dict[str, str]]:
    """Each invalid field with its dotted path and what is wrong with it."""
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in (*prefix, *err["loc"])) or "(body)"
        out.append({"field": loc, "message": err["msg"]})
    return out


def invalid(errors: list[dict[str, str]]) -> web.Response:
    """422 ``validation-error`` naming each invalid field."""
    fields = ", ".join(e["field"] for e in errors)
    return problem(422, Problem.VALIDATION_ERROR, f"invalid fields: {fields}", errors=errors)
