"""Webhook endpoints end to end, as a user runs them: registered, rotated, disabled and deleted
with the `cancelflow endpoints` command (through the API, with a URL and a token only), and a
real worker delivering a real job's event to the sandbox receiver, which verifies it with the
standardwebhooks library against the endpoint's own secret. The API's refusals too."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from producers.local import cancelflow_command, http_json
from sandboxes.receiver import DEMO_CALLBACK_SECRET
from tests.callbacks.test_integration import control, payway, received, receiver_url, wait_job
from tests.fixtures.system import READ_TOKEN, StartSystem
from tests.support import System

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hooks_system(start_system: StartSystem) -> System:
    """A system of its own: its endpoints get only its own jobs' events."""
    return start_system(isolated=True, CANCELFLOW_CALLBACKS__ALLOWED_HOSTS="localhost")


@pytest.fixture(autouse=True)
def fresh_receiver(hooks_system: System) -> Iterator[None]:
    # The sandbox's receiver is shared by every system of the session: left as it was found.
    http_json("POST", f"{hooks_system.sandbox.url}/receiver/_reset")
    yield
    http_json("POST", f"{hooks_system.sandbox.url}/receiver/_reset")


def cli(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CANCELFLOW_")}
    return subprocess.run(
        cancelflow_command("endpoints", *args),
        env={
            **base,
            "CANCELFLOW_REDIS_URL": "redis://127.0.0.1:1/0",  # never used: the API is
            "CANCELFLOW_CLIENT__URL": system.api_url,
            "CANCELFLOW_CLIENT__TOKEN": system.token,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def endpoint_attempts(job: dict[str, Any], endpoint_id: str) -> list[dict[str, Any]]:
    return [c for c in job["callbacks"] if c.get("endpoint_id") == endpoint_id]


def delivered_to(endpoint_id: str) -> Any:
    return lambda job: any(c["result"] == "delivered" for c in endpoint_attempts(job, endpoint_id))


def a_job(system: System) -> str:
    # No callback URL of its own: only the endpoints get its events.
    body = {"provider": "payway", "subscription": payway(system, "immediate")}
    return str(system.enqueue(body)["id"])


def test_an_endpoint_from_the_cli_gets_signed_events_rotates_and_is_removed(
    hooks_system: System,
) -> None:
    url = receiver_url(hooks_system)
    added = cli(hooks_system, "add", url, "--event", "cancellation.succeeded")
    endpoint_id, secret = ok(added).split()
    assert "not shown again" in added.stderr
    shown = json.loads(ok(cli(hooks_system, "show", endpoint_id)))
    assert shown["enabled"] and shown["url"] == url
    lines = ok(cli(hooks_system, "list", "--json"))
    [listed] = json.loads(lines)
    assert listed["id"] == endpoint_id and listed["event_types"] == ["cancellation.succeeded"]
    assert "whsec_" not in lines  # the secret is shown once, at creation
    try:
        # The receiver holds the endpoint's secret only: the event verifies under it.
        control(hooks_system, secrets=[secret])
        job_id = a_job(hooks_system)
        job = wait_job(hooks_system, job_id, delivered_to(endpoint_id))
        [attempt] = endpoint_attempts(job, endpoint_id)
        assert attempt["url"] == url and attempt["http_status"] == 200
        assert attempt["latency_ms"] is not None and attempt["response"]
        [request] = received(hooks_system, job_id)["requests"]
        assert request["verified"] and request["event_type"] == "cancellation.succeeded"

        # Rotated: both secrets sign while the overlap lasts.
        rotated = cli(hooks_system, "rotate", endpoint_id, "--overlap", "1h")
        new_secret = ok(rotated).strip()
        assert new_secret.startswith("whsec_") and new_secret != secret
        assert "signs too until" in rotated.stderr
        for held in ([new_secret], [secret]):
            control(hooks_system, secrets=held)
            job_id = a_job(hooks_system)
            wait_job(hooks_system, job_id, delivered_to(endpoint_id))
            assert received(hooks_system, job_id)["requests"][-1]["verified"]

        # Disabled: sent nothing; enabled again: sent again.
        shown = json.loads(ok(cli(hooks_system, "disable", endpoint_id, "--json")))
        assert shown["enabled"] is False and shown["disabled_reason"]
        job_id = a_job(hooks_system)
        job = wait_job(hooks_system, job_id, lambda j: j["callbacks"] != [])
        assert endpoint_attempts(job, endpoint_id) == []
        ok(cli(hooks_system, "enable", endpoint_id))
        control(hooks_system, secrets=[new_secret])
        job_id = a_job(hooks_system)
        wait_job(hooks_system, job_id, delivered_to(endpoint_id))
    finally:
        ok(cli(hooks_system, "delete", endpoint_id))
    gone = cli(hooks_system, "show", endpoint_id)
    assert gone.returncode == 1 and "no webhook endpoint" in gone.stderr


def test_the_api_refuses_bad_endpoints_with_problem_types(hooks_system: System) -> None:
    api, token = hooks_system.api_url, hooks_system.token
    base = f"{api}/v1/webhook-endpoints"
    problems = "https://cancelflow.dev/problems/"
    for body, field in (
        ({"url": "ftp://hooks.example.com/x"}, "url"),
        ({"url": "http://10.0.0.1/hook"}, "url"),
        ({"url": "https://user:pw@hooks.example.com/x"}, "url"),
        ({"url": "https://hooks.example.com/x", "event_types": ["cancellation.nope"]}, None),
        ({"url": "https://hooks.example.com/x", "rotation_overlap_s": -1}, None),
        ({"url": "https://hooks.example.com/x", "secret": DEMO_CALLBACK_SECRET}, None),
    ):
        status, answer = http_json("POST", base, body, token=token)
        assert status == 422, answer
        assert answer["type"] == problems + "validation-error"
        if field:
            assert [e["field"] for e in answer["errors"]] == [field]
        assert "pw" not in json.dumps(answer)
    status, answer = http_json("GET", f"{base}/ep_{'0' * 32}", token=token)
    assert (status, answer["type"]) == (404, problems + "not-found")
    status, answer = http_json("PATCH", f"{base}/nope", {"enabled": True}, token=token)
    assert (status, answer["type"]) == (404, problems + "not-found")
    good = {"url": "https://hooks.example.com/cancelflow"}
    status, answer = http_json("POST", base, good, token=READ_TOKEN)
    assert (status, answer["type"]) == (403, problems + "forbidden")
    status, answer = http_json("GET", base)
    assert (status, answer["type"]) == (401, problems + "unauthorized")
    status, created = http_json("POST", base, good, token=token)
    assert status == 201 and created["secret"].startswith("whsec_")
    assert created["endpoint"]["rotation_overlap_s"] == 86400  # the default overlap, 24 h
    endpoint_id = created["endpoint"]["id"]
    try:
        status, shown = http_json("GET", f"{base}/{endpoint_id}", token=READ_TOKEN)
        assert status == 200 and "whsec_" not in json.dumps(shown)
        status, rotated = http_json("POST", f"{base}/{endpoint_id}/rotate-secret", token=token)
        assert status == 200 and rotated["secret"] not in (created["secret"], None)
        assert rotated["endpoint"]["previous_secret_expires_at"] is not None
        status, changed = http_json(
            "PATCH",
            f"{base}/{endpoint_id}",
            {"event_types": ["cancellation.failed"], "url": "http://127.0.0.1/x"},
            token=token,
        )
        assert (status, changed["errors"][0]["field"]) == (422, "url")
    finally:
        status, _ = http_json("DELETE", f"{base}/{endpoint_id}", token=token)
        assert status == 204
