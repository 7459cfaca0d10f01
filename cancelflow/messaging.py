"""The Celery side of the contract: broker configuration, queues, and sending a step by name.

Producers and workers build their Celery app here, so both agree on serialization, queues
and the visibility timeout; producers never import ``worker``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from typing import Any, Generic, Literal, TypeVar

import structlog
from celery import Celery
from celery.events.dispatcher import EventDispatcher
from kombu.entity import Exchange, Queue
from kombu.transport import redis as kombu_redis

from cancelflow.broker_urls import parse_sentinel, scheme_of
from cancelflow.contract import (
    CALLBACKS_QUEUE,
    DEAD_LETTER_QUEUE,
    MAINTENANCE_QUEUE,
    STEP_TASKS,
    Step,
    provider_queue,
)
from cancelflow.logging import get_logger
from cancelflow.providers import REGISTRY
from cancelflow.settings import REDIS_HEALTH_CHECK_INTERVAL_S, Settings

log = get_logger(__name__)
T = TypeVar("T")

# kombu ships py.typed but leaves Exchange and Queue unannotated: hence the ignores below.
EXCHANGE = Exchange("cancelflow", type="direct", durable=True)  # type: ignore[no-untyped-call]
DEAD_LETTER_EXCHANGE = Exchange(DEAD_LETTER_QUEUE, type="direct", durable=True)  # type: ignore[no-untyped-call]


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with one client per connection pool.

    kombu builds a new ``redis.Redis`` for every publish, every batch of task events and
    every acknowledgement (``Channel.conn_or_acquire``), and building one copies redis-py's
    table of some 200 response callbacks: more CPU than the round trip it serves. A client
    is safe to share (each command takes a connection from the pool), so one is kept for as
    long as the channel keeps its pool (kombu replaces the pool after a connection error).
    """

    _client_for_pool: tuple[Any, Any] | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool
        kept = self._client_for_pool
        if kept is None or kept[0] is not pool:
            kept = self._client_for_pool = (pool, super()._create_client())  # type: ignore[no-untyped-call]
        return kept[1]


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same channel, its pool the master's that the sentinels name (and re-name)."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


TRANSPORT = f"{__name__}:Transport"
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"


def queues() -> list[Queue]:
    """One queue per provider, the callbacks queue, maintenance, and the dead-letter queue."""
    return [
        *(
            Queue(provider_queue(key), EXCHANGE, routing_key=provider_queue(key))  # type: ignore[no-untyped-call]
            for key in REGISTRY
        ),
        Queue(CALLBACKS_QUEUE, EXCHANGE, routing_key=CALLBACKS_QUEUE),  # type: ignore[no-untyped-call]
        Queue(MAINTENANCE_QUEUE, EXCHANGE, routing_key=MAINTENANCE_QUEUE),  # type: ignore[no-untyped-call]
        # Raw messages that could not be decoded are parked here byte for byte (besides
        # their entry in the dead-letter store); no worker consumes it.
        Queue(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, routing_key=DEAD_LETTER_QUEUE),  # type: ignore[no-untyped-call]
    ]


def celery_config(settings: Settings) -> dict[str, Any]:
    limits = settings.limits()
    config: dict[str, Any] = {
        "broker_url": settings.broker(),
        "broker_transport": TRANSPORT,
        "result_backend": settings.redis_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # The job store holds every outcome; task results would be one more write per task.
        "task_ignore_result": True,
        "task_queues": queues(),
        "task_default_queue": MAINTENANCE_QUEUE,
        "task_default_exchange": EXCHANGE.name,
        "task_create_missing_queues": False,
        # A message is acknowledged after its task ran, and given back if the worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # The shells handle every error they expect; one that still escapes (the job store
        # unreachable mid-error) leaves the message unacknowledged, for redelivery.
        "task_acks_on_failure_or_timeout": False,
        "worker_prefetch_multiplier": 1,
        # Redis redelivers unacknowledged messages after the visibility timeout. Retry
        # countdowns (capped at limits.max_countdown_s) and task time limits are kept under
        # it so that no ETA message or long task is delivered twice (celery/celery#2599).
        "broker_transport_options": {
            "visibility_timeout": limits.visibility_timeout_s,
            # How often a worker looks for messages a dead worker left unacknowledged (kombu's
            # default sweep is every ~100 s whatever the timeout).
            "unacked_restore_interval": limits.restore_interval_s,
            "unacked_restore_throttle": 1,
            # The sweep holds a mutex; a worker killed while holding it would block every
            # other worker's sweep for kombu's default 300 s.
            "unacked_mutex_expire": limits.restore_interval_s * 3,
            # A broker that accepts and never answers fails a publish or an ack within the
            # read timeout instead of hanging the sender (kombu waits forever by default).
            # It outlasts kombu's BRPOP (checked by load_settings); the workers' BRPOP runs on
            # kombu's event loop, whose own check drops a reply overdue by the interval.
            "socket_connect_timeout": settings.redis_connect_timeout_s,
            "socket_timeout": settings.redis_read_timeout_s,
            "retry_on_timeout": True,
            "health_check_interval": REDIS_HEALTH_CHECK_INTERVAL_S,
        },
        "result_backend_transport_options": {"visibility_timeout": limits.visibility_timeout_s},
        "task_time_limit": limits.task_time_limit_s,
        "task_soft_time_limit": limits.task_soft_time_limit_s,
        "broker_connection_retry_on_startup": True,
        # Flower: task events, and a "sent" event so queued tasks show up too.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        # Our handler writes to stderr itself; a redirect would loop it back into logging.
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }
    if settings.broker_kind() == "amqp":
        from brokers import amqp

        config.update(amqp.celery_config(settings))
    elif scheme_of(settings.broker()) == "sentinel":
        found = parse_sentinel(settings.broker())
        config["broker_url"] = found.kombu_url()
        config["broker_transport"] = SENTINEL_TRANSPORT
        config["broker_transport_options"]["master_name"] = found.master
    if scheme_of(settings.redis_url) == "sentinel":
        found = parse_sentinel(settings.redis_url)
        config["result_backend"] = found.kombu_url()
        config["result_backend_transport_options"]["master_name"] = found.master
    return config


