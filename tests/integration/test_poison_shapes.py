"""No message stops a worker: envelopes, headers, properties and bodies of any shape, pushed
raw onto the Redis lists of a running worker, each end as one poison dead letter, and the same
worker process goes on to run a good job.

The fixed shapes are the ones that used to stop the worker ("Unrecoverable error") and put the
message back for the next worker to die on; hypothesis adds envelopes and bodies of every
other shape (derandomized and bounded, so the run is the same every time and quick).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections import Counter
from typing import Any, cast

import pytest
import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cancelflow.contract import CALLBACKS_QUEUE, MAINTENANCE_QUEUE, provider_queue
from cancelflow.providers import REGISTRY
from cancelflow.settings import Settings
from messaging.config import create_celery
from sandboxes.payway import DEMO
from tests.fixtures.system import StartSystem
from tests.support import System

# Items on a Redis list (messaging.patches.WorkerChannel): AMQP frames every message, there
# is no envelope to get wrong on RabbitMQ.
pytestmark = [pytest.mark.integration, pytest.mark.redis_broker]

# The task each queue's consumer expects: a step, the callback step, a maintenance sweep.
TASK_OF = {
    **{provider_queue(k): "cancelflow.eligibility" for k in REGISTRY},
    CALLBACKS_QUEUE: "cancelflow.callback",
    MAINTENANCE_QUEUE: "cancelflow.resume_stalled",
}

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def envelope(
    queue: str,
    body: Any,
    *,
    headers: Any = None,
    properties: Any = None,
    raw_body: str | None = None,
) -> dict[str, Any]:
    """A list item as kombu's Redis channel writes one (``body`` JSON-encoded, base64)."""
    task_id = str(uuid.uuid4())
    encoded = raw_body if raw_body is not None else json.dumps(body)
    return {
        "body": base64.b64encode(encoded.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": TASK_OF[queue], "id": task_id}
        if headers is None
        else headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "cancelflow", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
        if properties is None
        else properties,
    }


def fixed_shapes(queue: str) -> list[dict[str, Any]]:
    """Each a different way past kombu's and Celery's own checks to a worker's crash."""
    task = TASK_OF[queue]
    good = envelope(queue, [[], {}, {}])

    def headers(**changes: Any) -> dict[str, Any]:
        return {**good["headers"], "id": str(uuid.uuid4()), **changes}

    def props(**changes: Any) -> dict[str, Any]:
        return {**good["properties"], "delivery_tag": str(uuid.uuid4()), **changes}

    return [
        # Bodies that are not [args, kwargs, embed] (Celery's Request unpacks three).
        envelope(queue, {"a": 1}),
        envelope(queue, [1]),
        envelope(queue, [[], {}]),
        envelope(queue, "s"),
        envelope(queue, None),
        envelope(queue, [[], {}, {}, {}]),
        envelope(queue, ["abc", {}, {}]),
        envelope(queue, [[], [], {}]),
        envelope(queue, [[], {}, 5]),
        envelope(queue, 7),
        envelope(queue, [[], {}, {}], raw_body=""),
        # Properties kombu cannot make a message of, or Redis's QoS cannot record.
        envelope(queue, [[], {}, {}], properties="x"),
        {**good, "properties": None},
        envelope(queue, [[], {}, {}], properties=[1, 2]),
        envelope(queue, [[], {}, {}], properties={}),
        envelope(queue, [[], {}, {}], properties=props(delivery_tag=None)),
        envelope(queue, [[], {}, {}], properties=props(delivery_tag={"a": 1})),
        envelope(queue, [[], {}, {}], properties=props(delivery_info=None)),
        envelope(queue, [[], {}, {}], properties=props(delivery_info={"exchange": "x"})),
        envelope(queue, [[], {}, {}], properties=props(body_encoding="rot13")),
        # Headers.
        envelope(queue, [[], {}, {}], headers="x"),
        envelope(queue, [[], {}, {}], headers=[1]),
        envelope(queue, [[], {}, {}], headers={"task": task}),
        envelope(queue, [[], {}, {}], headers=headers(id=None)),
        envelope(queue, [[], {}, {}], headers=headers(id=[1])),
        envelope(queue, [[], {}, {}], headers=headers(task=["a", "list"])),
        envelope(queue, [[], {}, {}], headers=headers(task={"a": 1})),
        envelope(queue, [[], {}, {}], headers=headers(timelimit="x")),
        envelope(queue, [[], {}, {}], headers=headers(timelimit=[1, 2, 3])),
        envelope(queue, [[], {}, {}], headers=headers(timelimit=["a", None])),
        envelope(queue, [[], {}, {}], headers=headers(retries="x")),
        envelope(queue, [[], {}, {}], headers=headers(shadow=[1])),
        envelope(queue, [[], {}, {}], headers=headers(eta="0001-01-01T00:00:00+10:00")),
        envelope(queue, [[], {}, {}], headers=headers(eta=5)),
        envelope(queue, [[], {}, {}], headers=headers(compression="zz")),
        # Arguments the task does not take (a step's: not a job id; a sweep's: any).
        envelope(queue, [[1, 2], {"x": 1}, None]),
    ]


def valid_triple(body: Any) -> bool:
    return (
        isinstance(body, list)
        and len(body) == 3
        and isinstance(body[0], list)
        and isinstance(body[1], dict)
        and (body[2] is None or isinstance(body[2], dict))
    )


# Every generated message is poison by construction: a body that is no [args, kwargs, embed]
# triple, or headers without a task id, or properties without a delivery tag.
def generated(queue: str) -> st.SearchStrategy[dict[str, Any]]:
    bodies = JSON_VALUES.filter(lambda b: not valid_triple(b)).map(lambda b: envelope(queue, b))
    header_keys = st.sampled_from(
        [
            "task",
            "timelimit",
            "retries",
            "shadow",
            "root_id",
            "parent_id",
            "argsrepr",
            "kwargsrepr",
            "ignore_result",
            "compression",
            "lang",
            "group",
            "origin",
        ]
    ) | st.text(max_size=6).filter(lambda k: k not in {"id", "eta", "expires"})
    no_id = st.dictionaries(header_keys, JSON_VALUES, max_size=5).map(
        lambda h: envelope(queue, [[], {}, {}], headers={"task": TASK_OF[queue], **h})
    )
    no_tag = st.dictionaries(
        st.text(max_size=8).filter(lambda k: k != "delivery_tag"), JSON_VALUES, max_size=5
    ).map(lambda p: envelope(queue, [[], {}, {}], properties=p))
    any_properties = JSON_VALUES.filter(lambda p: not isinstance(p, dict | None)).map(
        lambda p: envelope(queue, [[], {}, {}], properties=p)
    )
    return st.one_of(bodies, no_id, no_tag, any_properties)


def worker_pid(redis_url: str) -> int:
    app = create_celery(Settings(redis_url=redis_url))
    try:
        stats = app.control.inspect(timeout=2).stats() or {}
    finally:
        app.close()
    assert len(stats) == 1, stats
    return int(next(iter(stats.values()))["pid"])


def dead_letters_by_queue(client: redis.Redis) -> Counter[str]:
    found: Counter[str] = Counter()
    for dl_id in cast("list[bytes]", client.zrange("cf:dl:index", 0, -1)):
        entry = json.loads(cast("bytes | None", client.get(f"cf:dl:{dl_id.decode()}")) or "{}")
        if entry.get("kind") == "poison":
            found[entry.get("queue")] += 1
    return found


@pytest.fixture(scope="module")
def poisoned(start_system: StartSystem) -> System:
    return start_system(isolated=True)


def test_no_message_stops_the_worker(poisoned: System) -> None:
    system = poisoned
    client = redis.Redis.from_url(system.redis_url)
    pid = worker_pid(system.redis_url)
    process = system.procs.procs["worker"]
    served = [
        q
        for q in TASK_OF
        if q.split(".", 1)[-1] in system.env_providers() or not q.startswith("cancellations.")
    ]
    pushed: Counter[str] = Counter()

    def push(queue: str, item: dict[str, Any]) -> None:
        client.lpush(queue, json.dumps(item))
        pushed[queue] += 1

    def push_generated(queue: str) -> None:
        @settings(
            max_examples=25,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(item=generated(queue))
        def one(item: dict[str, Any]) -> None:
            push(queue, item)

        one()

    for queue in served:
        for item in fixed_shapes(queue):
            push(queue, item)
        push_generated(queue)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and dead_letters_by_queue(client) != pushed:
        assert process.poll() is None, system.procs.log_tail("worker")
        time.sleep(0.3)
    assert dead_letters_by_queue(client) == pushed, system.procs.log_tail("worker")
    assert all(client.llen(q) == 0 for q in served), "every poison message was taken off"

    # The same worker process goes on consuming: a good job sent afterwards finishes.
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
    assert process.poll() is None
    assert worker_pid(system.redis_url) == pid
    assert "Unrecoverable error" not in system.procs.log_tail("worker", lines=100000)
