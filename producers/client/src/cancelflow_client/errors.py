"""The client's errors: one type per kind of answer, each carrying the problem details."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

from pydantic import ValidationError

from cancelflow_client.models import FieldError, JobRecord, Problem


class ClientError(Exception):
    """Base of the client's errors."""


class TransportError(ClientError):
    """No answer from the API (connection refused or reset, timeout) after every retry.
    ``sent`` is False when the request cannot have reached the API (no connection was made):
    then retrying any call is safe. The message names the API's address."""

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class ApiError(ClientError):
    """The API answered with an error (``problem`` holds the problem details)."""

    def __init__(
        self,
        status: int,
        problem: Problem,
        *,
        retry_after_s: float | None = None,
        note: str = "",
    ) -> None:
        super().__init__(
            f"{status} {problem.title}"
            + (f": {problem.detail}" if problem.detail else "")
            + (f" ({note})" if note else "")
        )
        self.status = status
        self.problem = problem
        # From the ``Retry-After`` header, else the problem's ``retry_after``; None if neither.
        self.retry_after_s = retry_after_s if retry_after_s is not None else problem.retry_after


class BadRequest(ApiError):
    """400: the body was not JSON, or a header was malformed."""


class ValidationFailed(ApiError):
    """422: ``errors`` lists each invalid field (``fields`` their paths)."""

    @property
    def errors(self) -> list[FieldError]:
        return self.problem.errors or []

    @property
    def fields(self) -> list[str]:
        return [e.field for e in self.errors]


class AuthError(ApiError):
    """The token was refused (401) or may not do this (403)."""


class Unauthorized(AuthError):
    """401: the API knows no such token."""


class Forbidden(AuthError):
    """403: a read-only token tried to write."""


class NotFound(ApiError):
    """404: no such job or dead letter (never created, expired, replayed or purged)."""


class Conflict(ApiError):
    """409: the job is not awaiting a decision, or a dead letter cannot be replayed now."""

    @property
    def job_id(self) -> str | None:
        return self.problem.job_id


class PayloadTooLarge(ApiError):
    """413: the body is over the API's size limit."""


class RateLimited(ApiError):
    """429: the token's rate is spent; wait ``retry_after`` seconds."""

    @property
    def retry_after(self) -> float:
        return self.retry_after_s or 1.0


class ServerError(ApiError):
    """5xx, still after every retry."""


class WaitTimeout(ClientError):
    """The job did not reach a wanted status in time; ``job`` is how it was last seen."""

    def __init__(self, job: JobRecord, timeout_s: float) -> None:
        super().__init__(f"job {job.id} still {job.status.value} after {timeout_s:g}s")
        self.job = job


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
    429: RateLimited,
}


def error_for(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> ApiError:
    """The typed error of an error answer (``application/problem+json``, or anything else);
    ``headers`` (names in lower case) give its ``Retry-After``."""
    try:
        problem = Problem.model_validate_json(body)
    except ValidationError:
        text = body.decode(errors="replace")[:500]
        problem = Problem(title=f"HTTP {status}", status=status, detail=text or None)
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return cls(status, problem, retry_after_s=parse_retry_after((headers or {}).get("retry-after")))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP date (RFC 9110
    10.2.3); None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
