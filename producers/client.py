"""A Python client for the Cancelflow API, for backend systems: ``CancelflowClient`` (blocking,
standard library only) and ``AsyncCancelflowClient`` (asyncio, aiohttp). Both have the same
methods and answers::

    with CancelflowClient("https://cancelflow.internal", token) as cf:
        job = cf.enqueue("payway", {"account_id": …, "user_product_id": …,
                                    "cancellation_reason_id": …}).job
        done = cf.wait(job.id, timeout=120)

- Answers are the contract's pydantic models (``JobRecord``) and the API's (``JobPage``…).
- Errors are typed: ``ValidationFailed`` (with each invalid field), ``Conflict``, ``NotFound``,
  ``Unauthorized``/``Forbidden`` (both ``AuthError``), ``RateLimited`` (``retry_after``),
  ``PayloadTooLarge``, ``ServerError``, ``TransportError`` (no answer after the retries).
- 502/503/504 and 429 are retried, never before their ``Retry-After`` (the API answers 503
  while its Redis is unreachable), with jittered exponential backoff otherwise; network errors
  (refused, reset, timeout) too, for calls safe to repeat: reads, enqueues (an enqueue always
  carries an idempotency key, a fresh one unless given, so a retried enqueue never makes two
  jobs; pass your own key, an order id, to be safe across process restarts too) and decisions
  (a repeated one is recognised). ``RetryPolicy`` bounds the attempts and the total time; the
  last error names the API's address.
- Redirects are followed, but the token is sent only to the API's own origin: a redirect to
  another scheme, host or port is followed without ``Authorization`` (as aiohttp, which the
  asyncio client uses, does by itself).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http.client import HTTPException
from types import TracebackType
from typing import Any, Literal, Self

import aiohttp
from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from cancelflow.contract import (
    FINAL_STATUSES,
    CancellationRequest,
    Decision,
    JobRecord,
    Reason,
    Status,
)
from cancelflow.errors import CancelflowError
from producers.problems import field_errors
from producers.schemas import Enqueued, FieldError, JobPage, JobSummary, Problem, Stats

USER_AGENT = "cancelflow-client/1"
RETRY_STATUSES = frozenset({502, 503, 504})


# The client's variables, one group of their own (``CANCELFLOW_CLIENT__*``), and the names
# they had before (``CANCELFLOW_API_TOKEN`` was one letter from the server's
# ``CANCELFLOW_API_TOKENS``): those are still read, with a ``FutureWarning``; a new name wins.
CLIENT_ENV = {
    "api_url": ("CANCELFLOW_CLIENT__URL", "CANCELFLOW_API_URL"),
    "api_token": ("CANCELFLOW_CLIENT__TOKEN", "CANCELFLOW_API_TOKEN"),
    "api_timeout_s": ("CANCELFLOW_CLIENT__TIMEOUT_S", "CANCELFLOW_API_TIMEOUT_S"),
    "api_retries": ("CANCELFLOW_CLIENT__RETRIES", "CANCELFLOW_API_RETRIES"),
    "api_retry_time_s": ("CANCELFLOW_CLIENT__RETRY_TIME_S", "CANCELFLOW_API_RETRY_TIME_S"),
}


def _env(field: str) -> AliasChoices:
    return AliasChoices(*CLIENT_ENV[field])


class _EnvWithOldNames(EnvSettingsSource):
    def __call__(self) -> dict[str, Any]:
        for new, old in CLIENT_ENV.values():
            if old.lower() in self.env_vars and new.lower() not in self.env_vars:
                warnings.warn(f"{old} is deprecated: set {new}", FutureWarning, stacklevel=2)
        return super().__call__()


class ClientSettings(BaseSettings):
    """Where the API is and how to reach it: ``CANCELFLOW_CLIENT__URL``, ``__TOKEN``,
    ``__TIMEOUT_S``, ``__RETRIES``, ``__RETRY_TIME_S`` (see ``CLIENT_ENV``).
    A client's own settings: a machine that only calls the API needs none of the server's."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    api_url: str = Field(default="http://127.0.0.1:8080", validation_alias=_env("api_url"))
    api_token: SecretStr | None = Field(default=None, validation_alias=_env("api_token"))
    # Longer than the API waits on its Redis (CANCELFLOW_REDIS_READ_TIMEOUT_S, 10 s) before
    # answering 503: the client hears the 503 and its Retry-After rather than timing out.
    api_timeout_s: float = Field(default=15.0, gt=0, validation_alias=_env("api_timeout_s"))
    # Retries after the first attempt, all within ``api_retry_time_s`` of it: enough to ride
    # out a Redis restart or failover behind the API (it asks for 5 s between tries).
    api_retries: int = Field(default=6, ge=0, validation_alias=_env("api_retries"))
    api_retry_time_s: float = Field(default=60.0, ge=0, validation_alias=_env("api_retry_time_s"))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvWithOldNames(settings_cls), dotenv_settings, file_secret_settings


