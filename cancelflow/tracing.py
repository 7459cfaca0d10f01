"""OpenTelemetry traces: one trace per job, from the API request through each step, each
provider call and each callback delivery (docs/tracing.md).

Off by default. ``configure`` turns it on in a process when ``OTEL_TRACES_EXPORTER`` names an
exporter (``Settings.traces_exporters``); the SDK reads every other standard ``OTEL_*``
variable itself (endpoint, headers, service name, resource attributes, sampler, batching,
propagators). While off, nothing here imports OpenTelemetry: each hook on the hot path is
one test of the module's ``enabled`` and returns.

The context crosses processes in W3C Trace Context headers (``traceparent``, ``tracestate``,
through OpenTelemetry's configured propagators): in a step's Celery message headers, on each
request to a provider and to a callback receiver. A job's record keeps the ``traceparent`` it
was created under, so a step re-sent without a live parent (the watchdog, the straggler
sweep, a decision's deadline) still joins the job's trace.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from cancelflow.settings import Settings

# Read by every hook: False until ``configure`` set tracing up in this process.
enabled = False
_tracer: Tracer | None = None
_provider: Any = None

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# Attribute names of our own (OpenTelemetry's semantic conventions for the rest).
JOB_ID = "cancelflow.job_id"
PROVIDER = "cancelflow.provider"
STEP = "cancelflow.step"
ATTEMPT = "cancelflow.attempt"
RESULT = "cancelflow.result"
REQUEST_ID = "cancelflow.request_id"


def configure(settings: Settings, *, service: str) -> bool:
    """Set tracing up in this process when ``settings`` say it is on (``OTEL_TRACES_EXPORTER``
    names an exporter and ``OTEL_SDK_DISABLED`` is not true): a tracer provider exporting in
    batches to each named exporter, ``service`` the service name unless ``OTEL_SERVICE_NAME``
    (or ``OTEL_RESOURCE_ATTRIBUTES``) names one. Once per process; returns whether on."""
    global enabled, _tracer, _provider
    exporters = settings.traces_exporters()
    if enabled or not exporters:
        return enabled
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
    for name in exporters:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # Endpoint, headers, timeout, compression: OTEL_EXPORTER_OTLP_(TRACES_)*.
            exporter = OTLPSpanExporter()
        else:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    _tracer = trace.get_tracer("cancelflow")
    enabled = True
    return True


def use_tracer_provider(provider: Any) -> None:
    """Trace to ``provider`` (an SDK ``TracerProvider``) in this process: for tests that
    collect spans in memory, and for embedders who set OpenTelemetry up themselves."""
    global enabled, _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("cancelflow")
    enabled = True


def disable() -> None:
    """Stop tracing in this process (tests); spans already ended stay with their exporter."""
    global enabled, _tracer, _provider
    enabled, _tracer, _provider = False, None, None


def flush(timeout_s: float = 5.0) -> None:
    """Export the ended spans still waiting in their batch (a process about to stop)."""
    if _provider is not None and hasattr(_provider, "force_flush"):
        _provider.force_flush(int(timeout_s * 1000))


def inject(headers: MutableMapping[str, Any], *, job_traceparent: str | None = None) -> None:
    """Add the current trace context (``traceparent``, ``tracestate``) to ``headers``: a
    step's message, a provider request, a callback. ``job_traceparent`` (a job's own, from
    its record) instead when no span is current, or the current one is of another trace (a
    decision's or a replay's request): a job's steps stay in the job's trace. Nothing while
    off."""
    if not enabled:
        return
    from opentelemetry import propagate

    propagate.inject(headers)
    if job_traceparent is not None and _trace_id(headers.get(TRACEPARENT)) != _trace_id(
        job_traceparent
    ):
        headers[TRACEPARENT] = job_traceparent
        headers.pop(TRACESTATE, None)


def _trace_id(traceparent: str | None) -> str | None:
    parts = traceparent.split("-") if traceparent else []
    return parts[1] if len(parts) >= 4 else None


def current_traceparent() -> str | None:
    """The current span's ``traceparent`` (to keep in a job's record), None while off."""
    if not enabled:
        return None
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get(TRACEPARENT)


def has_current_span() -> bool:
    """Whether a span is current here (a step sent from inside one is its child)."""
    if not enabled:
        return False
    from opentelemetry import trace

    return trace.get_current_span().get_span_context().is_valid


def set_attributes(attributes: Mapping[str, Any]) -> None:
    """Set ``attributes`` (None values left out) on the current span, if tracing is on."""
    if not enabled:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    for key, value in attributes.items():
        if value is not None:
            span.set_attribute(key, value)


@contextmanager
def span(
    name: str,
    *,
    kind: str = "internal",
    attributes: Mapping[str, Any] | None = None,
    parent: Mapping[str, Any] | None = None,
) -> Iterator[Span | None]:
    """A span named ``name`` around the block, current within it (None while off); an
    exception leaving the block is recorded on it and its status set to error. ``kind``:
    ``server``, ``client``, ``consumer``, ``producer`` or ``internal``. ``parent``: headers
    to take the parent from (``traceparent``) instead of the current context."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    context = propagate.extract(parent) if parent is not None else None
    attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
    with _tracer.start_as_current_span(
        name, context=context, kind=SpanKind[kind.upper()], attributes=attrs
    ) as current:
        yield current


