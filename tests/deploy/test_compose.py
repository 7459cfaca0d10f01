"""docker-compose.yml and .env.example: valid Compose, and consistent with the code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from cancelflow.providers import REGISTRY
from cancelflow.settings import Limits, load_settings
from sandboxes.env import provider_env
from tests.deploy.support import (
    COMPOSE_FILE,
    CONSUMED_QUEUES,
    ENV_EXAMPLE,
    Command,
    compose,
    env_file,
    image_entrypoint,
    resolve,
    setting_names,
)

# Variables .env.example may set besides Cancelflow's settings, and who reads them.
OTHER_VARIABLES = {"FLOWER_BASIC_AUTH": "Flower's --basic-auth"}
LONGEST_TASK_S = Limits.from_visibility_timeout(10**9).task_time_limit_s


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]  # type: ignore[no-any-return]


def is_ours(service: dict[str, Any]) -> bool:
    return "build" in service


def argv(service: dict[str, Any]) -> list[str]:
    """What the service runs: entrypoint (ours: the image's) and command."""
    command = list(service.get("command", []))
    if "entrypoint" in service:
        return [*service["entrypoint"], *command]
    return [*image_entrypoint(), *command] if is_ours(service) else command


def healthcheck(service: dict[str, Any]) -> Command:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", f"{test}: exec form, no shell in the image's way"
    return resolve(test[1:])


def workers() -> dict[str, Command]:
    found = {}
    for name, service in services().items():
        if is_ours(service) and (command := resolve(argv(service))).path == [
            "cancelflow",
            "worker",
        ]:
            found[name] = command
    return found


def seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(duration[:-1]) * units[duration[-1]]


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_compose_file_matches_the_compose_spec() -> None:
    result = check_jsonschema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_schema_catches_mistakes(tmp_path: Path) -> None:
    broken = compose()
    broken["services"]["api"]["depend_on"] = broken["services"]["api"].pop("depends_on")
    broken["services"]["redis"]["healthcheck"]["retry"] = 3  # `retries`
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = check_jsonschema(path)
    assert result.returncode != 0
    assert "'depend_on'" in result.stdout and "'retry'" in result.stdout, result.stdout


def test_the_system_is_all_there() -> None:
    assert {"redis", "api", "beat", "flower", "sandbox", *workers()} == set(services())
    assert len(workers()) >= 2, "one worker service per group of provider queues"


def test_redis_persists_every_write() -> None:
    redis = services()["redis"]
    command = redis["command"]
    assert command[:1] == ["redis-server"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"]), "AOF on a volume"


def test_every_command_is_a_real_command() -> None:
    for service in services().values():
        resolve(argv(service))
        if "healthcheck" in service:
            healthcheck(service)


def test_every_long_running_service_restarts_and_is_health_checked() -> None:
    for name, service in services().items():
        assert service.get("restart") in ("unless-stopped", "always"), name
        # Beat only publishes and exits when it cannot: a restart is its health check.
        if name != "beat":
            assert "healthcheck" in service, name


def test_each_consumed_queue_has_exactly_one_worker_service() -> None:
    consumed = [q for command in workers().values() for q in command.queues]
    assert set(consumed) <= CONSUMED_QUEUES, f"unknown queues: {set(consumed) - CONSUMED_QUEUES}"
    assert sorted(consumed) == sorted(CONSUMED_QUEUES)


def test_worker_health_checks_ping_their_own_worker_and_stops_let_tasks_finish() -> None:
    for name, command in workers().items():
        service = services()[name]
        node = command.option("-n", "--hostname")
        assert node and node.endswith("@%h"), f"{name}: name the worker <group>@%h (-n)"
        check = healthcheck(service)
        assert check.path == ["cancelflow", "healthcheck", "worker"]
        assert check.params["hostname"] == node
        assert seconds(service["healthcheck"]["timeout"]) > check.params["timeout"]
        assert seconds(service["stop_grace_period"]) > LONGEST_TASK_S, name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_http_services_listen_where_they_are_checked_and_published() -> None:
    for name in ("api", "sandbox"):
        service = services()[name]
        command = resolve(argv(service))
        assert command.params["host"] == "0.0.0.0"  # noqa: S104 - the container's own network
        port = command.params["port"]
        assert service["ports"] == [f"127.0.0.1:{port}:{port}"], "published on this machine only"
        check = healthcheck(service)
        assert check.path == ["cancelflow", "healthcheck", "http"]
        assert urlsplit(check.params["url"]).port == port
    flower = services()["flower"]
    assert "--address=0.0.0.0" in flower["command"]
    assert flower["ports"] == ["127.0.0.1:5555:5555"]


def test_services_read_the_example_settings() -> None:
    for name, service in services().items():
        if is_ours(service):
            files = [entry["path"] for entry in service["env_file"]]
            assert files[0] == ENV_EXAMPLE.name, name
            assert set(service.get("environment", {})) <= setting_names() | set(OTHER_VARIABLES), (
                name
            )


def test_every_example_variable_is_a_setting() -> None:
    known = setting_names() | set(OTHER_VARIABLES)
    unknown = sorted(set(env_file(ENV_EXAMPLE)) - known)
    assert not unknown, f".env.example: not settings: {unknown}"


def test_example_points_every_provider_at_the_sandbox_service() -> None:
    example = env_file(ENV_EXAMPLE)
    providers = {k: v for k, v in example.items() if k.startswith("CANCELFLOW_PROVIDERS__")}
    assert providers == provider_env("http://sandbox:8090")
    # Compose builds the URL, with its credentials, from REDIS_PASSWORD (test_redis_auth.py).
    assert "CANCELFLOW_REDIS_URL" not in example


def test_example_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("CANCELFLOW_"):
            monkeypatch.delenv(key)
    for key, value in env_file(ENV_EXAMPLE).items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert set(settings.enabled_providers()) == set(REGISTRY)
    assert settings.api_tokens
