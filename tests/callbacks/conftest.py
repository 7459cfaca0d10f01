"""A system of its own for the callback integration tests: its own Redis DB (so no other
test's worker takes its messages), test hooks loaded, a short horizon, a rotated secret."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sandboxes.receiver import DEMO_CALLBACK_SECRET
from tests import fixtures
from tests.callbacks.secrets import ROTATED
from tests.support import System


def pytest_configure(config: pytest.Config) -> None:
    fixtures.use(config, fixtures.SYSTEM)


# Payway signs with a new secret and the demo one while rotating; the receiver holds the demo one.
ROTATED_SECRET = ROTATED
HORIZON_S = 6
CLIENT_ERROR_WINDOW_S = 3


@pytest.fixture(scope="session")
def cb_system(start_system: Callable[..., System]) -> System:
    return start_system(
        isolated=True,
        # The receiver is reached as localhost: 127.0.0.1 by address stays refused.
        CANCELFLOW_CALLBACKS__ALLOWED_HOSTS="localhost",
        CANCELFLOW_CALLBACKS__HORIZON_S=str(HORIZON_S),
        # A 4xx is retried this long (default: an hour, tests/unit/test_callback_retry.py).
        CANCELFLOW_CALLBACKS__CLIENT_ERROR_WINDOW_S=str(CLIENT_ERROR_WINDOW_S),
        CANCELFLOW_CALLBACKS__TIMEOUT_S="2",
        CANCELFLOW_CALLBACKS__HOOK_MODULES="tests.callbacks.hooks_for_tests",
        CANCELFLOW_PROVIDERS__PAYWAY__CALLBACK_SECRET=ROTATED_SECRET,
        CANCELFLOW_PROVIDERS__PAYWAY__CALLBACK_SECRET_PREVIOUS=DEMO_CALLBACK_SECRET,
        CANCELFLOW_PROVIDERS__PAYWAY__MAX_ATTEMPTS="2",
    )
