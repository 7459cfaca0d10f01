"""Fixtures for the producers' tests: Settings built directly, a second Redis DB, extra APIs.

``async def`` tests run with ``asyncio.run`` (no pytest async plugin is installed).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cancelflow.settings import Settings
from sandboxes import azotte, payway
from tests import fixtures
from tests.fixtures.system import StartSystem


def pytest_configure(config: pytest.Config) -> None:
    fixtures.use(config, fixtures.SYSTEM)


RULES = """\
version: 1
rules:
  - name: payway-final-failure
    when:
      type: [payment.final_failure, chargeback.lost]
      fields:
        data.provider: payway
    cancel:
      provider: payway
      subscription:
        account_id: "{data.account_id}"
        user_product_id: "{data.user_product_id}"
        cancellation_reason_id: 5cb80481c00000000000000a
      reason:
        code: "{type}"
        comment: "billing event {id}"
  - name: azotte-account-closed
    when:
      type: account.closed
      fields: {data.provider: azotte}
    cancel:
      provider: azotte
      method: Immediate
      subscription: {order_identifier: "{data.order_id}"}
"""


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


def providers(base_url: str = "http://127.0.0.1:9") -> dict[str, Any]:
    """Payway and Azotte configured (the billing path never calls them)."""
    return {
        "payway": {
            "base_url": f"{base_url}/payway",
            "client_id": payway.DEMO_CLIENT_ID,
            "client_secret": payway.DEMO_CLIENT_SECRET,
        },
        "azotte": {
            "base_url": f"{base_url}/azotte",
            "api_key": azotte.DEMO_API_KEY,
            "tenant": azotte.DEMO_TENANT,
        },
    }


MakeSettings = Callable[..., Settings]


@pytest.fixture
def make_settings(redis_url: str, rules_file: Path) -> MakeSettings:
    """Settings for in-process producers, on this session's Redis DB, with a fresh stream."""
    stream = f"test:billing:{uuid.uuid4().hex[:8]}"

    def make(**billing: Any) -> Settings:
        return Settings(
            redis_url=redis_url,
            providers=providers(),
            billing={
                "stream": stream,
                "rules_path": rules_file,
                "claim_idle_s": 0.3,
                "block_s": 0.1,
                **billing,
            },
        )

    return make


BILLING_SECRET = "whsec_test_billing"


@pytest.fixture(scope="session")
def billing_rules_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("billing") / "rules.yaml"
    path.write_text(RULES)
    return path


@pytest.fixture(scope="session")
def billing_api(start_system: StartSystem, billing_rules_path: Path) -> Any:
    """An API (no worker) with billing events on, and bodies limited to 4 KiB, on a Redis DB
    of its own: no other system's worker may take (and finish) its jobs."""
    return start_system(
        workers=0,
        isolated=True,
        CANCELFLOW_API__MAX_BODY_BYTES="4096",
        CANCELFLOW_BILLING__RULES_PATH=str(billing_rules_path),
        CANCELFLOW_BILLING__SECRET=BILLING_SECRET,
        # The property-based runs send thousands of bad credentials from one address: the
        # failed-authentication limit (its default is tested in test_auth_and_namespaces)
        # would answer them 429 before they reach what they test.
        CANCELFLOW_API__AUTH_FAILURES_BURST="100000",
    )


@pytest.fixture(scope="session")
def limited_api(start_system: StartSystem) -> Any:
    """An API (no worker) allowing each token 2 requests per second, 5 at once."""
    return start_system(
        workers=0,
        isolated=True,
        CANCELFLOW_API__RATE_LIMIT_PER_S="2",
        CANCELFLOW_API__RATE_LIMIT_BURST="5",
    )
