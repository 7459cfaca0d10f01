"""Request ids and the access log, over HTTP against running API and worker processes: every
answer carries ``Request-Id`` (the caller's when well formed), and the id is on the API's log
lines for the request, in the job's timeline and on the worker's lines of the job's step."""

from __future__ import annotations

import http.client
import json
import re
import secrets
from typing import Any
from urllib.parse import urlsplit

import pytest

from producers.local import wait_until
from sandboxes.payway import DEMO
from tests.fixtures.system import API_TOKEN, READ_TOKEN
from tests.producers.test_api import payway_body
from tests.support import System
from tests.support import payway_body as demo_body

pytestmark = pytest.mark.integration

GENERATED = re.compile(r"req_[0-9a-f]{32}")


def request(
    system: System,
    method: str,
    path: str,
    *,
    body: Any = None,
    token: str | None = API_TOKEN,
    request_id: str | None = None,
) -> tuple[int, str]:
    """(status, the answer's Request-Id)."""
    parts = urlsplit(system.api_url)
    assert parts.hostname is not None
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if request_id is not None:
        # http.client sends str headers as latin-1: UTF-8 bytes go as they are.
        headers["Request-Id"] = request_id.encode().decode("latin-1")
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Request-Id") or ""
    finally:
        conn.close()


def logged(system: System, request_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(process log name, line) of every JSON log line that carries ``request_id``."""
    found = []
    for row in system.log_lines(request_id).splitlines():
        name, _, text = row.partition(": ")
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if line.get("request_id") == request_id:
            found.append((name, line))
    return found


def access_line(system: System, request_id: str) -> dict[str, Any]:
    def found() -> list[dict[str, Any]]:
        return [line for _, line in logged(system, request_id) if line["message"] == "api.request"]

    wait_until(lambda: bool(found()), timeout_s=10, what=f"the access line of {request_id}")
    (line,) = found()
    return line


def test_an_id_is_generated_and_logged_with_the_access_line(system: System) -> None:
    status, rid = request(system, "GET", "/v1/stats")
    assert status == 200 and GENERATED.fullmatch(rid), rid
    line = access_line(system, rid)
    assert line["method"] == "GET" and line["route"] == "/v1/stats" and line["status"] == 200
    assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0
    assert line["token_name"] == "unnamed-1"
    assert API_TOKEN not in json.dumps(line)
    assert line["level"] == "info" and line["logger"] == "producers.api"
    # Two requests, two ids.
    assert request(system, "GET", "/v1/stats")[1] != rid


@pytest.mark.parametrize("given", ["trace-7f3a", "a b/c:d=e", "x" * 128])
def test_a_well_formed_caller_id_is_echoed(system: System, given: str) -> None:
    given = f"{given[:-8]}{secrets.token_hex(4)}"  # unique, to find its lines
    status, rid = request(system, "GET", "/v1/stats", request_id=given)
    assert status == 200 and rid == given
    assert access_line(system, given)["status"] == 200


@pytest.mark.parametrize("given", ["x" * 129, "café", ""])
def test_a_malformed_caller_id_is_replaced(system: System, given: str) -> None:
    status, rid = request(system, "GET", "/v1/stats", request_id=given)
    assert status == 200 and GENERATED.fullmatch(rid), rid
    assert access_line(system, rid)["status"] == 200


def test_refusals_have_an_id_and_an_access_line(system: System, billing_api: System) -> None:
    cases = [
        (system, "GET", "/v1/stats", None, "wrong-token", 401, "/v1/stats", None),
        (system, "POST", "/v1/cancellations", payway_body(), READ_TOKEN, 403,
         "/v1/cancellations", "unnamed-2"),
        (system, "GET", "/v1/stats?bogus=1", None, API_TOKEN, 422, "/v1/stats", "unnamed-1"),
        (billing_api, "POST", "/v1/cancellations", payway_body(metadata={"n": "x" * 5000}),
         API_TOKEN, 413, "/v1/cancellations", "unnamed-1"),
        (system, "GET", "/v1/nothing-here", None, API_TOKEN, 404, None, "unnamed-1"),
    ]  # fmt: skip
    for target, method, path, body, token, want, route, token_name in cases:
        status, rid = request(target, method, path, body=body, token=token)
        assert status == want and GENERATED.fullmatch(rid), (path, status, rid)
        line = access_line(target, rid)
        assert (line["status"], line["route"], line["token_name"]) == (want, route, token_name)
        assert line["method"] == method
        assert "wrong-token" not in json.dumps(line) and READ_TOKEN not in json.dumps(line)


def test_the_id_follows_the_job_into_its_timeline_and_the_worker(system: System) -> None:
    rid = f"order-{secrets.token_hex(8)}"
    system.sandbox.reset("payway")
    body = demo_body(DEMO.end_of_period, callback_url=f"{system.sandbox.url}/receiver/events")
    status, job = system.post("/v1/cancellations", body, headers={"Request-Id": rid})
    assert status == 202, job
    queued = job["timeline"][0]
    assert queued["event"] == "queued" and queued["details"] == {"request_id": rid}
    done = system.wait(job["id"])
    assert done["timeline"][0]["details"] == {"request_id": rid}

    def worker_lines() -> list[dict[str, Any]]:
        return [line for name, line in logged(system, rid) if not name.startswith("api")]

    # Every step of the chain, not only the first the API sent: each step's message carries
    # the id on to the next.
    chain = {"eligibility", "confirm", "callback"}
    wait_until(
        lambda: chain <= {line.get("step") for line in worker_lines()},
        timeout_s=10,
        what=f"worker lines with the id for each of {sorted(chain)}",
    )
    assert all(line["job_id"] == job["id"] for line in worker_lines())
    api_lines = [line for name, line in logged(system, rid) if name.startswith("api")]
    messages = {line["message"] for line in api_lines}
    assert {"job.enqueued", "api.request"} <= messages, messages