def create_celery(settings: Settings, *, name: str = "cancelflow") -> Celery:
    if settings.broker_kind() == "amqp":
        from brokers.amqp import AmqpCelery

        app: Celery = AmqpCelery(name)
    else:
        app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


def queue_for(step: Step, provider: str) -> str:
    return CALLBACKS_QUEUE if step is Step.CALLBACK else provider_queue(provider)


class Batch(Generic[T]):
    """Items written to Redis together (events, acknowledgements): ``add`` answers "now" for
    the ``limit``-th item (write the batch at once), "later" for the first of a batch (write
    it after a delay), else None; ``take`` empties it. Safe across threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: list[T] = []
        self._due = False
        self._lock = threading.Lock()

    def add(self, item: T) -> Literal["now", "later"] | None:
        with self._lock:
            self._items.append(item)
            if len(self._items) >= self.limit:
                return "now"
            if self._due:
                return None
            self._due = True
            return "later"

    def take(self) -> list[T]:
        # A write still due after a full batch was written finds nothing to write.
        with self._lock:
            items, self._items, self._due = self._items, [], False
        return items


class SentEvents(EventDispatcher):  # type: ignore[misc]  # Celery is untyped
    """Celery's ``task-sent`` events (for Flower), published in batches.

    Celery publishes one event per message sent, right after it: one more Redis round trip
    per message, during which the sender (the API's event loop, a worker's) waits. Sent from
    an event loop, the events here wait in a buffer published as one message, a list of
    events (as Celery's workers send their own task events, and as Flower reads them), once
    ``limit`` are waiting or ``delay_s`` after the first. Sent from a thread without a loop
    (a maintenance task), an event is published at once. Events are monitoring: a batch
    that cannot be published is logged and dropped, never retried in the sender's way.
    """

    def __init__(self, app: Celery, *, limit: int = 100, delay_s: float = 0.05) -> None:
        super().__init__(app=app, connection=app.connection_for_write(), buffer_while_offline=False)
        self.delay_s = delay_s
        self._batch: Batch[Any] = Batch(limit)

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **kwargs: Any) -> Any:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if type != "task-sent" or loop is None:
            return super().publish(type, fields, producer, **kwargs)
        when = self._batch.add(self._prepare_event(type, fields))
        if when == "now":
            self.flush_sent()
        elif when == "later":
            loop.call_later(self.delay_s, self.flush_sent)
        return None

    def flush_sent(self) -> None:
        """Publish the events waiting (the API and the workers call it as they stop)."""
        batch = self._batch.take()
        if not batch:
            return
        try:
            with self.mutex:
                self._publish(batch, self.producer, "task.multi")
        except Exception as exc:  # monitoring only: never fail or block a send for it
            log.warning("events.sent.dropped", events=len(batch), error=type(exc).__name__)


_sent_events: weakref.WeakKeyDictionary[Celery, SentEvents] = weakref.WeakKeyDictionary()
_sent_events_lock = threading.Lock()


def sent_events(app: Celery) -> SentEvents:
    """The app's batching dispatcher of ``task-sent`` events (one per app, made on first use)."""
    found = _sent_events.get(app)
    if found is None:
        with _sent_events_lock:
            found = _sent_events.get(app)
            if found is None:
                found = _sent_events[app] = SentEvents(app)
    return found


def flush_sent_events(app: Celery | None = None) -> None:
    """Publish the waiting ``task-sent`` events of ``app`` (of every app if None), as a
    process stops: its loop will not run the timer that would have."""
    for found in [_sent_events.get(app)] if app is not None else list(_sent_events.values()):
        if found is not None:
            found.flush_sent()


def send_step(
    app: Celery,
    step: Step,
    job_id: str,
    provider: str,
    *args: str,
    countdown: float | None = None,
) -> None:
    """Enqueue one step of a job by task name on its provider's queue."""
    task_args = [job_id, *args]
    headers: dict[str, Any] = {
        "job_id": job_id,
        "provider": provider,
        "sent_at": round(time.time(), 3),
    }
    # The API request (or earlier step) that caused this one: the worker binds it to its lines.
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if request_id is not None:
        headers["request_id"] = request_id
    app.send_task(
        STEP_TASKS[step],
        args=task_args,
        # Our own repr of the arguments (short strings): Celery's saferepr costs more.
        argsrepr=repr(task_args),
        kwargsrepr="{}",
        queue=queue_for(step, provider),
        countdown=countdown,
        # Shown in Flower, and lets a poison-message handler name the job; ``sent_at`` tells
        # the watchdog (and queue-latency metrics) how long the oldest message has waited.
        headers=headers,
        # Nobody waits on a step's result (the job store has it). Without this, a producer's
        # send_task subscribes to the task's result channel and unsubscribes again: two
        # more Redis round trips per message (the Redis backend's on_task_call).
        ignore_result=True,
        event_dispatcher=sent_events(app),
    )
