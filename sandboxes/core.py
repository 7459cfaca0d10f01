"""What every provider sandbox shares: bookkeeping, the provider error type, call counting,
and the registry entry (``SandboxSpec``) each sandbox module declares."""

from __future__ import annotations

import abc
import itertools
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sandboxes.faults import FaultInjector, FaultSettings, is_control_request
from sandboxes.tokens import DEFAULT_TOKEN_TTL_S, Clock, TokenStore

# The most recent provider calls' traceparents a sandbox keeps.
MAX_TRACEPARENTS = 10_000


class ProviderError(Exception):
    """An error answer in the provider's own body shape.

    Handlers raise it; the sandbox's `render_error` turns it into the provider's JSON (or XML).
    `details` carries provider-specific extras such as the offending `field`.
    """

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class Sandbox(abc.ABC):
    """In-memory state of one provider: its records, tokens, faults and what clients did to it.

    Subclasses hold the provider's records, load the demo data and render errors in the
    provider's shape; this base keeps the counters the state endpoint reports.
    """

    key: ClassVar[str]
    # Outcome kinds `POST /{key}/_sandbox/subscriptions` can generate in bulk.
    bulk_kinds: ClassVar[tuple[str, ...]]
    # Names of the routes whose call cancels (the faults' `lost_answer_rate` applies to them).
    cancel_routes: ClassVar[frozenset[str]]

    def __init__(
        self,
        *,
        faults: FaultSettings | None = None,
        token_ttl_s: int | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.clock = clock
        self.faults = FaultInjector(faults)
        ttl_s = DEFAULT_TOKEN_TTL_S if token_ttl_s is None else token_ttl_s
        self.tokens = TokenStore(ttl_s=ttl_s, clock=clock)
        self.calls: Counter[str] = Counter()
        # The W3C traceparent of each recent provider call (None: it came without one),
        # oldest first: ``GET _sandbox/traceparents``.
        self.traceparents: deque[str | None] = deque(maxlen=MAX_TRACEPARENTS)
        self.effective_cancels: Counter[str] = Counter()
        self._serials = itertools.count(1)
        self.load_demo()

    def reset(self) -> None:
        """Back to the demo data with every counter zeroed; faults and tokens stay as they are."""
        self.calls.clear()
        self.traceparents.clear()
        self.effective_cancels.clear()
        self.faults.reset()
        self._serials = itertools.count(1)
        self.load_demo()

    def next_serial(self) -> int:
        """A number unique since the last reset, to build ids of generated records."""
        return next(self._serials)

    def record_effective_cancel(self, reference: str) -> None:
        """Note that `reference` really changed state to cancelled (must happen once per ref)."""
        self.effective_cancels[reference] += 1

    def state(self) -> dict[str, Any]:
        """JSON-ready snapshot for `GET /{key}/_sandbox/state`."""
        return {
            "provider": self.key,
            "calls": dict(self.calls),
            "faults_injected": self.faults.injected_by_kind(),
            "effective_cancels": dict(self.effective_cancels),
            **self.extra_state(),
        }

    def create_bulk(self, kind: str, count: int) -> list[Any]:
        """Create `count` records of outcome `kind`; returns their JSON-ready references."""
        return [self.create_reference(kind) for _ in range(count)]

    @abc.abstractmethod
    def load_demo(self) -> None:
        """Replace every record with the demo data."""

    @abc.abstractmethod
    def extra_state(self) -> dict[str, Any]:
        """Provider-specific parts of the state snapshot (credit invoices, pending ends...)."""

    @abc.abstractmethod
    def create_reference(self, kind: str) -> Any:
        """Create one record of outcome `kind` (one of `bulk_kinds`); its JSON-ready reference."""

    @abc.abstractmethod
    def render_error(self, error: ProviderError) -> web.Response:
        """The provider's own error response for `error`."""

    def render_fault(self, status: int, code: str, message: str) -> web.Response:
        """Error renderer handed to the fault middleware."""
        return self.render_error(ProviderError(status, code, message))


def call_counter(sandbox: Sandbox) -> Middleware:
    """Middleware counting provider calls by route name, faulted ones included, and keeping
    the ``traceparent`` each came with."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not is_control_request(request):
            route = request.match_info.route
            sandbox.calls[route.name or f"{request.method} {request.path}"] += 1
            sandbox.traceparents.append(request.headers.get("traceparent"))
        return await handler(request)

    return middleware


def provider_errors(sandbox: Sandbox) -> Middleware:
    """Middleware rendering a raised ProviderError in the provider's shape."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProviderError as error:
            return sandbox.render_error(error)

    return middleware


class ProviderAppFactory(Protocol):
    """Builds one provider's sub-application."""

    def __call__(
        self, *, faults: FaultSettings | None = None, token_ttl_s: int | None = None
    ) -> web.Application: ...


@dataclass(frozen=True)
class SandboxSpec:
    """A sandbox registry entry (``sandboxes.server.SANDBOXES``): what the server, the demo
    settings, the demo, the benchmark and the tests need to know of one provider's sandbox.

    Its ``key`` is the provider's key in ``cancelflow.providers.REGISTRY``.
    """

    key: str
    create_app: ProviderAppFactory
    # The provider's demo settings (its ProviderSettings field names, lower case) for a
    # sandbox mounted at ``mount_url`` (``http://HOST:PORT/{key}``): base URL and credentials.
    settings: Callable[[str], dict[str, str]]
    # Bulk kinds (``POST /{key}/_sandbox/subscriptions``) whose job succeeds without waiting
    # on a customer: the chaos run's mix. The first is a plain eligibility -> confirm that
    # ends ``cancelled``: the benchmark's.
    succeeding_kinds: tuple[str, ...]
    # A bulk reference as the ``subscription`` of a cancellation request.
    subscription: Callable[[Any], dict[str, Any]]
