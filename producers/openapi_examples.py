"""The examples of ``/openapi.json``: built from the models the API answers with (and dumped as
the API dumps them), so an example cannot hold a field the model lacks; every example is
checked against its schema in ``tests/producers/test_openapi_document.py``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from cancelflow.contract import (
    CallbackAttempt,
    Decision,
    JobRecord,
    Offer,
    Outcome,
    OutcomeType,
    Reason,
    Status,
    TimelineEntry,
)
from cancelflow.dead_letters import DeadLetter
from cancelflow.endpoints import WebhookEndpoint
from producers.problems import TITLES, Problem
from producers.schemas import (
    BillingEvent,
    BillingResult,
    DeadLetterPage,
    EndpointPage,
    FieldError,
    Health,
    JobPage,
    JobSummary,
    ProviderState,
    ProviderStates,
    Replayed,
    Stats,
)

JOB_ID = "job_5b0c4e7d2a9f4c1e8d3b6a0f9e2c7d41"
DL_ID = "dl_0d9e8c7b6a5f4e3d2c1b0a9f8e7d6c5b"
CREATED = "2025-03-04T09:15:02.120Z"
UPDATED = "2025-03-04T09:15:03.870Z"
PAYWAY_SUBSCRIPTION = {
    "account_id": "5f1e0c2a9b3d4e5f6a7b8c9d",
    "user_product_id": "6a7b8c9d0e1f2a3b4c5d6e7f",
    "cancellation_reason_id": "5cb80481c00000000000000a",
}


# An example of each query parameter, by name.
QUERY: dict[str, Any] = {
    "provider": "payway",
    "status": ["queued", "checking"],
    "outcome": ["failed"],
    "reference": "5cb804811d41",
    "idempotency_key": "order-81723-cancel",
    "metadata": ["customer=c_123"],
    "created_after": "2025-03-04T00:00:00Z",
    "created_before": "2025-03-05T00:00:00Z",
    "limit": 50,
    "cursor": f"1741079702.12~{JOB_ID}",
    "since_s": 86400,
    "kind": "job",
    "error_type": "ProviderUnavailable",
    "older_than": "2025-03-04T00:00:00Z",
    "newer_than": "2025-03-01T00:00:00Z",
}


def _json(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


def cancellation_request() -> dict[str, Any]:
    return {
        "provider": "payway",
        "subscription": PAYWAY_SUBSCRIPTION,
        "reason": {"code": "too_expensive", "comment": "moving to the yearly plan"},
        "idempotency_key": "order-81723-cancel",
        "metadata": {"customer": "c_123"},
    }


def job_record(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": JOB_ID,
        "provider": "payway",
        "subscription": PAYWAY_SUBSCRIPTION,
        "reason": Reason(code="too_expensive", comment="moving to the yearly plan"),
        "idempotency_key": "order-81723-cancel",
        "metadata": {"customer": "c_123"},
        "status": Status.FINISHED,
        "outcome": Outcome(type=OutcomeType.CANCELLED, subscription_end_date="2025-03-31"),
        "timeline": [
            TimelineEntry(at=CREATED, step="enqueue", event="queued"),
            TimelineEntry(at="2025-03-04T09:15:02.310Z", step="eligibility", event="started"),
            TimelineEntry(
                at="2025-03-04T09:15:02.480Z", step="eligibility", event="eligible", status="200"
            ),
            TimelineEntry(at=UPDATED, step="confirm", event="finished", attempt=1, status="200"),
        ],
        "callbacks": [
            CallbackAttempt(
                at=UPDATED,
                event_id="evt_2c9a7e31",
                event_type="cancellation.succeeded",
                attempt=1,
                result="skipped",
            )
        ],
        "created_at": CREATED,
        "updated_at": UPDATED,
    }
    return _json(JobRecord(**{**fields, **changes}))


def created_job() -> dict[str, Any]:
    """A 202 of ``POST /v1/cancellations``: the new record, and how the request was met."""
    job = job_record(
        status=Status.QUEUED,
        outcome=None,
        timeline=[TimelineEntry(at=CREATED, step="enqueue", event="queued")],
        callbacks=[],
        updated_at=CREATED,
    )
    return {**job, "how": "created"}


def awaiting_job() -> dict[str, Any]:
    offer = Offer(
        kind="offer",
        offer_identifier="stay-3-months-half-price",
        decision_deadline="2025-03-11T09:15:02.480Z",
    )
    return job_record(status=Status.AWAITING_DECISION, outcome=None, offer=offer)


def decided_job() -> dict[str, Any]:
    return job_record(
        status=Status.CONFIRMING,
        outcome=None,
        decision=Decision(decision="reject", survey={"why": "price"}),
    )


def decision() -> dict[str, Any]:
    return _json(Decision(decision="reject", survey={"why": "price"}))


def job_page() -> dict[str, Any]:
    item = JobSummary(
        id=JOB_ID,
        provider="payway",
        subscription=PAYWAY_SUBSCRIPTION,
        status=Status.FINISHED,
        outcome=OutcomeType.CANCELLED,
        idempotency_key="order-81723-cancel",
        created_at=CREATED,
        updated_at=UPDATED,
    )
    return _json(JobPage(items=[item], next_cursor=f"1741079702.12~{JOB_ID}"))


def stats() -> dict[str, Any]:
    return _json(
        Stats(
            since="2025-03-03T09:00:00.000Z",
            jobs={"payway": {"finished": 118, "queued": 2}, "azotte": {"awaiting_decision": 3}},
            total=123,
            dead_letters=1,
            billing={"enqueued": 40, "ignored": 7},
            billing_ignored={"invoice.paid": 7},
        )
    )


def billing_event() -> dict[str, Any]:
    return _json(
        BillingEvent(
            id="evt_8c2e41d0",
            type="payment.final_failure",
            created_at="2025-03-04T09:14:58Z",
            data={
                "provider": "payway",
                "account_id": PAYWAY_SUBSCRIPTION["account_id"],
                "user_product_id": PAYWAY_SUBSCRIPTION["user_product_id"],
                "invoice_id": "in_20250304_17",
            },
        )
    )


def billing_result(result: str = "enqueued") -> dict[str, Any]:
    if result == "ignored":
        return _json(
            BillingResult(event_id="evt_8c2e41d1", event_type="invoice.paid", result="ignored")
        )
    return _json(
        BillingResult(
            event_id="evt_8c2e41d0",
            event_type="payment.final_failure",
            result="enqueued",
            rule="payway-payment-failed",
            job_id=JOB_ID,
        )
    )


def dead_letter() -> dict[str, Any]:
    return _json(
        DeadLetter(
            id=DL_ID,
            kind="job",
            job_id=JOB_ID,
            provider="payway",
            step="confirm",
            queue="cancellations.payway",
            error_type="ProviderUnavailable",
            error="payway answered 503 five times",
            errors=[{"attempt": 5, "error": "payway answered 503", "at": UPDATED}],
            created_at=UPDATED,
        )
    )


def dead_letter_page() -> dict[str, Any]:
    return _json(DeadLetterPage.model_validate({"items": [dead_letter()]}))


def replayed() -> dict[str, Any]:
    return _json(Replayed(replayed=DL_ID, job_id=JOB_ID, next="cancelflow.confirm"))


def provider_states() -> dict[str, Any]:
    state = ProviderState(
        provider="payway",
        circuit="closed",
        open_for_s=0.0,
        consecutive_failures=0,
        times_opened=2,
        in_flight=3,
    )
    return _json(ProviderStates(items=[state]))


def health(*, ready: bool = False) -> dict[str, Any]:
    if ready:
        return {**_json(Health(status="ready", providers=["azotte", "payway"])), "redis": "ok"}
    return _json(Health(status="ok"))


# The problem each status is answered with most often, with a detail as the API writes it.
_PROBLEMS: dict[int, tuple[Problem, str, dict[str, Any]]] = {
    400: (Problem.MALFORMED_JSON, "the body is not JSON: Expecting value at 1:1", {}),
    401: (Problem.UNAUTHORIZED, "send Authorization: Bearer <token>", {}),
    403: (Problem.FORBIDDEN, "this token is read-only", {}),
    404: (Problem.NOT_FOUND, f"no job {JOB_ID}", {}),
    409: (
        Problem.JOB_NOT_AWAITING_DECISION,
        f"job {JOB_ID} is finished, not awaiting a decision",
        {},
    ),
    413: (Problem.PAYLOAD_TOO_LARGE, "request bodies are limited to 65536 bytes", {}),
    422: (
        Problem.VALIDATION_ERROR,
        "invalid fields: subscription.account_id",
        {
            "errors": [
                _json(
                    FieldError(
                        field="subscription.account_id",
                        message="String should match pattern '^[a-fA-F0-9]{24}$'",
                    )
                )
            ]
        },
    ),
    429: (Problem.RATE_LIMITED, "rate limit reached: retry in 0.42s", {"retry_after": 0.42}),
    503: (
        Problem.UNAVAILABLE,
        "Redis is unreachable (ConnectionError): retry in 5s",
        {"retry_after": 5},
    ),
}


def problem(status: int, kind: Problem | None = None, detail: str | None = None) -> dict[str, Any]:
    """A problem+json body as ``producers.problems.problem`` writes it."""
    default, default_detail, extra = _PROBLEMS[status]
    kind = kind or default
    body = {"type": kind.uri, "title": TITLES[kind], "status": status}
    return {**body, "detail": detail or default_detail, **(extra if kind is default else {})}


ENDPOINT_ID = "ep_3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c"
# Not a secret of any deployment: the documentation's example (``cancelflow secret`` makes one).
EXAMPLE_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # noqa: S105


def endpoint_create() -> dict[str, Any]:
    return {
        "url": "https://hooks.example.com/cancelflow",
        "description": "billing system",
        "event_types": ["cancellation.succeeded", "cancellation.dead_lettered"],
        "rotation_overlap_s": 86400,
    }


def endpoint(**changes: Any) -> dict[str, Any]:
    record = WebhookEndpoint(
        id=ENDPOINT_ID,
        url="https://hooks.example.com/cancelflow",
        description="billing system",
        event_types=["cancellation.succeeded", "cancellation.dead_lettered"],
        rotation_overlap_s=86400,
        created_at=CREATED,
        updated_at=UPDATED,
    )
    return _json(record.model_copy(update=changes))


def endpoint_secret(*, rotated: bool = False) -> dict[str, Any]:
    changes = {"previous_secret_expires_at": "2025-03-05T09:15:03.870Z"} if rotated else {}
    return {"endpoint": endpoint(**changes), "secret": EXAMPLE_SECRET}


def endpoint_page() -> dict[str, Any]:
    return _json(EndpointPage.model_validate({"items": [endpoint()]}))
