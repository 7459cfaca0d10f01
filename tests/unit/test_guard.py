"""The provider guard on fakeredis: rate limit, in-flight limit, circuit breaker."""

from __future__ import annotations

import asyncio
from collections import Counter

import fakeredis
import pytest

from cancelflow.errors import CircuitOpen, ProviderRejected, ProviderTimeout, ProviderUnavailable
from cancelflow.guard import GuardLimits, ProviderGuard, ProviderThrottled, breaker_state, classify


def limits(**kw: float | int | None) -> GuardLimits:
    base: dict[str, float | int | None] = {
        "calls_per_second": None,
        "max_in_flight": None,
        "breaker_failures": 3,
        "breaker_cooldown_s": 0.5,
        "lease_s": 30.0,
        "max_wait_s": 10.0,
    }
    base.update(kw)
    return GuardLimits(**base)  # type: ignore[arg-type]


def test_rate_limit_is_shared_by_every_guard_on_the_same_redis() -> None:
    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        # Two "worker processes": two guards, one Redis.
        guards = [ProviderGuard(redis, "payway", limits(calls_per_second=5)) for _ in range(2)]
        seconds: Counter[int] = Counter()

        async def call(guard: ProviderGuard) -> None:
            admission = await guard.admit()
            seconds[admission.second] += 1
            await guard.release(admission, "success")

        await asyncio.gather(*(call(guards[i % 2]) for i in range(16)))
        assert sum(seconds.values()) == 16
        assert max(seconds.values()) <= 5
        assert len(seconds) >= 3  # 16 calls at 5/s span at least three seconds

    asyncio.run(go())


def test_in_flight_limit() -> None:
    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        guard = ProviderGuard(redis, "payway", limits(max_in_flight=2))
        in_flight = peak = 0

        async def call() -> None:
            nonlocal in_flight, peak
            admission = await guard.admit()
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.05)
            in_flight -= 1
            await guard.release(admission, "success")

        await asyncio.gather(*(call() for _ in range(8)))
        assert peak == 2
        assert (await breaker_state(redis, "payway"))["in_flight"] == 0

    asyncio.run(go())


def test_waiting_too_long_for_a_slot_is_a_retryable_throttle() -> None:
    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        guard = ProviderGuard(redis, "payway", limits(max_in_flight=1, max_wait_s=0.2))
        held = await guard.admit()
        with pytest.raises(ProviderThrottled) as err:
            await guard.admit()
        assert err.value.retryable
        await guard.release(held, "success")
        await guard.release(await guard.admit(), "success")

    asyncio.run(go())


def test_breaker_opens_after_consecutive_failures_and_half_opens_after_cooldown() -> None:
    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        guard = ProviderGuard(redis, "azotte", limits(breaker_failures=3, breaker_cooldown_s=0.3))
        for _ in range(2):
            await guard.release(await guard.admit(), "failure")
        await guard.release(await guard.admit(), "success")  # a success resets the count
        for _ in range(3):
            await guard.release(await guard.admit(), "failure")
        with pytest.raises(CircuitOpen) as err:
            await guard.admit()
        assert err.value.retryable and 0 < (err.value.retry_after or 0) <= 0.3
        assert (await breaker_state(redis, "azotte"))["circuit"] == "open"
        await asyncio.sleep(0.35)
        # Half-open: one failure opens it again at once...
        await guard.release(await guard.admit(), "failure")
        with pytest.raises(CircuitOpen):
            await guard.admit()
        await asyncio.sleep(0.35)
        # ...one success closes it.
        await guard.release(await guard.admit(), "success")
        for _ in range(2):
            await guard.release(await guard.admit(), "failure")
        await guard.admit()
        state = await breaker_state(redis, "azotte")
        assert state["times_opened"] == 2 and state["circuit"] != "open"

    asyncio.run(go())


