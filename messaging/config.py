"""The Celery app's configuration: broker, queues, serialization, acknowledgements, limits.

Producers and workers build their Celery app here, so both agree on serialization, queues
and the visibility timeout; producers never import ``worker``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

from cancelflow.broker_urls import parse_sentinel, scheme_of
from cancelflow.contract import (
    CALLBACKS_QUEUE,
    DEAD_LETTER_QUEUE,
    MAINTENANCE_QUEUE,
    provider_queue,
)
from cancelflow.providers import REGISTRY
from cancelflow.settings import REDIS_HEALTH_CHECK_INTERVAL_S, Settings

# kombu ships py.typed but leaves Exchange and Queue unannotated: hence the ignores below.
EXCHANGE = Exchange("cancelflow", type="direct", durable=True)  # type: ignore[no-untyped-call]
DEAD_LETTER_EXCHANGE = Exchange(DEAD_LETTER_QUEUE, type="direct", durable=True)  # type: ignore[no-untyped-call]


# kombu's Redis transport with one client per connection pool (``messaging.patches``).
TRANSPORT = "messaging.patches:Transport"
SENTINEL_TRANSPORT = "messaging.patches:SentinelTransport"


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
