"""The API's own request and response models, beside the contract's.

They validate what the API reads, shape what it answers, type what the Python client returns,
and are where ``/openapi.json`` comes from: one definition for all four.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cancelflow.contract import JobRecord, OutcomeType, Status
from cancelflow.dead_letters import DeadLetter, DeadLetterFilter
from cancelflow.endpoints import WebhookEndpoint

MAX_PAGE = 500
MAX_DEAD_LETTER_PAGE = 1000
# Dead-letter ids as ``DeadLetter`` makes them: ``dl_`` and a uuid4's 32 hex digits. Job ids
# are ``contract.JOB_ID_RE``. An id in a URL is checked against its format before it becomes
# part of a Redis key: ``index`` or ``<id>:timeline`` would name another key.
DEAD_LETTER_ID_RE = re.compile(r"^dl_[0-9a-f]{32}$")
# ``next_cursor``: the creation time (a Unix timestamp, as Python writes a float) and the id of
# the last job a page read, so a client can hand back nothing the API would not take.
# ``metadata`` filters: ``key=value``, the key not empty.
METADATA_PAIR = r"^[^=]+="
CURSOR_RE = re.compile(r"^(?P<score>[0-9]{1,12}(\.[0-9]{1,17})?)~(?P<job_id>job_[0-9a-f]{32})$")


class FieldError(BaseModel):
    """One invalid field: its dotted path (``subscription.account_id``) and what is wrong."""

    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details, as every error is answered (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    # 422: every invalid field.
    errors: list[FieldError] | None = None
    # 409: the job the idempotency key belongs to.
    job_id: str | None = None
    # 429: seconds to wait (also in the Retry-After header, rounded up).
    retry_after: float | None = None
    # A billing event that was dead-lettered.
    dead_letter_id: str | None = None


Enqueue = Literal["created", "existing", "joined"]


class JobSummary(BaseModel):
    """A job as ``GET /v1/cancellations`` lists it (the whole record is one GET away)."""

    id: str
    provider: str
    subscription: dict[str, Any]
    status: Status
    outcome: OutcomeType | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: str
    updated_at: str


class JobPage(BaseModel):
    """One page of jobs, newest first; follow ``next_cursor`` until it is null. A page may
    hold fewer than ``limit`` items (even none) while the cursor goes on: each request reads
    a bounded stretch of the index."""

    items: list[JobSummary]
    next_cursor: str | None = None


def _as_utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class JobQuery(BaseModel):
    """Filters of ``GET /v1/cancellations``; every one is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str | None = Field(default=None, min_length=1, max_length=64)
    status: list[Status] | None = Field(
        default=None, description="one or more (repeat the parameter, or separate with commas)"
    )
    outcome: list[OutcomeType] | None = Field(
        default=None, description="one or more (repeat the parameter, or separate with commas)"
    )
    reference: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="a part of any value of the subscription reference (case-insensitive)",
    )
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    metadata: list[Annotated[str, Field(pattern=METADATA_PAIR, max_length=1024)]] | None = Field(
        default=None,
        description="``key=value``, repeat the parameter for more: every pair must match the "
        "job's metadata (a value compared as JSON text: a string as it is, ``true``, ``42``)",
    )
    created_after: datetime | None = Field(
        default=None, description="inclusive, ISO 8601 (UTC if no offset)"
    )
    created_before: datetime | None = Field(
        default=None, description="exclusive, ISO 8601 (UTC if no offset)"
    )
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(
        default=None,
        pattern=CURSOR_RE.pattern,
        description="``next_cursor`` of the previous page, unchanged",
    )

    @field_validator("created_after", "created_before")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _as_utc(value)

    def metadata_pairs(self) -> dict[str, str]:
        return dict(pair.partition("=")[::2] for pair in self.metadata or [])


class NoQuery(BaseModel):
    """The query of a route that takes none: any parameter is unknown (422)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DeadLetterQuery(DeadLetterFilter):
    """Filters of ``GET /v1/dead-letters`` and the page size; every one is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    older_than: datetime | None = Field(default=None, description="ISO 8601 (UTC if no offset)")
    newer_than: datetime | None = Field(default=None, description="ISO 8601 (UTC if no offset)")
    limit: int = Field(default=100, ge=0, le=MAX_DEAD_LETTER_PAGE)

    @field_validator("older_than", "newer_than")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _as_utc(value)


class StatsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    since_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        le=31 * 24 * 3600,
        description="count the jobs created in the last this many seconds",
    )


