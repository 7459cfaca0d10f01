"""Retry policy and the retry decision.

``RetryPolicy``: exponential backoff with full jitter, honouring Retry-After, within limits.
``decide``: what a step's failure leads to, from the error's type alone (and the attempts
and the age of the retry window): wait, retry after a delay, give up to the dead-letter
store, or fail the job. A pure function: the task shells (``worker.tasks``) carry its action
out, the callback step (``cancelflow.delivery``) asks it for each target.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime

from cancelflow.callbacks import CallbackNotDue, CallbackRetryable
from cancelflow.contract import JobRecord, Step
from cancelflow.errors import (
    CallbackGiveUp,
    CircuitOpen,
    ProviderAuthError,
    ProviderError,
    StepBusy,
)
from cancelflow.guard import ProviderThrottled
from cancelflow.settings import Settings


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


def step_policy(settings: Settings, step: Step, provider: str) -> RetryPolicy:
    """The retry policy of ``step`` of a job of ``provider``: the provider's settings, or for
    the callback step the callbacks' horizon (not a count)."""
    if step is Step.CALLBACK:
        return callback_policy(settings)
    conf = settings.provider(provider)
    return RetryPolicy(
        base_s=conf.retry_base_s,
        max_attempts=conf.max_attempts,
        max_age_s=conf.max_age_s,
        cap_s=settings.limits().max_countdown_s,
    )


def callback_policy(settings: Settings) -> RetryPolicy:
    """The callback step's policy: the horizon, and its countdown cap (the broker's). Each
    target's own waits are ``decide_callback``'s, and a wait past the cap runs in hops."""
    return RetryPolicy(
        base_s=2.0,
        max_attempts=10**6,
        max_age_s=settings.callbacks.horizon_s,
        cap_s=settings.limits().max_countdown_s,
    )


