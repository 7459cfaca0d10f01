"""Tracing's parts in one process, with OpenTelemetry's SDK collecting spans in memory: off
by default (nothing imported, nothing added to a message); on, a step message carries the
span it is sent from, else the job's own trace context from its record, and a step's span
continues its message's. (tests/integration/test_tracing.py follows one job through the
real processes.)"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import fakeredis
import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import ValidationError

from cancelflow import sweeps, tracing
from cancelflow.contract import CancellationRequest, Step
from cancelflow.lifecycle import Next
from cancelflow.settings import Settings
from cancelflow.wiring import build_deps
from messaging.config import create_celery
from messaging.dispatch import _step_headers, step_message_for

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, every span ended kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    try:
        yield exporter
    finally:
        tracing.disable()


def test_off_by_default_nothing_imports_opentelemetry() -> None:
    """The API's app, a worker's task modules and a step's message built at the default
    settings, in a fresh interpreter: no OpenTelemetry module loaded, no header added."""
    code = """
import sys
from cancelflow.settings import Settings
from cancelflow.contract import Step
from cancelflow.lifecycle import Next
import cancelflow.http, cancelflow.delivery, cancelflow.callbacks, worker.pool, worker.tasks
from messaging.config import create_celery
from messaging.dispatch import step_message_for
from producers.api import create_app

settings = Settings()
create_app(settings)
message = step_message_for(create_celery(settings), Next(Step.ELIGIBILITY, "j", "payway"))
assert message is not None and "traceparent" not in message.headers, message.headers
print([m for m in sys.modules if m.startswith("opentelemetry")])
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_tracing_is_on_only_when_an_exporter_is_named() -> None:
    assert Settings().traces_exporters() == ()
    assert Settings(otel_traces_exporter="none").traces_exporters() == ()
    assert Settings(otel_traces_exporter="OTLP, console").traces_exporters() == ("otlp", "console")
    # The SDK's own switch wins.
    on_but_disabled = Settings(otel_traces_exporter="otlp", otel_sdk_disabled=True)
    assert on_but_disabled.traces_exporters() == ()
    with pytest.raises(ValidationError, match="OTEL_TRACES_EXPORTER: unknown exporter zipkin"):
        Settings(otel_traces_exporter="zipkin")
    with pytest.raises(ValidationError, match="OTEL_EXPORTER_OTLP_PROTOCOL: grpc is not supported"):
        Settings(otel_traces_exporter="otlp", otel_exporter_otlp_protocol="grpc")
    # Off, another program's protocol in the environment is no concern.
    assert Settings(otel_exporter_otlp_protocol="grpc").traces_exporters() == ()
    assert not tracing.configure(Settings(), service="test")
    assert not tracing.enabled


def test_the_standard_variables_are_read_under_their_own_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    assert Settings().traces_exporters() == ("otlp",)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert Settings().traces_exporters() == ()


def test_off_a_step_message_has_no_trace_header() -> None:
    headers = _step_headers(Next(Step.CONFIRM, "j", "payway", trace=TRACEPARENT))
    assert "traceparent" not in headers
    assert tracing.current_traceparent() is None


def test_a_step_message_carries_the_span_it_is_sent_from(spans: InMemorySpanExporter) -> None:
    app = create_celery(Settings())
    with tracing.span("POST /v1/cancellations", kind="server") as current:
        assert current is not None
        context = current.get_span_context()
        wanted = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        # The job-creation push (step_message_for) and dispatch build the same headers.
        message = step_message_for(app, Next(Step.ELIGIBILITY, "j", "payway"))
        assert message is not None and message.headers["traceparent"] == wanted
        # A live span of the job's trace is the parent.
        same_trace = f"00-{context.trace_id:032x}-{'1' * 16}-01"
        headers = _step_headers(Next(Step.CONFIRM, "j", "payway", trace=same_trace))
        assert headers["traceparent"] == wanted
        # A live span of another trace (a decision's request) is not: the job's trace goes on.
        headers = _step_headers(Next(Step.CONFIRM, "j", "payway", trace=TRACEPARENT))
        assert headers["traceparent"] == TRACEPARENT


def test_outside_any_span_a_step_message_carries_the_jobs_trace(
    spans: InMemorySpanExporter,
) -> None:
    headers = _step_headers(Next(Step.CONFIRM, "j", "payway", trace=TRACEPARENT))
    assert headers["traceparent"] == TRACEPARENT
    assert "traceparent" not in _step_headers(Next(Step.CONFIRM, "j", "payway"))


