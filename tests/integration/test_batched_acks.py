"""The worker's channel (messaging.patches.WorkerChannel) acknowledges in batches on the
consumer's hub.

Real Redis, real kombu consumer and hub: messages taken are recorded in Redis's unacked hash
(what Redis redelivers after the visibility timeout); an acknowledgement made on the hub's
thread (as Celery makes them) leaves them there for a moment and a batch removes them in
one pipeline; one made without a hub, or in another thread, removes them at once; closing
the channel writes a batch still waiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis
from kombu.asynchronous import Hub, set_event_loop
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Consumer, Producer

from messaging import patches as transport
from tests.fixtures.system import locked_db

pytestmark = pytest.mark.integration

QUEUE = Queue("test.acks", Exchange("test.acks", type="direct"), routing_key="test.acks")


@pytest.fixture
def url() -> Iterator[str]:
    with locked_db() as db_url:
        yield db_url
        redis.Redis.from_url(db_url).flushdb()


def taken(url: str, n: int) -> tuple[Connection, Any, list[Any]]:
    """``n`` messages published and taken by a consumer on the worker's channel, not acked."""
    conn = Connection(url, transport="messaging.patches:WorkerTransport")
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


@pytest.fixture
def hub() -> Iterator[Hub]:
    """kombu's event loop, as Celery's consumer sets it up (its timers fired by hand here)."""
    hub = Hub()
    set_event_loop(hub)
    yield hub
    set_event_loop(None)
    hub.close()


def unacked(url: str) -> int:
    return cast(int, redis.Redis.from_url(url).hlen("unacked"))


def test_acks_on_the_hub_are_written_together_a_moment_later(url: str, hub: Hub) -> None:
    conn, _, messages = taken(url, 5)
    assert unacked(url) == 5
    for m in messages:
        m.ack()
    assert unacked(url) == 5, "waiting for the batch"
    time.sleep(transport.ACK_DELAY_S * 2)
    hub.fire_timers()
    assert unacked(url) == 0, "written by the batch"
    assert redis.Redis.from_url(url).zcard("unacked_index") == 0
    conn.release()


def test_acks_without_a_hub_or_off_its_thread_are_written_at_once(url: str) -> None:
    conn, _, messages = taken(url, 3)
    messages[0].ack()
    assert unacked(url) == 2
    set_event_loop(Hub())
    try:
        other = threading.Thread(target=lambda: [m.ack() for m in messages[1:]])
        other.start()
        other.join()
    finally:
        set_event_loop(None)
    assert unacked(url) == 0
    conn.release()


def test_closing_the_channel_writes_the_batch_waiting(url: str, hub: Hub) -> None:
    conn, channel, messages = taken(url, 4)
    for m in messages:
        m.ack()
    assert unacked(url) == 4
    channel.close()
    assert unacked(url) == 0
    conn.release()


def test_a_consumer_connection_collected_then_closed_gives_its_messages_back(url: str) -> None:
    """Celery's consumer, its connection broken (a Sentinel failover), calls
    ``Connection.collect`` and then ``Connection.close``. The first close of the default
    channel fails on the broken socket (its ``BRPOP`` under way), kombu ignores that, and
    detaches the transport; the second close restores the unacknowledged messages, which
    needs the transport's connection: an ``AttributeError`` there stopped the worker."""
    conn = Connection(url, transport="messaging.patches:WorkerTransport")
    with Producer(conn) as producer:
        for i in range(3):
            producer.publish(
                {"n": i}, exchange=QUEUE.exchange, routing_key="test.acks", declare=[QUEUE]
            )
    channel: Any = conn.default_channel
    messages: list[Any] = []
    Consumer(
        channel, [QUEUE], callbacks=[lambda _, m: messages.append(m)], accept=["json"]
    ).consume()
    while len(messages) < 3:
        conn.drain_events(timeout=5)
    assert unacked(url) == 3
    # The socket broken: each close in ``collect`` fails midway, as a connection error.
    disconnect = channel._disconnect_pools

    def broken() -> None:
        raise redis.ConnectionError("Connection closed by server.")

    channel._disconnect_pools = broken
    transport = channel.connection
    conn.collect()
    assert transport.client is None and not channel.closed  # kombu's state after it
    channel._disconnect_pools = disconnect
    conn.close()
    assert channel.closed
    assert redis.Redis.from_url(url).llen("test.acks") == 3, "given back to their queue"
    assert unacked(url) == 0
    assert transport.client is None, "the transport stays detached"
