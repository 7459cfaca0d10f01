"""Purging or deleting a poison dead letter removes the copy parked on the ``dead_letters``
list, and only that copy: a real worker parks them, the CLI and the API purge them, and the
list's length (what ``cancelflow_queue_depth{queue="dead_letters"}`` reads) returns to 0."""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any, cast

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from cancelflow.contract import CALLBACKS_QUEUE, DEAD_LETTER_QUEUE
from cancelflow.dead_letters import DeadLetter, DeadLetterStore, parked_key
from producers.local import http_json
from tests.fixtures.system import StartSystem
from tests.integration.test_poison_messages import BAD_ARGS, POISON
from tests.producers.test_cli_operations import cli
from tests.support import System

# The dead_letters list and its records are the Redis broker's (RabbitMQ's parked messages stay
# until emptied by hand: the README's Dead letters).
pytestmark = [pytest.mark.integration, pytest.mark.redis_broker]


@pytest.fixture(scope="module")
def parking(start_system: StartSystem) -> System:
    """A system on a Redis DB of its own: its dead_letters list and store are its alone."""
    return start_system(isolated=True)


@pytest.fixture
def client(parking: System) -> redis.Redis:
    """The system's Redis, emptied of dead letters and parked messages before each test."""
    client = redis.Redis.from_url(parking.redis_url)
    names = [*client.scan_iter("cf:dl:*", count=1000), DEAD_LETTER_QUEUE]
    client.delete(*names)
    return client


def items(client: redis.Redis) -> list[bytes]:
    return cast(list[bytes], client.lrange(DEAD_LETTER_QUEUE, 0, -1))


def counts(client: redis.Redis) -> tuple[int, int]:
    """(dead letters in the store, messages parked on the dead_letters list)."""
    return cast(int, client.zcard("cf:dl:index")), cast(int, client.llen(DEAD_LETTER_QUEUE))


def push(system: System, client: redis.Redis, shapes: list[tuple[str, bytes, Any]]) -> None:
    """Put each poison message on the callbacks queue (raw list items or published), and wait
    until the worker dead-lettered every one and parked the unreadable ones."""
    entries, parked = counts(client)
    for how, body, options in shapes:
        if how == "raw":
            client.lpush(CALLBACKS_QUEUE, body)
        else:
            system.publish(CALLBACKS_QUEUE, body, **options)
    unreadable = [s for s in shapes if (s[2] or {}).get("headers", {}).get("id") not in BAD_ARGS]
    want = (entries + len(shapes), parked + len(unreadable))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and counts(client) != want:
        time.sleep(0.1)
    assert counts(client) == want, system.procs.log_tail("worker")


def depth_metric(system: System) -> float:
    """``cancelflow_queue_depth{queue="dead_letters"}`` as the API serves it to Prometheus."""
    status, text = http_json("GET", f"{system.api_url}/metrics", token=system.token)
    assert status == 200
    return next(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "cancelflow_queue_depth" and s.labels.get("queue") == DEAD_LETTER_QUEUE
    )


def entries(client: redis.Redis) -> list[DeadLetter]:
    ids = [i.decode() for i in cast(list[bytes], client.zrange("cf:dl:index", 0, -1))]
    return [DeadLetter.model_validate_json(cast(bytes, client.get(f"cf:dl:{i}"))) for i in ids]


def test_purge_by_kind_removes_every_parked_poison_message(
    parking: System, client: redis.Redis
) -> None:
    push(parking, client, POISON)
    parked = items(client)
    # Parked byte for byte: raw items as they were, published ones as kombu envelopes with
    # the exact body and headers; each entry that parked one records that exact item.
    for how, body, options in POISON:
        if how == "raw":
            assert body in parked
        elif options is not None and options["headers"].get("id") not in BAD_ARGS:
            envelopes = [json.loads(i) for i in parked if i.startswith(b"{")]
            assert any(
                e.get("headers") == options["headers"] and base64.b64decode(e["body"]) == body
                for e in envelopes
                if isinstance(e, dict) and "properties" in e
            ), body
    recorded = sorted(cast(bytes, client.get(dl.parked.key)) for dl in entries(client) if dl.parked)
    assert recorded == sorted(parked)

    # A non-poison dead letter's purge leaves every parked message where it is.
    DeadLetterStore.add_sync(
        client, DeadLetter(kind="job", job_id="job_x", error_type="ProviderTimeout", error="t")
    )
    purged_jobs = cli(parking, "dlq", "purge", "--kind", "job", "--yes")
    assert purged_jobs.returncode == 0, purged_jobs.stderr
    assert items(client) == parked

    purged = cli(parking, "dlq", "purge", "--kind", "poison", "--yes", "--json")
    assert purged.returncode == 0, purged.stderr
    assert client.llen(DEAD_LETTER_QUEUE) == 0
    assert client.zcard("cf:dl:index") == 0
    assert list(client.scan_iter("cf:dl:parked:*")) == []
    assert depth_metric(parking) == 0


def test_entries_without_a_record_leave_their_copy_as_before(
    parking: System, client: redis.Redis
) -> None:
    # What a worker before this change wrote: the entry, then the item, unrelated.
    old = DeadLetter(kind="poison", queue=CALLBACKS_QUEUE, error_type="X", error="old")
    DeadLetterStore.add_sync(client, old)
    client.lpush(DEAD_LETTER_QUEUE, b"parked by an older worker")
    push(parking, client, [("raw", b"parked by this one", None)])

    purged = cli(parking, "dlq", "purge", "--kind", "poison", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert client.zcard("cf:dl:index") == 0
    assert items(client) == [b"parked by an older worker"]


def test_a_purge_and_deletes_at_once_remove_each_copy_once(
    parking: System, client: redis.Redis
) -> None:
    # Three identical poison messages parked, and one more identical copy no entry records:
    # whatever runs at once, each entry removes one copy, so that one stays.
    same = b"the same garbage{"
    push(parking, client, [("raw", same, None)] * 3)
    client.lpush(DEAD_LETTER_QUEUE, same)
    first = entries(client)[0].id
    statuses: list[int] = []
    codes: list[int] = []

    def delete() -> None:
        status, _ = http_json(
            "DELETE", f"{parking.api_url}/v1/dead-letters/{first}", token=parking.token
        )
        statuses.append(status)

    def purge() -> None:
        codes.append(cli(parking, "dlq", "purge", "--kind", "poison", "--yes").returncode)

    threads = [
        *(threading.Thread(target=delete) for _ in range(4)),
        *(threading.Thread(target=purge) for _ in range(2)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count(204) <= 1 and set(statuses) <= {204, 404}
    assert client.zcard("cf:dl:index") == 0
    assert items(client) == [same]
    assert client.exists(parked_key(first)) == 0
