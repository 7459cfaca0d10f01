"""Poison messages on every queue end in the dead-letter store; the worker keeps working."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest
import redis
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Producer

from cancelflow.contract import CALLBACKS_QUEUE, MAINTENANCE_QUEUE, provider_queue
from cancelflow.providers import REGISTRY
from sandboxes.payway import DEMO
from tests.support import System

pytestmark = pytest.mark.integration

EXCHANGE = Exchange("cancelflow", type="direct")
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
    with Connection(system.redis_url) as conn:
        producer = Producer(conn)
        for queue in queues:
            for how, body, options in POISON:
                if how == "raw":
                    client.lpush(queue, body)
                else:
                    assert options is not None
                    producer.publish(
                        body,
                        exchange=EXCHANGE,
                        routing_key=queue,
                        declare=[Queue(queue, EXCHANGE, routing_key=queue)],
                        **options,
                    )
    # Queues of providers this system's worker does not serve stay untouched: only count
    # what the worker consumes.
    served = [
        q
        for q in queues
        if q.split(".", 1)[-1] in system.env_providers() or not q.startswith("cancellations.")
    ]
    expected = before + len(served) * len(POISON)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and cast(int, client.zcard("cf:dl:index")) < expected:
        time.sleep(0.2)
    assert client.zcard("cf:dl:index") == expected

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
        "UnreadableEnvelope",
        "DecodeError",
        "UnknownTask",
        "ContentDisallowed",
        "Poison",
        "UnknownMessage",
    } <= kinds
    assert {d["queue"] for d in listing["items"]} >= set(served)
