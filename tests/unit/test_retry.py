from __future__ import annotations

import random

from cancelflow.retry import RetryPolicy

POLICY = RetryPolicy(base_s=1.0, max_attempts=5, max_age_s=3600, cap_s=60)


def test_full_jitter_stays_within_the_exponential_envelope() -> None:
    rng = random.Random(7)
    for attempt in range(10):
        for _ in range(200):
            delay = POLICY.delay(attempt, rng=rng)
            assert 0 <= delay <= min(60, 2**attempt)


def test_retry_after_is_a_floor_but_the_cap_still_holds() -> None:
    assert POLICY.delay(0, retry_after=5, rng=random.Random(1)) >= 5
    assert POLICY.delay(0, retry_after=10_000) == 60


def test_exhausted_by_attempts_or_age() -> None:
    assert POLICY.exhausted(0, age_s=0) is None
    assert POLICY.exhausted(3, age_s=0) is None
    assert "5 attempts" in (POLICY.exhausted(4, age_s=0) or "")
    assert "older" in (POLICY.exhausted(0, age_s=3600) or "")
