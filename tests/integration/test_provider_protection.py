"""Providers protected from us: the circuit breaker parks jobs instead of failing them."""

from __future__ import annotations

import time

import pytest

from sandboxes.payway import DEMO
from tests.fixtures.system import StartSystem

pytestmark = pytest.mark.integration


def test_breaker_opens_leaves_jobs_waiting_and_they_finish_after_recovery(
    start_system: StartSystem,
) -> None:
    system = start_system(
        isolated=True,
        CANCELFLOW_PROVIDERS__PAYWAY__BREAKER_FAILURES="3",
        CANCELFLOW_PROVIDERS__PAYWAY__BREAKER_COOLDOWN_S="2",
        CANCELFLOW_PROVIDERS__PAYWAY__MAX_ATTEMPTS="4",
        CANCELFLOW_PROVIDERS__PAYWAY__RETRY_BASE_S="0.1",
    )
    system.sandbox.reset("payway")
    system.sandbox.faults("payway", error_rate=1.0)
    try:
        refs = [DEMO.end_of_period, DEMO.autogiro, DEMO.immediate, DEMO.end_of_period_with_credit]
        jobs = [
            system.enqueue(
                {
                    "provider": "payway",
                    "subscription": {
                        "account_id": r.account_id,
                        "user_product_id": r.user_product_id,
                        "cancellation_reason_id": DEMO.reason_id,
                    },
                }
            )["id"]
            for r in refs
        ]
        deadline = time.monotonic() + 30
        state: dict[str, object] = {}
        while time.monotonic() < deadline:
            _, providers = system.get("/v1/providers")
            state = next(p for p in providers["items"] if p["provider"] == "payway")
            if state["circuit"] == "open":
                break
            time.sleep(0.1)
        assert state["circuit"] == "open", state
        # While it is open, calls stop: the sandbox sees no more than a trickle.
        calls_at_open = sum(system.sandbox.state("payway")["calls"].values())
        time.sleep(1.5)
        assert sum(system.sandbox.state("payway")["calls"].values()) - calls_at_open <= 2
        for job_id in jobs:
            _, job = system.get(f"/v1/cancellations/{job_id}")
            assert job["status"] in ("queued", "checking", "confirming"), job["status"]
    finally:
        system.sandbox.faults("payway")
    finished = [system.wait(job_id, timeout_s=60) for job_id in jobs]
    assert {j["outcome"]["type"] for j in finished} == {"cancelled"}
    waited = [e for j in finished for e in j["timeline"] if e["event"] == "waiting"]
    assert waited and all(e["error"]["type"] == "CircuitOpen" for e in waited)
    # Waits spent no attempts: no job was dead-lettered although each saw failures.
    assert all(j["status"] == "finished" for j in finished)
