"""messaging.patches.TaskEventsEvery: a worker's task events wait for each other and go out
in one message, ``TASK_EVENTS_DELAY_S`` after the first (or at once when Celery's buffer of
24 is full), not one message per hub tick; a consumer that stops publishes what waits.

Celery's own event dispatcher and kombu's hub run here; the dispatcher's ``_publish`` (the
broker write) is replaced by a recorder of what it is given."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from kombu.asynchronous import Hub

from messaging.patches import TASK_EVENTS_DELAY_S, TaskEventsEvery


class Consumer(TaskEventsEvery):
    """What the mixin reads of Celery's consumer: its hub and its event dispatcher."""

    def __init__(self, hub: Hub, app: Celery) -> None:
        self.hub = hub
        self.published: list[tuple[str, list[Any]]] = []
        self.event_dispatcher = app.events.Dispatcher(
            app.connection_for_write(),
            hostname="worker@test",
            enabled=True,
            groups=None,
            buffer_group=["task"],
            on_send_buffered=self.on_send_event_buffered,
        )

        def record(event: Any, producer: Any, routing_key: str, **_: Any) -> None:
            self.published.append((routing_key, list(event)))

        self.event_dispatcher._publish = record

    def send(self, n: int) -> None:
        for i in range(n):
            self.event_dispatcher.send("task-succeeded", uuid=f"task-{i}")


@pytest.fixture
def consumer(hub: Hub) -> Iterator[Consumer]:
    app = Celery("events-batch", broker="memory://", set_as_current=False)
    found = Consumer(hub, app)
    try:
        yield found
    finally:
        app.close()


def run_hub_past_the_delay(hub: Hub) -> None:
    time.sleep(TASK_EVENTS_DELAY_S * 1.5)
    hub.run_once()


def test_events_wait_for_the_delay_and_go_out_in_one_message(hub: Hub, consumer: Consumer) -> None:
    consumer.send(3)
    hub.run_once()  # the next tick, where Celery's own hook published them
    assert consumer.published == []
    run_hub_past_the_delay(hub)
    [(routing_key, events)] = consumer.published
    assert routing_key == "task.multi"
    assert [e["uuid"] for e in events] == ["task-0", "task-1", "task-2"]


def test_a_full_buffer_goes_out_at_once(hub: Hub, consumer: Consumer) -> None:
    limit = consumer.event_dispatcher.buffer_limit
    consumer.send(limit)
    assert [len(events) for _, events in consumer.published] == [limit]


def test_one_timer_at_a_time(hub: Hub, consumer: Consumer) -> None:
    consumer.send(2)
    run_hub_past_the_delay(hub)
    consumer.send(2)
    run_hub_past_the_delay(hub)
    assert [len(events) for _, events in consumer.published] == [2, 2]
    # Each batch's timer fired once: nothing left to publish, no empty message.
    run_hub_past_the_delay(hub)
    assert len(consumer.published) == 2


def test_a_stopping_consumer_publishes_what_waits(hub: Hub, consumer: Consumer) -> None:
    consumer.send(2)
    consumer.flush_task_events()
    assert [len(events) for _, events in consumer.published] == [2]


def test_an_event_from_another_thread_is_timed_on_the_hub(hub: Hub, consumer: Consumer) -> None:
    thread = threading.Thread(target=consumer.send, args=(1,))
    thread.start()
    thread.join()
    assert consumer.published == []
    hub.run_once()  # the hub takes the hand-off and starts the timer
    run_hub_past_the_delay(hub)
    assert [len(events) for _, events in consumer.published] == [1]


def test_the_workers_consumer_batches_its_task_events() -> None:
    from worker.consumer import Consumer as WorkerConsumer

    assert issubclass(WorkerConsumer, TaskEventsEvery)
    assert WorkerConsumer.on_send_event_buffered is TaskEventsEvery.on_send_event_buffered
