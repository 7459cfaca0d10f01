"""deploy/compose/rabbitmq.yml: valid Compose, and every Cancelflow service on RabbitMQ."""

from __future__ import annotations

import re
from typing import Any

from cancelflow.settings import Settings
from tests.deploy.support import DEPLOY, yaml_documents
from tests.deploy.test_compose import check_jsonschema, is_ours, services

RABBITMQ = DEPLOY / "compose" / "rabbitmq.yml"


def overrides() -> dict[str, Any]:
    return yaml_documents(RABBITMQ)[0]


def interpolated(value: str) -> str:
    """``value`` as Compose gives it, a secret variable replaced by a stand-in."""
    return re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "s3cret", value)


def test_the_rabbitmq_override_matches_the_compose_spec() -> None:
    result = check_jsonschema(RABBITMQ)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_cancelflow_service_uses_rabbitmq_once_it_is_healthy() -> None:
    ours = {name for name, service in services().items() if is_ours(service)} - {"sandbox"}
    found = overrides()["services"]
    assert ours <= set(found), f"not on RabbitMQ: {ours - set(found)}"
    for name in ours:
        env = found[name]["environment"]
        settings = Settings(
            broker_url=interpolated(env["CANCELFLOW_BROKER_URL"]),
            broker_management_url=interpolated(env["CANCELFLOW_BROKER_MANAGEMENT_URL"]),
        )
        assert settings.broker_kind() == "amqp", name
        assert found[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name


def test_rabbitmq_has_quorum_queues_and_the_management_plugin() -> None:
    rabbitmq = overrides()["services"]["rabbitmq"]
    image = rabbitmq["image"]
    version = tuple(int(n) for n in re.findall(r":(\d+)\.(\d+)", image)[0])
    assert version >= (3, 10), image  # quorum queues with at-least-once dead-lettering
    assert "management" in image, image
    # The vhost the broker URL names is the one RabbitMQ makes.
    url = overrides()["services"]["api"]["environment"]["CANCELFLOW_BROKER_URL"]
    assert url.endswith("/" + rabbitmq["environment"]["RABBITMQ_DEFAULT_VHOST"])
    assert "rabbitmq-data" in overrides()["volumes"]
