"""``cancelflow healthcheck``: what Docker and Kubernetes run to tell a live worker or server
from a dead one. Exit 0 healthy, 1 unhealthy, 2 misused."""

from __future__ import annotations

import os
import subprocess
from urllib.parse import urlsplit

import pytest

from producers.local import cancelflow_command, free_port
from tests.support import Sandbox, System


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cancelflow_command("healthcheck", *args),
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.integration
def test_a_running_worker_answers_the_ping_by_its_node_name(system: System) -> None:
    # The fixture names its worker worker-<API port>@<this host>, as `-n worker-<port>@%h`.
    port = urlsplit(system.api_url).port
    result = healthcheck("worker", "-n", f"worker-{port}@%h", env=system.env)
    assert result.returncode == 0, result.stderr
    assert "pong" in result.stdout


@pytest.mark.integration
def test_no_pong_from_a_worker_that_is_not_there(system: System) -> None:
    result = healthcheck("worker", "-n", "nobody@%h", "--timeout", "1", env=system.env)
    assert result.returncode == 1
    assert "no pong from nobody@" in result.stderr


def test_an_unreachable_broker_is_unhealthy() -> None:
    env = {"CANCELFLOW_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = healthcheck("worker", "--timeout", "1", env=env)
    assert result.returncode == 1
    assert "broker unreachable" in result.stderr


def test_http_check_passes_on_2xx_only(sandbox: Sandbox) -> None:
    assert healthcheck("http", f"{sandbox.url}/healthz").returncode == 0
    missing = healthcheck("http", f"{sandbox.url}/no-such-page")
    assert missing.returncode == 1
    assert "HTTP 404" in missing.stderr
    assert healthcheck("http", f"http://127.0.0.1:{free_port()}/healthz").returncode == 1
    assert healthcheck("http", "ftp://example.com/").returncode == 2