def test_a_burst_admitted_on_one_clean_read_breaks_its_failures_with_its_successes() -> None:
    """Two processes each admit a burst of calls on one clean read (their concurrency), and
    one call in five fails, the failures and successes ending interleaved: the breaker,
    counting consecutive failures, stays closed. Before, a success admitted on a clean read
    reset nothing, and a burst's failures added up until it opened."""

    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        lim = limits(breaker_failures=20, breaker_read_s=60)
        processes = [ProviderGuard(redis, "payway", lim) for _ in range(2)]
        for guard in processes:  # each reads once: closed and clean
            await guard.release(await guard.admit(), "success")
        bursts = [[await g.admit() for _ in range(100)] for g in processes]
        for i in range(100):
            for guard, burst in zip(processes, bursts, strict=True):
                await guard.release(burst[i], "failure" if i % 5 == 0 else "success")
        assert (await breaker_state(redis, "payway"))["circuit"] == "closed"
        # Failures with no success in between still open it, across processes.
        for i in range(20):
            guard = processes[i % 2]
            await guard.release(await guard.admit(), "failure")
        assert (await breaker_state(redis, "payway"))["circuit"] == "open"

    asyncio.run(go())


def test_a_clean_success_costs_no_round_trip_once_its_process_reset() -> None:
    """After a failure, one success of the process resets the count (a round trip); the
    successes after it, admitted on a clean read, write nothing: the count another process
    then raised stays as it is."""

    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        guard = ProviderGuard(redis, "payway", limits(breaker_failures=50, breaker_read_s=60))
        await guard.release(await guard.admit(), "success")
        burst = [await guard.admit() for _ in range(4)]
        await guard.release(burst[0], "failure")
        await guard.release(burst[1], "success")
        assert (await breaker_state(redis, "payway"))["consecutive_failures"] == 0
        await redis.hincrby("cf:cb:payway", "failures", 7)  # type: ignore[misc]  # another process
        for admission in burst[2:]:
            await guard.release(admission, "success")
        assert (await breaker_state(redis, "payway"))["consecutive_failures"] == 7

    asyncio.run(go())


def test_only_signs_of_a_provider_down_count_as_failures() -> None:
    assert classify(None) == "success"
    assert classify(ProviderUnavailable("503", provider="p")) == "failure"
    assert classify(ProviderTimeout("slow", provider="p")) == "failure"
    assert classify(ProviderRejected("400", provider="p")) == "neutral"


def test_a_clean_breaker_read_is_reused_for_a_while_and_another_process_opening_it_is_seen() -> (
    None
):
    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        ours = ProviderGuard(redis, "payway", limits(breaker_read_s=0.3))
        other = ProviderGuard(redis, "payway", limits(breaker_read_s=0.3))  # another process
        await ours.release(await ours.admit(), "success")  # reads: closed, no failures
        for _ in range(3):
            await other.release(await other.admit(), "failure")
        assert (await breaker_state(redis, "payway"))["circuit"] == "open"
        await ours.admit()  # its clean read still holds: no round trip, admitted
        await asyncio.sleep(0.35)
        with pytest.raises(CircuitOpen):
            await ours.admit()  # read again: the other process opened it

    asyncio.run(go())


def test_a_read_is_not_reused_once_the_process_itself_failed_or_with_limits() -> None:
    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        guard = ProviderGuard(redis, "payway", limits(breaker_failures=2, breaker_read_s=60))
        await guard.release(await guard.admit(), "failure")
        await guard.release(await guard.admit(), "failure")
        with pytest.raises(CircuitOpen):
            await guard.admit()  # its own failures opened it: seen at once
        limited = ProviderGuard(redis, "azotte", limits(calls_per_second=2, breaker_read_s=60))
        verdicts: Counter[str] = Counter()
        for _ in range(5):  # within milliseconds: one second's 2 calls, or two seconds' 4
            try:
                await asyncio.wait_for(limited.admit(), 0.05)
                verdicts["admitted"] += 1
            except TimeoutError:
                verdicts["waiting"] += 1
        assert verdicts["waiting"] >= 1, "a rate limit is asked every call"

    asyncio.run(go())
