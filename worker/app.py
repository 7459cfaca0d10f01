"""The Celery app of the workers: ``celery -A worker.app`` (and Flower) find it here."""

from __future__ import annotations

import os
import tempfile
import urllib.parse
from typing import Any

import structlog
from celery import signals
from kombu.connection import Connection

from cancelflow.logging import configure_logging, get_logger
from cancelflow.messaging import SENTINEL_TRANSPORT, TRANSPORT, create_celery, flush_sent_events
from cancelflow.settings import load_settings, warn_unknown_env
from worker import leases

settings = load_settings()
app = create_celery(settings)
app.conf.include = ["worker.tasks"]
app.conf.worker_consumer = "worker.consumer:Consumer"
if settings.broker_kind() == "redis":
    # Each worker process holds its unacknowledged messages apart, so another can give them
    # back the moment it dies (worker.leases), not an hour later. (RabbitMQ does both this
    # and what worker.transport does natively: brokers.amqp.)
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        **leases.unacked_keys(leases.WORKER_ID),
    }
    sentinel = urllib.parse.urlsplit(settings.broker()).scheme == "sentinel"
    app.conf.broker_transport = (
        "worker.transport:SentinelTransport" if sentinel else "worker.transport:Transport"
    )
    # Both our transports are kombu's Redis transport: name them by the broker URL's scheme
    # where a connection is shown as a URL (Celery's banner; Flower's Broker page, which picks
    # its client by that URL's scheme, flower/utils/broker.py, and said "'redis' broker is not
    # supported" for "worker.transport:Transport://..."). Only the shown URL changes: kombu's
    # Connection.clone and every connection made use the class itself (_info(resolve=False)).
    Connection.resolve_aliases.update(
        dict.fromkeys(
            (app.conf.broker_transport, TRANSPORT, SENTINEL_TRANSPORT),
            urllib.parse.urlsplit(settings.broker()).scheme,
        )
    )
# Steps run on the runtime's event loop, other tasks in threads (see worker.pool).
app.conf.worker_pool = "worker.pool:TaskPool"
# Interval schedules only: the state file is a scratch file, one per process.
app.conf.beat_schedule_filename = os.path.join(
    tempfile.gettempdir(), f"cancelflow-beat-{os.getpid()}"
)
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
        "schedule": float(settings.limits().restore_interval_s),
        "options": {"queue": "maintenance", "expires": float(settings.limits().restore_interval_s)},
    },
    # Jobs recorded by a producer that died before sending their first step.
    "dispatch-stragglers": {
        "task": "cancelflow.dispatch_stragglers",
        "schedule": 30.0,
        "options": {"queue": "maintenance", "expires": 30.0},
    },
}


# Celery is untyped: its signal decorators hide the handlers' types from mypy.
@signals.setup_logging.connect  # type: ignore[untyped-decorator]
def _setup_logging(**_: Any) -> None:
    # Connecting here stops Celery from installing its own handlers: one format for all.
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    warn_unknown_env()


@signals.celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _log_worker_start(sender: str, instance: Any, **_: Any) -> None:
    get_logger(__name__).info(
        "worker.starting",
        hostname=sender,
        queues=sorted(instance.app.amqp.queues.consume_from),
        concurrency=instance.concurrency,
        providers=sorted(settings.enabled_providers()),
    )


@signals.beat_init.connect  # type: ignore[untyped-decorator]
def _log_beat_start(**_: Any) -> None:
    get_logger(__name__).info("beat.starting", schedule=sorted(app.conf.beat_schedule))


@signals.task_prerun.connect  # type: ignore[untyped-decorator]
def _fresh_log_context(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    # Threads are reused across tasks: no task's job id may ride on the next one's lines.
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))


@signals.celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _serve_metrics(**_: Any) -> None:
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


@signals.worker_shutdown.connect  # type: ignore[untyped-decorator]
@signals.worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _close_runtime(**_: Any) -> None:
    from worker import metrics_server
    from worker.runtime import shutdown_runtime

    flush_sent_events(app)
    shutdown_runtime()
    metrics_server.stop()
    leases.stop()
