"""Retention offers, durable: the job parks in Redis (no worker waits) until a decision."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sandboxes.azotte import DEMO
from tests.fixtures.system import StartSystem
from tests.support import System

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def fresh_azotte(system: System) -> Iterator[None]:
    system.sandbox.reset("azotte")
    yield


def body(order: str, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "azotte",
        "subscription": {"order_identifier": order},
        "reason": {"code": "PRICE", "comment": "too dear"},
        **extra,
    }


def park(system: System, order: str) -> dict[str, Any]:
    job = system.enqueue(body(order))
    return system.wait(job["id"], until={"awaiting_decision"})


def test_offer_parks_the_job_and_accept_ends_it_retained(system: System) -> None:
    job = park(system, DEMO.offer)
    assert job["offer"]["kind"] == "offer"
    assert job["offer"]["offer_identifier"] == DEMO.offer_identifier
    assert job["offer"]["cancellation_reasons"], "the reasons offered are recorded"
    status, answer = system.post(f"/v1/cancellations/{job['id']}/decision", {"decision": "accept"})
    assert status == 202, answer
    done = system.wait(job["id"])
    assert done["outcome"]["type"] == "retained"
    assert done["outcome"]["offer_identifier"] == DEMO.offer_identifier
    assert system.sandbox.state("azotte")["effective_cancels"] == {}
    # offer_presented, then the outcome event.
    assert [c["event_type"] for c in done["callbacks"]][:1] == ["cancellation.offer_presented"]


def test_reject_resumes_the_chain_at_confirm_with_the_survey(system: System) -> None:
    job = park(system, DEMO.offer)
    status, _ = system.post(
        f"/v1/cancellations/{job['id']}/decision",
        {"decision": "reject", "survey": {"comment": "no thanks"}},
    )
    assert status == 202
    done = system.wait(job["id"])
    assert done["outcome"]["type"] == "cancelled"
    assert done["decision"]["decision"] == "reject"
    assert system.sandbox.state("azotte")["effective_cancels"] == {DEMO.offer: 1}


def test_presentation_step_waits_too(system: System) -> None:
    job = park(system, DEMO.presentation)
    assert job["offer"]["kind"] == "presentation"
    system.post(f"/v1/cancellations/{job['id']}/decision", {"decision": "reject"})
    assert system.wait(job["id"])["outcome"]["type"] == "cancelled"


def test_a_decision_for_a_job_not_waiting_gets_409(system: System) -> None:
    job = system.wait(system.enqueue(body(DEMO.processed))["id"])
    assert job["outcome"]["type"] == "cancelled"
    status, problem = system.post(f"/v1/cancellations/{job['id']}/decision", {"decision": "accept"})
    assert status == 409, problem
    parked = park(system, DEMO.offer)
    status, problem = system.post(
        f"/v1/cancellations/{parked['id']}/decision", {"decision": "maybe"}
    )
    assert status == 422 and problem["errors"][0]["field"] == "decision"
    assert (
        system.post(f"/v1/cancellations/{parked['id']}/decision", {"decision": "accept"})[0] == 202
    )
    assert (
        system.post(f"/v1/cancellations/{parked['id']}/decision", {"decision": "reject"})[0] == 409
    )


@pytest.mark.parametrize(
    ("default", "outcome"), [("confirm", "cancelled"), ("abandon", "abandoned")]
)
def test_the_deadline_applies_the_default_action(
    start_system: StartSystem, default: str, outcome: str
) -> None:
    system = start_system(
        isolated=True,
        worker_args=("--beat",),
        CANCELFLOW_WORKER__DECISION_SWEEP_S="0.5",
        CANCELFLOW_PROVIDERS__AZOTTE__DECISION_DEADLINE_S="1",
        CANCELFLOW_PROVIDERS__AZOTTE__DECISION_DEFAULT=default,
    )
    system.sandbox.reset("azotte")
    job = park(system, DEMO.offer)
    done = system.wait(job["id"], timeout_s=30)
    assert done["outcome"]["type"] == outcome
    finished = [e for e in done["timeline"] if e["event"] in ("finished", "rejected")]
    assert finished[0]["details"]["by"] == "deadline"
