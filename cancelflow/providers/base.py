"""What every provider adapter is: its settings, its subscription reference, and two calls."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Protocol

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    field_validator,
)

from cancelflow.contract import JobRecord, Offer, Outcome
from cancelflow.http import ProviderHttp

# Standard Webhooks secrets: ``whsec_`` and the base64 of 24 to 64 random bytes; the HMAC key is
# the decoded bytes. https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md
CALLBACK_SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
CALLBACK_SECRET_BYTES = (24, 64)


def callback_secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` callback secret; ``ValueError`` (never showing
    the secret) when it is not one."""
    if not secret.startswith(CALLBACK_SECRET_PREFIX):
        raise ValueError(
            f"must be {CALLBACK_SECRET_PREFIX}<base64 of 24 to 64 random bytes> "
            "(generate one with `cancelflow secret`)"
        )
    try:
        # validate=True: b64decode would otherwise drop every character outside the alphabet,
        # and "whsec_my_password" would decode to a few bytes of nothing in particular.
        key = base64.b64decode(secret[len(CALLBACK_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"is not base64 after {CALLBACK_SECRET_PREFIX} (generate one with `cancelflow secret`)"
        ) from None
    low, high = CALLBACK_SECRET_BYTES
    if not low <= len(key) <= high:
        raise ValueError(
            f"decodes to {len(key)} bytes, not {low} to {high} (generate one with "
            "`cancelflow secret`)"
        )
    return key


class ProviderSettings(BaseModel):
    """Knobs every provider has. A provider's own settings subclass this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: HttpUrl
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    # Retries: attempts per step, and how old a job may get before it is dead-lettered.
    max_attempts: int = Field(default=8, ge=1, le=100)
    max_age_s: float = Field(default=24 * 3600, gt=0)
    retry_base_s: float = Field(default=1.0, gt=0)
    # Shared by all workers (held in Redis): calls per second and calls in flight.
    calls_per_second: float | None = Field(default=None, gt=0)
    max_in_flight: int | None = Field(default=None, ge=1)
    # Circuit breaker: this many consecutive failures open it for the cool-down.
    breaker_failures: int = Field(default=20, ge=1)
    breaker_cooldown_s: float = Field(default=30.0, gt=0)
    # Retention offers: how long a job waits for the customer, and what happens then.
    decision_deadline_s: float = Field(default=72 * 3600, gt=0)
    decision_default: Literal["confirm", "abandon"] = "abandon"
    # Result callbacks.
    callback_url: HttpUrl | None = None
    callback_secret: SecretStr | None = None
    callback_secret_previous: SecretStr | None = None

    @field_validator("callback_secret", "callback_secret_previous")
    @classmethod
    def _standard_webhooks_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            callback_secret_key(value.get_secret_value())
        return value


def _no_control_characters(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or blank")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in value):
        raise ValueError("must not contain control characters")
    return value


# Characters that, in one path segment, would change the path or its meaning once a server
# or proxy decodes or normalises it: separators (also as backslash), percent-escapes (%2f,
# %2e%2e), and the starts of a query or a fragment.
_PATH_CHANGING = frozenset("/\\%?#")


def _path_segment(value: str) -> str:
    _no_control_characters(value)
    if not value.strip().strip(".").strip():
        raise ValueError("must not be a dot segment ('.', '..'): only dots and spaces")
    if found := sorted(_PATH_CHANGING.intersection(value)):
        raise ValueError(f"must not contain {' '.join(found)}: it would change the request path")
    return value


# What ``_path_segment`` accepts, as the OpenAPI document states it (the validator names
# what is wrong; the pattern lets a client, or a property-based test, know what is right):
# allowed characters only, and at least one that is neither a dot nor a space.
_SEGMENT_CHARS = r"[^/\\%?#\x00-\x1f\x7f-\x9f]"
PATH_SEGMENT_PATTERN = rf"^{_SEGMENT_CHARS}*[^/\\%?#\x00-\x1f\x7f-\x9f.\s]{_SEGMENT_CHARS}*$"

# A reference that becomes one segment of a request path: it must stay exactly one segment.
# ``SEGMENT_CHECK`` alone, after its own ``StringConstraints``, for a reference that states
# a stricter pattern of its own (the pattern then stays in the OpenAPI document).
SEGMENT_CHECK = AfterValidator(_path_segment)
PathSegment = Annotated[
    str, SEGMENT_CHECK, Field(json_schema_extra={"pattern": PATH_SEGMENT_PATTERN})
]


class SubscriptionRef(BaseModel):
    """A provider's reference to one subscription, validated at the API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields that identify the subscription (one job at a time per identity); other fields
    # (a reason id, a cancellation method) are options of the request.
    identity_fields: ClassVar[tuple[str, ...]] = ()

    def identity(self) -> str:
        fields = self.identity_fields or tuple(type(self).model_fields)
        return "|".join(str(getattr(self, name)) for name in fields)


@dataclass(frozen=True)
class Eligibility:
    """The eligibility step's answer: go on to confirm, wait on an offer, or stop here."""

    kind: Literal["eligible", "offer", "final"]
    outcome: Outcome | None = None
    offer: Offer | None = None
    response: Any = None  # redacted provider response, for the timeline
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def eligible(cls, response: Any = None, **details: Any) -> Eligibility:
        return cls(kind="eligible", response=response, details=details)

    @classmethod
    def final(cls, outcome: Outcome, response: Any = None) -> Eligibility:
        return cls(kind="final", outcome=outcome, response=response)

    @classmethod
    def offered(cls, offer: Offer, response: Any = None) -> Eligibility:
        return cls(kind="offer", offer=offer, response=response)


@dataclass(frozen=True)
class Confirmation:
    outcome: Outcome
    response: Any = None


class Provider(Protocol):
    """One provider's API as the steps see it. Errors are raised as ``ProviderError``s."""

    key: str

    async def check(self, ref: Any, job: JobRecord) -> Eligibility:
        """Ask whether the subscription can be cancelled."""
        ...

    async def confirm(self, ref: Any, job: JobRecord) -> Confirmation:
        """Cancel it (the provider's PUT, POST or DELETE)."""
        ...


@dataclass(frozen=True)
class ProviderSpec:
    """A registry entry: everything the system needs to know to use one provider."""

    key: str
    reference: type[SubscriptionRef]
    settings: type[ProviderSettings]
    build: Callable[[Any, ProviderHttp], Provider]
    validate_settings: Callable[[Any], None] | None = None
