"""The integration tests run against a real system: its fixtures come from a shared plugin."""

from __future__ import annotations

import pytest

from tests import fixtures


def pytest_configure(config: pytest.Config) -> None:
    fixtures.use(config, fixtures.SYSTEM)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # One suite over every broker, as dramatiq runs its tests over every backend.
    if "broker" in metafunc.fixturenames:
        from tests.fixtures.system import BROKERS

        # A test of a Redis part (the workers' Redis channel's list items, say) has no RabbitMQ leg.
        only_redis = metafunc.definition.get_closest_marker("redis_broker") is not None
        brokers = [b for b in BROKERS if b == "redis"] if only_redis else list(BROKERS)
        metafunc.parametrize("broker", brokers, indirect=True, scope="session")
