"""Every Prometheus metric Cancelflow exports, in one place.

Counters and histograms live in the process that sees the event and are recorded through
hooks, never by the steps themselves: the provider-call observer (``cancelflow.http``), the
job-store observer (``JobObserver``, for jobs that end and callback attempts), and the task
shells (``worker.tasks``: step durations, retries). None costs a Redis round trip.

Gauges of shared state (queue depths and the age of each queue's oldest message, dead
letters, jobs awaiting a decision, each provider's circuit breaker and in-flight calls) are
read from Redis when ``/metrics`` is scraped, by the API only (``read_store`` then
``StoreGauges``): every API replica exports the same values, so queries take ``max``, not
``sum``, of them.

Workers serve ``/metrics`` on ``CANCELFLOW_WORKER__METRICS_PORT`` (``serve_worker_metrics``);
the API serves it on its own port, behind a bearer token (``producers.api``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, Protocol

import prometheus_client
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from redis.asyncio import Redis

from cancelflow.contract import queue_names
from cancelflow.dead_letters import KINDS, kind_key
from cancelflow.guard import breaker_key, in_flight_key
from cancelflow.providers import REGISTRY as PROVIDERS
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
CALLBACK_ENDPOINTS_DISABLED = Counter(
    "cancelflow_callback_endpoints_disabled_total",
    "Webhook endpoints disabled by the callbacks themselves, by reason: gone (it answered "
    "410), failing (every delivery failed for CANCELFLOW_CALLBACKS__ENDPOINT_DISABLE_AFTER_S).",
    ["reason"],
)
API_REQUESTS = Counter(
    "cancelflow_api_requests_total",
    "Requests the API answered, by method, route (its path template, such as "
    '/v1/cancellations/{job_id}; "unmatched" when no route matched) and status.',
    ["method", "route", "status"],
)
API_REQUEST_DURATION = Histogram(
    "cancelflow_api_request_duration_seconds",
    "Time the API took to answer a request, by method and route (as for the count).",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# --- what runs where --------------------------------------------------------------------------

BUILD_INFO = Gauge(
    "cancelflow_build_info",
    "Always 1; the labels say which Cancelflow, Python and Celery this process runs.",
    ["version", "python", "celery"],
    # One series for the processes of a ``--processes`` API (all run the same build).
    multiprocess_mode="max",
)
BUILD_INFO.labels(version("cancelflow"), platform.python_version(), version("celery")).set(1)

# --- shared state, read from Redis at scrape time (StoreGauges) -------------------------------

QUEUE_DEPTH = "cancelflow_queue_depth"
QUEUE_OLDEST_AGE = "cancelflow_queue_oldest_message_age_seconds"
DEAD_LETTERS = "cancelflow_dead_letters"
JOBS_AWAITING_DECISION = "cancelflow_jobs_awaiting_decision"
CIRCUIT_STATE = "cancelflow_provider_circuit_state"
IN_FLIGHT = "cancelflow_provider_in_flight"

# The values of CIRCUIT_STATE: one series per provider, so an alert is `== 2`, and the
# dashboard maps the numbers back to these names.
CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN = 0, 1, 2

EVENT_METRICS: tuple[Counter | Histogram | Gauge, ...] = (
    JOBS_ENQUEUED,
    JOBS_FINISHED,
    STEP_DURATION,
    PROVIDER_CALLS,
    PROVIDER_CALL_DURATION,
    RETRIES,
    CALLBACK_DELIVERIES,
    CALLBACK_ENDPOINTS_DISABLED,
    API_REQUESTS,
    API_REQUEST_DURATION,
    BUILD_INFO,
)


def sample_names() -> frozenset[str]:
    """Every series name Cancelflow exports (histograms by their _bucket, _count and _sum),
    as alert rules and dashboards may name them."""
    names = {
        QUEUE_DEPTH,
        QUEUE_OLDEST_AGE,
        DEAD_LETTERS,
        JOBS_AWAITING_DECISION,
        CIRCUIT_STATE,
        IN_FLIGHT,
    }
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


def endpoint_disabled(reason: str) -> None:
    """A webhook endpoint was disabled by its deliveries (``reason``: gone or failing)."""
    CALLBACK_ENDPOINTS_DISABLED.labels(reason).inc()


def retry_scheduled(provider: str, error_type: str) -> None:
    RETRIES.labels(provider, error_type).inc()


# Methods a route can take; anything else a client sends is counted as "other", so no client
# can grow the method label.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def api_request_done(method: str, route: str, status: int, seconds: float) -> None:
    """One answered API request; ``route`` is its path template, never the raw path."""
    shown = method if method in _METHODS else "other"
    API_REQUESTS.labels(shown, route, str(status)).inc()
    API_REQUEST_DURATION.labels(shown, route).observe(seconds)


# --- store gauges -----------------------------------------------------------------------------


class BrokerWaiting(Protocol):
    @property
    def depth(self) -> Mapping[str, int]: ...

    @property
    def oldest_age_s(self) -> Mapping[str, float]: ...


class BrokerQueues(Protocol):
    """Reads the broker's queues when it is not the job store's Redis (``brokers.queues``)."""

    async def read(self, names: Sequence[str], *, now: float) -> BrokerWaiting: ...


@dataclass(frozen=True)
class StoreSnapshot:
    """The shared state the gauges show, read in one round trip."""

    queue_depth: Mapping[str, int]
    dead_letters: Mapping[str, int]
    awaiting_decision: int
    # Per queue: seconds its oldest waiting message has waited; 0 when the queue is empty, no
    # entry when that message's send time is unknown (not sent by ``messaging.dispatch``).
    oldest_message_age_s: Mapping[str, float]
    # Per provider: CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN or CIRCUIT_OPEN, and calls in flight.
    circuit_state: Mapping[str, int]
    in_flight: Mapping[str, int]


async def read_store(
    redis: Redis,
    *,
    providers: Iterable[str] = PROVIDERS,
    now: float | None = None,
    broker_queues: BrokerQueues | None = None,
) -> StoreSnapshot:
    """Queue lengths (``LLEN`` of each Celery queue: waiting messages, not running or
    countdown ones) and the oldest message of each, dead letters by kind, jobs awaiting a
    decision, and each provider's breaker and in-flight calls (``cancelflow.guard``'s keys),
    in one pipeline of a fixed number of commands. ``now``: epoch seconds (the clock).
    ``broker_queues``: when the broker is not this Redis, what reads its queues instead
    (``brokers.queues``)."""
    names = queue_names(PROVIDERS)
    keys = list(providers)
    at = time.time() if now is None else now
    from_broker = None if broker_queues is None else await broker_queues.read(names, now=at)
    async with redis.pipeline(transaction=False) as pipe:
        for name in names if from_broker is None else ():
            pipe.llen(name)
        for name in names if from_broker is None else ():
            pipe.lindex(name, -1)  # kombu pushes on the left and pops on the right
        for kind in KINDS:
            pipe.scard(kind_key(kind))
        pipe.zcard(AWAITING)
        for key in keys:
            pipe.hmget(breaker_key(key), ["open_until", "failures", "opened"])
            # Scored by when each slot's lease ends: the live ones end after now.
            pipe.zcount(in_flight_key(key), at * 1000, "+inf")
        found: list[Any] = await pipe.execute()
    n, k = 0 if from_broker is not None else len(names), len(KINDS)
    depths, heads = found[:n], found[n : 2 * n]
    dead, awaiting = found[2 * n : 2 * n + k], found[2 * n + k]
    guards = found[2 * n + k + 1 :]
    oldest: dict[str, float] = {}
    for name, head in zip(names, heads, strict=False):  # none when read from the broker
        sent_at = 0.0 if head is None else sent_at_of(head)
        if head is None:
            oldest[name] = 0.0
        elif sent_at > 0:
            oldest[name] = max(0.0, at - sent_at)
    depth = {name: int(d) for name, d in zip(names, depths, strict=False)}
    if from_broker is not None:
        depth, oldest = dict(from_broker.depth), dict(from_broker.oldest_age_s)
    return StoreSnapshot(
        queue_depth=depth,
        dead_letters={kind: int(d) for kind, d in zip(KINDS, dead, strict=True)},
        awaiting_decision=int(awaiting),
        oldest_message_age_s=oldest,
        circuit_state={
            key: circuit_state(guards[2 * i], now_ms=at * 1000) for i, key in enumerate(keys)
        },
        in_flight={key: int(guards[2 * i + 1]) for i, key in enumerate(keys)},
    )


def sent_at_of(message: bytes | str) -> float:
    """When a queued message was sent (the ``sent_at`` header ``messaging.dispatch`` sets, epoch s):
    0 when unknown (not ours, or not a kombu JSON envelope)."""
    try:
        sent = json.loads(message)["headers"]["sent_at"]
    except (ValueError, TypeError, KeyError):
        return 0.0
    if isinstance(sent, bool) or not isinstance(sent, int | float) or not math.isfinite(sent):
        return 0.0
    return float(sent)


def circuit_state(fields: list[Any], *, now_ms: float) -> int:
    """A breaker's state from its hash's ``open_until``, ``failures`` and ``opened``, as
    ``guard.breaker_state`` reads it: open until ``open_until``; then half-open while the
    failures that opened it stand (one more re-opens it); closed once a success reset them."""
    open_until, failures, opened = (int(v) if v is not None else 0 for v in fields)
    if open_until > now_ms:
        return CIRCUIT_OPEN
    return CIRCUIT_HALF_OPEN if opened and failures > 0 else CIRCUIT_CLOSED


class StoreGauges(Collector):
    """A collector of one snapshot: the gauges of shared state, as read at this scrape."""

    def __init__(self, snapshot: StoreSnapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            QUEUE_DEPTH,
            "Messages waiting in each Celery queue (Redis: LLEN; RabbitMQ: ready messages).",
            labels=["queue"],
        )
        for queue, n in self._snapshot.queue_depth.items():
            depth.add_metric([queue], n)
        yield depth
        age = GaugeMetricFamily(
            QUEUE_OLDEST_AGE,
            "Seconds the oldest message waiting in each queue has waited since it was sent; 0 "
            "when the queue is empty, no series when its send time is unknown.",
            labels=["queue"],
        )
        for queue, seconds in self._snapshot.oldest_message_age_s.items():
            age.add_metric([queue], seconds)
        yield age
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
        circuit = GaugeMetricFamily(
            CIRCUIT_STATE,
            "Each provider's circuit breaker: 0 closed, 1 half-open (the next failure opens it "
            "again), 2 open (no calls; its jobs wait for the cool-down).",
            labels=["provider"],
        )
        for provider, state in self._snapshot.circuit_state.items():
            circuit.add_metric([provider], state)
        yield circuit
        in_flight = GaugeMetricFamily(
            IN_FLIGHT,
            "Calls to each provider holding an in-flight slot now (counted only for providers "
            "with an in-flight limit, max_in_flight; 0 otherwise).",
            labels=["provider"],
        )
        for provider, n in self._snapshot.in_flight.items():
            in_flight.add_metric([provider], n)
        yield in_flight


def render(*collectors: Collector) -> bytes:
    """This process's metrics and the given collectors', in the text exposition format. In
    Prometheus' multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set for the processes of
    ``cancelflow api --processes N``), every process's counters and histograms added up,
    whichever process answers the scrape (without the per-process ``process_*`` and
    ``python_*`` series, which cannot be added)."""
    extra = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        extra.register(collector)
    own: CollectorRegistry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own = CollectorRegistry()
        multiprocess.MultiProcessCollector(own)  # type: ignore[no-untyped-call]
    return prometheus_client.generate_latest(own) + prometheus_client.generate_latest(extra)


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