class Stats(BaseModel):
    """Live counts for ``cancelflow watch``."""

    since: str
    jobs: dict[str, dict[str, int]] = Field(
        description="provider -> status -> jobs created since ``since``"
    )
    outcomes: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="provider -> outcome type -> jobs created since ``since`` that finished "
        "with it (counted as each job finished; jobs finished before these counts existed "
        "are in ``jobs`` only)",
    )
    total: int
    dead_letters: int
    billing: dict[str, int] = Field(
        default_factory=dict, description="billing events by result, ever"
    )
    billing_ignored: dict[str, int] = Field(
        default_factory=dict, description="ignored billing events by type, ever"
    )


class DeadLetterPage(BaseModel):
    items: list[DeadLetter]


class Replayed(BaseModel):
    replayed: str
    job_id: str | None = None
    next: str | None = None


class ProviderState(BaseModel):
    """One provider's circuit breaker and calls in flight, shared by all workers, and how its
    jobs of the last hour have ended so far."""

    provider: str
    circuit: Literal["open", "half_open", "closed"]
    open_for_s: float
    consecutive_failures: int
    times_opened: int
    in_flight: int
    jobs_last_hour: int = Field(
        default=0, description="jobs created since the start of the previous hour"
    )
    dead_lettered_last_hour: int = Field(default=0, description="of those, dead-lettered now")
    error_rate: float | None = Field(
        default=None,
        description="dead_lettered / (finished + dead_lettered) of those jobs; null before any "
        "has ended",
    )


class ProviderStates(BaseModel):
    items: list[ProviderState]


class Health(BaseModel):
    status: str
    providers: list[str] | None = None


class BillingEvent(BaseModel):
    """What a billing system publishes: ``{"id", "type", "data": {…}}``; more top-level fields
    are kept, and rules may read any of them."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(
        min_length=1,
        max_length=200,
        description="unique per event: a redelivered event carries the same id",
    )
    type: str = Field(min_length=1, max_length=200, examples=["payment.final_failure"])
    created_at: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


BillingOutcome = Literal["enqueued", "joined", "duplicate", "ignored", "dead_lettered"]


class BillingResult(BaseModel):
    """What became of one billing event."""

    event_id: str | None
    event_type: str | None = None
    result: BillingOutcome
    rule: str | None = None
    job_id: str | None = None
    dead_letter_id: str | None = None
    errors: list[FieldError] = Field(default_factory=list)


class Enqueued(BaseModel):
    """The client's answer to an enqueue: the job, and whether it is new."""

    job: JobRecord
    how: Enqueue


# --- webhook endpoints (``cancelflow.endpoints``) ---------------------------------------------

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
# The longest rotation overlap an endpoint may ask for.
MAX_ROTATION_OVERLAP_S = 30 * 24 * 3600


class EndpointCreate(BaseModel):
    """``POST /v1/webhook-endpoints``: a callback URL of your own, with its own secret."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2083)
    description: str = Field(default="", max_length=256)
    # Event types to send; empty or left out: every type.
    event_types: list[EventType] = Field(default_factory=list, max_length=16)
    # How long the old secret keeps signing after a rotation (default: 24 h, the setting
    # CANCELFLOW_CALLBACKS__ENDPOINT_ROTATION_OVERLAP_S).
    rotation_overlap_s: float | None = Field(default=None, ge=0, le=MAX_ROTATION_OVERLAP_S)
    enabled: bool = True


class EndpointUpdate(BaseModel):
    """``PATCH /v1/webhook-endpoints/{endpoint_id}``: the fields given are changed."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=1, max_length=2083)
    description: str | None = Field(default=None, max_length=256)
    event_types: list[EventType] | None = Field(default=None, max_length=16)
    rotation_overlap_s: float | None = Field(default=None, ge=0, le=MAX_ROTATION_OVERLAP_S)
    # true re-enables a disabled endpoint (and forgets its failures); false disables it.
    enabled: bool | None = None


class SecretRotation(BaseModel):
    """``POST /v1/webhook-endpoints/{endpoint_id}/rotate-secret``."""

    model_config = ConfigDict(extra="forbid")

    # How long the old secret keeps signing beside the new one; default: the endpoint's
    # ``rotation_overlap_s``. 0 stops the old one at once.
    overlap_s: float | None = Field(default=None, ge=0, le=MAX_ROTATION_OVERLAP_S)


class EndpointPage(BaseModel):
    items: list[WebhookEndpoint]


class EndpointSecret(BaseModel):
    """An endpoint with its signing secret: answered once, at creation and at rotation."""

    endpoint: WebhookEndpoint
    # ``whsec_…``: give it to your receiver (Standard Webhooks libraries take it as it is).
    secret: str
