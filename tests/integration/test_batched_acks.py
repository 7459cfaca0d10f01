"""The worker's channel (worker.transport) acknowledges in batches from an event loop.

Real Redis, real kombu consumer: messages taken are recorded in Redis's unacked hash (what
Redis redelivers after the visibility timeout); an acknowledgement made on a loop leaves
them there for a moment and a batch removes them in one pipeline; one made in a thread
without a loop removes them at once; closing the channel writes a batch still waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tests.conftest import locked_db
from worker import transport

pytestmark = pytest.mark.integration

QUEUE = Queue("test.acks", Exchange("test.acks", type="direct"), routing_key="test.acks")


@pytest.fixture
def url() -> Iterator[str]:
    with locked_db() as db_url:
        yield db_url
        redis.Redis.from_url(db_url).flushdb()


def taken(url: str, n: int) -> tuple[Connection, Any, list[Any]]:
    """``n`` messages published and taken by a consumer on the worker's channel, not acked."""
    conn = Connection(url, transport="worker.transport:Transport")
    with Producer(conn) as producer:
        for i in range(n):
            producer.publish(
                {"n": i}, exchange=QUEUE.exchange, routing_key="test.acks", declare=[QUEUE]
            )
    channel = conn.channel()
    messages: list[Any] = []
    consumer = Consumer(
        channel, [QUEUE], callbacks=[lambda _, m: messages.append(m)], accept=["json"]
    )
    consumer.consume()
    while len(messages) < n:
        conn.drain_events(timeout=5)
    return conn, channel, messages


def unacked(url: str) -> int:
    return int(redis.Redis.from_url(url).hlen("unacked"))


def test_acks_on_a_loop_are_written_together_a_moment_later(url: str) -> None:
    conn, _, messages = taken(url, 5)
    assert unacked(url) == 5

    async def ack_all() -> None:
        for m in messages:
            m.ack()
        assert unacked(url) == 5, "waiting for the batch"
        await asyncio.sleep(transport.ACK_DELAY_S * 5)
        assert unacked(url) == 0, "written by the batch"

    asyncio.run(ack_all())
    assert redis.Redis.from_url(url).zcard("unacked_index") == 0
    conn.release()


def test_acks_without_a_loop_are_written_at_once(url: str) -> None:
    conn, _, messages = taken(url, 3)
    messages[0].ack()
    assert unacked(url) == 2
    for m in messages[1:]:
        m.ack()
    assert unacked(url) == 0
    conn.release()


def test_closing_the_channel_writes_the_batch_waiting(url: str) -> None:
    conn, channel, messages = taken(url, 4)

    async def ack_then_close() -> None:
        for m in messages:
            m.ack()
        channel.close()
        assert unacked(url) == 0

    asyncio.run(ack_then_close())
    conn.release()
