"""Flower against the workers' broker: a job's tasks are found by its id, with operator-readable
names, through Flower's HTTP API (what an operator's search box does)."""

from __future__ import annotations

import base64
import socket
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cancelflow.contract import STEP_TASKS, Step
from producers.local import ProcessGroup, free_port, http_json, wait_until
from sandboxes.payway import DEMO
from tests.support import System

pytestmark = pytest.mark.integration

USER, PASSWORD = "operator", "flower-test"


@dataclass
class Flower:
    url: str

    def get(self, path: str, **query: str) -> Any:
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        url = f"{self.url}{path}?{urllib.parse.urlencode(query)}"
        status, body = http_json("GET", url, headers={"Authorization": f"Basic {auth}"})
        assert status == 200, body
        return body

    def hears(self, worker: str) -> bool:
        """Flower has received events from ``worker`` (its heartbeats)."""
        return any(w.get("hostname") == worker for w in self.get("/workers", json="1")["data"])

    def tasks_of(self, job_id: str) -> dict[str, dict[str, Any]]:
        # Task args are [job_id, ...]: Flower's search finds every task of the job.
        return self.get("/api/tasks", search=f"args:{job_id}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def flower(system: System, log_dir: Path) -> Iterator[Flower]:
    """``celery -A worker.app flower`` on the system's broker, as `make flower` runs it."""
    port = free_port()
    procs = ProcessGroup(
        env={**system.env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}, log_dir=log_dir / "flower"
    )
    procs.start(
        "flower",
        [
            sys.executable,
            "-m",
            "celery",
            "--broker",
            system.redis_url,
            "-A",
            "worker.app",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
        ],
    )
    flower = Flower(f"http://127.0.0.1:{port}")
    # The fixture names its worker worker-<API port>@<this host>.
    worker = f"worker-{urllib.parse.urlsplit(system.api_url).port}@{socket.gethostname()}"
    try:
        wait_until(lambda: _answers(flower), timeout_s=30, what="flower")
        # Flower keeps only the events it receives: a job sent before it listens is not seen.
        wait_until(lambda: flower.hears(worker), timeout_s=30, what=f"flower to hear from {worker}")
        yield flower
    finally:
        procs.stop_all()


def _answers(flower: Flower) -> bool:
    try:
        return bool(flower.get("/healthcheck") == "OK")
    except (AssertionError, OSError):
        return False


def test_a_jobs_tasks_are_found_in_flower_by_job_id(system: System, flower: Flower) -> None:
    system.sandbox.reset("payway")
    ref = DEMO.immediate
    job = system.wait(
        system.enqueue(
            {
                "provider": "payway",
                "subscription": {
                    "account_id": ref.account_id,
                    "user_product_id": ref.user_product_id,
                    "cancellation_reason_id": DEMO.reason_id,
                },
            }
        )["id"]
    )
    assert job["outcome"]["type"] == "cancelled"

    wanted = {STEP_TASKS[Step.ELIGIBILITY], STEP_TASKS[Step.CONFIRM]}
    found: dict[str, dict[str, Any]] = {}

    def all_succeeded() -> bool:
        nonlocal found
        found = flower.tasks_of(job["id"])
        # A step's sent event (its queue) is published with others, in a batch, up to 50 ms
        # after the step was sent: the step may have run by then.
        done = {
            t["name"] for t in found.values() if t["state"] == "SUCCESS" and t.get("routing_key")
        }
        return wanted <= done

    wait_until(all_succeeded, timeout_s=15, what=f"flower to show {sorted(wanted)} of {job['id']}")
    for task in found.values():
        assert task["name"].startswith("cancelflow."), task
        assert job["id"] in task["args"]
        assert task["worker"], "the worker that ran it"
        assert (
            task["routing_key"] == "cancellations.payway"
            or task["name"] == STEP_TASKS[Step.CALLBACK]
        )
    system.sandbox.reset("payway")