def test_the_watchdog_resends_into_the_trace_the_job_was_created_in(
    spans: InMemorySpanExporter,
) -> None:
    async def go() -> None:
        deps = build_deps(Settings(), redis=fakeredis.FakeAsyncRedis())
        with tracing.span("POST /v1/cancellations", kind="server"):
            created = await deps.store.create(
                CancellationRequest(provider="payway", subscription={"account_id": "a" * 24}),
                identity="sub-1",
            )
            kept = tracing.current_traceparent()
        assert kept is not None and created.job.traceparent == kept
        assert (await deps.store.get(created.job.id)).traceparent == kept
        await deps.store.mark_dispatched(created.job.id)
        await asyncio.sleep(0.05)
        # Outside any span, as beat's sweep runs.
        (resent,) = await sweeps.resume_stalled(deps, quiet_for_s=0.01)
        assert resent.trace == kept
        assert _step_headers(resent)["traceparent"] == kept

    asyncio.run(go())


def test_the_straggler_sweep_sends_a_first_step_into_the_jobs_trace(
    spans: InMemorySpanExporter,
) -> None:
    async def go() -> None:
        deps = build_deps(Settings(), redis=fakeredis.FakeAsyncRedis())
        with tracing.span("POST /v1/cancellations", kind="server"):
            # No first step pushed with it (another broker): marked undispatched.
            created = await deps.store.create(
                CancellationRequest(provider="payway", subscription={"account_id": "b" * 24}),
                identity="sub-2",
            )
        await asyncio.sleep(0.05)
        (first,) = await sweeps.stragglers(deps, older_than_s=0.01)
        assert first.job_id == created.job.id
        assert first.trace is not None and first.trace == created.job.traceparent
        assert _step_headers(first)["traceparent"] == first.trace

    asyncio.run(go())


def test_a_steps_span_continues_its_messages_context(spans: InMemorySpanExporter) -> None:
    request = {
        "id": "task-1",
        "traceparent": TRACEPARENT,
        "job_id": "job-1",
        "provider": "payway",
        "retries": 2,
        "request_id": "req-1",
        "delivery_info": {"routing_key": "cancellations.payway"},
    }

    def step() -> tuple[dict[str, Any], dict[str, Any]]:
        # In a context of its own, as the pool's coroutine runs: its log fields stay there.
        scope = tracing.step_scope("cancelflow.confirm", request)
        assert scope is not None
        # The next step, sent from within the step, is its child.
        sent = _step_headers(replace(Next(Step.CALLBACK, "job-1", "payway"), args=("outcome",)))
        logged = structlog.contextvars.get_contextvars()
        scope.end(RuntimeError("boom"))
        return sent, logged

    sent, logged = contextvars.copy_context().run(step)
    (span,) = spans.get_finished_spans()
    assert logged["trace_id"] == TRACEPARENT.split("-")[1]
    assert logged["span_id"] == f"{span.context.span_id:016x}"
    assert "trace_id" not in structlog.contextvars.get_contextvars()
    assert span.name == "cancelflow.confirm" and span.kind is SpanKind.CONSUMER
    assert f"{span.context.trace_id:032x}" == TRACEPARENT.split("-")[1]
    assert span.parent is not None and f"{span.parent.span_id:016x}" == TRACEPARENT.split("-")[2]
    assert sent["traceparent"] == f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"
    assert dict(span.attributes or {}) == {
        "messaging.system": "celery",
        "messaging.operation.type": "process",
        "messaging.destination.name": "cancellations.payway",
        "messaging.message.id": "task-1",
        "cancelflow.job_id": "job-1",
        "cancelflow.provider": "payway",
        "cancelflow.step": "confirm",
        "cancelflow.attempt": 2,
        "cancelflow.request_id": "req-1",
    }
    assert span.status.status_code is StatusCode.ERROR
    # Detached: nothing is current after the step.
    assert not tracing.has_current_span()


def test_the_console_exporter_writes_each_span(capfd: pytest.CaptureFixture[str]) -> None:
    """``OTEL_TRACES_EXPORTER=console`` through ``configure``, the SDK's own batch processor
    and exporter (flushed), in a fresh interpreter: the global provider is set once."""
    code = """
from cancelflow import tracing
from cancelflow.settings import Settings
assert tracing.configure(Settings(otel_traces_exporter="console"), service="cancelflow-test")
with tracing.span("hello", attributes={"cancelflow.job_id": "j"}):
    pass
tracing.flush()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    span = json.loads(out.stdout)
    assert span["name"] == "hello" and span["attributes"] == {"cancelflow.job_id": "j"}
    assert span["resource"]["attributes"]["service.name"] == "cancelflow-test"
