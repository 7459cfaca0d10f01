"""RabbitMQ's ``ConfirmedPublisher`` (messaging.dispatch): the steps a producer's loop or a
worker's step sends, from one thread that waits for the confirms of every message sent
meanwhile at once. Against a real RabbitMQ, in a vhost of the test's own: the message is
``dispatch``'s, ``send`` returns only once RabbitMQ confirmed it, a refused message raises,
a lost connection is replaced, an unreachable broker fails the send."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from cancelflow.contract import Step, new_job_id
from cancelflow.lifecycle import Next
from cancelflow.settings import Settings
from messaging.config import create_celery
from messaging.dispatch import ConfirmedPublisher, dispatch, queue_for
from producers.local import free_port
from tests.fixtures.system import locked_db
from tests.rabbitmq import RabbitServer

pytestmark = pytest.mark.integration


@pytest.fixture
def vhost(rabbit: RabbitServer) -> Iterator[str]:
    with rabbit.vhost() as url:
        yield url


@pytest.fixture
def app(vhost: str) -> Iterator[Celery]:
    with locked_db() as db_url:
        yield create_celery(Settings(redis_url=db_url, broker_url=vhost))


def step(job_id: str | None = None, provider: str = "payway") -> Next:
    return Next(Step.ELIGIBILITY, job_id or new_job_id(), provider)


QUEUE = queue_for(Step.ELIGIBILITY, "payway")


def messages(app: Celery, name: str = QUEUE) -> list[Any]:
    """Every message on the queue ``name`` (payway's), taken off it."""
    queue = next(q for q in app.conf.task_queues if q.name == name)
    found = []
    with Connection(app.conf.broker_url) as conn:
        bound = queue(conn.channel())
        while (message := bound.get(no_ack=True)) is not None:
            found.append(message)
    return found


def publishes_of(publisher: ConfirmedPublisher) -> list[int]:
    """The size of every batch ``publisher`` will publish (each attempt at it), as it goes."""
    sizes: list[int] = []
    publish_once = publisher._publish_once

    def counted(todo: list[Any]) -> None:
        sizes.append(len(todo))
        publish_once(todo)

    publisher._publish_once = counted  # type: ignore[method-assign]
    return sizes


def test_the_publisher_sends_what_dispatch_sends_with_the_parent_given(app: Celery) -> None:
    nxt = step()
    dispatch(app, nxt)
    publisher = ConfirmedPublisher(app)
    try:
        asyncio.run(publisher.send(nxt, parent=("parent-task", "root-task")))
    finally:
        publisher.close()
    by_dispatch, by_publisher = messages(app)
    assert by_publisher.body == by_dispatch.body
    differ = {"id", "root_id", "parent_id", "sent_at"}
    assert {k: v for k, v in by_publisher.headers.items() if k not in differ} == {
        k: v for k, v in by_dispatch.headers.items() if k not in differ
    }
    # Sent from no task, the step is its own root; from a step, its task's ids.
    assert by_dispatch.headers["parent_id"] is None
    assert by_dispatch.headers["root_id"] == by_dispatch.headers["id"]
    assert by_publisher.headers["parent_id"] == "parent-task"
    assert by_publisher.headers["root_id"] == "root-task"
    # application_headers: the headers, compared above.
    differ = {"correlation_id", "delivery_tag", "application_headers"}
    assert {k: v for k, v in by_publisher.properties.items() if k not in differ} == {
        k: v for k, v in by_dispatch.properties.items() if k not in differ
    }
    assert by_publisher.delivery_info["routing_key"] == by_dispatch.delivery_info["routing_key"]


def test_steps_sent_together_wait_for_their_confirms_together(app: Celery) -> None:
    publisher = ConfirmedPublisher(app)
    batches = publishes_of(publisher)
    ids = [new_job_id() for _ in range(300)]

    async def send_all() -> None:
        await asyncio.gather(*(publisher.send(step(job_id)) for job_id in ids))

    try:
        asyncio.run(send_all())
    finally:
        publisher.close()
    assert sum(batches) == 300
    assert len(batches) < 300, batches  # some waited for one confirm together
    assert sorted(m.headers["job_id"] for m in messages(app)) == sorted(ids)


def test_a_message_rabbitmq_refuses_raises_and_the_next_is_sent(
    app: Celery, rabbit: RabbitServer, vhost: str
) -> None:
    dispatch(app, step())  # the queue exists, one message on it
    name = urllib.parse.unquote(vhost.rsplit("/", 1)[-1])
    quoted = urllib.parse.quote(name, safe="")

    def policy_is(policy: str | None) -> None:
        deadline = time.monotonic() + 30
        while rabbit.management.call("GET", f"queues/{quoted}/{QUEUE}").get("policy") != policy:
            assert time.monotonic() < deadline, f"the queue's policy is not {policy}"
            time.sleep(0.2)

    rabbit.management.call(
        "PUT",
        f"policies/{quoted}/full",
        {"pattern": f"^{QUEUE}$", "definition": {"max-length": 1}, "apply-to": "queues"},
    )
    policy_is("full")
    publisher = ConfirmedPublisher(app)
    confirmed, refused = [], []
    try:
        # Full, the queue overflows by refusing (x-overflow: reject-publish): a nack, once
        # RabbitMQ counts it full (a quorum queue may take a message or two more).
        for _ in range(5):
            sent = step()
            try:
                asyncio.run(publisher.send(sent))
                confirmed.append(sent.job_id)
            except OperationalError as exc:
                assert "refused" in str(exc)
                refused.append(sent.job_id)
        assert refused
        on_queue = [m.headers["job_id"] for m in messages(app)]
        assert on_queue[1:] == confirmed  # the first: dispatch's
        # The publisher goes on after a nack: a step for a queue with room is confirmed.
        # (Another provider's queue: a quorum queue lifts its refusal in its own time.)
        last = step(provider="azotte")
        asyncio.run(publisher.send(last))
    finally:
        publisher.close()
    other = queue_for(Step.ELIGIBILITY, "azotte")
    assert [m.headers["job_id"] for m in messages(app, other)] == [last.job_id]


def test_a_connection_closed_by_rabbitmq_is_replaced_and_the_step_sent(
    app: Celery, rabbit: RabbitServer, vhost: str
) -> None:
    name = urllib.parse.unquote(vhost.rsplit("/", 1)[-1])
    quoted = urllib.parse.quote(name, safe="")
    publisher = ConfirmedPublisher(app, idle_s=120)
    try:
        first, second = step(), step()
        asyncio.run(publisher.send(first))
        # RabbitMQ closes the publisher's connection (as an operator or a node restart would).
        deadline = time.monotonic() + 30
        while not (connections := rabbit.management.call("GET", f"vhosts/{quoted}/connections")):
            assert time.monotonic() < deadline, "the publisher's connection is not listed"
            time.sleep(0.5)
        for connection in connections:
            rabbit.management.call(
                "DELETE", f"connections/{urllib.parse.quote(connection['name'], safe='')}"
            )
        asyncio.run(publisher.send(second))
    finally:
        publisher.close()
    assert [m.headers["job_id"] for m in messages(app)] == [first.job_id, second.job_id]


def test_an_unreachable_rabbitmq_fails_the_send_after_the_retry_policy(vhost: str) -> None:
    with locked_db() as db_url:
        url = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
        app = create_celery(Settings(redis_url=db_url, broker_url=url))
    publisher = ConfirmedPublisher(app)
    attempts = publishes_of(publisher)
    try:
        with pytest.raises(OperationalError, match="did not confirm"):
            asyncio.run(publisher.send(step()))
    finally:
        publisher.close()
    assert attempts == [1] * (publisher.retries + 1)  # the retry policy's, then the error
