"""The billing consumer's span per stream entry, with OpenTelemetry's SDK collecting in
memory, against a real Redis Stream: it continues the entry's ``traceparent`` field, and the
job the entry makes keeps its context (so its steps are its children)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from cancelflow import tracing
from tests.producers.conftest import MakeSettings
from tests.producers.test_billing_consumer import drain, harness, payway_event

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    try:
        yield exporter
    finally:
        tracing.disable()


async def test_an_entry_is_traced_under_its_traceparent_and_its_job_keeps_it(
    make_settings: MakeSettings, spans: InMemorySpanExporter
) -> None:
    async with harness(make_settings) as h:
        event = payway_event()
        await h.processor.deps.store.redis.xadd(
            h.settings.billing.stream, {"event": json.dumps(event), "traceparent": TRACEPARENT}
        )
        await drain(h.consumer("traced"))
        (job_id,) = (await h.jobs_by_event())[event["id"]]
        job = await h.processor.deps.store.get(job_id)
    (span,) = [s for s in spans.get_finished_spans() if s.name == "billing.event"]
    assert span.kind is SpanKind.CONSUMER
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert span.attributes is not None
    assert span.attributes["messaging.destination.name"] == h.settings.billing.stream
    assert job.traceparent is not None
    assert job.traceparent.split("-")[1:3] == [TRACE_ID, f"{span.context.span_id:016x}"]
