"""Dead letters as an operator handles them: from ``cancelflow dlq`` and from the API.

Jobs whose provider keeps failing are dead-lettered (one attempt allowed); then they are
listed and filtered, shown whole, replayed (twice: the second replay does nothing), finish
once the provider is back, and the rest are purged.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest

from producers.local import cancelflow_command, http_json
from tests.fixtures.system import StartSystem
from tests.support import System

pytestmark = pytest.mark.integration


def cli(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cancelflow_command("dlq", *args),
        # As an operator runs it: through the API, with its URL and a token (no Redis needed).
        env={
            **os.environ,
            **system.env,
            "CANCELFLOW_CLIENT__URL": system.api_url,
            "CANCELFLOW_CLIENT__TOKEN": system.token,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def payway_subscriptions(system: System, count: int) -> list[dict[str, Any]]:
    status, created = http_json(
        "POST",
        f"{system.sandbox.url}/payway/_sandbox/subscriptions",
        {"count": count, "kind": "immediate"},
    )
    assert status == 200, created
    return [
        {**ref, "cancellation_reason_id": "5cb80481c00000000000000a"}
        for ref in created["references"]
    ]


def dead_lettered(system: System, jobs: list[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        statuses = {system.get(f"/v1/cancellations/{j}")[1]["status"] for j in jobs}
        if statuses == {"dead_lettered"}:
            return
        time.sleep(0.1)
    raise AssertionError(f"not all dead-lettered: {statuses}")


def test_dead_letters_from_the_command_line_and_the_api(start_system: StartSystem) -> None:
    system = start_system(isolated=True, CANCELFLOW_PROVIDERS__PAYWAY__MAX_ATTEMPTS="1")
    system.sandbox.faults("payway", error_rate=1.0)
    try:
        jobs = [
            system.enqueue({"provider": "payway", "subscription": sub})["id"]
            for sub in payway_subscriptions(system, 4)
        ]
        dead_lettered(system, jobs)
    finally:
        system.sandbox.faults("payway")

    # Listed and filtered (provider, error type, age), from the API and the command line.
    status, listing = system.get("/v1/dead-letters?provider=payway&error_type=ProviderUnavailable")
    assert status == 200
    letters = {dl["job_id"]: dl for dl in listing["items"]}
    assert set(letters) == set(jobs)
    assert all(dl["kind"] == "job" and dl["step"] == "eligibility" for dl in letters.values())
    assert system.get("/v1/dead-letters?provider=azotte")[1]["items"] == []
    an_hour_ago = quote((datetime.now(UTC) - timedelta(hours=1)).isoformat())
    assert system.get(f"/v1/dead-letters?older_than={an_hour_ago}")[1]["items"] == []
    assert system.get("/v1/dead-letters?older_than=yesterday")[0] == 422
    listed = cli(system, "list", "--provider", "payway", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {dl["job_id"] for dl in json.loads(listed.stdout)} == set(jobs)
    assert json.loads(cli(system, "list", "--error-type", "NoSuchError", "--json").stdout) == []

    # Shown whole: every attempt's error, the payload, the traceback.
    first, second, third, fourth = (letters[j]["id"] for j in jobs)
    status, shown = system.get(f"/v1/dead-letters/{first}")
    assert status == 200 and shown["errors"] and shown["payload"] == {"args": [jobs[0]]}
    assert shown["error_type"] == "ProviderUnavailable" and shown["traceback"]
    assert json.loads(cli(system, "show", second).stdout)["job_id"] == jobs[1]
    assert cli(system, "show", "dl_nope").returncode == 1

    # Replayed from the command line and from the API; a second replay does nothing.
    assert f"{first}: replayed -> eligibility" in cli(system, "replay", first).stdout
    again = cli(system, "replay", first)  # gone from the store: an action that failed
    assert again.returncode == 1 and f"no dead letter {first}" in again.stderr, again
    assert system.post(f"/v1/dead-letters/{second}/replay")[0] == 202
    assert system.post(f"/v1/dead-letters/{second}/replay")[0] == 404
    for job_id in jobs[:2]:
        assert system.wait(job_id)["outcome"]["type"] == "cancelled"
        assert (
            sum(
                1
                for e in system.get(f"/v1/cancellations/{job_id}")[1]["timeline"]
                if e["event"] == "replayed"
            )
            == 1
        )

    # Purged: one from the API, the rest by filter from the command line.
    delete = f"{system.api_url}/v1/dead-letters/{third}"
    assert http_json("DELETE", delete, token=system.token)[0] == 204
    assert http_json("DELETE", delete, token=system.token)[0] == 404
    assert system.get(f"/v1/dead-letters/{third}")[0] == 404
    purged = cli(
        system, "purge", "--provider", "payway", "--error-type", "ProviderUnavailable", "--yes"
    )
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.splitlines() == [f"{fourth}: purged"], purged.stdout
    assert "purged 1 of 1" in purged.stderr, purged.stderr
    assert system.get(f"/v1/dead-letters/{fourth}")[0] == 404
    assert system.get("/v1/dead-letters?provider=payway")[1]["items"] == []
