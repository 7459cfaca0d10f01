"""Protects providers from us: a rate limit, an in-flight limit and a circuit breaker per
provider, held in Redis so every worker process shares them (Celery's ``rate_limit`` is per
worker). Every provider call passes ``ProviderHttp``, which asks the guard first.

Breaker: after ``breaker_failures`` consecutive transient failures (connection, timeout, 5xx)
the provider is not called for ``breaker_cooldown_s``; its jobs wait (they are re-sent after
the cool-down, no attempt spent) instead of failing. After the cool-down calls resume
("half-open"): one more failure opens it again at once, one success closes it.

With no rate or in-flight limit (the default), admitting a call only reads the breaker; a
process reuses a read that found it closed and clean for ``breaker_read_s`` (0.5 s), so most
calls cost no round trip. A breaker another process opened is then seen up to that late, and
that process's failures may not be reset by this one's successes for as long; this process's
own failures update its view at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal, cast

from redis.asyncio import Redis

from cancelflow.errors import CircuitOpen, ProviderRateLimited, ProviderTimeout, ProviderUnavailable
from cancelflow.logging import get_logger

log = get_logger(__name__)

Result = Literal["success", "failure", "neutral"]

_ADMIT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until > now_ms then return {'open', open_until - now_ms, 0} end
local rate = tonumber(ARGV[1])
if rate > 0 then
  local key = KEYS[2] .. ':' .. t[1]
  local n = tonumber(redis.call('GET', key) or '0')
  if n >= rate then return {'rate', 1000 - math.floor(tonumber(t[2]) / 1000), 0} end
  redis.call('INCR', key)
  redis.call('EXPIRE', key, 2)
end
local cap = tonumber(ARGV[2])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[3]) >= cap then return {'busy', 25, 0} end
  redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[3]), ARGV[4])
end
return {'ok', tonumber(t[1]), tonumber(redis.call('HGET', KEYS[1], 'failures') or '0')}
"""

_RELEASE = """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[2], ARGV[1]) end
if ARGV[2] == 'failure' then
  local f = redis.call('HINCRBY', KEYS[1], 'failures', 1)
  if f >= tonumber(ARGV[3]) then
    local t = redis.call('TIME')
    local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    -- Half-open after the cool-down: one more failure re-opens at once.
    redis.call('HSET', KEYS[1], 'open_until', now_ms + tonumber(ARGV[4]),
               'failures', tonumber(ARGV[3]) - 1)
    redis.call('HINCRBY', KEYS[1], 'opened', 1)
    return 'opened'
  end
elseif ARGV[2] == 'success' then
  redis.call('HSET', KEYS[1], 'failures', 0)
end
return 'ok'
"""


class ProviderThrottled(ProviderRateLimited):
    """Our own limit for the provider kept the call waiting too long; try again later."""


@dataclass(frozen=True)
class Admission:
    token: str
    failures: int
    second: int = 0  # the Redis clock's second the call was admitted in


@dataclass(frozen=True)
class GuardLimits:
    calls_per_second: float | None
    max_in_flight: int | None
    breaker_failures: int
    breaker_cooldown_s: float
    lease_s: float  # an in-flight slot of a dead process frees itself after this
    max_wait_s: float = 30.0
    breaker_read_s: float = 0.5  # how long a read finding the breaker closed and clean holds


def breaker_key(provider: str) -> str:
    """The provider's circuit breaker (hash: open_until, failures, opened)."""
    return f"cf:cb:{provider}"


def rate_key(provider: str) -> str:
    """The provider's calls in the current second (the rate limit)."""
    return f"cf:rl:{provider}"


def in_flight_key(provider: str) -> str:
    """The provider's calls in flight (sorted set scored by when each slot's lease ends)."""
    return f"cf:if:{provider}"


