"""The message ``dispatch_async`` writes is the one ``send_task`` writes.

The API sends a job's first step with its own asyncio Redis client (``dispatch_async``,
built by ``messaging.patches.step_message``) instead of kombu's publish (``dispatch``, through
Celery's ``send_task``). The worker must not be able to tell them apart: here both are sent
for the same step onto a real Redis, read back raw from the queue's list, and compared field
by field, the order of every object's keys included; only the ids and the send time differ.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis
import structlog
from redis.asyncio import Redis as AsyncRedis

from cancelflow.contract import Step, new_job_id
from cancelflow.lifecycle import Next
from cancelflow.settings import Settings
from messaging.config import create_celery
from messaging.dispatch import dispatch, dispatch_async, queue_for
from tests.fixtures.system import locked_db

pytestmark = pytest.mark.integration

# Different in every message: the task's id (and so its root id and correlation id), the
# delivery tag, and when it was sent.
IDS = {
    ("headers", "id"),
    ("headers", "root_id"),
    ("headers", "sent_at"),
    ("properties", "correlation_id"),
    ("properties", "delivery_tag"),
}


@pytest.fixture
def db_url() -> Iterator[str]:
    with locked_db() as url:
        yield url
        redis.Redis.from_url(url).flushdb()


def raw_pair(db_url: str, nxt: Next, request_id: str | None) -> tuple[bytes, bytes]:
    """The list items ``dispatch`` and then ``dispatch_async`` wrote for ``nxt``."""
    app = create_celery(Settings(redis_url=db_url))
    sync = redis.Redis.from_url(db_url)
    queue = queue_for(nxt.step, nxt.provider) if nxt.step is not None else ""
    structlog.contextvars.clear_contextvars()
    if request_id is not None:
        structlog.contextvars.bind_contextvars(request_id=request_id)

    async def send_both() -> tuple[bytes, bytes]:
        client = AsyncRedis.from_url(db_url)
        try:
            dispatch(app, nxt)
            [by_kombu] = cast("list[bytes]", sync.lrange(queue, 0, -1))
            sync.delete(queue)
            await dispatch_async(app, client, nxt)
            [by_us] = cast("list[bytes]", sync.lrange(queue, 0, -1))
            return by_kombu, by_us
        finally:
            await client.aclose()

    try:
        return asyncio.run(send_both())
    finally:
        structlog.contextvars.clear_contextvars()
        app.close()


def fields(raw: bytes) -> list[tuple[tuple[str, ...], Any]]:
    """Every leaf of the envelope, path and value, in order, the body decoded."""
    envelope = json.loads(raw)
    assert envelope["properties"]["body_encoding"] == "base64"
    envelope["body"] = json.loads(base64.b64decode(envelope["body"]))
    out: list[tuple[tuple[str, ...], Any]] = []

    def walk(path: tuple[str, ...], value: Any) -> None:
        if isinstance(value, dict):
            out.append((path, ("keys", list(value))))
            for key, item in value.items():
                walk((*path, key), item)
        else:
            out.append((path, "<id>" if path in IDS else value))

    walk((), envelope)
    return out


@pytest.mark.parametrize(
    ("step", "args", "request_id"),
    [
        (Step.ELIGIBILITY, (), "req-1"),
        (Step.ELIGIBILITY, (), None),
        (Step.CONFIRM, (), "req-2"),
        (Step.CALLBACK, ("finished",), "req-3"),
    ],
)
def test_the_async_message_is_send_tasks_field_by_field(
    db_url: str, step: Step, args: tuple[str, ...], request_id: str | None
) -> None:
    nxt = Next(step, new_job_id(), "payway", args)
    by_kombu, by_us = raw_pair(db_url, nxt, request_id)
    assert fields(by_us) == fields(by_kombu)
    # And the ids are new ones, consistent as Celery's are.
    ours = json.loads(by_us)
    assert ours["headers"]["id"] == ours["headers"]["root_id"]
    assert ours["headers"]["id"] == ours["properties"]["correlation_id"]
    assert ours["headers"]["id"] != json.loads(by_kombu)["headers"]["id"]


def test_the_fields_compared_are_the_ones_the_worker_reads(db_url: str) -> None:
    nxt = Next(Step.ELIGIBILITY, new_job_id(), "payway")
    _, by_us = raw_pair(db_url, nxt, "req-9")
    found = dict(fields(by_us))
    assert found["headers", "task"] == "cancelflow.eligibility"
    assert found["headers", "job_id"] == nxt.job_id
    assert found["headers", "provider"] == "payway"
    assert found["headers", "request_id"] == "req-9"
    assert found["headers", "argsrepr"] == repr([nxt.job_id])
    assert found["properties", "delivery_info", "routing_key"] == "cancellations.payway"
    assert found[("content-type",)] == "application/json"
    assert found[("body",)] == [
        [nxt.job_id],
        {},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]
