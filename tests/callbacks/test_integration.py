"""Callbacks end to end: API -> real worker -> provider sandboxes -> signed POST to the
sandbox's receiver over HTTP, plus the in-process hooks of tests.callbacks.hooks_for_tests."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from producers.local import http_json
from sandboxes.payway import DEMO as PAYWAY
from sandboxes.receiver import DEMO_CALLBACK_SECRET
from tests.callbacks.conftest import CLIENT_ERROR_WINDOW_S, HORIZON_S, ROTATED_SECRET
from tests.callbacks.hooks_for_tests import EVENTS_KEY, NAME
from tests.callbacks.secrets import OTHER_SECRET
from tests.support import System

pytestmark = pytest.mark.integration

HOOK = f"hook:{NAME}"


# --- helpers ---------------------------------------------------------------------------------


def receiver_url(system: System, host: str = "localhost") -> str:
    return f"http://{host}:{urlsplit(system.sandbox.url).port}/receiver/events"


def control(system: System, **settings: Any) -> None:
    status, body = http_json("PUT", f"{system.sandbox.url}/receiver/_control", settings)
    assert status == 200, body


def received(system: System, job_id: str) -> dict[str, Any]:
    status, body = http_json("GET", f"{system.sandbox.url}/receiver/_events?job_id={job_id}")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def hook_events(system: System, job_id: str) -> list[dict[str, Any]]:
    raw: list[bytes] = redis.Redis.from_url(system.redis_url).lrange(EVENTS_KEY, 0, -1)  # type: ignore[assignment]
    events = [json.loads(r) for r in raw]
    return [e for e in events if e["data"]["job_id"] == job_id]


def attempts(job: dict[str, Any], target: str = "webhook") -> list[dict[str, Any]]:
    def target_of(url: str | None) -> str:
        return url if url and url.startswith("hook:") else "webhook"

    return [c for c in job["callbacks"] if target_of(c["url"]) == target]


def ended(job: dict[str, Any], target: str = "webhook", n: int = 1) -> bool:
    """At least ``n`` of the target's attempts ended (delivered or dead-lettered)."""
    results = [c["result"] for c in attempts(job, target)]
    return sum(r in ("delivered", "dead_lettered", "skipped") for r in results) >= n


