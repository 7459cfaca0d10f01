"""OpenTelemetry traces over a real system: the API and a worker as processes, exporting over
OTLP/HTTP (OpenTelemetry's own SDK and exporter) to a collector this test runs
(``tests.otlp_collector``, decoding the protobuf with opentelemetry-proto), the provider and
callback calls going over HTTP to the sandboxes, which keep the ``traceparent`` they get.

What it proves: a caller's ``traceparent`` sent to the API reaches the provider and the
callback receiver with the same trace id; one job's spans, from the API process and the
worker process, form one tree under the caller's span (no orphan, no second root); retried
steps stay in it, and so do the steps a decision sends from a request of another trace (from
the job record's context); and with tracing off (the default) nothing is sent or stored."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from producers.local import http_json, wait_until
from sandboxes.azotte import DEMO as AZOTTE_DEMO
from sandboxes.payway import DEMO
from tests.fixtures.system import StartSystem
from tests.otlp_collector import CollectedSpan, Collector, otlp_collector
from tests.support import System, payway_body

pytestmark = pytest.mark.integration

STEP_SPANS = ("cancelflow.eligibility", "cancelflow.confirm", "cancelflow.callback")
ANY_STEP = {*STEP_SPANS, "cancelflow.retention_offer"}


@pytest.fixture(scope="session")
def collector() -> Iterator[Collector]:
    with otlp_collector() as found:
        yield found


@pytest.fixture(scope="session")
def traced(start_system: StartSystem, collector: Collector) -> System:
    """A system with tracing on, by the standard variables only, on a Redis DB of its own (no
    untraced worker takes its jobs)."""
    return start_system(
        isolated=True,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        # Spans exported within 100 ms of ending, not the SDK's 5 s: the test waits less.
        OTEL_BSP_SCHEDULE_DELAY="100",
    )


@pytest.fixture(autouse=True)
def fresh_payway(sandbox: Any) -> Iterator[None]:
    sandbox.reset("payway")
    sandbox.faults("payway")
    yield
    sandbox.faults("payway")


def caller_traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent_id, f"00-{trace_id}-{parent_id}-01"


def enqueue(system: System, body: dict[str, Any], traceparent: str) -> str:
    status, job = http_json(
        "POST",
        f"{system.api_url}/v1/cancellations",
        body,
        token=system.token,
        headers={"traceparent": traceparent},
    )
    assert status == 202, job
    return str(job["id"])


def receiver_url(system: System) -> str:
    return f"{system.sandbox.url}/receiver/events"


def sandbox_traceparents(system: System, trace_id: str) -> list[str]:
    status, body = http_json("GET", f"{system.sandbox.url}/payway/_sandbox/traceparents")
    assert status == 200, body
    return [t for t in body["traceparents"] if t is not None and t.split("-")[1] == trace_id]


def receiver_requests(system: System, job_id: str) -> list[dict[str, Any]]:
    status, body = http_json("GET", f"{system.sandbox.url}/receiver/_events?job_id={job_id}")
    assert status == 200, body
    return list(body["requests"])


def trace_of(collector: Collector, trace_id: str, *, steps: int) -> list[CollectedSpan]:
    """The trace's spans once its callback delivery and ``steps`` step spans arrived."""

    def arrived() -> bool:
        spans = collector.of_trace(trace_id)
        return any(s.name == "POST callback" for s in spans) and (
            sum(s.name in ANY_STEP for s in spans) >= steps
        )

    try:
        wait_until(arrived, timeout_s=30, what=f"the spans of trace {trace_id}")
    except TimeoutError as exc:
        got = [(s.name, s.span_id, s.parent_span_id) for s in collector.of_trace(trace_id)]
        raise AssertionError(f"{exc}; it has {got}") from exc
    return collector.of_trace(trace_id)


def assert_one_tree(spans: list[CollectedSpan], caller_span_id: str) -> CollectedSpan:
    """Every span's parent is in the trace, but the root's, which is the caller's span."""
    ids = {s.span_id for s in spans}
    assert len(ids) == len(spans), "a span id twice"
    roots = [s for s in spans if s.parent_span_id not in ids]
    assert [(r.name, r.parent_span_id) for r in roots] == [
        ("POST /v1/cancellations", caller_span_id)
    ], [(s.name, s.span_id, s.parent_span_id) for s in spans]
    return roots[0]