class ProviderGuard:
    def __init__(self, redis: Redis, provider: str, limits: GuardLimits) -> None:
        self.provider = provider
        self._limits = limits
        self._keys = [breaker_key(provider), rate_key(provider), in_flight_key(provider)]
        self._admit = redis.register_script(_ADMIT)
        self._release = redis.register_script(_RELEASE)
        self._redis = redis
        # Until when (monotonic) the last read's "closed, no failures" holds: see the module.
        self._clean_until = 0.0
        # Failures this process fed the breaker, and how many of them a success of its own
        # has reset since: a success admitted on a clean read still resets the count when
        # a failure of this process came after that read (see ``release``).
        self._failed = 0
        self._reset_upto = 0

    async def admit(self) -> Admission:
        """Wait for a slot under the limits; ``CircuitOpen`` while the breaker is open."""
        lim = self._limits
        breaker_only = not lim.calls_per_second and not lim.max_in_flight
        if breaker_only and time.monotonic() < self._clean_until:
            return Admission("", 0)
        token = uuid.uuid4().hex if lim.max_in_flight else ""
        deadline = time.monotonic() + lim.max_wait_s
        while True:
            verdict, value, failures = await self._admit(
                keys=self._keys,
                args=[
                    int(lim.calls_per_second or 0),
                    lim.max_in_flight or 0,
                    int(lim.lease_s * 1000),
                    token,
                ],
            )
            verdict = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
            if verdict == "ok":
                if breaker_only and int(failures) == 0:
                    self._clean_until = time.monotonic() + lim.breaker_read_s
                return Admission(token, int(failures), int(value))
            wait_ms = int(value)
            if verdict == "open":
                raise CircuitOpen(
                    f"circuit open for {self.provider}",
                    provider=self.provider,
                    retry_after=int(wait_ms) / 1000,
                )
            if time.monotonic() + int(wait_ms) / 1000 > deadline:
                raise ProviderThrottled(
                    f"waited {lim.max_wait_s:g}s for a slot under {self.provider}'s limits",
                    provider=self.provider,
                    retry_after=1.0,
                )
            await asyncio.sleep(int(wait_ms) / 1000)

    async def release(self, admission: Admission, result: Result) -> None:
        """Free the in-flight slot and feed the breaker (no round trip when nothing changes).

        A success resets the count of consecutive failures when its admission read some,
        or when this process failed a call since it last reset: the calls admitted on one
        clean read (a burst of steps, up to the concurrency) end in any order, and their
        successes must break a run of their failures, or a provider failing one call in
        five would open its breaker (measured: ``make bench``'s fail_once_20 with two
        worker processes, jobs stalled the 30 s cool-down over and over)."""
        if not admission.token and (
            result == "neutral"
            or (
                result == "success" and admission.failures == 0 and self._reset_upto == self._failed
            )
        ):
            return
        if result == "failure":
            self._failed += 1
        elif result == "success":
            self._reset_upto = self._failed
        self._clean_until = 0.0  # the breaker changes: the next admission reads it
        outcome = await self._release(
            keys=[self._keys[0], self._keys[2]],
            args=[
                admission.token,
                result,
                self._limits.breaker_failures,
                int(self._limits.breaker_cooldown_s * 1000),
            ],
        )
        if (outcome.decode() if isinstance(outcome, bytes) else outcome) == "opened":
            log.error(
                "provider.circuit.opened",
                provider=self.provider,
                cooldown_s=self._limits.breaker_cooldown_s,
            )


def classify(error: BaseException | None) -> Result:
    """How a call's result counts for the breaker: only signs of a provider down count."""
    if error is None:
        return "success"
    if isinstance(error, ProviderTimeout | ProviderUnavailable):
        return "failure"
    return "neutral"


async def breaker_state(redis: Redis, provider: str) -> dict[str, Any]:
    """The breaker and limits as an operator sees them (``GET /v1/providers``)."""
    # redis-py types each command for the sync and the async client at once.
    raw = await cast("Awaitable[dict[Any, Any]]", redis.hgetall(breaker_key(provider)))
    h = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    open_until = int(h.get("open_until", 0)) / 1000
    now = time.time()
    return {
        "circuit": (
            "open"
            if open_until > now
            else ("half_open" if h.get("opened") and int(h.get("failures", 0)) > 0 else "closed")
        ),
        "open_for_s": round(max(0.0, open_until - now), 3),
        "consecutive_failures": int(h.get("failures", 0)),
        "times_opened": int(h.get("opened", 0)),
        "in_flight": int(await redis.zcount(in_flight_key(provider), now * 1000, "+inf")),
    }
