"""``ratelimit.Gate``: a token route's two limits in one script, against the buckets that
``RateLimiter.hit`` keeps (fakeredis with Lua)."""

from __future__ import annotations

import asyncio

import fakeredis

from producers.ratelimit import Gate, RateLimiter


def _gate(
    redis: fakeredis.FakeAsyncRedis, *, failures_burst: int, token_burst: int
) -> tuple[Gate, RateLimiter, RateLimiter]:
    # Refills too slowly to matter within a test: only the bursts count.
    failures = RateLimiter(redis, rate_per_s=0.001, burst=failures_burst)
    tokens = RateLimiter(redis, rate_per_s=0.001, burst=token_burst)
    return Gate(redis, failures=failures, tokens=tokens), failures, tokens


def test_failures_are_counted_per_address_until_spent_then_every_credential_waits(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async def run() -> list[str]:
        gate, _, _ = _gate(fake_redis, failures_burst=3, token_burst=100)
        seen: list[str] = [(await gate.admit("10.0.0.1", None)).outcome for _ in range(6)]
        # A right token from the spent address waits too; another address is not affected.
        held = await gate.admit("10.0.0.1", "name:crm")
        assert held.retry_after_s > 0
        seen += [held.outcome, (await gate.admit("10.0.0.2", "name:crm")).outcome]
        return seen

    outcomes = asyncio.run(run())
    assert outcomes[:3] == ["failure_counted"] * 3
    assert outcomes[3:6] == ["failures_spent"] * 3
    assert outcomes[6:] == ["failures_spent", "admitted"]


def test_a_token_is_limited_in_the_bucket_hit_uses_and_spends_no_failures(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async def run() -> None:
        gate, failures, tokens = _gate(fake_redis, failures_burst=1, token_burst=2)
        outcomes = [(await gate.admit("10.0.0.1", "name:crm")).outcome for _ in range(4)]
        assert outcomes == ["admitted"] * 2 + ["token_limited"] * 2
        # The same bucket as RateLimiter.hit("token:<namespace>"): spent there too.
        assert not (await tokens.hit("token:name:crm", count=False)).allowed
        # Admitted and limited requests counted nothing against the address (its burst is
        # 1: one failure would have spent it).
        assert (await failures.hit("authfail:10.0.0.1", count=False)).allowed
        assert (await gate.admit("10.0.0.1", "name:other")).outcome == "admitted"

    asyncio.run(run())
