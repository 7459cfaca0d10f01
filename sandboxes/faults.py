"""Fault injection for the provider sandboxes: latency, errors, rate limits, hangs, fail-once,
lost answers.

Faults apply to provider routes only; the control routes under `/{key}/_sandbox/` are never
faulted, so a test can always read state or change the faults of a misbehaving sandbox.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import random
from collections import Counter
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Every sandbox mounts its control routes under this path segment (see control.py).
CONTROL_SEGMENT = "/_sandbox/"

# Renders an error in a provider's own body shape: (HTTP status, error code, message).
ErrorRenderer = Callable[[int, str, str], web.Response]


class FaultSettings(BaseModel):
    """How a sandbox misbehaves. Shares are probabilities in [0, 1] drawn per provider call."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latency_ms: float = Field(default=0, ge=0)
    error_rate: float = Field(default=0, ge=0, le=1)
    rate_limit_rate: float = Field(default=0, ge=0, le=1)
    retry_after_s: int = Field(default=1, ge=0)
    hang_rate: float = Field(default=0, ge=0, le=1)
    hang_s: float = Field(default=30, ge=0)
    fail_once_rate: float = Field(default=0, ge=0, le=1)
    # The share of cancel calls (each sandbox's `cancel_routes`) that take effect and whose
    # answer is then lost: the client gets a proxy's 502 Bad Gateway at once. (`hang_rate` with
    # `hang_s` past the client's timeout is the other way to lose an answer, on every call.)
    lost_answer_rate: float = Field(default=0, ge=0, le=1)
    seed: int | None = None

    @model_validator(mode="after")
    def _exclusive_shares_fit(self) -> FaultSettings:
        # error, rate limit, hang and lost answer share one draw per call (see
        # FaultInjector.draw), so that each rate is the real share of calls it affects (of
        # cancel calls, for a lost answer): together they cannot exceed 1.
        shares = self.error_rate + self.rate_limit_rate + self.hang_rate + self.lost_answer_rate
        if shares > 1:
            raise ValueError(
                "error_rate + rate_limit_rate + hang_rate + lost_answer_rate must not exceed 1"
            )
        return self


class Fault(enum.Enum):
    """A kind of injected fault; the value names it in the state endpoint."""

    LATENCY = "latency"
    ERROR = "error"
    RATE_LIMIT = "rate_limit"
    HANG = "hang"
    FAIL_ONCE = "fail_once"
    LOST_ANSWER = "lost_answer"


class FaultInjector:
    """Decides, with one seeded `random.Random`, which fault (if any) each provider call gets."""

    def __init__(self, settings: FaultSettings | None = None) -> None:
        self.settings = settings or FaultSettings()
        self._rng = random.Random(self.settings.seed)
        self._seen: set[bytes] = set()
        self.injected: Counter[Fault] = Counter()

    def replace(self, settings: FaultSettings) -> None:
        """Switch to new settings: a new experiment, so fail-once memory starts empty."""
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        """Zero the counters and forget seen requests; re-seed so a reset run replays the same."""
        self.injected.clear()
        self._seen.clear()
        if self.settings.seed is not None:
            self._rng.seed(self.settings.seed)

    def injected_by_kind(self) -> dict[str, int]:
        """Faults injected so far, by kind, every kind listed (JSON-ready)."""
        return {fault.value: self.injected[fault] for fault in Fault}

    def draw(
        self, method: str, path_qs: str, body: bytes, *, cancels: bool = False
    ) -> Fault | None:
        """The fault for one call (``cancels``: a call that cancels), or None. Counts what it
        returns."""
        fault = self._draw_fail_once(method, path_qs, body) or self._draw_exclusive(cancels)
        if fault is not None:
            self.injected[fault] += 1
        return fault

    def _draw_fail_once(self, method: str, path_qs: str, body: bytes) -> Fault | None:
        s = self.settings
        if not s.fail_once_rate:
            return None
        # The key leaves out headers on purpose: a retry carries a new OAuth nonce or a fresh
        # token but is still "the same request" for a benchmark of calls failing once.
        key = hashlib.sha256(b"\0".join([method.encode(), path_qs.encode(), body])).digest()
        if key in self._seen:
            return None
        self._seen.add(key)
        return Fault.FAIL_ONCE if self._rng.random() < s.fail_once_rate else None

    def _draw_exclusive(self, cancels: bool) -> Fault | None:
        s = self.settings
        if not (s.error_rate or s.rate_limit_rate or s.hang_rate or s.lost_answer_rate):
            return None
        u = self._rng.random()
        for fault, rate in (
            (Fault.RATE_LIMIT, s.rate_limit_rate),
            (Fault.ERROR, s.error_rate),
            (Fault.HANG, s.hang_rate),
            (Fault.LOST_ANSWER, s.lost_answer_rate),
        ):
            if u < rate:
                # A call that cancels nothing has no answer worth losing: it goes through.
                return None if fault is Fault.LOST_ANSWER and not cancels else fault
            u -= rate
        return None


def is_control_request(request: web.Request) -> bool:
    """True for the sandbox's own control routes, which are never faulted nor counted."""
    # The matched route's template, not the path: an id of "_sandbox" in a provider URL must
    # not exempt that call.
    resource = request.match_info.route.resource
    return resource is not None and CONTROL_SEGMENT in resource.canonical


def fault_middleware(
    injector: FaultInjector,
    render_error: ErrorRenderer,
    cancel_routes: frozenset[str] = frozenset(),
) -> Middleware:
    """Middleware applying `injector`'s faults to a provider sub-application's routes;
    `cancel_routes` names the routes that cancel (the only ones that can lose an answer)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_control_request(request):
            return await handler(request)
        settings = injector.settings
        if settings.latency_ms:
            injector.injected[Fault.LATENCY] += 1
            await asyncio.sleep(settings.latency_ms / 1000)
        # read() caches the body, so the handler can still read it.
        cancels = request.match_info.route.name in cancel_routes
        fault = injector.draw(
            request.method, request.path_qs, await request.read(), cancels=cancels
        )
        if fault is Fault.HANG:
            # Like a real provider that is slow, not dead, the call still goes through after the
            # client gave up: the side effect a retry must not repeat. Shielded, so that a server
            # cancelling handlers on disconnect (aiohttp's TestServer does) behaves the same.
            return await asyncio.shield(_after(settings.hang_s, handler, request))
        if fault is Fault.LOST_ANSWER:
            # The provider acts (or refuses, as it would) and its answer is lost on the way
            # back: a proxy in front of it answers 502. Shielded like a hang, so the effect
            # happens whatever the client does.
            await asyncio.shield(handler(request))
            return web.Response(status=502, text=BAD_GATEWAY, content_type="text/html")
        if fault is Fault.RATE_LIMIT:
            response = render_error(429, "rate_limited", "Too many requests, slow down")
            response.headers["Retry-After"] = str(settings.retry_after_s)
            return response
        if fault in (Fault.ERROR, Fault.FAIL_ONCE):
            return render_error(503, "service_unavailable", "Service temporarily unavailable")
        return await handler(request)

    return middleware


# What a reverse proxy (nginx) answers when the upstream's answer did not reach it.
BAD_GATEWAY = "<html><head><title>502 Bad Gateway</title></head><body>502 Bad Gateway</body></html>"


async def _after(delay_s: float, handler: Handler, request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(delay_s)
    return await handler(request)
