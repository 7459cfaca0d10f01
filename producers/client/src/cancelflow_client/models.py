"""What the API sends and answers, as the client types it.

The client's own copies of the API's wire models: this distribution imports nothing of the
server's. Answers ignore fields they do not know (a newer server may add some); what the client
sends is checked as the API checks it. ``tests/producers/test_client_package.py`` keeps these
equal to the server's models (every field, every enum value) and
``tests/producers/test_client_openapi.py`` to the OpenAPI document (every schema, field, type
and format).
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StringConstraints,
    field_validator,
)


class Status(StrEnum):
    QUEUED = "queued"
    CHECKING = "checking"
    AWAITING_DECISION = "awaiting_decision"
    CONFIRMING = "confirming"
    FINISHED = "finished"
    DEAD_LETTERED = "dead_lettered"


FINAL_STATUSES = frozenset({Status.FINISHED, Status.DEAD_LETTERED})


class OutcomeType(StrEnum):
    CANCELLED = "cancelled"
    ALREADY_CANCELLED = "already_cancelled"
    PENDING_PROVIDER_CONFIRMATION = "pending_provider_confirmation"
    NOT_ELIGIBLE = "not_eligible"
    NOT_FOUND = "not_found"
    RETAINED = "retained"
    ABANDONED = "abandoned"
    FAILED = "failed"


class _Answer(BaseModel):
    """A model the API answers with: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


# --- what a producer sends ------------------------------------------------------------------


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str | None = Field(default=None, min_length=1, max_length=64)
    comment: str | None = Field(default=None, max_length=2000)


# --- the providers' subscription references -------------------------------------------------
#
# What ``subscription`` holds for each provider, as the API checks it (the OpenAPI document's
# ``<Provider>Ref`` schemas): the client checks a request's ``subscription`` against its
# provider's before sending it. A provider the client does not know is sent as given (a newer
# server may have it) and checked by the API.

# One segment of a request path: the characters that cannot change the path, and at least one
# that is neither a dot nor a space.
_SEGMENT_CHARS = r"[^/\\%?#\x00-\x1f\x7f-\x9f]"
PATH_SEGMENT_PATTERN = rf"^{_SEGMENT_CHARS}*[^/\\%?#\x00-\x1f\x7f-\x9f.\s]{_SEGMENT_CHARS}*$"
_Hex24 = Annotated[str, StringConstraints(pattern=r"^[a-fA-F0-9]{24}$")]


class _Ref(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PaywayRef(_Ref):
    account_id: _Hex24
    user_product_id: _Hex24
    cancellation_reason_id: _Hex24


class AzotteRef(_Ref):
    order_identifier: Annotated[
        str, StringConstraints(pattern=PATH_SEGMENT_PATTERN, min_length=1, max_length=200)
    ]
    cancelation_method: Literal["Normal", "Immediate", "EndOfPeriod"] = "Normal"


class AppDirectRef(_Ref):
    subscription_id: Annotated[
        str,
        StringConstraints(
            pattern=r"^[A-Za-z0-9._~-]*[A-Za-z0-9_~-][A-Za-z0-9._~-]*$", max_length=128
        ),
    ]


class AxelSpringerRef(_Ref):
    purchase_ref: Annotated[
        str, StringConstraints(pattern=PATH_SEGMENT_PATTERN, min_length=1, max_length=200)
    ]


SUBSCRIPTION_REFS: dict[str, type[BaseModel]] = {
    "payway": PaywayRef,
    "azotte": AzotteRef,
    "appdirect": AppDirectRef,
    "axelspringer": AxelSpringerRef,
}


METADATA_MAX_BYTES = 8192


class CancellationRequest(BaseModel):
    """One cancellation to queue; ``subscription`` is the provider's reference (the API checks
    it against the provider's own model)."""

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
        if len(json.dumps(value, default=str)) > METADATA_MAX_BYTES:
            raise ValueError(f"metadata must serialise to at most {METADATA_MAX_BYTES} bytes")
        return value


class Decision(BaseModel):
    """A customer's answer to a retention offer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    decision: Literal["accept", "reject"]
    survey: dict[str, Any] | None = None


# --- job records ----------------------------------------------------------------------------


class Outcome(_Answer):
    """How a job ended; the fields beyond ``type`` are there when the provider said them."""

    type: OutcomeType
    cancellation_type: str | None = None
    subscription_end_date: str | None = None
    reason: str | None = None
    offer_identifier: str | None = None
    error: dict[str, Any] | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Offer(_Answer):
    """A retention offer (or an information step) the provider answered with."""

    kind: Literal["offer", "presentation"]
    offer_identifier: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    cancellation_reasons: list[dict[str, Any]] = Field(default_factory=list)
    decision_deadline: AwareDatetime | None = None


class TimelineEntry(_Answer):
    """One thing that happened to a job: a step started, a provider answered, a retry."""

    at: AwareDatetime
    step: str
    event: str
    attempt: int = 0
    status: str | None = None
    response: Any = None
    error: dict[str, Any] | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class CallbackAttempt(_Answer):
    at: AwareDatetime
    event_id: str
    event_type: str
    url: str | None = None
    attempt: int = 0
    result: Literal["delivered", "failed", "skipped", "refused", "dead_lettered"]
    http_status: int | None = None
    latency_ms: float | None = None
    error: str | None = None
    response: str | None = None
    retry_at: AwareDatetime | None = None
    endpoint_id: str | None = None


class JobRecord(_Answer):
    """A job as ``GET /v1/cancellations/{id}`` answers it."""

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
    extra_callbacks: list[str] = Field(default_factory=list)
    created_at: AwareDatetime
    updated_at: AwareDatetime
    held_by: str | None = None
    # The W3C trace context the job was created in, when the server traces (its trace id is
    # the job's trace's).
    traceparent: str | None = None


Enqueue = Literal["created", "existing", "joined"]


class Enqueued(_Answer):
    """An enqueue's answer: the job, and whether it was ``created``, an ``existing`` one (the
    same idempotency key) or ``joined`` (the subscription already had a job in flight)."""

    job: JobRecord
    how: Enqueue


class JobSummary(_Answer):
    """A job as ``GET /v1/cancellations`` lists it (the whole record is one GET away)."""

    id: str
    provider: str
    subscription: dict[str, Any]
    status: Status
    outcome: OutcomeType | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: AwareDatetime
    updated_at: AwareDatetime


class JobPage(_Answer):
    """One page of jobs, newest first; follow ``next_cursor`` until it is null. A page may
    hold fewer than ``limit`` items (even none) while the cursor goes on."""

    items: list[JobSummary]
    next_cursor: str | None = None


class Stats(_Answer):
    since: AwareDatetime
    jobs: dict[str, dict[str, int]]
    # provider -> outcome type -> jobs created since ``since`` that finished with it
    outcomes: dict[str, dict[str, int]] = Field(default_factory=dict)
    total: int
    dead_letters: int
    billing: dict[str, int] = Field(default_factory=dict)
    billing_ignored: dict[str, int] = Field(default_factory=dict)


# --- dead letters and providers -------------------------------------------------------------

DeadLetterKind = Literal["job", "callback", "poison", "billing_event"]


class Parked(_Answer):
    """Where a poison message's raw item was parked: one item of the broker list
    ``queue_key``, whose bytes are kept at ``key``."""

    queue_key: str
    key: str


class DeadLetter(_Answer):
    id: str
    kind: DeadLetterKind
    job_id: str | None = None
    provider: str | None = None
    step: str | None = None
    queue: str | None = None
    error_type: str
    error: str
    errors: list[dict[str, Any]] = Field(default_factory=list)
    traceback: str | None = None
    payload: Any = None
    event: str | None = None
    created_at: AwareDatetime
    # A poison message's parked copy (its list and the key holding its exact bytes).
    parked: Parked | None = None


class DeadLetterPage(_Answer):
    items: list[DeadLetter]


class Replayed(_Answer):
    """A replay's answer: the dead letter, its job and the step sent (None: nothing to do)."""

    replayed: str
    job_id: str | None = None
    next: str | None = None


