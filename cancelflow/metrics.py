"""Every Prometheus metric Cancelflow exports, in one place.

Counters and histograms live in the process that sees the event and are recorded through
hooks, never by the steps themselves: the provider-call observer (``cancelflow.http``), the
job-store observer (``JobObserver``, for jobs that end and callback attempts), and the task
shells (``worker.tasks``: step durations, retries). None costs a Redis round trip.

Gauges of shared state (queue depths, dead letters, jobs awaiting a decision) are read from
Redis when ``/metrics`` is scraped, by the API only (``read_store`` then ``StoreGauges``):
every API replica exports the same values, so queries take ``max``, not ``sum``, of them.

Workers serve ``/metrics`` on ``CANCELFLOW_WORKER__METRICS_PORT`` (``serve_worker_metrics``);
the API serves it on its own port, behind a bearer token (``producers.api``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from redis.asyncio import Redis

from cancelflow.dead_letters import KINDS, kind_key
from cancelflow.messaging import queues
from cancelflow.store import AWAITING

# ``_created`` series double the number of series for a timestamp nobody queries.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

# --- events, recorded where they happen -------------------------------------------------------

JOBS_ENQUEUED = Counter(
    "cancelflow_jobs_enqueued_total",
    "New jobs recorded and sent by a producer (repeats of an idempotency key and requests "
    "that join a job in flight are not counted).",
    ["provider"],
)
JOBS_FINISHED = Counter(
    "cancelflow_jobs_finished_total",
    'Jobs that reached their end, by outcome; outcome="dead_lettered" for jobs moved to the '
    "dead-letter store (a replayed job that then finishes is counted again).",
    ["provider", "outcome"],
)
STEP_DURATION = Histogram(
    "cancelflow_step_duration_seconds",
    "Time one run of a step's task took, retried and failed runs included.",
    ["step"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
PROVIDER_CALLS = Counter(
    "cancelflow_provider_calls_total",
    'HTTP calls to providers, by result: the HTTP status, "timeout" or "connection_error".',
    ["provider", "method", "result"],
)
PROVIDER_CALL_DURATION = Histogram(
    "cancelflow_provider_call_duration_seconds",
    "Latency of HTTP calls to providers, failed ones included.",
    ["provider", "method"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RETRIES = Counter(
    "cancelflow_retries_total",
    "Step runs scheduled again after a retryable error, by its type (CircuitOpen and "
    "ProviderThrottled: waits on our own provider limits, no attempt spent).",
    ["provider", "error_type"],
)
CALLBACK_DELIVERIES = Counter(
    "cancelflow_callback_deliveries_total",
    "Result callback attempts (callback URL and in-process hooks), by result: delivered, "
    "skipped (no URL), failed, refused (unsafe URL or no signing secret).",
    ["result"],
)

# --- shared state, read from Redis at scrape time (StoreGauges) -------------------------------

QUEUE_DEPTH = "cancelflow_queue_depth"
DEAD_LETTERS = "cancelflow_dead_letters"
JOBS_AWAITING_DECISION = "cancelflow_jobs_awaiting_decision"

EVENT_METRICS: tuple[Counter | Histogram, ...] = (
    JOBS_ENQUEUED,
    JOBS_FINISHED,
    STEP_DURATION,
    PROVIDER_CALLS,
    PROVIDER_CALL_DURATION,
    RETRIES,
    CALLBACK_DELIVERIES,
)


def sample_names() -> frozenset[str]:
    """Every series name Cancelflow exports (histograms by their _bucket, _count and _sum),
    as alert rules and dashboards may name them."""
    names = {QUEUE_DEPTH, DEAD_LETTERS, JOBS_AWAITING_DECISION}
    for metric in EVENT_METRICS:
        for family in metric.describe():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names.update(f"{family.name}{s}" for s in ("_bucket", "_count", "_sum"))
            else:
                names.add(family.name)
    return frozenset(names)


# --- hooks ------------------------------------------------------------------------------------


def observe_provider_call(provider: str, method: str, result: str, seconds: float) -> None:
    """The ``CallObserver`` of ``cancelflow.http.ProviderHttp``."""
    PROVIDER_CALLS.labels(provider, method, result).inc()
    PROVIDER_CALL_DURATION.labels(provider, method).observe(seconds)


class JobMetrics:
    """The ``JobObserver`` of ``cancelflow.store.JobStore``."""

    def job_ended(self, provider: str, outcome: str) -> None:
        JOBS_FINISHED.labels(provider, outcome).inc()

    def callback_attempted(self, result: str) -> None:
        # "dead_lettered" marks the end of a target's attempts, not an attempt: the dead
        # letters gauge counts those.
        if result != "dead_lettered":
            CALLBACK_DELIVERIES.labels(result).inc()


JOB_METRICS = JobMetrics()


def job_enqueued(provider: str) -> None:
    JOBS_ENQUEUED.labels(provider).inc()


def step_ran(step: str, seconds: float) -> None:
    STEP_DURATION.labels(step).observe(seconds)


def retry_scheduled(provider: str, error_type: str) -> None:
    RETRIES.labels(provider, error_type).inc()


# --- store gauges -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreSnapshot:
    """The shared state the gauges show, read in one round trip."""

    queue_depth: Mapping[str, int]
    dead_letters: Mapping[str, int]
    awaiting_decision: int


async def read_store(redis: Redis) -> StoreSnapshot:
    """Queue lengths (``LLEN`` of each Celery queue: waiting messages, not running or
    countdown ones), dead letters by kind and jobs awaiting a decision, in one pipeline."""
    names = [q.name for q in queues()]
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(name)
        for kind in KINDS:
            pipe.scard(kind_key(kind))
        pipe.zcard(AWAITING)
        found: list[Any] = await pipe.execute()
    depths, rest = found[: len(names)], found[len(names) :]
    return StoreSnapshot(
        queue_depth={name: int(n) for name, n in zip(names, depths, strict=True)},
        dead_letters={kind: int(n) for kind, n in zip(KINDS, rest[: len(KINDS)], strict=True)},
        awaiting_decision=int(rest[-1]),
    )


class StoreGauges(Collector):
    """A collector of one snapshot: the gauges of shared state, as read at this scrape."""

    def __init__(self, snapshot: StoreSnapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            QUEUE_DEPTH, "Messages waiting in each Celery queue (LLEN).", labels=["queue"]
        )
        for queue, n in self._snapshot.queue_depth.items():
            depth.add_metric([queue], n)
        yield depth
        dead = GaugeMetricFamily(
            DEAD_LETTERS, "Entries in the dead-letter store, by kind.", labels=["kind"]
        )
        for kind, n in self._snapshot.dead_letters.items():
            dead.add_metric([kind], n)
        yield dead
        yield GaugeMetricFamily(
            JOBS_AWAITING_DECISION,
            "Jobs parked on a retention offer, waiting for the customer's decision.",
            value=self._snapshot.awaiting_decision,
        )


def render(*collectors: Collector) -> bytes:
    """This process's metrics and the given collectors', in the text exposition format."""
    extra = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        extra.register(collector)
    return prometheus_client.generate_latest(REGISTRY) + prometheus_client.generate_latest(extra)


CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


# --- the worker's endpoint --------------------------------------------------------------------


@dataclass
class MetricsServer:
    """``prometheus_client``'s HTTP server in a thread of the worker process."""

    server: Any
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_worker_metrics(host: str, port: int) -> MetricsServer:
    """Serve this process's metrics on ``host:port``; ``OSError`` when the port is taken."""
    server, _thread = prometheus_client.start_http_server(port, addr=host)
    return MetricsServer(server, int(server.server_address[1]))
