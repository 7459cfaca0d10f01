"""The Celery app of the workers, built by ``create_app`` from a Settings.

``celery -A worker.app`` (and Flower) find ``app`` here: built on first access from the
environment (``load_settings``), so importing this module (or ``worker.tasks``) reads no
environment and a test builds its own app from the Settings it made.
"""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import threading
import urllib.parse
from typing import Any

import structlog
from celery import Celery, signals

from cancelflow.logging import configure_logging, get_logger
from cancelflow.redis_clients import sync_client
from cancelflow.settings import Settings, load_settings, warn_unknown_env
from cancelflow.wiring import redis_client, report_persistence
from messaging.config import SENTINEL_TRANSPORT, TRANSPORT, create_celery
from messaging.dispatch import close_publishers, flush_sent_events
from messaging.patches import (
    WorkerChannel,
    lean_tracebacks,
    show_retries_until_they_run,
    show_transports_as,
)
from worker import leases

WORKER_TRANSPORT = "messaging.patches:WorkerTransport"
WORKER_SENTINEL_TRANSPORT = "messaging.patches:WorkerSentinelTransport"


# A worker's thresholds for CPython's cyclic garbage collector (CPython's own: 700, 10, 10).
# A step allocates thousands of short-lived objects (messages, records, HTTP exchanges) that
# reference counting frees as they go; at 700 allocations the youngest generation was
# scanned every step or two and the whole heap every few hundred. Measured with make bench's
# no-latency scenario (five A/B pairs, 1,500 jobs, 2 rounds each): the worker's CPU per job
# 8.3 ms (median) against 9.7 ms, jobs/s over the baseline 1.06 against 1.00.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """What start-up made (modules, settings, the app, the runtime) is moved out of the
    collector's reach for good (``gc.freeze``: it is never garbage, and the collector no
    longer scans it), and the thresholds set to ``GC_THRESHOLDS``."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def settings_of(app: Celery) -> Settings:
    """The Settings ``app`` was built from (``create_app``)."""
    found = getattr(app, "cancelflow_settings", None)
    if not isinstance(found, Settings):
        raise TypeError(f"{app!r} was not built by worker.app.create_app")
    return found


def create_app(settings: Settings) -> Celery:
    """The workers' Celery app: the shared configuration (``messaging.config``), the workers'
    transport, consumer and pool, beat's schedule, the task shells, and the signal handlers
    that start and stop the process's runtime."""
    from worker import tasks

    app = create_celery(settings)
    app.cancelflow_settings = settings
    app.conf.worker_consumer = "worker.consumer:Consumer"
    if settings.broker_kind() == "redis":
        # Each worker process holds its unacknowledged messages apart, so another can give
        # them back the moment it dies (worker.leases), not an hour later. (RabbitMQ does
        # this, and what the workers' Redis channel does, natively: brokers.amqp.)
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            **leases.unacked_keys(leases.WORKER_ID),
        }
        # The workers' channel dead-letters unreadable list items: into the job store, which
        # may be another Redis than the broker's.
        WorkerChannel.job_store = (
            None
            if settings.broker() == settings.redis_url
            else sync_client(
                settings.redis_url,
                socket_connect_timeout=settings.redis_connect_timeout_s,
                socket_timeout=settings.redis_read_timeout_s,
            )
        )
        scheme = urllib.parse.urlsplit(settings.broker()).scheme
        app.conf.broker_transport = (
            WORKER_SENTINEL_TRANSPORT if scheme == "sentinel" else WORKER_TRANSPORT
        )
        # Our transports are kombu's Redis transport: shown as the broker URL's scheme.
        show_transports_as(
            scheme, WORKER_TRANSPORT, TRANSPORT, WORKER_SENTINEL_TRANSPORT, SENTINEL_TRANSPORT
        )
    # Flower, run on this app, shows a retry as RETRY for its whole countdown.
    show_retries_until_they_run()
    lean_tracebacks()
    # Steps run on the runtime's event loop, other tasks in threads (see worker.pool).
    app.conf.worker_pool = "worker.pool:TaskPool"
    # Interval schedules only: the state file is a scratch file, one per process.
    app.conf.beat_schedule_filename = os.path.join(
        tempfile.gettempdir(), f"cancelflow-beat-{os.getpid()}"
    )
    restore_s = float(settings.limits().restore_interval_s)
    app.conf.beat_schedule = {
        # Jobs parked on a retention offer past their deadline get their default action.
        "expire-decisions": {
            "task": "cancelflow.expire_decisions",
            "schedule": settings.worker.decision_sweep_s,
            "options": {"queue": "maintenance", "expires": settings.worker.decision_sweep_s},
        },
        # Jobs mid-chain that stopped moving (a message lost anywhere): their step is re-sent.
        "resume-stalled": {
            "task": "cancelflow.resume_stalled",
            "schedule": restore_s,
            "options": {"queue": "maintenance", "expires": restore_s},
        },
        # Jobs recorded by a producer that died before sending their first step.
        "dispatch-stragglers": {
            "task": "cancelflow.dispatch_stragglers",
            "schedule": 30.0,
            "options": {"queue": "maintenance", "expires": 30.0},
        },
    }
    tasks.register(app)
    _connect_signals(app, settings)
    return app


