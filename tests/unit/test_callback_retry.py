"""The callback retry policy at the default settings (``retry.decide_callback``, pure): what
each receiver status leads to, the backoff, Retry-After, the windows. The step tests in
``tests/callbacks`` run the same function with a real receiver, some with shorter windows."""

from __future__ import annotations

import random

import pytest

from cancelflow import callbacks, retry
from cancelflow.contract import Step
from cancelflow.settings import DAY, Settings

DEFAULTS = retry.callback_target_policy(Settings())


def answered(status: int, retry_after: str | None = None) -> BaseException | None:
    return callbacks.classify(status, retry_after=retry_after, elapsed_s=0.1, response=None)


def test_the_defaults_are_the_documented_ones() -> None:
    assert (DEFAULTS.horizon_s, DEFAULTS.client_error_window_s) == (3 * DAY, 3600.0)
    assert (DEFAULTS.max_backoff_s, DEFAULTS.max_retry_after_s) == (3600.0, DAY)
    cb = Settings().callbacks
    assert (cb.endpoint_disable_after_s, cb.endpoint_rotation_overlap_s) == (5 * DAY, DAY)


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert answered(status) is None


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502, 503, 504, 599])
def test_later_statuses_are_retried_until_the_horizon(status: int) -> None:
    error = answered(status)
    assert isinstance(error, callbacks.CallbackRetryable) and not error.client_error
    for age in (0.0, 3600.0, 2 * DAY):
        action = retry.decide_callback(error, failures=5, age_s=age, policy=DEFAULTS)
        assert isinstance(action, retry.Retry)
    past = retry.decide_callback(error, failures=5, age_s=3 * DAY, policy=DEFAULTS)
    assert isinstance(past, retry.GiveUp) and past.error_type == "CallbackGiveUp"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 422])
def test_other_4xx_are_retried_for_the_client_error_window_only(status: int) -> None:
    error = answered(status)
    assert isinstance(error, callbacks.CallbackRetryable) and error.client_error
    # A receiver answering 404 for a minute during its deploy still gets the event.
    for age in (0.0, 60.0, 3599.0):
        action = retry.decide_callback(error, failures=3, age_s=age, policy=DEFAULTS)
        assert isinstance(action, retry.Retry)
    past = retry.decide_callback(error, failures=3, age_s=3600.0, policy=DEFAULTS)
    assert isinstance(past, retry.GiveUp) and past.error_type == "CallbackRejected"


@pytest.mark.parametrize("status", [410, 301, 302, 307, 308])
def test_gone_and_redirects_are_not_retried(status: int) -> None:
    error = answered(status)
    assert isinstance(error, callbacks.CallbackRejected)
    assert error.gone is (status == 410)


def test_backoff_is_exponential_with_full_jitter_capped_at_an_hour() -> None:
    rng = random.Random(7)
    for failures in range(40):
        bound = min(3600.0, 2.0 * 2**failures)
        draws = [DEFAULTS.delay(failures, rng=rng) for _ in range(50)]
        assert all(0 <= d <= bound for d in draws)
        assert max(draws) > bound / 2  # spread over the range, not fixed steps
    assert DEFAULTS.delay(10**6, rng=rng) <= 3600.0  # no overflow after days of failures


def test_retry_after_is_a_floor_honoured_up_to_a_day() -> None:
    rng = random.Random(1)
    for seconds in ("30", "7200", "86400"):
        error = answered(503, seconds)
        assert isinstance(error, callbacks.CallbackRetryable)
        action = retry.decide_callback(error, failures=0, age_s=0, policy=DEFAULTS, rng=rng)
        assert isinstance(action, retry.Retry) and action.delay_s == float(seconds)
    error = answered(429, str(3 * DAY))
    assert isinstance(error, callbacks.CallbackRetryable)
    action = retry.decide_callback(error, failures=0, age_s=0, policy=DEFAULTS, rng=rng)
    assert isinstance(action, retry.Retry) and action.delay_s == DAY


def test_the_step_runs_again_in_countdowns_the_broker_can_hold() -> None:
    settings = Settings()
    cap = settings.limits().max_countdown_s
    error = answered(503, "7200")
    assert isinstance(error, callbacks.CallbackRetryable)
    error.delay_s = 7200.0
    step = retry.callback_policy(settings)
    action = retry.decide(error, step=Step.CALLBACK, attempt=0, age_s=0, policy=step)
    assert isinstance(action, retry.Retry) and action.delay_s == cap == 900.0
    hop = retry.decide(
        callbacks.CallbackNotDue("later", retry_after=6300.0),
        step=Step.CALLBACK,
        attempt=1,
        age_s=0,
        policy=retry.waits_only(settings),
    )
    assert isinstance(hop, retry.Wait) and hop.recorded and hop.delay_s == cap
