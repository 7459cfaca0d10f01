"""`cancelflow enqueue`, `status` and `watch` against the live API, as an operator runs them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from producers.local import cancelflow_command, http_json
from sandboxes.payway import DEMO
from tests.fixtures.system import READ_TOKEN
from tests.support import System

pytestmark = pytest.mark.integration


def cli(system: System, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CANCELFLOW_CLIENT__URL": system.api_url,
        "CANCELFLOW_CLIENT__TOKEN": token or system.token,
    }
    return subprocess.run(
        cancelflow_command(*args), env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_enqueue_status_and_watch(system: System) -> None:
    status, created = http_json(
        "POST",
        f"{system.sandbox.url}/payway/_sandbox/subscriptions",
        {"count": 1, "kind": "immediate"},
    )
    assert status == 200, created
    ref = created["references"][0]
    done = cli(
        system, "enqueue", "-p", "payway",
        "-s", f"account_id={ref['account_id']}", "-s", f"user_product_id={ref['user_product_id']}",
        "-s", f"cancellation_reason_id={DEMO.reason_id}",
        "--reason-code", "moving", "-m", "ticket=T-1", "--wait", "30", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["how"] == "created"
    job = answer["job"]
    assert job["status"] == "finished" and job["outcome"]["type"] == "cancelled"
    assert job["metadata"] == {"ticket": "T-1"} and job["reason"]["code"] == "moving"

    shown = cli(system, "status", job["id"], "--json", token=READ_TOKEN)
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == job["id"]
    table = cli(system, "status", job["id"])
    assert job["id"] in table.stdout and "confirm" in table.stdout

    counts = cli(system, "watch", "--once", "--json", "--since", "600")
    assert counts.returncode == 0, counts.stderr
    assert json.loads(counts.stdout)["jobs"]["payway"]["finished"] >= 1
    board = cli(system, "watch", "--once")
    assert "payway" in board.stdout and "finished" in board.stdout


def test_errors_are_reported_with_their_fields(system: System, tmp_path: Path) -> None:
    bad = cli(system, "enqueue", "-p", "payway", "-s", "account_id=xyz", "--json")
    assert bad.returncode == 1
    fields = {e["field"] for e in json.loads(bad.stdout)["errors"]}
    assert {"subscription.account_id", "subscription.user_product_id"} <= fields
    missing = cli(system, "status", f"job_{'0' * 32}")
    assert missing.returncode == 1 and "404" in missing.stderr
    refused = cli(system, "status", f"job_{'0' * 32}", token="wrong")
    assert refused.returncode == 2
    # (A valid request: the client checks the subscription before it sends anything.)
    valid = ["-s", f"account_id={'a' * 24}", "-s", f"user_product_id={'b' * 24}"]
    valid += ["-s", f"cancellation_reason_id={'c' * 24}"]
    read_only = cli(system, "enqueue", "-p", "payway", *valid, token=READ_TOKEN)
    assert read_only.returncode == 2 and "403" in read_only.stderr
