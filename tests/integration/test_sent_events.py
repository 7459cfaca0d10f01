"""Celery's task-sent events, as the steps' senders publish them (messaging.dispatch).

Sent from an event loop (the API, a worker's steps) they go out in batches, one Redis
message holding a list of events; from a thread without a loop, one message each. Read here
as Flower reads them: the raw messages on Redis's event channels, then Celery's receiver.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from cancelflow.contract import Step, new_job_id
from cancelflow.lifecycle import Next
from cancelflow.settings import Settings
from messaging.config import create_celery
from messaging.dispatch import dispatch, dispatch_async, flush_sent_events
from tests.fixtures.system import locked_db

pytestmark = pytest.mark.integration


@pytest.fixture
def db_url() -> Iterator[str]:
    with locked_db() as url:
        yield url
        redis.Redis.from_url(url).flushdb()


def sent_messages(url: str, send: Callable[[list[str]], None], n: int) -> list[list[Any]]:
    """Run ``send`` with ``n`` new job ids; the event messages (each a list of events) that
    carried their task-sent events (other tests' workers publish on the same channels)."""
    ids = sorted(new_job_id() for _ in range(n))
    pubsub = redis.Redis.from_url(url).pubsub()
    pubsub.psubscribe("*celeryev*")
    while (m := pubsub.get_message(timeout=1.0)) is None or m["type"] != "psubscribe":
        pass
    sender = threading.Thread(target=send, args=(ids,))
    sender.start()
    messages: list[list[Any]] = []
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        item = pubsub.get_message(timeout=0.1)
        if not item or item["type"] != "pmessage":
            continue
        body = json.loads(base64.b64decode(json.loads(item["data"])["body"]))
        events = body if isinstance(body, list) else [body]
        ours = [
            e
            for e in events
            if e.get("type") == "task-sent" and any(i in str(e.get("args")) for i in ids)
        ]
        if ours:
            messages.append(ours)
    sender.join()
    pubsub.close()
    return messages


def test_steps_sent_from_a_loop_publish_their_sent_events_in_one_batch(db_url: str) -> None:
    app = create_celery(Settings(redis_url=db_url))

    def send(ids: list[str]) -> None:
        async def go() -> None:
            for job_id in ids:
                dispatch(app, Next(Step.ELIGIBILITY, job_id, "payway"))
            await asyncio.sleep(0.2)  # past the batch's delay: its timer publishes it

        asyncio.run(go())

    messages = sent_messages(db_url, send, 5)
    assert [len(m) for m in messages] == [5], "one message, five task-sent events"
    event = messages[0][0]
    assert event["routing_key"] == "cancellations.payway"
    assert event["name"] == "cancelflow.eligibility"
    app.close()


def test_from_a_thread_without_a_loop_each_sent_event_goes_at_once(db_url: str) -> None:
    app = create_celery(Settings(redis_url=db_url))

    def send(ids: list[str]) -> None:
        for job_id in ids:
            dispatch(app, Next(Step.ELIGIBILITY, job_id, "payway"))

    assert [len(m) for m in sent_messages(db_url, send, 3)] == [1, 1, 1]
    app.close()


def test_events_still_waiting_when_the_loop_ends_are_published_by_the_flush(db_url: str) -> None:
    app = create_celery(Settings(redis_url=db_url))

    def send(ids: list[str]) -> None:
        async def go() -> None:
            for job_id in ids:
                dispatch(app, Next(Step.ELIGIBILITY, job_id, "payway"))

        asyncio.run(go())  # ends before the batch's timer
        flush_sent_events()

    assert [len(m) for m in sent_messages(db_url, send, 4)] == [4]
    app.close()


def test_steps_sent_on_the_loop_by_redis_send_the_same_events_in_one_batch(db_url: str) -> None:
    # dispatch_async (the API's first steps) writes the message itself; its task-sent events
    # go into the same batch, with the fields send_task gives them.
    app = create_celery(Settings(redis_url=db_url))

    def send(ids: list[str]) -> None:
        async def go() -> None:
            client = AsyncRedis.from_url(db_url)
            dispatch(app, Next(Step.ELIGIBILITY, ids[0], "payway"))
            for job_id in ids[1:]:
                await dispatch_async(app, client, Next(Step.ELIGIBILITY, job_id, "payway"))
            await asyncio.sleep(0.2)
            await client.aclose()

        asyncio.run(go())

    ids_sent = sent_messages(db_url, send, 4)
    assert [len(m) for m in ids_sent] == [4], "one message, four task-sent events"
    by_kombu, *by_us = ids_sent[0]
    differ = {"uuid", "root_id", "args", "clock", "timestamp", "local_received"}
    for event in by_us:
        assert list(event) == list(by_kombu)
        assert {k: v for k, v in event.items() if k not in differ} == {
            k: v for k, v in by_kombu.items() if k not in differ
        }
        assert event["uuid"] == event["root_id"] and event["uuid"] != by_kombu["uuid"]
    assert by_us[0]["routing_key"] == "cancellations.payway"
    app.close()
