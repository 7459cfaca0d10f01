"""The one door to every provider: timeouts, logging with latency, typed errors.

Modelled on Sentry's ``BaseApiClient``: adapters never touch aiohttp directly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from cancelflow import tracing
from cancelflow.errors import (
    LeaseLost,
    ProviderAuthError,
    ProviderError,
    ProviderProtocolError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from cancelflow.guard import ProviderGuard, classify
from cancelflow.logging import get_logger

log = get_logger(__name__)

# The most of a provider's answer read into memory: an answer is a small JSON (or XML)
# document; a larger one is a ProviderProtocolError, raised as soon as the limit is passed
# (a declared Content-Length above it is refused before any of the body is read).
MAX_PROVIDER_BODY = 1024 * 1024

# An observer gets (provider, HTTP method, status or error kind, seconds); metrics plug in
# here. Paths are left out: they carry subscription ids, one label value per subscription.
CallObserver = Callable[[str, str, str, float], None]


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self, provider: str) -> Any:
        """The body as JSON whatever JSON-ish content type it came with; a typed error if not."""
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise ProviderProtocolError(
                f"provider answered {self.status} with a body that is not JSON",
                provider=provider,
                status=self.status,
                body=self.text[:500],
            ) from exc


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class ProviderHttp:
    """Makes one provider's HTTP calls on a shared aiohttp session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        provider: str,
        base_url: str,
        timeout_s: float,
        observer: CallObserver | None = None,
        guard: ProviderGuard | None = None,
        may_send: Callable[[], bool] | None = None,
        max_body_bytes: int = MAX_PROVIDER_BODY,
    ) -> None:
        self._guard = guard
        self._max_body = max_body_bytes
        # False while this process's heartbeat is stale (worker.leases): no request may
        # start then, or it could overlap the one of a process that took the step over.
        self._may_send = may_send
        self._session = session
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._observer = observer

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        """Send one request. Answers below 500 (but 429) are returned for the adapter to read;
        timeouts, connection failures, 5xx and 429 are raised as retryable errors, with
        ``may_have_acted`` set unless the request is known not to have reached the provider
        (refused before sending, 429). The provider's guard (shared limits, circuit breaker)
        admits the call first."""
        if self._may_send is not None and not self._may_send():
            raise LeaseLost(f"{self.provider}: this worker's heartbeat is stale; not sending")
        if self._guard is None:
            return await self._send(
                method, path, params=params, json_body=json_body, data=data, headers=headers
            )
        admission = await self._guard.admit()
        error: BaseException | None = None
        try:
            return await self._send(
                method, path, params=params, json_body=json_body, data=data, headers=headers
            )
        except BaseException as exc:
            error = exc
            raise
        finally:
            await self._guard.release(admission, classify(error))

    async def request_with_token(
        self,
        tokens: TokenCache,
        fetch: Callable[[], Any],
        method: str,
        path: str,
        **kwargs: Any,
    ) -> HttpResponse:
        """A bearer-token call: a 401 drops the cached token, fetches a new one and tries once
        more. A second 401 is returned for the adapter to raise as its ``ProviderAuthError``."""
        for attempt in (1, 2):
            token = await tokens.get(fetch)
            headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
            response = await self.request(method, path, headers=headers, **kwargs)
            if response.status != 401:
                return response
            tokens.invalidate(token)
            if attempt == 2:
                return response
        raise AssertionError("unreachable")

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None,
        json_body: Any,
        data: Any,
        headers: Mapping[str, str] | None,
    ) -> HttpResponse:
        if not tracing.enabled:
            return await self._exchange(
                method, path, params=params, json_body=json_body, data=data, headers=headers
            )
        # A client span per request, its traceparent sent to the provider (docs/tracing.md).
        url = urlsplit(self.url(path))
        attributes = {
            "http.request.method": method,
            "server.address": url.hostname,
            "server.port": url.port,
            # Without the query: it may carry a key.
            "url.full": urlunsplit((url.scheme, url.netloc, url.path, "", "")),
            tracing.PROVIDER: self.provider,
        }
        with tracing.span(f"{method} {self.provider}", kind="client", attributes=attributes):
            sent = dict(headers or {})
            tracing.inject(sent)
            try:
                response = await self._exchange(
                    method, path, params=params, json_body=json_body, data=data, headers=sent
                )
            except ProviderError as exc:
                tracing.record_http(status=exc.status, error=exc)
                raise
            tracing.record_http(status=response.status)
            return response

    async def _exchange(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None,
        json_body: Any,
        data: Any,
        headers: Mapping[str, str] | None,
    ) -> HttpResponse:
        url = self.url(path)
        started = time.perf_counter()
        name = method
        try:
            async with self._session.request(
                method,
                url,
                params=params,
                json=json_body,
                data=data,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                body = await _read_at_most(resp, self._max_body)
                if body is None:
                    self._observe(name, "body_too_large", started)
                    raise ProviderProtocolError(
                        f"provider answered {resp.status} with a body larger than "
                        f"{self._max_body} bytes",
                        provider=self.provider,
                        status=resp.status,
                        may_have_acted=True,
                    )
                response = HttpResponse(resp.status, dict(resp.headers), body)
        except TimeoutError as exc:
            self._observe(name, "timeout", started)
            raise ProviderTimeout(
                f"no answer within {self._timeout.total}s",
                provider=self.provider,
                may_have_acted=not _before_sending(exc),
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            self._observe(name, "connection_error", started)
            raise ProviderUnavailable(
                f"connection failed: {type(exc).__name__}: {exc}",
                provider=self.provider,
                may_have_acted=not _before_sending(exc),
            ) from exc
        latency = self._observe(name, str(response.status), started)
        log.info(
            "provider.http_response",
            method=method,
            path=path.split("?")[0],
            status=response.status,
            latency_ms=round(latency * 1000, 1),
        )
        if response.status == 429:
            raise ProviderRateLimited(
                "rate limited",
                provider=self.provider,
                status=429,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
                body=response.text[:500],
            )
        if response.status >= 500:
            # A 5xx may come from a proxy after the provider acted (a 502 or 504 with the
            # provider's answer lost), or from the provider failing half-way.
            raise ProviderUnavailable(
                f"provider answered {response.status}",
                provider=self.provider,
                status=response.status,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
                body=response.text[:500],
                may_have_acted=True,
            )
        return response

    def _observe(self, name: str, result: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        if self._observer is not None:
            self._observer(self.provider, name, result, elapsed)
        return elapsed

    def error(
        self,
        response: HttpResponse,
        *,
        message: str | None = None,
        code: str | None = None,
        field: str | None = None,
        cls: type[ProviderError] | None = None,
    ) -> ProviderError:
        """A typed error for a 4xx the adapter does not map to an outcome."""
        if cls is None:
            cls = ProviderAuthError if response.status in (401, 403) else ProviderRejected
        return cls(
            message or f"provider answered {response.status}",
            provider=self.provider,
            status=response.status,
            code=code,
            field=field,
            body=response.text[:500],
        )


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body if it is at most ``limit`` bytes, else None, having read at most limit + 1
    (the connection is closed rather than drained: aiohttp then discards the rest)."""
    if resp.content_length is not None and resp.content_length > limit:
        resp.close()
        return None
    chunks: list[bytes] = []
    size = 0
    while chunk := await resp.content.read(min(64 * 1024, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            resp.close()
            return None
    return b"".join(chunks)


# Failures that happen before a byte of the request is sent: connecting (refused, DNS, TLS,
# the connect timeout). Anything later (a reset, a disconnect, a read timeout) may have
# reached the provider.
_BEFORE_SENDING = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def _before_sending(exc: BaseException) -> bool:
    """Whether a failed request is known not to have reached the provider."""
    return isinstance(exc, _BEFORE_SENDING)


def read_token(response: HttpResponse, provider: str) -> tuple[str, float]:
    """``(access_token, expires_in)`` from an OAuth-style token answer; a typed error if absent."""
    body = response.json(provider)
    try:
        return str(body["access_token"]), float(body["expires_in"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProviderProtocolError(
            "token response lacks access_token or expires_in", provider=provider
        ) from exc


class TokenCache:
    """One bearer token per provider and process: fetched once, reused until it expires."""

    def __init__(self, *, margin_s: float = 30.0) -> None:
        self._token: str | None = None
        self._expires_at = 0.0
        self._margin = margin_s
        self._lock = asyncio.Lock()

    async def get(self, fetch: Callable[[], Any]) -> str:
        """The cached token, or a new one from ``fetch`` (returning ``(token, expires_in)``)."""
        if self._token is not None and time.monotonic() < self._expires_at:
            return self._token
        async with self._lock:
            if self._token is not None and time.monotonic() < self._expires_at:
                return self._token
            token: str
            token, expires_in = await fetch()
            # Refresh a little early so a token never expires between check and use.
            self._expires_at = time.monotonic() + max(0.0, float(expires_in) - self._margin)
            self._token = token
            return token

    def invalidate(self, token: str | None = None) -> None:
        """Drop the cached token (after a 401), unless another call already replaced it."""
        if token is None or token == self._token:
            self._token = None
            self._expires_at = 0.0
