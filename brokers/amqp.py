"""RabbitMQ as Cancelflow's broker: quorum queues, publisher confirms, native delayed delivery.

What RabbitMQ does natively that Redis needs Cancelflow's code for:

- **A dead worker's messages.** RabbitMQ gives back every message a consumer held
  unacknowledged the moment its connection closes (a SIGKILLed process's socket is closed by
  its kernel; a host that vanishes is noticed within two missed AMQP heartbeats,
  ``BROKER_HEARTBEAT_S``). So ``worker.leases`` keeps no per-process unacknowledged hash and
  restores nothing on RabbitMQ; its heartbeats in the job store still guard the confirm lease
  and stop a process cut off from Redis from calling providers.
- **Acknowledgements.** An AMQP ack is one frame on the open connection, with no reply to
  wait for: the Redis channel's batching (a Redis round trip per ack) has nothing to save.
- **Unreadable messages.** AMQP frames every message: there is no list item that is not an
  envelope, the case the workers' Redis channel (``messaging.patches``) exists for. A body
  that is not a valid task message is dead-lettered by ``worker.consumer`` (store entry),
  then rejected without requeue, and the queue's dead-letter exchange parks it byte for
  byte on ``dead_letters``.
  A message delivered ``broker_delivery_limit`` times without an ack (a worker dying on it
  each time) is not run again nor requeued forever: on the delivery RabbitMQ allows last,
  ``worker.consumer`` dead-letters it (with its job, for a step: replayable) and rejects
  it, and the dead-letter exchange parks it (the broker itself would park it, with no
  store entry and its job left mid-chain). So is the message of a step that failed parked
  (Celery rejects it; Redis drops it), whose job is in the store.
- **Task events.** With publisher confirms, a publish waits for its ack on the socket:
  the worker's event connection is read by the consumer's hub, so every task event is
  published there (``messaging.patches.HubEventsRequest``), never by the pool's loop.
- **Countdowns.** Celery's native delayed delivery (5.5+) holds a countdown in RabbitMQ's
  ``celery_delayed_*`` queues (28 levels of per-queue TTL, so up to 2**28 - 1 s), not in a
  worker's memory: no visibility timeout can deliver it twice. What caps a countdown on
  RabbitMQ is ``MAX_COUNTDOWN_S`` (a day: a provider asking for a longer wait is asked
  again after a day), not a quarter of the visibility timeout; backoff itself stops at an
  hour (``cancelflow.retry``), and a job's ``MAX_AGE_S`` ends it.
  Native delayed delivery routes through topic exchanges, hence ``EXCHANGE`` is one.
"""

from __future__ import annotations

import math
from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

from cancelflow.contract import (
    CALLBACKS_QUEUE,
    DEAD_LETTER_QUEUE,
    MAINTENANCE_QUEUE,
    provider_queue,
)
from cancelflow.providers import REGISTRY
from cancelflow.settings import AMQP_MAX_COUNTDOWN_S, Settings

# kombu ships py.typed but leaves Exchange and Queue unannotated: hence the ignores below.
EXCHANGE = Exchange("cancelflow", type="topic", durable=True)  # type: ignore[no-untyped-call]
# Topic, as every exchange native delayed delivery binds its queues through.
DEAD_LETTER_EXCHANGE = Exchange(DEAD_LETTER_QUEUE, type="topic", durable=True)  # type: ignore[no-untyped-call]

# Messages the dead_letters queue keeps (each also has its entry in the dead-letter store).
DEAD_LETTERS_KEPT = 100_000
# The longest countdown on RabbitMQ (see above).
MAX_COUNTDOWN_S = AMQP_MAX_COUNTDOWN_S
# A broker host that vanishes without closing the connection is noticed after two missed
# heartbeats, and its consumers' messages are delivered to others.
BROKER_HEARTBEAT_S = 10


