"""Request limits, held in Redis so every API process shares them: per token, for signed
billing events, and for failed authentication per client address.

GCRA (the generic cell rate algorithm): one key per token holding the "theoretical arrival
time" of the next request, so the limit is smooth (``rate`` per second) with a burst allowance,
costs one round trip, and needs no clean-up. Redis's clock is used, not each API process's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_s: float


class RateLimiter:
    """``rate`` requests per second per key, up to ``burst`` at once."""

    def __init__(self, redis: Redis, *, rate_per_s: float, burst: int) -> None:
        self._interval_us = 1_000_000 / rate_per_s
        self._burst = burst
        self._script = redis.register_script(_GCRA)

    async def hit(self, key: str, *, count: bool = True) -> Verdict:
        """Count one request for ``key`` (a token: only its hash is stored); with
        ``count=False`` only say whether one would be allowed now, counting nothing."""
        bucket = PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]
        allowed, wait_us = await self._script(
            keys=[bucket], args=[self._interval_us, self._burst, "1" if count else "0"]
        )
        return Verdict(allowed=bool(int(allowed)), retry_after_s=int(wait_us) / 1_000_000)
