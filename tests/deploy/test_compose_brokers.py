"""deploy/compose/rabbitmq.yml: valid Compose, and every Cancelflow service on RabbitMQ."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from amqp.exceptions import AccessRefused, NotAllowed  # type: ignore[import-untyped]
from kombu.connection import Connection

from brokers.amqp import queues as amqp_queues
from cancelflow.settings import Settings
from tests.deploy.support import DEPLOY, yaml_documents
from tests.deploy.test_compose import check_jsonschema, is_ours, services
from tests.deploy.test_k8s_overlays import login, needs_rabbitmq_server, rabbitmq_with

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
    assert "rabbitmq-data" in overrides()["volumes"]
    assert "environment" not in rabbitmq, "no default user: the definitions' only"


def definitions(password: str) -> dict[str, Any]:
    """The definitions RabbitMQ loads, as Compose writes them with this password."""
    content = overrides()["configs"]["rabbitmq-definitions"]["content"]
    loaded: dict[str, Any] = json.loads(content.replace(_PASSWORD, password))
    return loaded


_PASSWORD = "${RABBITMQ_PASSWORD:?set RABBITMQ_PASSWORD in .env}"


def test_rabbitmq_loads_one_user_with_the_urls_credentials_and_the_vhost_only() -> None:
    rabbitmq = overrides()["services"]["rabbitmq"]
    targets = {c["source"]: c["target"] for c in rabbitmq["configs"]}
    conf = overrides()["configs"]["rabbitmq-conf"]["content"]
    settings = dict(line.split(" = ", 1) for line in conf.splitlines() if line)
    assert settings["load_definitions"] == targets["rabbitmq-definitions"]
    assert settings["loopback_users.guest"] == "true"
    # After the image's conf.d/10-defaults.conf, which lets guest in from anywhere.
    assert targets["rabbitmq-conf"].startswith("/etc/rabbitmq/conf.d/2")
    defs = definitions("s3cret")
    (user,) = defs["users"]
    (vhost,) = defs["vhosts"]
    (permission,) = defs["permissions"]
    for name in ("api", "worker-payway-azotte", "beat", "flower"):
        env = overrides()["services"][name]["environment"]
        for key in ("CANCELFLOW_BROKER_URL", "CANCELFLOW_BROKER_MANAGEMENT_URL"):
            parts = urlsplit(interpolated(env[key]))
            assert (parts.username, parts.password) == (user["name"], user["password"]), key
        assert urlsplit(interpolated(env["CANCELFLOW_BROKER_URL"])).path == "/" + vhost["name"]
    assert user["tags"] == ["management"], "no administrator"
    assert permission == {
        "user": user["name"],
        "vhost": vhost["name"],
        "configure": ".*",
        "write": ".*",
        "read": ".*",
    }


@needs_rabbitmq_server
def test_the_compose_rabbitmq_runs_with_its_user_only(tmp_path: Path) -> None:
    conf = overrides()["configs"]["rabbitmq-conf"]["content"]
    url = interpolated(overrides()["services"]["api"]["environment"]["CANCELFLOW_BROKER_URL"])
    user, password = login(url)
    with rabbitmq_with(
        tmp_path, conf=conf, definitions=json.dumps(definitions(password)), login=(user, password)
    ) as rabbit:
        assert rabbit.api("whoami", "guest", "guest")[0] == 401, "no guest"
        assert rabbit.api("users", user, password)[0] == 401, "no administrator"
        settings = Settings(broker_url=url)
        local = urlsplit(url)._replace(netloc=f"{user}:{password}@127.0.0.1:{rabbit.amqp_port}")
        queue = next(q for q in amqp_queues(settings) if q.name == "callbacks")
        with Connection(local.geturl(), connect_timeout=10) as connection:
            queue(connection.default_channel).declare()
        vhost = local.path.lstrip("/")
        status, found = rabbit.api(f"queues/{vhost}/callbacks", user, password)
        assert status == 200 and found["type"] == "quorum", (status, found)
        # No other vhost (not even the default one, which is not made).
        other = local._replace(path="/")
        with pytest.raises((AccessRefused, NotAllowed)):
            Connection(other.geturl(), connect_timeout=10).connect()