def _connect_signals(app: Celery, settings: Settings) -> None:
    """The process's start and stop, for the app's worker (or beat). Celery's signals are
    global: each handler is connected once per app (``dispatch_uid``) and kept alive by it."""
    uid = f"cancelflow-{id(app)}"

    def setup_logging(**_: Any) -> None:
        # Connecting here stops Celery from installing its own handlers: one format for all.
        configure_logging(fmt=settings.log_format, level=settings.log_level)
        warn_unknown_env()

    def log_worker_start(sender: str, instance: Any, **_: Any) -> None:
        get_logger(__name__).info(
            "worker.starting",
            hostname=sender,
            queues=sorted(instance.app.amqp.queues.consume_from),
            concurrency=instance.concurrency,
            providers=sorted(settings.enabled_providers()),
        )

    def log_beat_start(**_: Any) -> None:
        get_logger(__name__).info("beat.starting", schedule=sorted(app.conf.beat_schedule))

    def fresh_log_context(task_id: str | None = None, task: Any = None, **_: Any) -> None:
        # Threads are reused across tasks: no task's job id may ride on the next one's lines.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))

    def serve_metrics(**_: Any) -> None:
        # The pool runs every task in this one process: one endpoint per worker. Sent
        # once logging is set up and before the worker starts consuming (or forks an embedded
        # beat).
        from worker import metrics_server

        metrics_server.start(settings.worker)
        # Beating before the first message is taken: whatever this process holds is covered.
        leases.start(app, settings)
        if settings.broker_kind() == "amqp":
            from brokers.amqp import declare_dead_letters

            declare_dead_letters(app)

    def report_redis_persistence(**_: Any) -> None:
        # Once per worker, at start-up, on a client of its own in a thread of its own: a Redis
        # that does not answer delays nothing (the check is bounded by the Redis timeouts).
        async def check() -> None:
            redis = redis_client(settings)
            try:
                await report_persistence(redis, settings, process="worker")
            finally:
                await redis.aclose()

        threading.Thread(
            target=asyncio.run, args=(check(),), name="redis-persistence", daemon=True
        ).start()

    def attach_consumer(sender: Any = None, **_: Any) -> None:
        # The consumer whose task queues a failing heartbeat holds (RabbitMQ: worker.leases).
        leases.attach(sender)

    def collect_less(**_: Any) -> None:
        # Once the worker is up: start-up's objects frozen, the thresholds raised (tune_gc).
        tune_gc()

    def close_runtime(**_: Any) -> None:
        from worker import metrics_server
        from worker.runtime import shutdown_runtime

        close_publishers(app)  # RabbitMQ's: its thread and connection, while the loop runs
        flush_sent_events(app)
        shutdown_runtime()
        metrics_server.stop()
        leases.stop()

    handlers = [
        (signals.setup_logging, setup_logging),
        (signals.celeryd_after_setup, log_worker_start),
        (signals.beat_init, log_beat_start),
        (signals.task_prerun, fresh_log_context),
        (signals.celeryd_after_setup, serve_metrics),
        (signals.worker_ready, report_redis_persistence),
        (signals.worker_ready, attach_consumer),
        (signals.worker_ready, collect_less),
        (signals.worker_shutdown, close_runtime),
        (signals.worker_process_shutdown, close_runtime),
    ]
    for signal, handler in handlers:
        signal.connect(handler, weak=False, dispatch_uid=f"{uid}-{signal.name}-{handler.__name__}")


def __getattr__(name: str) -> Any:
    # ``celery -A worker.app`` reads ``app``; so do the commands that run a worker or beat.
    if name == "app":
        with _lock:
            if "app" not in globals():
                globals()["app"] = create_app(load_settings())
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_lock = threading.Lock()