def log_fields(current: Span | None) -> dict[str, str]:
    """``trace_id`` and ``span_id`` of ``current`` (hex, as trace backends show them), for log
    lines: a line's trace is found from the line and back. Empty for no (valid) span."""
    if current is None:
        return {}
    context = current.get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


class StepScope:
    """A step's span, open from where the pool starts the step's coroutine until Celery's
    tracer ran the task shell (so the next step sent is its child); ``end`` closes it."""

    def __init__(self, name: str, request: Mapping[str, Any]) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind

        assert _tracer is not None
        delivery = request.get("delivery_info") or {}
        attributes = {
            "messaging.system": "celery",
            "messaging.operation.type": "process",
            "messaging.destination.name": delivery.get("routing_key"),
            "messaging.message.id": request.get("id"),
            JOB_ID: request.get("job_id"),
            PROVIDER: request.get("provider"),
            STEP: name.rpartition(".")[2],
            ATTEMPT: int(request.get("retries") or 0),
            REQUEST_ID: request.get("request_id"),
        }
        self.span = _tracer.start_span(
            name,
            context=propagate.extract(request),
            kind=SpanKind.CONSUMER,
            attributes={k: v for k, v in attributes.items() if v is not None},
        )
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        # On the step's log lines (this coroutine's context is the step's own).
        structlog.contextvars.bind_contextvars(**log_fields(self.span))

    def end(self, error: BaseException | None = None) -> None:
        """Close the span (with ``error`` recorded, if the step's coroutine raised one)."""
        from opentelemetry import context as otel_context
        from opentelemetry.trace import Status, StatusCode

        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        otel_context.detach(self._token)
        self.span.end()


def step_scope(name: str, request: Mapping[str, Any]) -> StepScope | None:
    """The span of task ``name``'s step run, parented by the ``traceparent`` of its message
    (``request``: Celery's request, the message's headers in it); None while off."""
    return StepScope(name, request) if _tracer is not None else None


def record_http(status: int | None = None, error: BaseException | None = None) -> None:
    """On the current (client) span: the answer's status, or the error the request ended
    with; a status of 500 and above, or an error, marks the span as failed."""
    if not enabled:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    current = trace.get_current_span()
    if status is not None:
        current.set_attribute("http.response.status_code", status)
        if status >= 500:
            current.set_attribute("error.type", str(status))
            current.set_status(Status(StatusCode.ERROR))
    if error is not None:
        current.set_attribute("error.type", type(error).__name__)
        current.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
