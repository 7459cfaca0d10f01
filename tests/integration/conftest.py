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
        # One of RabbitMQ (a quorum queue's delivery limit), its RabbitMQ leg only.
        only = {
            kind
            for kind in ("redis", "amqp")
            if metafunc.definition.get_closest_marker(f"{kind}_broker") is not None
        }
        brokers = [b for b in BROKERS if not only or b in only]
        metafunc.parametrize("broker", brokers, indirect=True, scope="session")