@dataclass(frozen=True)
class CallbackPolicy:
    """How one callback target is retried (docs/callbacks.md, "Delivery, retries"): full
    jitter over ``base_s * 2**n`` capped at ``max_backoff_s``, a receiver's Retry-After
    honoured up to ``max_retry_after_s``, until ``horizon_s`` after the target's first attempt
    (``client_error_window_s`` for a 4xx that is not a "later")."""

    base_s: float
    max_backoff_s: float
    max_retry_after_s: float
    horizon_s: float
    client_error_window_s: float

    def delay(
        self, failures: int, *, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait after the target's ``failures + 1``-th failure in its window."""
        # min() first: 2**n overflows a float past n=1023, and a receiver down for days
        # is tried far fewer times than that.
        draw = (rng or random).uniform(
            0, min(self.max_backoff_s, self.base_s * 2 ** min(failures, 64))
        )
        if retry_after is not None:
            draw = max(draw, min(retry_after, self.max_retry_after_s))
        return draw


def callback_target_policy(settings: Settings) -> CallbackPolicy:
    """The callback target policy at ``settings``."""
    cb = settings.callbacks
    return CallbackPolicy(
        base_s=2.0,
        max_backoff_s=cb.max_backoff_s,
        max_retry_after_s=cb.max_retry_after_s,
        horizon_s=cb.horizon_s,
        client_error_window_s=cb.client_error_window_s,
    )


def decide_callback(
    error: CallbackRetryable,
    *,
    failures: int,
    age_s: float,
    policy: CallbackPolicy,
    rng: random.Random | None = None,
) -> Retry | GiveUp:
    """What a failed attempt at one callback target leads to: ``failures``, the target's
    failed attempts before this one in its window; ``age_s``, how long the window has been
    open (since its first attempt after its last dead letter)."""
    if error.client_error and age_s >= policy.client_error_window_s:
        reason = (
            f"{error}: a client error for the whole {policy.client_error_window_s:g}s "
            "client-error window"
        )
        return GiveUp(reason, "CallbackRejected")
    if age_s >= policy.horizon_s:
        reason = f"no delivery within the {policy.horizon_s:g}s horizon: {error}"
        return GiveUp(reason, CallbackGiveUp.__name__)
    return Retry(policy.delay(failures, retry_after=error.retry_after, rng=rng))


def waits_only(settings: Settings) -> RetryPolicy:
    """A policy for the errors whose action needs no job history (``needs_history``): they
    only wait, within the countdown cap."""
    cap_s = settings.limits().max_countdown_s
    return RetryPolicy(base_s=0.0, max_attempts=1, max_age_s=0.0, cap_s=cap_s)


@dataclass(frozen=True)
class Wait:
    """Run the step again after ``delay_s`` without spending an attempt: our own limits for
    the provider held it back (``recorded``: noted on the job's timeline), or another
    delivery holds its lease (not recorded)."""

    delay_s: float
    recorded: bool = True


@dataclass(frozen=True)
class Retry:
    """Run the step again after ``delay_s``: one more attempt."""

    delay_s: float


@dataclass(frozen=True)
class GiveUp:
    """Give up: the job (or the callback target) goes to the dead-letter store, with
    ``reason`` as its error and ``error_type`` as its type."""

    reason: str
    error_type: str


@dataclass(frozen=True)
class Fail:
    """The provider refused for good: the job ends ``failed`` with the error."""


Action = Wait | Retry | GiveUp | Fail


def needs_history(error: BaseException) -> bool:
    """Whether ``decide`` needs the job's attempts and age (and its provider's policy) for
    ``error``: the others are decided by their type alone, with no read of the job."""
    return isinstance(error, ProviderError | CallbackRetryable)


def decide(
    error: BaseException,
    *,
    step: Step,
    attempt: int,
    age_s: float,
    policy: RetryPolicy,
    rng: random.Random | None = None,
) -> Action:
    """What a failure of ``step`` leads to. ``attempt``: the failed attempts before this one
    (``attempts``); ``age_s``: how long the retry window has been open (the job's age, or for
    a callback target, since its first attempt after its last dead letter)."""
    draw = (rng or random).uniform
    if isinstance(error, CircuitOpen | ProviderThrottled):
        # Our own protection of the provider: the job waits, no attempt is spent.
        return Wait(min(policy.cap_s, (error.retry_after or 1.0) + draw(0, 1)))
    if isinstance(error, StepBusy):
        return Wait(min(error.retry_after + draw(0, 0.5), policy.cap_s), recorded=False)
    if isinstance(error, CallbackGiveUp):
        return GiveUp(str(error), type(error).__name__)
    if isinstance(error, CallbackNotDue):
        # Every target waits for a retry_at beyond one countdown: wait again, in hops.
        return Wait(min(error.retry_after, policy.cap_s))
    if isinstance(error, CallbackRetryable) and error.delay_s is not None:
        # The callback step decided each target's next attempt (``decide_callback``): run
        # again for the first one due, in a countdown of at most the cap (then in hops).
        return Retry(min(error.delay_s, policy.cap_s))
    if isinstance(error, CallbackRetryable):
        if age_s >= policy.max_age_s:
            reason = f"no delivery within the {policy.max_age_s:g}s horizon: {error}"
            return GiveUp(reason, CallbackGiveUp.__name__)
        return Retry(policy.delay(attempt, retry_after=error.retry_after, rng=rng))
    if isinstance(error, ProviderError):
        if error.retryable:
            why_not = policy.exhausted(attempt, age_s=age_s)
            if why_not is None:
                return Retry(policy.delay(attempt, retry_after=error.retry_after, rng=rng))
            return GiveUp(f"{why_not}; last error: {error.message}", type(error).__name__)
        if isinstance(error, ProviderAuthError):
            # Credentials are an operator's to fix; the job can be replayed after.
            return GiveUp(str(error), type(error).__name__)
        return Fail()
    # Any surprise goes to the dead-letter store.
    return GiveUp(str(error), type(error).__name__)


def attempts(job: JobRecord, step: Step) -> int:
    """Failed attempts of ``step`` so far; a replay starts the count afresh. (Not Celery's
    retry count, which also counts waits on our own limits and knows nothing of a replay.)"""
    count = 0
    for entry in job.timeline:
        if entry.event == "replayed":
            count = 0
        elif entry.step == step.value and entry.event == "retry_scheduled":
            count += 1
    return count


def age_s(job: JobRecord, now: datetime) -> float:
    """How long ago the job was created: a chain step's retry window."""
    return (now - datetime.fromisoformat(job.created_at)).total_seconds()
