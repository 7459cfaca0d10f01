"""Lifetimes that contradict each other refuse to start (issue 14, store integrity)."""

from __future__ import annotations

import os

import pytest

from cancelflow.errors import ConfigError
from cancelflow.settings import DAY, load_settings
from cancelflow.store import INFLIGHT_SPARE_S, INFLIGHT_TTL_S

PAYWAY = {
    "CANCELFLOW_PROVIDERS__PAYWAY__BASE_URL": "https://backend.example.com",
    "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_ID": "client",
    "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_SECRET": "s3cret-value",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("CANCELFLOW_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_a_retention_shorter_than_the_idempotency_ttl_is_refused_naming_both(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("CANCELFLOW_IDEMPOTENCY_TTL_S", str(2 * DAY))
    env.setenv("CANCELFLOW_JOB_RETENTION_S", str(2 * DAY - 1))
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "CANCELFLOW_JOB_RETENTION_S" in str(raised.value)
    assert "CANCELFLOW_IDEMPOTENCY_TTL_S" in str(raised.value)
    env.setenv("CANCELFLOW_JOB_RETENTION_S", str(2 * DAY))
    assert load_settings().job_retention_s == 2 * DAY


def test_a_decision_deadline_the_in_flight_marker_would_not_outlive_is_refused(
    env: pytest.MonkeyPatch,
) -> None:
    for name, value in PAYWAY.items():
        env.setenv(name, value)
    longest = INFLIGHT_TTL_S - INFLIGHT_SPARE_S
    env.setenv("CANCELFLOW_PROVIDERS__PAYWAY__DECISION_DEADLINE_S", str(longest + 1))
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "CANCELFLOW_PROVIDERS__PAYWAY__DECISION_DEADLINE_S" in str(raised.value)
    assert "INFLIGHT_TTL_S" in str(raised.value)
    env.setenv("CANCELFLOW_PROVIDERS__PAYWAY__DECISION_DEADLINE_S", str(longest))
    assert load_settings().provider("payway").decision_deadline_s == longest


def test_the_default_deadline_and_retention_are_accepted(env: pytest.MonkeyPatch) -> None:
    for name, value in PAYWAY.items():
        env.setenv(name, value)
    settings = load_settings()
    assert settings.provider("payway").decision_deadline_s < INFLIGHT_TTL_S - INFLIGHT_SPARE_S
    assert settings.job_retention_s >= settings.idempotency_ttl_s
