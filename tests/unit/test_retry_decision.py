"""``cancelflow.retry.decide``: what every error a step can raise leads to, as a table. The
task shells (``worker.tasks``) only carry the action out; the callback step asks the same
function for each target (its horizon)."""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass

import pytest

from cancelflow import callbacks, errors, guard, hooks, retry
from cancelflow.contract import Step
from cancelflow.dead_letters import AlreadyReplayed
from cancelflow.retry import Fail, GiveUp, Retry, RetryPolicy, Wait
from cancelflow.store import IdempotencyConflict

POLICY = RetryPolicy(base_s=1.0, max_attempts=5, max_age_s=3600.0, cap_s=60.0)
# Callbacks: the horizon (not a count) ends retries.
CALLBACK_POLICY = RetryPolicy(base_s=2.0, max_attempts=10**6, max_age_s=86400.0, cap_s=60.0)


def provider(cls: type[errors.ProviderError], **kw: object) -> errors.ProviderError:
    return cls("boom", provider="payway", **kw)  # type: ignore[arg-type]


def late_callback() -> callbacks.CallbackRetryable:
    return callbacks.CallbackRetryable("503 from the receiver", status=503, retry_after=3.0)


@dataclass(frozen=True)
class Row:
    error: BaseException
    step: Step = Step.CONFIRM
    attempt: int = 0
    age_s: float = 0.0
    policy: RetryPolicy = POLICY


# (case, row, the action's type, its error type when it gives up)
TABLE: list[tuple[str, Row, type, str | None]] = [
    ("unavailable", Row(provider(errors.ProviderUnavailable)), Retry, None),
    ("timeout", Row(provider(errors.ProviderTimeout)), Retry, None),
    ("rate limited", Row(provider(errors.ProviderRateLimited, retry_after=7.0)), Retry, None),
    ("circuit open", Row(provider(errors.CircuitOpen, retry_after=5.0)), Wait, None),
    ("throttled by us", Row(provider(guard.ProviderThrottled, retry_after=2.0)), Wait, None),
    (
        "unavailable, attempts spent",
        Row(provider(errors.ProviderUnavailable), attempt=4),
        GiveUp,
        "ProviderUnavailable",
    ),
    (
        "timeout, job too old",
        Row(provider(errors.ProviderTimeout), age_s=3600.0),
        GiveUp,
        "ProviderTimeout",
    ),
    ("bad credentials", Row(provider(errors.ProviderAuthError)), GiveUp, "ProviderAuthError"),
    ("rejected", Row(provider(errors.ProviderRejected)), Fail, None),
    ("unreadable answer", Row(provider(errors.ProviderProtocolError)), Fail, None),
    ("any other provider error", Row(provider(errors.ProviderError)), Fail, None),
    ("another delivery's lease", Row(errors.StepBusy("leased", retry_after=4.0)), Wait, None),
    (
        "callback, within the horizon",
        Row(late_callback(), step=Step.CALLBACK, attempt=3, age_s=600.0, policy=CALLBACK_POLICY),
        Retry,
        None,
    ),
    (
        "callback, past the horizon",
        Row(late_callback(), step=Step.CALLBACK, age_s=86400.0, policy=CALLBACK_POLICY),
        GiveUp,
        "CallbackGiveUp",
    ),
    (
        "callback refused for good",
        Row(errors.CallbackGiveUp("410 Gone"), step=Step.CALLBACK, policy=CALLBACK_POLICY),
        GiveUp,
        "CallbackGiveUp",
    ),
    (
        "callback targets not due yet",
        Row(callbacks.CallbackNotDue("later", retry_after=7200.0), step=Step.CALLBACK),
        Wait,
        None,
    ),
    ("a surprise", Row(KeyError("offer")), GiveUp, "KeyError"),
    ("an error of ours", Row(errors.CancelflowError("no offer")), GiveUp, "CancelflowError"),
]


