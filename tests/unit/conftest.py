"""Fixtures for the unit tests: in-memory fakes only."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest
from kombu.asynchronous import Hub, get_event_loop, set_event_loop


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeAsyncRedis]:
    """An in-memory async Redis (with Lua) for fast unit tests."""
    server = fakeredis.FakeServer()
    yield fakeredis.FakeAsyncRedis(server=server)


@pytest.fixture
def hub() -> Iterator[Hub]:
    """kombu's event loop, set as the current one (as Celery's consumer sets it up); run by
    hand (``run_once``, ``fire_timers``)."""
    previous = get_event_loop()
    found = Hub()
    set_event_loop(found)
    try:
        yield found
    finally:
        set_event_loop(previous)
        found.close()
