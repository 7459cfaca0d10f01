"""Each process says at start-up what it is: the API where it listens, a worker its host name,
queues, concurrency and providers, beat its schedule, the billing consumer its stream and
group; and each reports the CANCELFLOW_* variables nothing reads (typos), never their value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from producers.local import cancelflow_command, wait_until
from sandboxes.payway import DEMO
from tests.fixtures.system import StartSystem

pytestmark = pytest.mark.integration

# Top-level ones: a misspelt nested variable stops start-up (its group forbids extras).
TYPOS = {"CANCELFLOW_REDIS_ULR": "redis://secret-host", "CANCELFLOW_LOG_LEVLE": "secret-level"}


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for text in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue
    return lines


def first(path: Path, message: str) -> dict[str, Any]:
    def found() -> list[dict[str, Any]]:
        return [line for line in json_lines(path) if line.get("message") == message]

    wait_until(lambda: bool(found()), timeout_s=20, what=f"{message} in {path.name}")
    return found()[0]


def test_every_process_logs_its_start_and_the_typos(
    start_system: StartSystem, rules_file: Path
) -> None:
    system = start_system(beat=True, isolated=True, concurrency=7, **TYPOS)
    logs = system.procs.log_dir
    system.procs.start(
        "billing",
        cancelflow_command("billing-consumer"),
        extra_env={"CANCELFLOW_BILLING__RULES_PATH": str(rules_file)},
    )

    api = first(logs / "api.log", "api.listening")
    assert api["url"] == system.api_url and api["level"] == "info"
    assert api["event_loop"] == "uvloop"  # installed, and api.event_loop is "auto"
    assert set(api["providers"]) == system.env_providers()

    worker = first(logs / "worker.log", "worker.starting")
    assert worker["hostname"].startswith("worker-") and worker["concurrency"] == 7
    assert {"cancellations.payway", "callbacks", "maintenance"} <= set(worker["queues"]), worker
    assert set(worker["providers"]) == system.env_providers()

    beat = first(logs / "beat.log", "beat.starting")
    assert "expire-decisions" in beat["schedule"]

    billing = first(logs / "billing.log", "billing.consumer.starting")
    assert billing["stream"] == "cf:billing:events" and billing["group"] == "cancelflow-billing"

    for name in ("api", "worker", "beat", "billing"):
        first(logs / f"{name}.log", "settings.unknown_variable")
        typos = {
            line["variable"]: line["did_you_mean"]
            for line in json_lines(logs / f"{name}.log")
            if line.get("message") == "settings.unknown_variable"
        }
        assert typos == {
            "CANCELFLOW_REDIS_ULR": "CANCELFLOW_REDIS_URL",
            "CANCELFLOW_LOG_LEVLE": "CANCELFLOW_LOG_LEVEL",
        }, name
        assert "secret-level" not in (logs / f"{name}.log").read_text()
        assert "secret-host" not in (logs / f"{name}.log").read_text()


def test_an_api_on_asyncio_s_own_loop_carries_a_job_through(start_system: StartSystem) -> None:
    system = start_system(isolated=True, CANCELFLOW_API__EVENT_LOOP="asyncio")
    assert first(system.procs.log_dir / "api.log", "api.listening")["event_loop"] == "asyncio"
    status, made = system.sandbox_post(
        "/payway/_sandbox/subscriptions", {"count": 1, "kind": "immediate"}
    )
    assert status == 200, made
    body = {
        "provider": "payway",
        "subscription": {**made["references"][0], "cancellation_reason_id": DEMO.reason_id},
    }
    job = system.wait(system.enqueue(body)["id"])
    assert job["status"] == "finished" and job["outcome"]["type"] == "cancelled", job
