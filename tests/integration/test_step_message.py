"""The message ``dispatch_async`` writes, and the one a job's creation pushes, is the one
``send_task`` writes.

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
import secrets
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis
import structlog
from celery import Celery
from celery._state import _task_stack
from redis.asyncio import Redis as AsyncRedis

from cancelflow.contract import CancellationRequest, Step, new_job_id
from cancelflow.lifecycle import Next
from cancelflow.settings import Settings
from cancelflow.store import UNDISPATCHED, Created, job_key
from cancelflow.wiring import build_deps
from messaging.config import create_celery
from messaging.dispatch import dispatch, dispatch_async, queue_for
from producers.submit import submit
from tests.fixtures.system import locked_db
from worker.app import create_app
from worker.tasks import outbox

pytestmark = pytest.mark.integration

# Different in every message: the task's id (and so its root id and correlation id), the
# delivery tag, and when it was sent.
IDS: set[tuple[str, ...]] = {
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


def fields(raw: bytes, ids: set[tuple[str, ...]] = IDS) -> list[tuple[tuple[str, ...], Any]]:
    """Every leaf of the envelope, path and value, in order, the body decoded; the ``ids``
    masked."""
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
            out.append((path, "<id>" if path in ids else value))

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


# --- the first step pushed by the job's creation (``producers.submit``) -------------------------


def payway_request(key: str | None = None) -> CancellationRequest:
    return CancellationRequest(
        provider="payway",
        subscription={
            "account_id": secrets.token_hex(12),
            "user_product_id": secrets.token_hex(12),
            "cancellation_reason_id": secrets.token_hex(12),
        },
        idempotency_key=key,
    )


def submit_settings(db_url: str) -> Settings:
    return Settings(
        redis_url=db_url,
        providers={
            "payway": {
                "base_url": "http://127.0.0.1:9/payway",
                "client_id": "c",
                "client_secret": "s",
            }
        },
    )


def submitted(
    db_url: str, requests: list[CancellationRequest], request_id: str | None
) -> tuple[list[Created], list[bytes], bytes]:
    """Submit ``requests`` in turn through ``producers.submit``; the jobs, every item then on
    payway's queue (oldest first), and the item ``send_task`` writes for the first job's
    first step (sent last, onto an emptied queue). No job was marked undispatched."""
    settings = submit_settings(db_url)
    app = create_celery(settings)
    sync = redis.Redis.from_url(db_url)
    queue = queue_for(Step.ELIGIBILITY, "payway")
    structlog.contextvars.clear_contextvars()
    if request_id is not None:
        structlog.contextvars.bind_contextvars(request_id=request_id)

    async def go() -> tuple[list[Created], list[bytes], bytes]:
        client = AsyncRedis.from_url(db_url)
        try:
            deps = build_deps(settings, redis=client)
            jobs = [await submit(deps, app, r) for r in requests]
            # Read before a batch of marks could be cleared: none was made.
            assert sync.zcard(UNDISPATCHED) == 0
            await deps.store.flush_marks()
            pushed = cast("list[bytes]", sync.lrange(queue, 0, -1))[::-1]
            sync.delete(queue)
            dispatch(app, Next(Step.ELIGIBILITY, jobs[0].job.id, "payway"))
            [by_kombu] = cast("list[bytes]", sync.lrange(queue, 0, -1))
            return jobs, pushed, by_kombu
        finally:
            await client.aclose()

    try:
        return asyncio.run(go())
    finally:
        structlog.contextvars.clear_contextvars()
        app.close()


@pytest.mark.parametrize("request_id", ["req-7", None])
def test_the_message_the_creation_pushed_is_send_tasks_field_by_field(
    db_url: str, request_id: str | None
) -> None:
    [created], [pushed], by_kombu = submitted(db_url, [payway_request()], request_id)
    assert created.how == "created"
    assert fields(pushed) == fields(by_kombu)
    ours = json.loads(pushed)
    assert ours["headers"]["job_id"] == created.job.id
    assert ours["headers"]["id"] == ours["headers"]["root_id"]
    assert ours["headers"]["id"] != json.loads(by_kombu)["headers"]["id"]
    # Pushed by the script that recorded the job (``submitted`` found no undispatched mark).
    sync = redis.Redis.from_url(db_url)
    assert cast("bytes", sync.hget(job_key(created.job.id), "status")) == b"queued"


def test_a_repeated_or_joining_request_pushes_nothing(db_url: str) -> None:
    first = payway_request("key-1")
    joining = first.model_copy(update={"idempotency_key": "key-2"})
    jobs, pushed, _ = submitted(db_url, [first, first, joining], "req-8")
    assert [j.how for j in jobs] == ["created", "existing", "joined"]
    assert {j.job.id for j in jobs} == {jobs[0].job.id}
    assert [json.loads(p)["headers"]["job_id"] for p in pushed] == [jobs[0].job.id]


def test_where_the_copy_does_not_apply_the_job_is_marked_then_sent_as_before(
    db_url: str,
) -> None:
    """A task route: ``send_task`` sends the first step after the job is recorded, and the
    undispatched mark it was recorded with is cleared once it is sent."""
    settings = submit_settings(db_url)
    app = create_celery(settings)
    queue = queue_for(Step.ELIGIBILITY, "payway")
    app.conf.task_routes = {"cancelflow.eligibility": {"queue": queue}}
    sync = redis.Redis.from_url(db_url)

    async def go() -> tuple[Created, bool, bool]:
        client = AsyncRedis.from_url(db_url)
        try:
            deps = build_deps(settings, redis=client)
            created = await submit(deps, app, payway_request())
            marked = sync.zscore(UNDISPATCHED, created.job.id) is not None
            await deps.store.flush_marks()
            return created, marked, await deps.store.dispatched(created.job.id)
        finally:
            await client.aclose()

    try:
        created, marked, cleared = asyncio.run(go())
    finally:
        app.close()
    assert created.how == "created"
    assert marked and cleared
    [sent] = cast("list[bytes]", sync.lrange(queue, 0, -1))
    assert json.loads(sent)["headers"]["job_id"] == created.job.id


# --- the next step pushed by a step's own move (``worker.tasks.outbox``) ------------------------


def _a_step(self: Any) -> None:
    """The running task ``send_task`` finds (Celery's task stack)."""


@pytest.mark.parametrize(
    ("step", "args"),
    [(Step.CONFIRM, ()), (Step.CALLBACK, ("outcome",))],
    ids=["confirm", "callback"],
)
def test_the_next_step_a_worker_pushes_is_send_tasks_from_within_the_step(
    db_url: str, step: Step, args: tuple[str, ...]
) -> None:
    """A step's move pushes its next step's message (``chain.OUTBOX``), built on the loop
    before Celery runs the task, from the step's request: the same message ``send_task`` writes
    from inside that running task, field by field, its parent and root ids included (Celery
    takes them from the task running; here they are compared, not masked)."""
    settings = Settings(redis_url=db_url)
    worker_app = create_app(settings)
    parents = Celery("parents", set_as_current=False)
    sync = redis.Redis.from_url(db_url)
    parent_id, root_id = str(uuid.uuid4()), str(uuid.uuid4())
    nxt = Next(step, new_job_id(), "payway", args)
    structlog.contextvars.clear_contextvars()
    build = outbox(worker_app, {"id": parent_id, "root_id": root_id})
    assert build is not None, "the broker is the job store's Redis: the move pushes"
    ours = build(nxt)
    assert ours is not None
    # send_task in the step's task: Celery's running task is the parent.
    parent = parents.task(name="test.step", bind=True)(_a_step)
    parent.push_request(id=parent_id, root_id=root_id, called_directly=False)
    _task_stack.push(parent)
    try:
        dispatch(worker_app, nxt)  # as the tracer sends a step not pushed
    finally:
        _task_stack.pop()
        parent.pop_request()
        parents.close()
        worker_app.close()
    queue = queue_for(step, "payway")
    [by_kombu] = cast("list[bytes]", sync.lrange(queue, 0, -1))
    # Compared: the root id. Masked besides the ids: ``reply_to``, the sending app's own oid
    # (the outbox's app is not the worker's; nobody replies to a step, its result ignored).
    masked = (IDS - {("headers", "root_id")}) | {("properties", "reply_to")}
    assert fields(ours.payload.encode(), masked) == fields(by_kombu, masked)
    sent = json.loads(ours.payload)
    assert (sent["headers"]["parent_id"], sent["headers"]["root_id"]) == (parent_id, root_id)
    assert ours.key == queue
