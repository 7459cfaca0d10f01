"""messaging.patches.HubEventsRequest: a task event sent from another thread than the
consumer's hub is published by the hub's thread, the only one that reads the event
connection (on RabbitMQ, a publish from another thread waits for a confirm the hub may
read first, and both threads stop until the broker drops the connection)."""

from __future__ import annotations

import threading
from typing import Any

from kombu.asynchronous import Hub, get_event_loop

from messaging.patches import HubEventsRequest, StepRequest


class Dispatcher:
    """Celery's event dispatcher as a request uses it: ``enabled`` and ``send``."""

    enabled = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def send(self, type: str, **fields: Any) -> None:
        self.sent.append((threading.current_thread().name, type, fields))


class SendsEvents:
    send_events = True


def request(cls: type[HubEventsRequest], eventer: Dispatcher) -> HubEventsRequest:
    """A request with what ``Request.send_event`` reads (the rest needs a message)."""
    req = cls.__new__(cls)
    req._eventer = eventer
    req.id = "task-1"
    req._task = SendsEvents()
    return req


def send_from_thread(req: HubEventsRequest, type: str, **fields: Any) -> None:
    thread = threading.Thread(target=req.send_event, args=(type,), kwargs=fields, name="io")
    thread.start()
    thread.join()


def test_an_event_from_another_thread_is_published_by_the_hub(hub: Hub) -> None:
    eventer = Dispatcher()
    req = request(HubEventsRequest, eventer)
    send_from_thread(req, "task-started", pid=7)
    assert eventer.sent == []  # not published by the thread that sent it
    hub.run_once()  # the hub's thread: this one
    assert eventer.sent == [("MainThread", "task-started", {"uuid": "task-1", "pid": 7})]


def test_an_event_from_the_hubs_thread_is_published_at_once(hub: Hub) -> None:
    eventer = Dispatcher()
    request(HubEventsRequest, eventer).send_event("task-received")
    assert eventer.sent == [("MainThread", "task-received", {"uuid": "task-1"})]


def test_without_a_hub_an_event_is_published_by_its_thread() -> None:
    assert get_event_loop() is None
    eventer = Dispatcher()
    send_from_thread(request(HubEventsRequest, eventer), "task-started")
    assert eventer.sent == [("io", "task-started", {"uuid": "task-1"})]


def test_a_steps_events_go_through_the_hub_with_their_fields_made_where_sent(hub: Hub) -> None:
    eventer = Dispatcher()
    req = request(StepRequest, eventer)
    req.time_start = None
    req._request_dict = {"retries": 2}
    send_from_thread(req, "task-succeeded", result="'ok'")
    assert eventer.sent == []
    hub.run_once()
    [(thread, type, fields)] = eventer.sent
    assert (thread, type) == ("MainThread", "task-succeeded")
    assert fields == {"uuid": "task-1", "result": "'ok'", "exception": None, "traceback": None}