def queue_arguments(delivery_limit: int, *, dead_letters: bool = True) -> dict[str, Any]:
    """A Cancelflow queue's arguments: quorum (Raft-replicated), with a delivery limit, and
    a dead-letter exchange that parks what it rejects or gives up on."""
    arguments: dict[str, Any] = {"x-queue-type": "quorum", "x-delivery-limit": delivery_limit}
    if dead_letters:
        arguments |= {
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name,
            "x-dead-letter-routing-key": DEAD_LETTER_QUEUE,
            # Parked only once the dead-letter queue has it (quorum queues otherwise
            # dead-letter at most once); needs reject-publish overflow.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
    return arguments


def queues(settings: Settings) -> list[Queue]:
    """Every Cancelflow queue as a quorum queue. Maintenance has no dead-letter exchange:
    beat's messages expire when not taken in time (``expires``), and the next is on its way."""
    limit = settings.broker_delivery_limit

    def queue(name: str, *, dead_letters: bool = True) -> Queue:
        return Queue(  # type: ignore[no-untyped-call]
            name,
            EXCHANGE,
            routing_key=name,
            durable=True,
            queue_arguments=queue_arguments(limit, dead_letters=dead_letters),
        )

    return [
        *(queue(provider_queue(key)) for key in REGISTRY),
        queue(CALLBACKS_QUEUE),
        queue(MAINTENANCE_QUEUE, dead_letters=False),
        # No consumer: parked messages wait here for an operator.
        Queue(  # type: ignore[no-untyped-call]
            DEAD_LETTER_QUEUE,
            DEAD_LETTER_EXCHANGE,
            routing_key=DEAD_LETTER_QUEUE,
            durable=True,
            # Bounded: the oldest parked message goes first past this many.
            queue_arguments={"x-queue-type": "quorum", "x-max-length": DEAD_LETTERS_KEPT},
        ),
    ]


def celery_config(settings: Settings) -> dict[str, Any]:
    """What ``messaging.config.celery_config`` changes for RabbitMQ."""
    return {
        "broker_url": settings.broker(),
        # kombu's py-amqp transport, chosen by the URL's scheme.
        "broker_transport": None,
        "broker_transport_options": {
            # A publish returns once RabbitMQ has the message (on a quorum queue: once a
            # majority of its replicas wrote it).
            "confirm_publish": True,
        },
        "broker_heartbeat": BROKER_HEARTBEAT_S,
        "broker_connection_timeout": settings.redis_connect_timeout_s,
        "task_queues": queues(settings),
        "task_default_exchange": EXCHANGE.name,
        "task_default_exchange_type": EXCHANGE.type,
        "task_default_queue_type": "quorum",
        # Celery's native delayed delivery (celery.worker.consumer.delayed_delivery).
        "broker_native_delayed_delivery_queue_type": "quorum",
        # Quorum queues have no global QoS: prefetch is per consumer (Celery detects it).
        "worker_detect_quorum_queues": True,
    }


class AmqpCelery(Celery):  # type: ignore[misc]  # Celery is untyped
    """Celery, with countdowns in whole seconds: native delayed delivery takes whole
    seconds, truncating a fraction and refusing a countdown under one
    (``kombu.transport.native_delayed_delivery.calculate_routing_key``). Rounded up, a
    retry never comes before its ``Retry-After``."""

    def send_task(self, *args: Any, countdown: float | None = None, **kwargs: Any) -> Any:
        if countdown is not None and countdown > 0:
            countdown = float(math.ceil(countdown))
        return super().send_task(*args, countdown=countdown, **kwargs)


def declare_dead_letters(app: Celery) -> None:
    """Declare the dead-letter exchange and queue (no worker consumes them, so Celery would
    not): until they exist, RabbitMQ drops what a queue dead-letters, and Celery's native
    delayed delivery fails to bind the dead-letter queue at start-up."""
    with app.connection_for_write() as conn:
        for queue in app.conf.task_queues:
            if queue.name == DEAD_LETTER_QUEUE:
                queue.bind(conn.default_channel).declare()
