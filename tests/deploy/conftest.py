"""The health-check tests run a real worker: the system fixtures come from the shared plugin."""

from __future__ import annotations

import pytest

from tests import fixtures


def pytest_configure(config: pytest.Config) -> None:
    fixtures.use(config, fixtures.SYSTEM)
