"""What the blocking and the asyncio clients share: building each call, reading each answer,
deciding retries. No I/O here: ``_async/client.py`` (and the blocking client generated from it)
only send the calls built here and sleep."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import httpx
from pydantic import ValidationError

from cancelflow_client.errors import ApiError, TransportError, ValidationFailed, error_for
from cancelflow_client.models import (
    SUBSCRIPTION_REFS,
    CancellationRequest,
    DeadLetterKind,
    FieldError,
    JobRecord,
    OutcomeType,
    Problem,
    Reason,
    Status,
)
from cancelflow_client.retry import RetryPolicy
from cancelflow_client.settings import TOKEN_VARIABLE, ClientSettings

USER_AGENT = "cancelflow-client/1"
IDEMPOTENCY_KEY_PREFIX = "client:"

_REF_TITLES = frozenset(model.__name__ for model in SUBSCRIPTION_REFS.values())


@dataclass(frozen=True)
class Call:
    method: Literal["GET", "POST", "PATCH", "DELETE"]
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
class Reply:
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def job_path(job_id: str) -> str:
    return f"/v1/cancellations/{urllib.parse.quote(job_id, safe='')}"


def dead_letter_path(dl_id: str) -> str:
    return f"/v1/dead-letters/{urllib.parse.quote(dl_id, safe='')}"


def endpoint_path(endpoint_id: str) -> str:
    return f"/v1/webhook-endpoints/{urllib.parse.quote(endpoint_id, safe='')}"


def _many(value: str | Collection[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in (value or [])]


class Base:
    """The settings, the retry policy and every call's shape; the subclasses send them."""

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
        transport: Any = None,
    ) -> None:
        conf = settings or (
            ClientSettings.from_env() if base_url is None or token is None else ClientSettings()
        )
        self.base_url = (base_url or conf.api_url).rstrip("/")
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the API URL must be http(s)://host[:port]: {self.base_url!r}")
        secret = token or (conf.api_token.get_secret_value() if conf.api_token else None)
        if not secret:
            raise ValueError(f"no API token: pass token= or set {TOKEN_VARIABLE}")
        self._token = secret
        self.timeout_s = timeout_s or conf.api_timeout_s
        self.retry = RetryPolicy(
            retries=retries if retries is not None else conf.api_retries,
            total_s=retry_time_s if retry_time_s is not None else conf.api_retry_time_s,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            max_retry_after_s=max_retry_after_s,
        )
        # An httpx transport (tests, proxies); None: httpx's own.
        self._transport = transport

    def _client_options(self) -> dict[str, Any]:
        # httpx drops ``Authorization`` on a redirect to another origin by itself.
        return {
            "base_url": self.base_url,
            "timeout": httpx.Timeout(self.timeout_s),
            "follow_redirects": True,
            "headers": {
                "Authorization": f"Bearer {self._token}",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
            "transport": self._transport,
        }

    @staticmethod
    def _request_options(call: Call) -> dict[str, Any]:
        options: dict[str, Any] = {"params": call.query or None}
        if call.body is not None:
            options["content"] = json.dumps(call.body).encode()
            options["headers"] = {"Content-Type": "application/json"}
        return options

    def _transport_error(self, call: Call, exc: httpx.TransportError) -> TransportError:
        # No connection was made (refused, unresolvable, connect timeout): the API never saw it.
        sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
        return TransportError(
            f"{call.method} {self.base_url}{call.path}: {type(exc).__name__}: {exc}", sent=sent
        )

    def _delay(self, call: Call, error: Exception, attempt: int, started: float) -> float:
        """Seconds to wait before trying ``call`` again; raises the error to give up."""
        elapsed = time.monotonic() - started
        delay = self.retry.delay(
            error, attempt=attempt, elapsed_s=elapsed, retry_safe=call.retry_safe
        )
        if delay is not None:
            return delay
        if isinstance(error, TransportError):
            raise TransportError(
                f"no answer from {self.base_url} ({attempt + 1} attempts over {elapsed:.1f}s): "
                f"{error}",
                sent=error.sent,
            ) from error
        if isinstance(error, ApiError) and (error.status >= 500 or error.status == 429):
            note = f"from {self.base_url}, {attempt + 1} attempts over {elapsed:.1f}s"
            raise type(error)(
                error.status, error.problem, retry_after_s=error.retry_after_s, note=note
            ) from error
        raise error

    @staticmethod
    def _reply(response: httpx.Response) -> Reply:
        reply = Reply(
            response.status_code,
            {k.lower(): v for k, v in response.headers.items()},
            response.content,
        )
        if reply.status >= 400:
            raise error_for(reply.status, reply.body, reply.headers)
        return reply

    # --- the calls ---------------------------------------------------------------------------

    @staticmethod
    def _enqueue_call(
        provider: str | CancellationRequest,
        subscription: Mapping[str, Any] | None,
        *,
        reason: Reason | None,
        callback_url: str | None,
        idempotency_key: str | None,
        metadata: Mapping[str, Any] | None,
    ) -> Call:
        try:
            if isinstance(provider, CancellationRequest):
                request = provider
            else:
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
            ref = SUBSCRIPTION_REFS.get(request.provider)
            if ref is not None:
                ref.model_validate(request.subscription)
        except ValidationError as exc:
            # A subscription checked against its provider's reference: its fields' paths
            # start at ``subscription``, as the API names them.
            prefix = ("subscription",) if exc.title in _REF_TITLES else ()
            errors = [
                FieldError(
                    field=".".join(map(str, (*prefix, *e["loc"]))) or "(body)", message=e["msg"]
                )
                for e in exc.errors(include_url=False)
            ]
            problem = Problem(
                title="Invalid request (checked by the client)",
                status=422,
                detail="invalid fields: " + ", ".join(e.field for e in errors),
                errors=errors,
            )
            raise ValidationFailed(422, problem) from None
        if request.idempotency_key is None:
            # The key that makes retrying this enqueue safe.
            key = f"{IDEMPOTENCY_KEY_PREFIX}{uuid.uuid4().hex}"
            request = request.model_copy(update={"idempotency_key": key})
        return Call(
            "POST",
            "/v1/cancellations",
            request.model_dump(mode="json", exclude_none=True),
            idempotent=True,  # the idempotency key: a repeat finds the first one's job
        )

    @staticmethod
    def _list_call(
        *,
        provider: str | None,
        status: Status | str | Collection[Status | str] | None,
        outcome: OutcomeType | str | Collection[OutcomeType | str] | None,
        reference: str | None,
        idempotency_key: str | None,
        metadata: Mapping[str, str] | None,
        created_after: datetime | None,
        created_before: datetime | None,
        limit: int,
        cursor: str | None,
    ) -> Call:
        query: list[tuple[str, str]] = [("limit", str(limit))]
        if provider:
            query.append(("provider", provider))
        query += [("status", s) for s in _many(status)]
        query += [("outcome", o) for o in _many(outcome)]
        if reference:
            query.append(("reference", reference))
        if idempotency_key:
            query.append(("idempotency_key", idempotency_key))
        query += [("metadata", f"{k}={v}") for k, v in (metadata or {}).items()]
        if created_after:
            query.append(("created_after", created_after.isoformat()))
        if created_before:
            query.append(("created_before", created_before.isoformat()))
        if cursor:
            query.append(("cursor", cursor))
        return Call("GET", "/v1/cancellations", query=query)

    @staticmethod
    def _decide_call(
        job_id: str, decision: Literal["accept", "reject"], survey: Mapping[str, Any] | None
    ) -> Call:
        body = {"decision": decision, **({"survey": dict(survey)} if survey is not None else {})}
        # A repeat whose first attempt went through gets 409, which ``decide`` recognises.
        return Call("POST", f"{job_path(job_id)}/decision", body, idempotent=True)

    @staticmethod
    def _decided(job: JobRecord, decision: str) -> bool:
        return job.decision is not None and job.decision.decision == decision

    @staticmethod
    def _dead_letters_call(
        *,
        provider: str | None,
        kind: DeadLetterKind | None,
        error_type: str | None,
        older_than: datetime | None,
        newer_than: datetime | None,
        limit: int,
    ) -> Call:
        query = [("limit", str(limit))]
        for name, value in (
            ("provider", provider),
            ("kind", kind),
            ("error_type", error_type),
            ("older_than", older_than.isoformat() if older_than else None),
            ("newer_than", newer_than.isoformat() if newer_than else None),
        ):
            if value:
                query.append((name, value))
        return Call("GET", "/v1/dead-letters", query=query)


async def async_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def sync_sleep(seconds: float) -> None:
    time.sleep(seconds)


def monotonic() -> float:
    return time.monotonic()
