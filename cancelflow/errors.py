"""Typed errors. Each one says whether it is worth retrying; no caller guesses from status codes."""

from __future__ import annotations

from typing import Any


class CancelflowError(Exception):
    """Base of every error Cancelflow raises on purpose."""


class ConfigError(CancelflowError):
    """Settings are missing or invalid; the message names the environment variables."""


class JobNotFound(CancelflowError):
    """No job record with that id (never created, or expired after its retention)."""


class LeaseLost(CancelflowError):
    """This worker process's heartbeat is stale (Redis out of reach): another process may
    take over its steps, so it sends no provider request until it beats again."""


class ProviderError(CancelflowError):
    """A provider call failed. ``retryable`` and ``retry_after`` decide what happens next.

    ``may_have_acted``: the request may have reached the provider and taken effect even though
    no usable answer came back (a timeout, a reset after sending, a 5xx). A cancel that failed
    so is read back before it is sent again (``chain.confirm``). The HTTP door
    (``cancelflow.http``) sets it for each failure; each class has the default of its kind.
    """

    retryable: bool = False
    may_have_acted: bool = False

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status: int | None = None,
        code: str | None = None,
        field: str | None = None,
        retry_after: float | None = None,
        body: Any = None,
        may_have_acted: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.status = status
        self.code = code
        self.field = field
        self.retry_after = retry_after
        self.body = body
        if may_have_acted is not None:
            self.may_have_acted = may_have_acted

    def as_dict(self) -> dict[str, Any]:
        """The error as JSON-safe data for the job timeline and dead letters."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "status": self.status,
            "code": self.code,
            "field": self.field,
            "retryable": self.retryable,
            "retry_after": self.retry_after,
            "may_have_acted": self.may_have_acted,
        }


class ProviderUnavailable(ProviderError):
    """Connection refused or reset, or a 5xx: the provider may answer later."""

    retryable = True


class ProviderTimeout(ProviderError):
    """No answer within the provider's timeout."""

    retryable = True
    # Unless it is known to have timed out before sending (connecting), a request without an
    # answer may have been acted on: a step overrunning its time limit mid-call is one too.
    may_have_acted = True


class ProviderRateLimited(ProviderError):
    """429: wait at least ``retry_after`` seconds."""

    retryable = True


class ProviderAuthError(ProviderError):
    """Credentials refused even after fetching a fresh token: an operator must fix settings."""


class ProviderRejected(ProviderError):
    """The provider refused the request as invalid (a 4xx we do not map to an outcome)."""


class ProviderProtocolError(ProviderError):
    """The provider answered something we cannot read (bad JSON, missing fields)."""


class CircuitOpen(ProviderError):
    """The provider's circuit breaker is open: leave the job queued and try after the cool-down."""

    retryable = True


class StepBusy(CancelflowError):
    """Another delivery of the same step holds its lease; run again after ``retry_after``."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DecisionConflict(CancelflowError):
    """A decision for a job that is not waiting for one."""


class CallbackGiveUp(CancelflowError):
    """A callback was refused for good or its retry horizon has passed."""


class JobDeadLettered(CancelflowError):
    """A step ended in the dead-letter store (``dead_letter_id``; ``error_type``: why): the
    step's Celery task fails with it, so monitoring (Flower) shows a failure, not a success.
    The job is safe in the store: its message is acknowledged, never delivered again."""

    def __init__(self, dead_letter_id: str, error_type: str) -> None:
        super().__init__(dead_letter_id, error_type)
        self.dead_letter_id = dead_letter_id
        self.error_type = error_type

    def __str__(self) -> str:
        return f"dead-lettered as {self.dead_letter_id} ({self.error_type})"
