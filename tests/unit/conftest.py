"""Fixtures for the unit tests: in-memory fakes only."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeAsyncRedis]:
    """An in-memory async Redis (with Lua) for fast unit tests."""
    server = fakeredis.FakeServer()
    yield fakeredis.FakeAsyncRedis(server=server)
