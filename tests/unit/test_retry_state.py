"""A retry as a monitor's state (Flower's) shows it: ``RETRY`` until the retried run starts
(``messaging.patches.RetryingTask``), fed the events a retried step sends, in the orders
they reach Flower."""

from __future__ import annotations

from typing import Any

import pytest
from celery.events.state import State
from celery.events.state import Task as CeleryTask

from messaging.patches import RetryingTask

UUID = "6f1c2d1e-0000-4000-8000-000000000001"
ETA = "2026-12-01T12:00:05+00:00"


class RetryingState(State):  # type: ignore[misc]  # Celery is untyped
    Task = RetryingTask


def event(type_: str, timestamp: float, **fields: Any) -> dict[str, Any]:
    return {
        "type": type_,
        "uuid": UUID,
        "hostname": "worker-1@host",
        "timestamp": timestamp,
        "local_received": timestamp,
        "clock": int(timestamp * 10),
        **fields,
    }


FIRST_SENT = event(
    "task-sent", 100.0, name="cancelflow.eligibility", args="['job_1']", retries=0, eta=None
)
FIRST_RUN = [
    event("task-received", 100.01, name="cancelflow.eligibility", args="['job_1']", retries=0),
    event("task-started", 100.02),
    event("task-retried", 100.05, exception="Retry(ProviderRateLimited())", traceback="tb"),
]
RETRY_HELD = [
    event("task-sent", 100.04, name="cancelflow.eligibility", args="['job_1']", retries=1, eta=ETA),
    event(
        "task-received", 100.06, name="cancelflow.eligibility", args="['job_1']", retries=1, eta=ETA
    ),
]


@pytest.mark.parametrize("first_sent_late", [False, True], ids=["in order", "first sent late"])
def test_a_retry_stays_retry_until_its_run_starts(first_sent_late: bool) -> None:
    state = RetryingState()
    events = (
        [*FIRST_RUN, *RETRY_HELD, FIRST_SENT]
        if first_sent_late
        else [FIRST_SENT, *FIRST_RUN, *RETRY_HELD]
    )
    for e in events:
        state.event(dict(e))
    task = state.tasks[UUID]
    assert task.state == "RETRY"
    assert (task.name, task.args, task.retries, task.eta) == (
        "cancelflow.eligibility",
        "['job_1']",
        1,
        ETA,
    )
    assert task.exception == "Retry(ProviderRateLimited())"

    state.event(event("task-started", 105.0))
    assert state.tasks[UUID].state == "STARTED"
    state.event(event("task-succeeded", 105.1, result="'ok'", exception=None, traceback=None))
    assert (task.state, task.retries, task.eta, task.exception) == ("SUCCESS", 1, ETA, None)


class CeleryState(State):  # type: ignore[misc]  # Celery is untyped
    # Celery's own Task: a worker app made in this process (worker.app.create_app) installs
    # RetryingTask as every State's (messaging.patches.show_retries_until_they_run).
    Task = CeleryTask


def test_celerys_own_state_loses_the_retry() -> None:
    # What RetryingTask is for: Celery's Task lets the held retry's receipt replace RETRY.
    state = CeleryState()
    for e in [FIRST_SENT, *FIRST_RUN, *RETRY_HELD]:
        state.event(dict(e))
    assert state.tasks[UUID].state == "RECEIVED"
