"""The shared contract between producers and workers: job requests, job records, names.

Only JSON crosses a process boundary: these models are dumped with ``mode="json"`` going in
and validated coming out.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

# --- names shared by producers and workers -------------------------------------------------

TASK_ELIGIBILITY = "cancelflow.eligibility"
TASK_RETENTION_OFFER = "cancelflow.retention_offer"
TASK_CONFIRM = "cancelflow.confirm"
TASK_CALLBACK = "cancelflow.callback"

CALLBACKS_QUEUE = "callbacks"
DEAD_LETTER_QUEUE = "dead_letters"
MAINTENANCE_QUEUE = "maintenance"


def provider_queue(provider: str) -> str:
    """The queue of one provider: a slow provider cannot starve the others."""
    return f"cancellations.{provider}"


def queue_names(providers: Iterable[str]) -> list[str]:
    """Every queue: one per provider, then callbacks, maintenance and dead letters."""
    return [
        *(provider_queue(key) for key in providers),
        CALLBACKS_QUEUE,
        MAINTENANCE_QUEUE,
        DEAD_LETTER_QUEUE,
    ]


JOB_ID_RE = re.compile(r"^job_[0-9a-f]{32}$")


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- statuses and outcomes ------------------------------------------------------------------


class Status(StrEnum):
    QUEUED = "queued"
    CHECKING = "checking"
    AWAITING_DECISION = "awaiting_decision"
    CONFIRMING = "confirming"
    FINISHED = "finished"
    DEAD_LETTERED = "dead_lettered"


FINAL_STATUSES = frozenset({Status.FINISHED, Status.DEAD_LETTERED})


class Step(StrEnum):
    """The chain: eligibility -> retention_offer (when offered) -> confirm -> callback."""

    ELIGIBILITY = "eligibility"
    RETENTION_OFFER = "retention_offer"
    CONFIRM = "confirm"
    CALLBACK = "callback"


STEP_TASKS: dict[Step, str] = {
    Step.ELIGIBILITY: TASK_ELIGIBILITY,
    Step.RETENTION_OFFER: TASK_RETENTION_OFFER,
    Step.CONFIRM: TASK_CONFIRM,
    Step.CALLBACK: TASK_CALLBACK,
}


class OutcomeType(StrEnum):
    CANCELLED = "cancelled"
    ALREADY_CANCELLED = "already_cancelled"
    PENDING_PROVIDER_CONFIRMATION = "pending_provider_confirmation"
    NOT_ELIGIBLE = "not_eligible"
    NOT_FOUND = "not_found"
    RETAINED = "retained"
    ABANDONED = "abandoned"
    FAILED = "failed"


class Outcome(BaseModel):
    """How a job ended. Fields beyond ``type`` are present where the provider says them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: OutcomeType
    cancellation_type: str | None = None
    subscription_end_date: str | None = None
    reason: str | None = None
    offer_identifier: str | None = None
    error: dict[str, Any] | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Offer(BaseModel):
    """A retention offer (or an information step) a provider answered with."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["offer", "presentation"]
    offer_identifier: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    cancellation_reasons: list[dict[str, Any]] = Field(default_factory=list)
    # When the customer's decision is due (ISO 8601 UTC), set once the job waits for it.
    decision_deadline: str | None = None


# --- requests -------------------------------------------------------------------------------


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str | None = Field(default=None, min_length=1, max_length=64)
    comment: str | None = Field(default=None, max_length=2000)


_METADATA_MAX_BYTES = 8192


class CancellationRequest(BaseModel):
    """What a producer asks for. ``subscription`` is validated by the provider's own model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str = Field(min_length=1, max_length=64)
    subscription: dict[str, Any]
    reason: Reason | None = None
    callback_url: HttpUrl | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _metadata_small(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, default=str)) > _METADATA_MAX_BYTES:
            raise ValueError(f"metadata must serialise to at most {_METADATA_MAX_BYTES} bytes")
        return value

    def fingerprint(self) -> str:
        """A hash of the request body, to tell a replayed idempotency key from a reused one."""
        body = self.model_dump(mode="json", exclude={"idempotency_key"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class Decision(BaseModel):
    """A customer's answer to a retention offer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    decision: Literal["accept", "reject"]
    survey: dict[str, Any] | None = None


# --- records --------------------------------------------------------------------------------


class TimelineEntry(BaseModel):
    """One thing that happened to a job: a step started, a provider answered, a retry."""

    at: str
    step: str
    event: str
    attempt: int = 0
    status: str | None = None
    response: Any = None
    error: dict[str, Any] | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class CallbackAttempt(BaseModel):
    at: str
    event_id: str
    event_type: str
    url: str | None = None
    attempt: int = 0
    result: Literal["delivered", "failed", "skipped", "refused", "dead_lettered"]
    http_status: int | None = None
    latency_ms: float | None = None
    error: str | None = None
    # The first characters of the receiver's answer (``callbacks.RESPONSE_EXCERPT_CHARS``).
    response: str | None = None
    # After a failed attempt: when the next attempt at this target is due (UTC, RFC 3339).
    retry_at: str | None = None
    # The registered webhook endpoint this attempt was sent to, if any (``endpoints``).
    endpoint_id: str | None = None


class JobRecord(BaseModel):
    """A job as the job store keeps it and ``GET /v1/cancellations/{id}`` returns it."""

    id: str
    provider: str
    subscription: dict[str, Any]
    reason: Reason | None = None
    callback_url: str | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    status: Status
    outcome: Outcome | None = None
    offer: Offer | None = None
    decision: Decision | None = None
    timeline: list[TimelineEntry] = Field(default_factory=list)
    callbacks: list[CallbackAttempt] = Field(default_factory=list)
    # Callback URLs of requests that joined this job while it was in flight: each is sent
    # the job's events too, as a target of its own.
    extra_callbacks: list[str] = Field(default_factory=list)
    created_at: str
    updated_at: str
    # The worker process running the job's step now, if one is (see worker.leases).
    held_by: str | None = None
    # The W3C trace context the job was created in (docs/tracing.md), when tracing was on:
    # a step re-sent outside any span (the watchdog, a sweep) joins the job's trace.
    traceparent: str | None = None
