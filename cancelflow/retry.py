"""Retry policy: exponential backoff with full jitter, honouring Retry-After, within limits."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float
    max_attempts: int
    max_age_s: float
    # Every delay is capped so no countdown outlives the broker's visibility timeout.
    cap_s: float

    def delay(
        self, attempt: int, *, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 0).

        Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): a uniform
        draw in [0, base * 2**attempt], so a burst of failures does not retry in lockstep.
        A provider's Retry-After is a floor.
        """
        draw = (rng or random).uniform(0, min(self.cap_s, self.base_s * 2**attempt))
        if retry_after is not None:
            draw = max(draw, retry_after)
        return min(draw, self.cap_s)

    def exhausted(self, attempt: int, *, age_s: float) -> str | None:
        """Why no further attempt may run, or None."""
        if attempt + 1 >= self.max_attempts:
            return f"gave up after {attempt + 1} attempts"
        if age_s >= self.max_age_s:
            return f"job older than max_age_s={self.max_age_s:g}"
        return None