def test_a_callers_traceparent_makes_one_tree_to_the_provider_and_the_receiver(
    traced: System, collector: Collector
) -> None:
    trace_id, caller_span, traceparent = caller_traceparent()
    job_id = enqueue(
        traced, payway_body(DEMO.end_of_period, callback_url=receiver_url(traced)), traceparent
    )
    job = traced.wait(job_id)
    assert job["outcome"]["type"] == "cancelled"
    # The record keeps the context it was created in: the API request's span.
    assert job["traceparent"].split("-")[1] == trace_id

    spans = trace_of(collector, trace_id, steps=3)
    root = assert_one_tree(spans, caller_span)
    assert (root.kind, root.service) == ("server", "cancelflow-api")
    assert root.attributes["http.response.status_code"] == 202
    assert root.attributes["cancelflow.job_id"] == job_id
    assert job["traceparent"].split("-")[2] == root.span_id

    by_name = {s.name: s for s in spans if s.name in STEP_SPANS}
    eligibility, confirm, callback = (by_name[n] for n in STEP_SPANS)
    # Each step is the child of the span that sent it: the request, then the step before.
    assert eligibility.parent_span_id == root.span_id
    assert confirm.parent_span_id == eligibility.span_id
    assert callback.parent_span_id == confirm.span_id
    for step in (eligibility, confirm, callback):
        assert (step.kind, step.service) == ("consumer", "cancelflow-worker")
        assert step.attributes["cancelflow.job_id"] == job_id
        assert step.attributes["cancelflow.provider"] == "payway"

    calls = [s for s in spans if s.kind == "client" and s.name != "POST callback"]
    assert calls, [s.name for s in spans]
    assert {s.attributes["cancelflow.provider"] for s in calls} == {"payway"}
    assert {s.parent_span_id for s in calls} <= {eligibility.span_id, confirm.span_id}
    # The provider got each call's own span as its parent, in the caller's trace.
    received = sandbox_traceparents(traced, trace_id)
    assert sorted(t.split("-")[2] for t in received) == sorted(s.span_id for s in calls)

    (delivery,) = [s for s in spans if s.name == "POST callback"]
    assert delivery.parent_span_id == callback.span_id
    assert delivery.attributes["http.response.status_code"] == 200
    (seen,) = receiver_requests(traced, job_id)
    assert seen["traceparent"] == f"00-{trace_id}-{delivery.span_id}-01"
    # The worker's lines of the job's steps name the step's trace and span.
    lines = [json.loads(row.partition(": ")[2]) for row in traced.log_lines(job_id).splitlines()]
    step_lines = [line for line in lines if line.get("step") and line.get("job_id") == job_id]
    assert step_lines and {line.get("trace_id") for line in step_lines} == {trace_id}
    assert {line["span_id"] for line in step_lines} <= {s.span_id for s in spans}
    # The start-up's /readyz polls made no trace of their own.
    assert not [s for s in collector.spans if s.attributes.get("url.path") == "/readyz"]


def test_retried_steps_stay_in_the_jobs_trace(traced: System, collector: Collector) -> None:
    # Every distinct provider call fails once (a 503), so each step is retried.
    traced.sandbox.faults("payway", fail_once_rate=1.0, seed=7)
    trace_id, caller_span, traceparent = caller_traceparent()
    job_id = enqueue(
        traced, payway_body(DEMO.immediate, callback_url=receiver_url(traced)), traceparent
    )
    job = traced.wait(job_id, timeout_s=60)
    assert job["outcome"]["type"] == "cancelled"
    spans = trace_of(collector, trace_id, steps=5)
    root = assert_one_tree(spans, caller_span)
    eligibility = [s for s in spans if s.name == "cancelflow.eligibility"]
    attempts = sorted(s.attributes["cancelflow.attempt"] for s in eligibility)
    assert len(attempts) >= 2 and attempts == list(range(len(attempts))), attempts
    # A retry's message keeps the headers of the one it retries: the same parent.
    assert {s.parent_span_id for s in eligibility} == {root.span_id}
    failed = [s for s in spans if s.kind == "client" and s.status_code == 2]
    assert failed and {s.attributes["http.response.status_code"] for s in failed} == {503}


def test_off_by_default_nothing_is_sent_or_stored(system: System) -> None:
    """The shared system runs at the default settings: tracing off. A caller's traceparent
    is not passed on, and the job record holds none."""
    _, _, traceparent = caller_traceparent()
    job_id = enqueue(
        system, payway_body(DEMO.end_of_period, callback_url=receiver_url(system)), traceparent
    )
    job = system.wait(job_id)
    assert job["outcome"]["type"] == "cancelled"
    assert job.get("traceparent") is None
    status, body = http_json("GET", f"{system.sandbox.url}/payway/_sandbox/traceparents")
    assert status == 200 and body["traceparents"], body
    assert set(body["traceparents"]) == {None}
    assert [r["traceparent"] for r in receiver_requests(system, job_id)] == [None]


def test_a_decision_goes_on_in_the_jobs_trace(traced: System, collector: Collector) -> None:
    """The decision's request comes without a traceparent (a trace of its own); the steps it
    sends are still parented by the job's context, from its record."""
    traced.sandbox.reset("azotte")
    trace_id, caller_span, traceparent = caller_traceparent()
    body = {
        "provider": "azotte",
        "subscription": {"order_identifier": AZOTTE_DEMO.offer},
        "callback_url": receiver_url(traced),
    }
    job_id = enqueue(traced, body, traceparent)
    traced.wait(job_id, until={"awaiting_decision"})
    status, answer = traced.post(f"/v1/cancellations/{job_id}/decision", {"decision": "reject"})
    assert status == 202, answer
    job = traced.wait(job_id)
    assert job["outcome"]["type"] == "cancelled"

    # eligibility, retention_offer, the offer's callback, confirm, the outcome's callback
    spans = trace_of(collector, trace_id, steps=5)
    root = assert_one_tree(spans, caller_span)
    (confirm,) = [s for s in spans if s.name == "cancelflow.confirm"]
    assert confirm.parent_span_id == root.span_id

    def decisions() -> list[CollectedSpan]:
        return [
            s
            for s in collector.spans
            if s.name == "POST /v1/cancellations/{job_id}/decision"
            and s.attributes.get("cancelflow.job_id") == job_id
        ]

    # The API's span comes in the API's own export batch, which may follow the worker's.
    wait_until(lambda: bool(decisions()), timeout_s=30, what="the decision request's span")
    (decision,) = decisions()
    assert decision.trace_id != trace_id