class ProviderState(_Answer):
    """One provider's health: its circuit breaker, calls in flight (shared by all workers), and
    how its jobs of the last hour ended."""

    provider: str
    circuit: Literal["open", "half_open", "closed"]
    open_for_s: float
    consecutive_failures: int
    times_opened: int
    in_flight: int
    jobs_last_hour: int = 0
    dead_lettered_last_hour: int = 0
    error_rate: float | None = None


class ProviderStates(_Answer):
    items: list[ProviderState]


# --- errors ---------------------------------------------------------------------------------


class FieldError(_Answer):
    """One invalid field: its dotted path (``subscription.account_id``) and what is wrong."""

    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details, as the API answers every error."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    errors: list[FieldError] | None = None
    job_id: str | None = None
    retry_after: float | None = None
    dead_letter_id: str | None = None


# --- webhook endpoints ------------------------------------------------------------------------

EventType = Literal[
    "cancellation.succeeded",
    "cancellation.retained",
    "cancellation.not_eligible",
    "cancellation.not_found",
    "cancellation.failed",
    "cancellation.abandoned",
    "cancellation.offer_presented",
    "cancellation.dead_lettered",
]
MAX_ROTATION_OVERLAP_S = 30 * 24 * 3600


class EndpointCreate(BaseModel):
    """A webhook endpoint to register: its URL, an event-type filter (empty: every type) and
    how long an old secret keeps signing after a rotation (None: the server's default, 24 h)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(min_length=1, max_length=2083)
    description: str = Field(default="", max_length=256)
    event_types: list[EventType] = Field(default_factory=list, max_length=16)
    rotation_overlap_s: float | None = Field(default=None, ge=0, le=MAX_ROTATION_OVERLAP_S)
    enabled: bool = True


class EndpointUpdate(BaseModel):
    """The fields of an endpoint to change (None: unchanged)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(default=None, min_length=1, max_length=2083)
    description: str | None = Field(default=None, max_length=256)
    event_types: list[EventType] | None = Field(default=None, max_length=16)
    rotation_overlap_s: float | None = Field(default=None, ge=0, le=MAX_ROTATION_OVERLAP_S)
    enabled: bool | None = None


class SecretRotation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    overlap_s: float | None = Field(default=None, ge=0, le=MAX_ROTATION_OVERLAP_S)


class WebhookEndpoint(_Answer):
    """A registered webhook endpoint (never its secret)."""

    id: str
    url: str
    description: str = ""
    event_types: list[str] = Field(default_factory=list)
    enabled: bool = True
    disabled_reason: str | None = None
    disabled_at: AwareDatetime | None = None
    rotation_overlap_s: float
    previous_secret_expires_at: AwareDatetime | None = None
    failing_since_at: AwareDatetime | None = None
    last_success_at: AwareDatetime | None = None
    last_failure_at: AwareDatetime | None = None
    created_at: AwareDatetime
    updated_at: AwareDatetime


class EndpointPage(_Answer):
    items: list[WebhookEndpoint]


class EndpointSecret(_Answer):
    """An endpoint with its ``whsec_`` secret: answered once, at creation and at rotation."""

    endpoint: WebhookEndpoint
    secret: str