# --- errors ---------------------------------------------------------------------------------


class ClientError(CancelflowError):
    """Base of the client's errors."""


class TransportError(ClientError):
    """No answer from the API (connection refused or reset, timeout) after every retry.
    ``sent`` is False when the request cannot have reached the API (the connection was
    refused): then retrying any call is safe."""

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
    """400: the body was not JSON."""


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
    """401: no token, or not a valid one."""


class Forbidden(AuthError):
    """403: a read-only token tried to write."""


class NotFound(ApiError):
    """404: no such job (never created, or expired after its retention)."""


class Conflict(ApiError):
    """409: the idempotency key was used with another body (``job_id`` is its job), or the
    job is not awaiting a decision."""

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
    """The job did not reach the wanted status in time; ``job`` is how it was last seen."""

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


# --- retries -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """When to try a call again, and after how long: the one place that decides.

    - 429 and 502/503/504 are retried, never before their ``Retry-After`` (plus jitter, so
      that clients sent away together do not come back together); without one, after a
      full-jitter exponential backoff (``backoff_s`` doubling per attempt, at most
      ``max_backoff_s``).
    - Network errors are retried likewise for calls safe to repeat (``retry_safe``), and for
      any call when the request cannot have been sent (connection refused).
    - At most ``retries`` retries, none starting later than ``total_s`` after the first
      attempt, and none after a ``Retry-After`` longer than ``max_retry_after_s``.
    """

    retries: int = 6
    total_s: float = 60.0
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    max_retry_after_s: float = 60.0

    def delay(
        self,
        error: Exception,
        *,
        attempt: int,
        elapsed_s: float,
        retry_safe: bool,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """Seconds to wait before retrying after the ``attempt``-th failure (0 for the first),
        ``elapsed_s`` after the first attempt began; None: give up and raise ``error``."""
        if attempt >= self.retries:
            return None
        backoff = rand() * min(self.max_backoff_s, self.backoff_s * 2**attempt)
        if isinstance(error, RateLimited) or (
            isinstance(error, ApiError) and error.status in RETRY_STATUSES
        ):
            after = error.retry_after if isinstance(error, RateLimited) else error.retry_after_s
            if after is None:
                wait = backoff
            elif after > self.max_retry_after_s:
                return None
            else:
                # Jitter of up to a tenth of the wait (at most max_backoff_s) on top of it.
                wait = after + rand() * min(self.max_backoff_s, after / 10)
        elif isinstance(error, TransportError) and (retry_safe or not error.sent):
            wait = backoff
        else:
            return None
        return wait if elapsed_s + wait <= self.total_s else None


# --- the parts both clients share ------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    method: Literal["GET", "POST"]
    path: str
    body: Any = None
    query: list[tuple[str, str]] = field(default_factory=list)
    # A POST that may be repeated without doing its work twice (see ``retry_safe``).
    idempotent: bool = False

    @property
    def retry_safe(self) -> bool:
        """Whether the call may be sent again after a network error left its fate unknown."""
        return self.method == "GET" or self.idempotent


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class _Base:
    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
        retry_time_s: float | None = None,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        max_retry_after_s: float = 60.0,
        settings: ClientSettings | None = None,
    ) -> None:
        conf = settings or (ClientSettings() if base_url is None or token is None else None)
        self.base_url = (base_url or (conf.api_url if conf else "")).rstrip("/")
        if urllib.parse.urlsplit(self.base_url).scheme not in ("http", "https"):
            raise ValueError(f"the API URL must be http(s): {self.base_url!r}")
        secret = token or (conf.api_token.get_secret_value() if conf and conf.api_token else None)
        if not secret:
            raise ValueError("no API token: pass token= or set CANCELFLOW_CLIENT__TOKEN")
        self._token = secret
        defaults = conf or ClientSettings.model_construct()
        self.timeout_s = timeout_s or defaults.api_timeout_s
        self.retry = RetryPolicy(
            retries=retries if retries is not None else defaults.api_retries,
            total_s=retry_time_s if retry_time_s is not None else defaults.api_retry_time_s,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            max_retry_after_s=max_retry_after_s,
        )

    def _headers(self, call: _Call) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {self._token}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        if call.body is not None:
            headers["Content-Type"] = "application/json"
        return headers

    def _url(self, call: _Call) -> str:
        query = f"?{urllib.parse.urlencode(call.query)}" if call.query else ""
        return f"{self.base_url}{call.path}{query}"

    def _delay(self, call: _Call, error: Exception, attempt: int, started: float) -> float:
        """Seconds to wait before trying ``call`` again; raises the error to give up."""
        elapsed = time.monotonic() - started
        delay = self.retry.delay(
            error, attempt=attempt, elapsed_s=elapsed, retry_safe=call.retry_safe
        )
        if delay is not None:
            return delay
        note = f"from {self.base_url}, {attempt + 1} attempts over {elapsed:.1f}s"
        if isinstance(error, TransportError):
            raise TransportError(
                f"no answer from {self.base_url} ({attempt + 1} attempts over {elapsed:.1f}s): "
                f"{error}",
                sent=error.sent,
            ) from error
        if isinstance(error, ApiError) and (error.status >= 500 or error.status == 429):
            raise type(error)(
                error.status, error.problem, retry_after_s=error.retry_after_s, note=note
            ) from error
        raise error

    @staticmethod
    def _check(answer: _Answer) -> _Answer:
        if answer.status >= 400:
            raise error_for(answer.status, answer.body, answer.headers)
        return answer

    @staticmethod
    def _enqueue_call(
        provider: str | CancellationRequest,
        subscription: Mapping[str, Any] | None,
        *,
        reason: Reason | None,
        callback_url: str | None,
        idempotency_key: str | None,
        metadata: Mapping[str, Any] | None,
    ) -> _Call:
        if isinstance(provider, CancellationRequest):
            request = provider
        else:
            try:
                request = CancellationRequest.model_validate(
                    {
                        "provider": provider,
                        "subscription": dict(subscription or {}),
                        "reason": reason,
                        "callback_url": callback_url,
                        "idempotency_key": idempotency_key,
                        "metadata": dict(metadata or {}),
                    }
                )
            except ValidationError as exc:
                errors = [FieldError(**e) for e in field_errors(exc)]
                problem = Problem(
                    title="Invalid request (checked by the client)",
                    status=422,
                    detail="invalid fields: " + ", ".join(e.field for e in errors),
                    errors=errors,
                )
                raise ValidationFailed(422, problem) from None
        if request.idempotency_key is None:
            # The key that makes retrying this enqueue safe.
            request = request.model_copy(update={"idempotency_key": f"client:{uuid.uuid4().hex}"})
        return _Call(
            "POST",
            "/v1/cancellations",
            request.model_dump(mode="json", exclude_none=True),
            idempotent=True,  # the idempotency key: a repeat finds the first one's job
        )

    @staticmethod
    def _enqueued(answer: _Answer) -> Enqueued:
        how = answer.headers.get("cancelflow-enqueue", "created")
        return Enqueued(job=JobRecord.model_validate(answer.json()), how=how)

    @staticmethod
    def _list_call(
        provider: str | None,
        status: Status | str | Collection[Status | str] | None,
        created_after: datetime | None,
        created_before: datetime | None,
        limit: int,
        cursor: str | None,
    ) -> _Call:
        query: list[tuple[str, str]] = [("limit", str(limit))]
        if provider:
            query.append(("provider", provider))
        statuses = [status] if isinstance(status, str) else list(status or [])
        query += [("status", str(s)) for s in statuses]
        if created_after:
            query.append(("created_after", created_after.isoformat()))
        if created_before:
            query.append(("created_before", created_before.isoformat()))
        if cursor:
            query.append(("cursor", cursor))
        return _Call("GET", "/v1/cancellations", query=query)


def _lower(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers}


def _path(job_id: str) -> str:
    return f"/v1/cancellations/{urllib.parse.quote(job_id, safe='')}"


# --- blocking -------------------------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


class _SameOriginCredentials(urllib.request.HTTPRedirectHandler):
    """The standard library's redirects, minus the token on the way to another origin
    (urllib copies every header of the request to the redirected one, ``Authorization`` too).
    """

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(new.full_url) != _origin(req.full_url):
            for name in [k for k in new.headers if k.lower() in ("authorization", "cookie")]:
                new.remove_header(name)
        return new


_OPENER = urllib.request.build_opener(_SameOriginCredentials)


class CancelflowClient(_Base):
    """The blocking client (standard library HTTP); safe to share between threads."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release (one connection per request); here for symmetry."""

    def enqueue(
        self,
        provider: str | CancellationRequest,
        subscription: Mapping[str, Any] | None = None,
        *,
        reason: Reason | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Enqueued:
        """Queue a cancellation (or a whole ``CancellationRequest``); the job and whether it
        was ``created``, an ``existing`` one (same key) or ``joined`` (already in flight)."""
        call = self._enqueue_call(
            provider,
            subscription,
            reason=reason,
            callback_url=callback_url,
            idempotency_key=idempotency_key,
            metadata=metadata,
        )
        return self._enqueued(self._call(call))

    def get(self, job_id: str) -> JobRecord:
        """The job record; ``NotFound`` if there is none."""
        return JobRecord.model_validate(self._call(_Call("GET", _path(job_id))).json())

    def decide(
        self,
        job_id: str,
        decision: Literal["accept", "reject"],
        *,
        survey: Mapping[str, Any] | None = None,
    ) -> JobRecord:
        """Answer a retention offer; ``Conflict`` if the job is not awaiting a decision."""
        wanted = Decision(decision=decision, survey=dict(survey) if survey is not None else None)
        # A repeat whose first attempt went through gets 409, recognised below.
        call = _Call(
            "POST", f"{_path(job_id)}/decision", wanted.model_dump(mode="json"), idempotent=True
        )
        try:
            return JobRecord.model_validate(self._call(call).json())
        except Conflict:
            # A retried decision whose first attempt went through (its answer was lost).
            job = self.get(job_id)
            if job.decision is not None and job.decision.decision == decision:
                return job
            raise

    def wait(
        self,
        job_id: str,
        timeout: float = 60.0,
        *,
        until: Collection[Status] = FINAL_STATUSES,
        poll_s: float = 0.25,
    ) -> JobRecord:
        """Poll the job until its status is in ``until`` (final by default); ``WaitTimeout``."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.status in until:
                return job
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(job, timeout)
            time.sleep(min(poll_s, left))
            poll_s = min(poll_s * 1.5, 5.0)

    def list(
        self,
        *,
        provider: str | None = None,
        status: Status | str | Collection[Status | str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        """One page of jobs, newest first."""
        call = self._list_call(provider, status, created_after, created_before, limit, cursor)
        return JobPage.model_validate(self._call(call).json())

    def iter_jobs(self, **filters: Any) -> Iterator[JobSummary]:
        """Every job the filters match, page after page."""
        cursor = None
        while True:
            page = self.list(**filters, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def stats(self, *, since_s: float = 24 * 3600) -> Stats:
        """Counts of the jobs created in the last ``since_s`` seconds, by provider and status."""
        return Stats.model_validate(
            self._call(_Call("GET", "/v1/stats", query=[("since_s", str(since_s))])).json()
        )

    def _call(self, call: _Call) -> _Answer:
        attempt, started = 0, time.monotonic()
        while True:
            try:
                return self._check(self._send(call))
            except (TransportError, ApiError) as exc:
                delay = self._delay(call, exc, attempt, started)
            time.sleep(delay)
            attempt += 1

    def _send(self, call: _Call) -> _Answer:
        data = json.dumps(call.body).encode() if call.body is not None else None
        request = urllib.request.Request(  # noqa: S310 - http(s) is checked in __init__
            self._url(call), data=data, method=call.method, headers=self._headers(call)
        )
        try:
            with _OPENER.open(request, timeout=self.timeout_s) as resp:
                return _Answer(resp.status, _lower(resp.headers.items()), resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return _Answer(exc.code, _lower(exc.headers.items()), exc.read())
        except (urllib.error.URLError, HTTPException, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise TransportError(
                f"{call.method} {call.path}: {type(exc).__name__}: {exc}",
                sent=not isinstance(reason, ConnectionRefusedError),
            ) from exc


# --- asyncio --------------------------------------------------------------------------------


class AsyncCancelflowClient(_Base):
    """The asyncio client: one aiohttp session, opened on first use; close it with
    ``async with`` or ``await client.aclose()``."""

    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def enqueue(
        self,
        provider: str | CancellationRequest,
        subscription: Mapping[str, Any] | None = None,
        *,
        reason: Reason | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Enqueued:
        """As ``CancelflowClient.enqueue``."""
        call = self._enqueue_call(
            provider,
            subscription,
            reason=reason,
            callback_url=callback_url,
            idempotency_key=idempotency_key,
            metadata=metadata,
        )
        return self._enqueued(await self._call(call))

    async def get(self, job_id: str) -> JobRecord:
        """As ``CancelflowClient.get``."""
        return JobRecord.model_validate((await self._call(_Call("GET", _path(job_id)))).json())

    async def decide(
        self,
        job_id: str,
        decision: Literal["accept", "reject"],
        *,
        survey: Mapping[str, Any] | None = None,
    ) -> JobRecord:
        """As ``CancelflowClient.decide``."""
        wanted = Decision(decision=decision, survey=dict(survey) if survey is not None else None)
        # A repeat whose first attempt went through gets 409, recognised below.
        call = _Call(
            "POST", f"{_path(job_id)}/decision", wanted.model_dump(mode="json"), idempotent=True
        )
        try:
            return JobRecord.model_validate((await self._call(call)).json())
        except Conflict:
            job = await self.get(job_id)
            if job.decision is not None and job.decision.decision == decision:
                return job
            raise

    async def wait(
        self,
        job_id: str,
        timeout: float = 60.0,  # noqa: ASYNC109 - the blocking client's signature: a deadline to poll to
        *,
        until: Collection[Status] = FINAL_STATUSES,
        poll_s: float = 0.25,
    ) -> JobRecord:
        """As ``CancelflowClient.wait``."""
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if job.status in until:
                return job
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(job, timeout)
            await asyncio.sleep(min(poll_s, left))
            poll_s = min(poll_s * 1.5, 5.0)

    async def list(
        self,
        *,
        provider: str | None = None,
        status: Status | str | Collection[Status | str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        """As ``CancelflowClient.list``."""
        call = self._list_call(provider, status, created_after, created_before, limit, cursor)
        return JobPage.model_validate((await self._call(call)).json())

    async def iter_jobs(self, **filters: Any) -> AsyncIterator[JobSummary]:
        """As ``CancelflowClient.iter_jobs``."""
        cursor = None
        while True:
            page = await self.list(**filters, cursor=cursor)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def stats(self, *, since_s: float = 24 * 3600) -> Stats:
        """As ``CancelflowClient.stats``."""
        answer = await self._call(_Call("GET", "/v1/stats", query=[("since_s", str(since_s))]))
        return Stats.model_validate(answer.json())

    async def _call(self, call: _Call) -> _Answer:
        attempt, started = 0, time.monotonic()
        while True:
            try:
                return self._check(await self._send(call))
            except (TransportError, ApiError) as exc:
                delay = self._delay(call, exc, attempt, started)
            await asyncio.sleep(delay)
            attempt += 1

    async def _send(self, call: _Call) -> _Answer:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        data = json.dumps(call.body).encode() if call.body is not None else None
        try:
            async with self._session.request(
                call.method, self._url(call), data=data, headers=self._headers(call)
            ) as resp:
                return _Answer(resp.status, _lower(resp.headers.items()), await resp.read())
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransportError(
                f"{call.method} {call.path}: {type(exc).__name__}: {exc}",
                # No connection was made: the API never saw the request.
                sent=not isinstance(exc, aiohttp.ClientConnectorError),
            ) from exc