def wait_job(
    system: System, job_id: str, done: Callable[[dict[str, Any]], bool], timeout_s: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    job: Any = None
    while time.monotonic() < deadline:
        status, job = system.get(f"/v1/cancellations/{job_id}")
        assert status == 200, job
        if done(job):
            return job  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(
        f"job {job_id} not there after {timeout_s}s:\n{json.dumps(job, indent=1)}\n"
        f"--- worker log ---\n{system.procs.log_tail('worker')}"
    )


def both_ended(job: dict[str, Any]) -> bool:
    return ended(job, "webhook") and ended(job, HOOK)


def fresh(system: System, provider: str, kind: str) -> Any:
    status, body = http_json(
        "POST",
        f"{system.sandbox.url}/{provider}/_sandbox/subscriptions",
        {"count": 1, "kind": kind},
    )
    assert status == 200, body
    return body["references"][0]


def payway(system: System, kind: str, *, reason: str = PAYWAY.reason_id) -> dict[str, Any]:
    return {**fresh(system, "payway", kind), "cancellation_reason_id": reason}


def enqueue(system: System, provider: str, subscription: dict[str, Any], **extra: Any) -> str:
    body = {"provider": provider, "subscription": subscription, **extra}
    body.setdefault("callback_url", receiver_url(system))
    return str(system.enqueue(body)["id"])


def dead_letters(system: System, job_id: str) -> list[dict[str, Any]]:
    status, body = system.get("/v1/dead-letters?kind=callback")
    assert status == 200, body
    return [d for d in body["items"] if d["job_id"] == job_id]


def replay(system: System, dl_id: str) -> None:
    status, body = system.post(f"/v1/dead-letters/{dl_id}/replay")
    assert status == 202, body


@pytest.fixture(autouse=True)
def fresh_receiver(cb_system: System) -> Iterator[None]:
    status, _ = http_json("POST", f"{cb_system.sandbox.url}/receiver/_reset")
    assert status == 200
    yield
    http_json("POST", f"{cb_system.sandbox.url}/receiver/_reset")


def assert_delivered_once(system: System, job: dict[str, Any], etype: str) -> dict[str, Any]:
    """The receiver verified exactly one event of that type for the job; the hook got it too."""
    got = received(system, job["id"])
    [event] = [e for e in got["events"] if e["type"] == etype]
    requests = [r for r in got["requests"] if r["event_type"] == etype]
    assert [(r["status"], r["verified"], r["duplicate"]) for r in requests] == [(200, True, False)]
    assert [e["id"] for e in hook_events(system, job["id"]) if e["type"] == etype] == [event["id"]]
    [attempt] = [c for c in attempts(job) if c["event_type"] == etype]
    assert attempt["result"] == "delivered" and attempt["http_status"] == 200
    assert attempt["latency_ms"] is not None and attempt["at"]
    return event  # type: ignore[no-any-return]


# --- every event type ------------------------------------------------------------------------

# provider, how to get a subscription, expected event type, expected outcome
Case = tuple[str, Callable[[System], dict[str, Any]], str, str]
CASES: dict[str, Case] = {
    "cancelled": (
        "payway",
        lambda s: payway(s, "end_of_period"),
        "cancellation.succeeded",
        "cancelled",
    ),
    "already_cancelled": (
        "payway",
        lambda s: payway(s, "already_cancelled"),
        "cancellation.succeeded",
        "already_cancelled",
    ),
    "not_eligible": (
        "payway",
        lambda s: payway(s, "not_web_originated"),
        "cancellation.not_eligible",
        "not_eligible",
    ),
    "failed": (
        "payway",
        lambda s: payway(s, "end_of_period", reason=PAYWAY.unknown_reason_id),
        "cancellation.failed",
        "failed",
    ),
    "pending_provider_confirmation": (
        "azotte",
        lambda s: {"order_identifier": fresh(s, "azotte", "app_store")},
        "cancellation.succeeded",
        "pending_provider_confirmation",
    ),
    "not_found": (
        "appdirect",
        lambda s: {"subscription_id": "00000000-dead-4bee-8f00-000000000404"},
        "cancellation.not_found",
        "not_found",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_outcome_event_reaches_the_url_and_the_hook(cb_system: System, case: str) -> None:
    provider, subscription, etype, outcome = CASES[case]
    job_id = enqueue(
        cb_system,
        provider,
        subscription(cb_system),
        idempotency_key=f"cb-{case}-{time.time()}",
        metadata={"order": case},
    )
    job = wait_job(cb_system, job_id, both_ended)
    assert job["outcome"]["type"] == outcome
    event = assert_delivered_once(cb_system, job, etype)
    assert event["data"]["outcome"]["type"] == outcome
    assert event["data"]["metadata"] == {"order": case}
    assert event["data"]["idempotency_key"] == job["idempotency_key"]


def test_offer_presented_then_retained(cb_system: System) -> None:
    job_id = enqueue(cb_system, "azotte", {"order_identifier": fresh(cb_system, "azotte", "offer")})
    job = wait_job(cb_system, job_id, both_ended)
    assert job["status"] == "awaiting_decision"
    offered = assert_delivered_once(cb_system, job, "cancellation.offer_presented")
    assert offered["data"]["offer"]["offer_identifier"]
    status, _ = cb_system.post(f"/v1/cancellations/{job_id}/decision", {"decision": "accept"})
    assert status == 202
    job = wait_job(
        cb_system, job_id, lambda j: both_ended(j) and ended(j, n=2) and ended(j, HOOK, n=2)
    )
    retained = assert_delivered_once(cb_system, job, "cancellation.retained")
    assert retained["id"] != offered["id"]
    assert (
        retained["data"]["outcome"]["offer_identifier"]
        == offered["data"]["offer"]["offer_identifier"]
    )


def test_a_job_that_dead_letters_sends_dead_lettered(cb_system: System) -> None:
    cb_system.sandbox.faults("payway", error_rate=1.0)
    try:
        job_id = enqueue(cb_system, "payway", payway(cb_system, "end_of_period"))
        job = wait_job(cb_system, job_id, both_ended)
    finally:
        cb_system.sandbox.faults("payway")
    assert job["status"] == "dead_lettered"
    event = assert_delivered_once(cb_system, job, "cancellation.dead_lettered")
    assert event["data"]["error"]["type"] == "ProviderUnavailable"


# --- retries, the horizon, dead letters and replay -------------------------------------------


def test_a_receiver_failing_twice_gets_exactly_one_recorded_success(cb_system: System) -> None:
    control(cb_system, fail_next=2, status=503)
    job_id = enqueue(cb_system, "payway", payway(cb_system, "autogiro"))
    job = wait_job(cb_system, job_id, both_ended)
    assert [c["result"] for c in attempts(job)] == ["failed", "failed", "delivered"]
    assert [c["http_status"] for c in attempts(job)] == [503, 503, 200]
    got = received(cb_system, job_id)
    assert [r["status"] for r in got["requests"]] == [503, 503, 200]
    assert len(got["events"]) == 1
    # The hook was not run again for the URL's retries.
    assert [c["result"] for c in attempts(job, HOOK)] == ["delivered"]
    retries = [e for e in job["timeline"] if e["step"] == "callback"]
    assert [e["event"] for e in retries] == ["retry_scheduled", "retry_scheduled"]


def test_a_receiver_down_for_the_horizon_is_dead_lettered_and_replays(cb_system: System) -> None:
    control(cb_system, down=True)
    started = time.monotonic()
    job_id = enqueue(cb_system, "payway", payway(cb_system, "end_of_period"))
    job = wait_job(cb_system, job_id, ended, timeout_s=HORIZON_S * 6)
    assert time.monotonic() - started >= HORIZON_S
    results = [c["result"] for c in attempts(job)]
    assert results[-1] == "dead_lettered" and set(results[:-1]) == {"failed"} and len(results) >= 3
    [dl] = dead_letters(cb_system, job_id)
    assert dl["error_type"] == "CallbackGiveUp" and dl["event"] == "outcome@webhook"
    assert received(cb_system, job_id)["events"] == []
    control(cb_system)
    replay(cb_system, dl["id"])
    job = wait_job(cb_system, job_id, lambda j: attempts(j)[-1]["result"] == "delivered")
    assert dead_letters(cb_system, job_id) == []
    [event] = received(cb_system, job_id)["events"]
    assert event["id"] == job["callbacks"][0]["event_id"]  # the same event, delivered late
    # The job's own outcome never moved.
    assert job["status"] == "finished" and job["outcome"]["type"] == "cancelled"


def test_a_wrong_secret_is_a_4xx_retried_briefly_then_dead_lettered_and_replayed(
    cb_system: System,
) -> None:
    control(cb_system, secrets=[OTHER_SECRET])
    job_id = enqueue(cb_system, "payway", payway(cb_system, "immediate"))
    job = wait_job(cb_system, job_id, ended, timeout_s=CLIENT_ERROR_WINDOW_S * 10)
    got = [(c["result"], c["http_status"]) for c in attempts(job)]
    assert got[-1] == ("dead_lettered", None) and len(got) >= 3
    assert set(got[:-1]) == {("failed", 400)}
    [dl] = dead_letters(cb_system, job_id)
    assert dl["error_type"] == "CallbackRejected" and "client-error window" in dl["error"]
    # The receiver moves to the new secret: the previous one is still sent while rotating.
    control(cb_system, secrets=[ROTATED_SECRET])
    replay(cb_system, dl["id"])
    job = wait_job(cb_system, job_id, lambda j: attempts(j)[-1]["result"] == "delivered")
    verified = [r["verified"] for r in received(cb_system, job_id)["requests"]]
    assert verified == [False] * (len(got) - 1) + [True]


def test_a_failing_hook_is_retried_alone(cb_system: System) -> None:
    job_id = enqueue(
        cb_system, "payway", payway(cb_system, "end_of_period"), metadata={"hook": {"fail": 2}}
    )
    job = wait_job(cb_system, job_id, both_ended)
    assert [c["result"] for c in attempts(job, HOOK)] == ["failed", "failed", "delivered"]
    assert [c["result"] for c in attempts(job)] == ["delivered"]
    assert len(received(cb_system, job_id)["requests"]) == 1
    assert len(hook_events(cb_system, job_id)) == 1
    assert job["outcome"]["type"] == "cancelled"


def test_a_rejecting_hook_is_dead_lettered_and_the_job_is_untouched(cb_system: System) -> None:
    job_id = enqueue(
        cb_system, "payway", payway(cb_system, "end_of_period"), metadata={"hook": {"reject": True}}
    )
    job = wait_job(cb_system, job_id, both_ended)
    assert [c["result"] for c in attempts(job, HOOK)] == ["failed", "dead_lettered"]
    assert [c["result"] for c in attempts(job)] == ["delivered"]
    [dl] = dead_letters(cb_system, job_id)
    assert dl["event"] == f"outcome@{HOOK}" and dl["error_type"] == "CallbackRejected"
    assert job["status"] == "finished" and job["outcome"]["type"] == "cancelled"


# --- URL safety ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "10.20.30.40", "[::1]"])
def test_an_internal_address_is_refused_when_the_job_is_submitted(
    cb_system: System, host: str
) -> None:
    body = {
        "provider": "payway",
        "subscription": payway(cb_system, "end_of_period"),
        "callback_url": receiver_url(cb_system, host),
    }
    status, problem = cb_system.post("/v1/cancellations", body)
    assert status == 422, problem
    [error] = problem["errors"]
    assert error["field"] == "callback_url" and "ALLOWED_HOSTS" in error["message"]


def test_a_name_resolving_to_an_internal_address_is_refused_at_delivery(
    cb_system: System,
) -> None:
    # The machine's own name resolves to a loopback or private address, and is not
    # allow-listed (only "localhost" is): the URL passes at submission, its addresses do not.
    host = socket.gethostname()
    job_id = enqueue(
        cb_system,
        "payway",
        payway(cb_system, "end_of_period"),
        callback_url=receiver_url(cb_system, host),
    )
    job = wait_job(cb_system, job_id, both_ended)
    [refused, dead] = attempts(job)
    assert (refused["result"], dead["result"]) == ("refused", "dead_lettered")
    assert host in refused["error"] and "ALLOWED_HOSTS" in refused["error"]
    [dl] = dead_letters(cb_system, job_id)
    assert dl["error_type"] == "UnsafeCallbackUrl"
    assert received(cb_system, job_id)["requests"] == []
    # The hook is in-process: it still gets the event.
    assert [c["result"] for c in attempts(job, HOOK)] == ["delivered"]


def test_the_default_system_signs_with_the_demo_secret_the_receiver_holds(
    cb_system: System,
) -> None:
    # Payway here signs with both secrets (rotation); the receiver's default is the demo one.
    control(cb_system, secrets=[DEMO_CALLBACK_SECRET])
    job_id = enqueue(cb_system, "payway", payway(cb_system, "end_of_period"))
    wait_job(cb_system, job_id, both_ended)
    assert [r["verified"] for r in received(cb_system, job_id)["requests"]] == [True]


def test_a_joiners_callback_url_gets_the_jobs_events_too(cb_system: System) -> None:
    """A request for a subscription already being cancelled joins that job (issue 14, point
    4): told so in its answer, and its own callback URL is sent the job's outcome, signed."""
    order = {"order_identifier": fresh(cb_system, "azotte", "offer")}
    job_id = enqueue(cb_system, "azotte", order)
    wait_job(cb_system, job_id, lambda j: j["status"] == "awaiting_decision")
    joiner_url = receiver_url(cb_system) + "?from=joiner"  # another URL than the job's own
    status, joined = cb_system.post(
        "/v1/cancellations",
        {"provider": "azotte", "subscription": order, "callback_url": joiner_url},
    )
    assert status in (200, 202), json.dumps(joined)
    assert joined["id"] == job_id and joined["how"] == "joined"
    status, _ = cb_system.post(f"/v1/cancellations/{job_id}/decision", {"decision": "accept"})
    assert status == 202

    def joiner_ended(job: dict[str, Any]) -> bool:
        return any(
            c["url"] == joiner_url
            and c["event_type"] == "cancellation.retained"
            and c["result"] in ("delivered", "dead_lettered")
            for c in job["callbacks"]
        )

    job = wait_job(cb_system, job_id, lambda j: joiner_ended(j) and ended(j, n=2))
    [to_joiner] = [
        c
        for c in job["callbacks"]
        if c["url"] == joiner_url and c["event_type"] == "cancellation.retained"
    ]
    assert to_joiner["result"] == "delivered" and to_joiner["http_status"] == 200
    # The same event (one id) reached both URLs, each request verified by the receiver.
    got = received(cb_system, job_id)
    retained = [r for r in got["requests"] if r["event_type"] == "cancellation.retained"]
    assert len(retained) == 2 and all(r["verified"] for r in retained), retained
    assert len({r["event_id"] for r in retained}) == 1
