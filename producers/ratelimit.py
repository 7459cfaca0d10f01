"""Request limits, held in Redis so every API process shares them: per token, for signed
billing events, and for failed authentication per client address.

GCRA (the generic cell rate algorithm): one key per token holding the "theoretical arrival
time" of the next request, so the limit is smooth (``rate`` per second) with a burst allowance,
costs one round trip, and needs no clean-up. Redis's clock is used, not each API process's.

A token route asks two buckets (the client address's failed authentications, then the
token's rate): ``Gate`` asks both in one script, one round trip per request.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, cast, get_args

from redis.asyncio import Redis

PREFIX = "cf:ratelimit:"

# KEYS[1] the bucket; ARGV[1] microseconds between requests; ARGV[2] burst (requests);
# ARGV[3] '1' to count the request, '0' to only ask whether one would be allowed now.
# Returns {1, 0} when allowed, {0, microseconds to wait} when not.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - tolerance - now
if wait > 0 then return {0, math.ceil(wait)} end
if ARGV[3] == '0' then return {1, 0} end
local ttl_ms = math.ceil((new_tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
return {1, 0}
"""


# One token route's two limits at once. KEYS[1] the client address's failures bucket; KEYS[2]
# the token's bucket, or '' when the credential matched no token (count a failure instead).
# ARGV[1], ARGV[2]: the failures' microseconds between requests and burst; ARGV[3], ARGV[4]:
# the token's. The address's bucket is asked first, without counting: an address that spent
# its failures is refused whatever it presents. Returns {outcome, microseconds to wait}.
_GATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function gcra(key, interval, burst, count)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local wait = new_tat - interval * burst - now
  if wait > 0 then return math.ceil(wait) end
  if count then
    local ttl_ms = math.ceil((new_tat - now) / 1000) + 1000
    redis.call('SET', key, string.format('%.0f', new_tat), 'PX', ttl_ms)
  end
  return 0
end
local wait = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), KEYS[2] == '')
if wait > 0 then return {'failures_spent', wait} end
if KEYS[2] == '' then return {'failure_counted', 0} end
wait = gcra(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), true)
if wait > 0 then return {'token_limited', wait} end
return {'admitted', 0}
"""


def bucket(key: str) -> str:
    """The Redis key of ``key``'s bucket (a token's is named by a hash, never the token)."""
    return PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_s: float


class RateLimiter:
    """``rate`` requests per second per key, up to ``burst`` at once."""

    def __init__(self, redis: Redis, *, rate_per_s: float, burst: int) -> None:
        self.interval_us = 1_000_000 / rate_per_s
        self.burst = burst
        self._script = redis.register_script(_GCRA)

    async def hit(self, key: str, *, count: bool = True) -> Verdict:
        """Count one request for ``key`` (a token: only its hash is stored); with
        ``count=False`` only say whether one would be allowed now, counting nothing."""
        allowed, wait_us = await self._script(
            keys=[bucket(key)], args=[self.interval_us, self.burst, "1" if count else "0"]
        )
        return Verdict(allowed=bool(int(allowed)), retry_after_s=int(wait_us) / 1_000_000)


Outcome = Literal["admitted", "failures_spent", "failure_counted", "token_limited"]


@dataclass(frozen=True)
class Admission:
    """What ``Gate.admit`` decided; ``retry_after_s`` for the two refusals."""

    outcome: Outcome
    retry_after_s: float


class Gate:
    """The limits of a token route in one round trip: the client address's failed
    authentications (``failures``, keyed ``authfail:<address>``) and the token's rate
    (``tokens``, keyed ``token:<namespace>``), the same buckets ``RateLimiter.hit`` uses."""

    def __init__(self, redis: Redis, *, failures: RateLimiter, tokens: RateLimiter) -> None:
        self._failures = failures
        self._tokens = tokens
        self._script = redis.register_script(_GATE)

    async def admit(self, client: str, token_namespace: str | None) -> Admission:
        """``failures_spent`` when ``client`` spent its failed authentications (nothing is
        counted); else, with no token (``None``: the credential matched none), one failure
        is counted (``failure_counted``); else the token's request is counted, or refused
        (``token_limited``)."""
        keys = [
            bucket("authfail:" + client),
            "" if token_namespace is None else bucket("token:" + token_namespace),
        ]
        f, t = self._failures, self._tokens
        outcome, wait_us = await self._script(
            keys=keys, args=[f.interval_us, f.burst, t.interval_us, t.burst]
        )
        name = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        assert name in get_args(Outcome), name
        return Admission(outcome=cast(Outcome, name), retry_after_s=int(wait_us) / 1_000_000)