@pytest.mark.parametrize(("case", "row", "kind", "error_type"), TABLE, ids=[t[0] for t in TABLE])
def test_each_error_leads_to_its_action(
    case: str, row: Row, kind: type, error_type: str | None
) -> None:
    action = retry.decide(
        row.error,
        step=row.step,
        attempt=row.attempt,
        age_s=row.age_s,
        policy=row.policy,
        rng=random.Random(1),
    )
    assert type(action) is kind, case
    if isinstance(action, GiveUp):
        assert action.error_type == error_type
    if isinstance(action, Wait | Retry):
        assert 0 <= action.delay_s <= row.policy.cap_s


def test_waits_and_retries_honour_retry_after_and_the_cap() -> None:
    rng = random.Random(3)
    wait = retry.decide(
        provider(errors.CircuitOpen, retry_after=5.0),
        step=Step.ELIGIBILITY,
        attempt=0,
        age_s=0,
        policy=POLICY,
        rng=rng,
    )
    assert isinstance(wait, Wait) and wait.recorded and 5.0 <= wait.delay_s <= 6.0
    busy = retry.decide(
        errors.StepBusy("leased", retry_after=4.0),
        step=Step.CONFIRM,
        attempt=0,
        age_s=0,
        policy=POLICY,
        rng=rng,
    )
    # Not noted on the timeline: the other delivery is the one at work.
    assert isinstance(busy, Wait) and not busy.recorded and 4.0 <= busy.delay_s <= 4.5
    limited = retry.decide(
        provider(errors.ProviderRateLimited, retry_after=30.0),
        step=Step.CONFIRM,
        attempt=0,
        age_s=0,
        policy=POLICY,
        rng=rng,
    )
    assert isinstance(limited, Retry) and limited.delay_s == 30.0
    capped = retry.decide(
        provider(errors.CircuitOpen, retry_after=10_000.0),
        step=Step.CONFIRM,
        attempt=0,
        age_s=0,
        policy=POLICY,
        rng=rng,
    )
    assert isinstance(capped, Wait) and capped.delay_s == POLICY.cap_s


def test_giving_up_says_why_with_the_last_error() -> None:
    action = retry.decide(
        provider(errors.ProviderTimeout),
        step=Step.CONFIRM,
        attempt=4,
        age_s=0,
        policy=POLICY,
    )
    assert isinstance(action, GiveUp)
    assert action.reason == "gave up after 5 attempts; last error: boom"
    past = retry.decide(
        late_callback(), step=Step.CALLBACK, attempt=0, age_s=90_000, policy=CALLBACK_POLICY
    )
    assert isinstance(past, GiveUp)
    assert past.reason == "no delivery within the 86400s horizon: 503 from the receiver"


def test_only_the_errors_that_count_attempts_need_the_jobs_history() -> None:
    assert retry.needs_history(provider(errors.ProviderTimeout))
    assert retry.needs_history(provider(errors.CircuitOpen))
    assert retry.needs_history(late_callback())
    assert not retry.needs_history(errors.StepBusy("leased", retry_after=1.0))
    assert not retry.needs_history(errors.CallbackGiveUp("gone"))
    assert not retry.needs_history(KeyError("x"))


# Raised before the decision (the shell's poison handling, the store's own refusals, the
# callback step's per-target handling) or by producers: never a step's failure to decide.
NOT_A_STEP_FAILURE = {
    errors.CancelflowError,  # the base: a row of its own above ("an error of ours")
    errors.ConfigError,
    errors.JobNotFound,
    errors.LeaseLost,
    errors.DecisionConflict,
    errors.JobDeadLettered,
    callbacks.CallbackRejected,
    callbacks.UnsafeCallbackUrl,
    callbacks.CallbackMisconfigured,
    hooks.HookRejected,
    AlreadyReplayed,
    IdempotencyConflict,
}


def test_the_table_has_a_row_for_every_error_a_step_can_fail_with() -> None:
    defined = {
        cls
        for module in (errors, callbacks, guard)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__ == module.__name__
    }
    in_table = {type(row.error) for _, row, _, _ in TABLE}
    assert defined - NOT_A_STEP_FAILURE - in_table == set()
