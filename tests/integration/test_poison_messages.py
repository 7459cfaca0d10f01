"""Poison messages on every queue end in the dead-letter store; the worker keeps working."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest
import redis
from kombu.connection import Connection
from kombu.exceptions import ChannelError
from kombu.messaging import Producer

from cancelflow.contract import (
    CALLBACKS_QUEUE,
    DEAD_LETTER_QUEUE,
    MAINTENANCE_QUEUE,
    provider_queue,
)
from cancelflow.providers import REGISTRY
from messaging.config import create_celery
from sandboxes.payway import DEMO
from tests.support import System

pytestmark = pytest.mark.integration


def parked(app: Any) -> int:
    """Messages waiting on the dead_letters queue (a passive declare: Redis and RabbitMQ)."""
    with app.connection_for_read() as conn:
        try:
            found = conn.default_channel.queue_declare(DEAD_LETTER_QUEUE, passive=True)
        except ChannelError:  # no such queue (on Redis: no list yet): nothing parked
            return 0
        return int(found.message_count)


# The task messages of POISON whose only fault is their arguments.
BAD_ARGS = {"p4", "p5"}
JSON = {"content_type": "application/json", "content_encoding": "utf-8", "serializer": None}

# (how, body, headers/options) — each a different way a message can be unreadable.
POISON: list[tuple[str, bytes, dict[str, Any] | None]] = [
    ("raw", b"garbage{", None),
    ("raw", b'{"json": "but not a kombu envelope"}', None),
    (
        "publish",
        b"{not json",
        {"headers": {"task": "cancelflow.eligibility", "id": "p1", "lang": "py"}, **JSON},
    ),
    (
        "publish",
        b"[[], {}, {}]",
        {"headers": {"task": "cancelflow.no_such_task", "id": "p2", "lang": "py"}, **JSON},
    ),
    (
        "publish",
        b"\x80\x04K\x01.",
        {
            "headers": {"task": "cancelflow.eligibility", "id": "p3", "lang": "py"},
            "content_type": "application/x-python-serialize",
            "content_encoding": "binary",
            "serializer": None,
        },
    ),
    (
        "publish",
        b'[["not-a-job-id"], {}, {}]',
        {"headers": {"task": "cancelflow.confirm", "id": "p4", "lang": "py"}, **JSON},
    ),
    (
        "publish",
        b'[[1, 2, 3], {"x": 1}, {}]',
        {"headers": {"task": "cancelflow.callback", "id": "p5", "lang": "py"}, **JSON},
    ),
    ("publish", b'{"hello": 1}', {"headers": {}, **JSON}),
]


def test_poison_on_every_queue_is_dead_lettered_and_good_jobs_still_run(system: System) -> None:
    queues = [*(provider_queue(k) for k in REGISTRY), CALLBACKS_QUEUE, MAINTENANCE_QUEUE]
    client = redis.Redis.from_url(system.redis_url)
    before = cast(int, client.zcard("cf:dl:index"))
    # Raw list items exist on Redis only: AMQP frames every message it carries.
    poison = [p for p in POISON if p[0] == "publish" or system.broker == "redis"]
    app = create_celery(system.settings())
    declared = {q.name: q for q in app.conf.task_queues}
    parked_before = parked(app)
    with Connection(system.broker_url) as conn:
        producer = Producer(conn)
        for queue in queues:
            for how, body, options in poison:
                if how == "raw":
                    client.lpush(queue, body)
                else:
                    assert options is not None
                    producer.publish(
                        body,
                        exchange=declared[queue].exchange,
                        routing_key=queue,
                        declare=[declared[queue]],
                        **options,
                    )
    # Queues of providers this system's worker does not serve stay untouched: only count
    # what the worker consumes.
    served = [
        q
        for q in queues
        if q.split(".", 1)[-1] in system.env_providers() or not q.startswith("cancellations.")
    ]
    expected = before + len(served) * len(poison)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and cast(int, client.zcard("cf:dl:index")) < expected:
        time.sleep(0.2)
    assert client.zcard("cf:dl:index") == expected
    # Each unreadable one is parked on the dead_letters queue too. A task message with wrong
    # arguments is a step that failed, dead-lettered by the task: Celery rejects its message,
    # which on Redis drops it and on RabbitMQ parks it through the queue's dead-letter
    # exchange (maintenance has none: its messages expire by design).
    unreadable = [p for p in poison if (p[2] or {}).get("headers", {}).get("id") not in BAD_ARGS]
    failed = len(poison) - len(unreadable) if system.broker == "amqp" else 0
    parked_after = (
        parked_before
        + len(served) * len(unreadable)
        + len([q for q in served if q != MAINTENANCE_QUEUE]) * failed
    )
    while time.monotonic() < deadline and parked(app) < parked_after:
        time.sleep(0.2)
    assert parked(app) == parked_after

    system.sandbox.reset("payway")
    job = system.wait(
        system.enqueue(
            {
                "provider": "payway",
                "subscription": {
                    "account_id": DEMO.immediate.account_id,
                    "user_product_id": DEMO.immediate.user_product_id,
                    "cancellation_reason_id": DEMO.reason_id,
                },
            }
        )["id"]
    )
    assert job["outcome"]["type"] == "cancelled"

    status, listing = system.get("/v1/dead-letters?kind=poison&limit=1000")
    assert status == 200
    kinds = {d["error_type"] for d in listing["items"]}
    assert {
        *(["UnreadableEnvelope"] if system.broker == "redis" else []),
        "DecodeError",
        "UnknownTask",
        "ContentDisallowed",
        "Poison",
        "UnknownMessage",
    } <= kinds
    assert {d["queue"] for d in listing["items"]} >= set(served)
