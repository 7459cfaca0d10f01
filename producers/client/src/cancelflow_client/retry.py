"""When to try a call again, and after how long: a pure decision, the one place it is made."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from cancelflow_client.errors import ApiError, RateLimited, TransportError

RETRY_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """- 429 and 502/503/504 are retried, never before their ``Retry-After`` (plus jitter, so
      that clients sent away together do not come back together); without one, after a
      full-jitter exponential backoff (``backoff_s`` doubling per attempt, at most
      ``max_backoff_s``).
    - Network errors are retried likewise for calls safe to repeat (``retry_safe``), and for
      any call when the request cannot have been sent (no connection was made).
    - At most ``retries`` retries, none starting later than ``total_s`` after the first
      attempt, and none after a ``Retry-After`` longer than ``max_retry_after_s``.
    """

    retries: int = 6
    total_s: float = 60.0
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    max_retry_after_s: float = 60.0

    def delay(
        self,
        error: Exception,
        *,
        attempt: int,
        elapsed_s: float,
        retry_safe: bool,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """Seconds to wait before retrying after the ``attempt``-th failure (0 for the first),
        ``elapsed_s`` after the first attempt began; None: give up and raise ``error``."""
        if attempt >= self.retries:
            return None
        backoff = rand() * min(self.max_backoff_s, self.backoff_s * 2**attempt)
        if isinstance(error, RateLimited) or (
            isinstance(error, ApiError) and error.status in RETRY_STATUSES
        ):
            after = error.retry_after if isinstance(error, RateLimited) else error.retry_after_s
            if after is None:
                wait = backoff
            elif after > self.max_retry_after_s:
                return None
            else:
                # Jitter of up to a tenth of the wait (at most max_backoff_s) on top of it.
                wait = after + rand() * min(self.max_backoff_s, after / 10)
        elif isinstance(error, TransportError) and (retry_safe or not error.sent):
            wait = backoff
        else:
            return None
        return wait if elapsed_s + wait <= self.total_s else None
