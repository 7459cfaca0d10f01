"""Most deployment checks read files; the health-check commands run against a real system,
whose fixtures come from the shared plugin (also when this directory runs on its own)."""

from __future__ import annotations

import pytest

from tests import fixtures


def pytest_configure(config: pytest.Config) -> None:
    fixtures.use(config, fixtures.SYSTEM)
