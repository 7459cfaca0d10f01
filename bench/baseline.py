"""The baseline: plain Celery chains of tasks that do nothing, on Cancelflow's own Celery config.

Same broker, serializer, acks (``acks_late``, ``reject_on_worker_lost``, prefetch 1), events
and visibility timeout as ``messaging.config.celery_config``; only the queue differs. The
bench runs its workers as ``cancelflow worker`` runs ours (same flags and process count) on
the fastest stock pool for this load (``bench.system.BASELINE_POOLS``, measured by
``python -m bench.pools``), so the comparison measures what Cancelflow adds to a chain of
tasks (on whichever broker the leg runs, ``CANCELFLOW_BROKER_URL``):

    celery -A bench.baseline worker --pool=prefork --concurrency=8 -Q bench.baseline ...
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from celery import Celery, chain
from kombu import Queue  # type: ignore[attr-defined]

from cancelflow.settings import Settings, load_settings
from messaging.config import EXCHANGE, celery_config

QUEUE = "bench.baseline"
# Never consumed: the target for the "loop of plain send_task calls" of the enqueue benchmark.
SINK_QUEUE = "bench.sink"
# "job_id time" per finished chain (time in epoch seconds), appended by the chain's last task.
DONE_KEY = "bench:baseline:done"
TASKS_PER_JOB = 3  # eligibility -> confirm -> callback, as a payway job without an offer


def _queues(settings: Settings) -> list[Queue]:
    """The bench's queues. On RabbitMQ, quorum queues on Cancelflow's topic exchange, as
    Cancelflow's (same durability: Raft-replicated, publishes confirmed), without what only
    Cancelflow asks of them (a delivery limit, a dead-letter exchange)."""
    if settings.broker_kind() == "amqp":
        from brokers import amqp

        return [
            Queue(  # type: ignore[no-untyped-call]
                name,
                amqp.EXCHANGE,
                routing_key=name,
                durable=True,
                queue_arguments={"x-queue-type": "quorum"},
            )
            for name in (QUEUE, SINK_QUEUE)
        ]
    return [
        Queue(QUEUE, EXCHANGE, routing_key=QUEUE),  # type: ignore[no-untyped-call]
        Queue(SINK_QUEUE, EXCHANGE, routing_key=SINK_QUEUE),  # type: ignore[no-untyped-call]
    ]


def create_baseline(settings: Settings) -> Celery:
    """A Celery app configured as Cancelflow's (on RabbitMQ: publisher confirms, quorum
    queues, per-consumer prefetch), with the bench's own queues."""
    app = Celery("bench-baseline")
    app.conf.update(celery_config(settings))
    app.conf.update(
        task_queues=_queues(settings),
        task_default_queue=QUEUE,
        task_default_routing_key=QUEUE,
        # Stock kombu: the baseline is plain Celery, not Cancelflow's tuned channel.
        broker_transport=None,
    )
    return app


settings = load_settings()
app = create_baseline(settings)
_local = threading.local()


def _redis() -> redis.Redis:
    client: redis.Redis | None = getattr(_local, "client", None)
    if client is None:
        client = _local.client = redis.Redis.from_url(settings.redis_url)
    return client


@app.task(name="bench.noop", ignore_result=True)  # type: ignore[untyped-decorator]
def noop(job_id: str) -> None:
    """A step that does nothing."""


@app.task(name="bench.done", ignore_result=True)  # type: ignore[untyped-decorator]
def done(job_id: str) -> None:
    """The last step: records when the chain ended (the one write the bench needs)."""
    _redis().rpush(DONE_KEY, f"{job_id} {time.time()!r}")


def send_chain(celery: Celery, job_id: str) -> Any:
    """Start one job: ``TASKS_PER_JOB`` tasks in a ``celery.chain``."""
    sigs = [
        celery.signature("bench.noop", args=(job_id,), queue=QUEUE, immutable=True)
        for _ in range(TASKS_PER_JOB - 1)
    ]
    sigs.append(celery.signature("bench.done", args=(job_id,), queue=QUEUE, immutable=True))
    return chain(*sigs).apply_async()
