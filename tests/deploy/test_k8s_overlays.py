"""The RabbitMQ and Sentinel overlays, as `kubectl kustomize` renders them: valid against the
Kubernetes schemas (and KEDA's), every reference resolved, every variable a process gets a real
setting that loads the broker and job store meant; RabbitMQ's users, vhost and permissions the
ones the URLs name (password hashes checked), KEDA's triggers on real quorum queues of the
worker group they scale; Redis's and the sentinels' users and configuration exactly
deploy/redis/acl.yaml's rendering, the URLs naming every sentinel, the network policies letting
through what must be."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest
from amqp.exceptions import AccessRefused  # type: ignore[import-untyped]
from kombu.connection import Connection
from kombu.entity import Queue

from brokers.amqp import queues as amqp_queues
from cancelflow.broker_urls import parse_sentinel
from cancelflow.contract import MAINTENANCE_QUEUE
from cancelflow.settings import Settings, load_settings
from tests.deploy.support import (
    CONSUMED_QUEUES,
    K8S,
    kustomization,
    kustomize_build,
    resolve,
    setting_names,
)
from tests.deploy.test_compose_sentinel import Cluster, exercise_sentinels, stopped_after
from tests.deploy.test_k8s import argv, is_cancelflow_image, schema_errors
from tests.deploy.test_lockdown import (
    K8S_ROLES,
    REDIS_SERVER,
    free_port,
    k8s_role,
    matches,
    needs_redis_server,
)
from tests.redis_acl import (
    SENTINEL_MASTER,
    acl_file,
    data_node_users,
    replication_conf,
    sentinel_conf,
)

OVERLAYS = {
    "rabbitmq": K8S / "overlays" / "rabbitmq",
    "sentinel": K8S / "overlays" / "sentinel",
}
NAMESPACE = {"kubernetes.io/metadata.name": "cancelflow-example"}
KEDA_NS = {"kubernetes.io/metadata.name": "keda"}
KEDA_OPERATOR = {"app": "keda-operator"}
STRANGER = {"app.kubernetes.io/name": "something-else"}


@cache
def _rendered(name: str) -> list[dict[str, Any]] | None:
    return kustomize_build(OVERLAYS[name])


def rendered(name: str) -> list[dict[str, Any]]:
    docs = _rendered(name)
    if docs is None:
        # .ci/run installs kubectl where it is missing: on CI, these tests never skip.
        if os.environ.get("CI"):
            pytest.fail("kubectl is not installed: .ci/run installs it")
        pytest.skip("kubectl is not installed: the overlays are not rendered")
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def secret(docs: list[dict[str, Any]], prefix: str) -> dict[str, str]:
    """A rendered Secret's data, decoded; found by its name without kustomize's hash."""
    (found,) = [
        d
        for name, d in of_kind(docs, "Secret").items()
        if name == prefix or re.fullmatch(rf"{re.escape(prefix)}-[a-z0-9]{{10}}", name)
    ]
    return {k: base64.b64decode(v).decode() for k, v in found.get("data", {}).items()}


def cancelflow_containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each Cancelflow Deployment's container (not the sandbox's), by Deployment."""
    found = {}
    for name, d in of_kind(docs, "Deployment").items():
        (container,) = d["spec"]["template"]["spec"]["containers"]
        if is_cancelflow_image(container["image"]) and name != "cancelflow-sandbox":
            found[name] = container
    return found


def process_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The variables a container's process gets, as Kubernetes sets them: each envFrom in
    order (a later source wins), then env."""
    config_maps = of_kind(docs, "ConfigMap")
    secrets = of_kind(docs, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]]["data"])
        else:
            data = secrets[source["secretRef"]["name"]].get("data", {})
            env.update({k: base64.b64decode(v).decode() for k, v in data.items()})
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def overlay_settings(
    docs: list[dict[str, Any]], container: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> Settings:
    for key in list(os.environ):
        if key.startswith("CANCELFLOW_"):
            monkeypatch.delenv(key)
    for key, value in process_env(docs, container).items():
        monkeypatch.setenv(key, value)
    return load_settings()


# --- both overlays ------------------------------------------------------------------------


def test_every_manifest_file_is_listed_in_its_kustomization() -> None:
    for directory in [*OVERLAYS.values(), OVERLAYS["rabbitmq"] / "without-redis-scaling"]:
        k = kustomization(directory)
        listed = {e for e in k.get("resources", []) if (directory / e).is_file()}
        present = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == present, directory
        for entry in [*k.get("resources", []), *k.get("components", [])]:
            assert (directory / entry).exists(), f"{directory}: {entry}"


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_the_overlay_renders_valid_manifests_that_refer_to_what_exists(name: str) -> None:
    docs = rendered(name)
    for doc in docs:
        assert schema_errors(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"
        assert (
            doc["kind"] == "Namespace"
            or doc["metadata"].get("namespace") == (NAMESPACE["kubernetes.io/metadata.name"])
        ), f"{doc['kind']}/{doc['metadata']['name']}: in the example's namespace"
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for container in spec["containers"]:
            if is_cancelflow_image(container["image"]):
                resolve(argv(container))
            for source in container.get("envFrom", []):
                kind, key = ("ConfigMap", "configMapRef")
                if "secretRef" in source:
                    kind, key = ("Secret", "secretRef")
                assert (kind, source[key]["name"]) in names, doc["metadata"]["name"]
            for e in container.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secret(docs, ref["name"]), doc["metadata"]["name"]
        for volume in spec.get("volumes", []):
            for kind, key, field in (
                ("Secret", "secret", "secretName"),
                ("ConfigMap", "configMap", "name"),
            ):
                if key in volume:
                    ref = volume[key][field]
                    assert (kind, ref) in names, f"{doc['metadata']['name']}: no {kind} {ref}"
                    data = (
                        secret(docs, ref)
                        if kind == "Secret"
                        else of_kind(docs, "ConfigMap")[ref]["data"]
                    )
                    for item in volume[key].get("items", []):
                        assert item["key"] in data, f"{ref}: no key {item['key']}"
        if doc["kind"] == "StatefulSet":
            service = of_kind(docs, "Service")[doc["spec"]["serviceName"]]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert service["spec"]["selector"].items() <= labels.items()
    for doc in of_kind(docs, "ScaledObject").values():
        assert ("Deployment", doc["spec"]["scaleTargetRef"]["name"]) in names
    for doc in of_kind(docs, "TriggerAuthentication").values():
        for ref in doc["spec"]["secretTargetRef"]:
            assert ref["key"] in secret(docs, ref["name"]), ref


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_every_variable_the_processes_get_is_a_setting_and_they_load(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered(name)
    containers = cancelflow_containers(docs)
    assert {k8s_role(c) for c in containers.values()} == set(K8S_ROLES.values())
    for deployment, container in containers.items():
        env = process_env(docs, container)
        unknown = sorted(k for k in env if k not in setting_names())
        assert not unknown, f"{deployment}: not settings: {unknown}"
        settings = overlay_settings(docs, container, monkeypatch)
        if name == "rabbitmq":
            assert settings.broker_kind() == "amqp", deployment
            assert settings.broker_management_url, deployment
        else:
            assert settings.broker_url is None, deployment
            assert parse_sentinel(settings.redis_url).master == SENTINEL_MASTER, deployment


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_every_pod_runs_locked_down(name: str) -> None:
    """The restricted Pod Security Standard the example's namespace enforces, for the pods the
    overlay adds too: non-root, no privilege escalation, no capability, RuntimeDefault
    seccomp, a read-only root, no service account token."""
    docs = rendered(name)
    for workload in [*of_kind(docs, "Deployment").values(), *of_kind(docs, "StatefulSet").values()]:
        where = workload["metadata"]["name"]
        spec = workload["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "resources" in container, where


# --- RabbitMQ -----------------------------------------------------------------------------


def rabbitmq_password_matches(password_hash: str, password: str) -> bool:
    """rabbit_password_hashing_sha256: base64 of a 4-byte salt and SHA-256(salt + password)."""
    raw = base64.b64decode(password_hash)
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


def definitions() -> dict[str, Any]:
    found: dict[str, Any] = json.loads(
        secret(rendered("rabbitmq"), "cancelflow-rabbitmq-definitions")["definitions.json"]
    )
    return found


def login(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    assert parts.username and parts.password, url
    return unquote(parts.username), unquote(parts.password)


def test_rabbitmq_has_the_users_the_urls_name_and_keda_reads_statistics_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = rendered("rabbitmq")
    defs = definitions()
    users = {u["name"]: u for u in defs["users"]}
    permissions = {(p["user"], p["vhost"]): p for p in defs["permissions"]}
    assert "guest" not in users, "no user with a known password"
    container = next(iter(cancelflow_containers(docs).values()))
    settings = overlay_settings(docs, container, monkeypatch)
    user, password = login(settings.broker())
    assert login(settings.broker_management_url or "") == (user, password)
    vhost = unquote(urlsplit(settings.broker()).path.lstrip("/"))
    assert [v["name"] for v in defs["vhosts"]] == [vhost]
    for name, pw in [(user, password), login(secret(docs, "cancelflow-keda-rabbitmq")["host"])]:
        assert users[name]["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert rabbitmq_password_matches(users[name]["password_hash"], pw), name
        # The management API on queues of the vhosts it has permissions on; not an admin.
        assert users[name]["tags"] == ["management"], name
    assert {k[0] for k in permissions} == {user, "keda"}
    assert {k[1] for k in permissions} == {vhost}, "no user on another vhost"
    assert all(permissions[(user, vhost)][p] == ".*" for p in ("configure", "write", "read"))
    # KEDA declares, publishes and consumes nothing.
    assert all(permissions[("keda", vhost)][p] == "^$" for p in ("configure", "write", "read"))
    keda_host = urlsplit(secret(docs, "cancelflow-keda-rabbitmq")["host"])
    assert keda_host.path == f"/{vhost}" and keda_host.port == 15672
    assert keda_host.hostname == "cancelflow-rabbitmq.cancelflow-example.svc"
    assert urlsplit(settings.broker()).hostname == "cancelflow-rabbitmq"


def test_rabbitmq_loads_the_definitions_and_has_the_management_plugin() -> None:
    docs = rendered("rabbitmq")
    sts = of_kind(docs, "StatefulSet")["cancelflow-rabbitmq"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert re.search(r":3\.(1[0-9])-management", container["image"]), container["image"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    # The whole conf.d: the image's 10-defaults.conf (guest from anywhere) is not read.
    conf_map = volumes[mounts["/etc/rabbitmq/conf.d"]]["configMap"]["name"]
    (conf,) = of_kind(docs, "ConfigMap")[conf_map]["data"].values()
    settings = dict(line.split(" = ", 1) for line in conf.splitlines() if line)
    assert settings["loopback_users.guest"] == "true"
    definitions_path = Path(settings["load_definitions"])
    definitions_volume = volumes[mounts[str(definitions_path.parent)]]["secret"]
    assert {"key": "definitions.json", "path": definitions_path.name} in definitions_volume["items"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"amqp": 5672, "management": 15672}
    assert "/var/lib/rabbitmq" in mounts, "its data on the volume claim"


def test_keda_scales_each_worker_group_on_its_own_quorum_queues_on_rabbitmq(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = rendered("rabbitmq")
    containers = cancelflow_containers(docs)
    settings = overlay_settings(docs, next(iter(containers.values())), monkeypatch)
    declared = {q.name: q for q in amqp_queues(settings)}
    scaled = {
        d["spec"]["scaleTargetRef"]["name"]: d for d in of_kind(docs, "ScaledObject").values()
    }
    workers = {
        name: resolve(argv(c))
        for name, c in containers.items()
        if resolve(argv(c)).path == ["cancelflow", "worker"]
    }
    assert set(scaled) == set(workers), "one ScaledObject per worker group"
    vhost = urlsplit(settings.broker()).path.lstrip("/")
    for name, command in workers.items():
        triggers = scaled[name]["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"rabbitmq"}, f"{name}: no redis trigger left"
        queues = [t["metadata"]["queueName"] for t in triggers]
        assert sorted(queues) == sorted(q for q in command.queues if q != MAINTENANCE_QUEUE)
        for queue in queues:
            assert queue in CONSUMED_QUEUES, queue
            arguments = declared[queue].queue_arguments  # type: ignore[attr-defined]
            assert arguments["x-queue-type"] == "quorum", queue
        for trigger in triggers:
            # The vhost is the host's path (no vhostName to disagree with it).
            assert "vhostName" not in trigger["metadata"] or trigger["metadata"][
                "vhostName"
            ] == unquote(vhost)
    assert "cancelflow-keda-redis" not in of_kind(docs, "Secret")
    assert not [t for t in of_kind(docs, "TriggerAuthentication") if "redis" in t]


# --- Sentinel -----------------------------------------------------------------------------


def test_the_sentinel_overlays_users_and_configuration_are_the_acl_sources() -> None:
    docs = rendered("sentinel")
    acl = secret(docs, "cancelflow-redis-acl")
    passwords = {}
    for line in acl["users.acl"].splitlines():
        words = line.split()
        if len(words) > 3 and words[3].startswith(">"):
            passwords[words[1]] = words[3][1:]
    assert set(passwords) == {*K8S_ROLES.values(), "keda", "replica", "sentinel"}
    expected = acl_file(passwords)
    assert acl["users.acl"] == expected, (
        "deploy/k8s/overlays/sentinel/kustomization.yaml's users.acl must read:\n"
        + json.dumps(expected)
    )
    assert acl["replication.conf"] == replication_conf(passwords["replica"])
    redis_sts = of_kind(docs, "StatefulSet")["cancelflow-redis"]
    first_node = f"cancelflow-redis-0.{redis_sts['spec']['serviceName']}"
    expected_conf = sentinel_conf(
        master_host=first_node, passwords={"sentinel": passwords["sentinel"]}
    )
    found_conf = secret(docs, "cancelflow-redis-sentinel")["sentinel.conf"]
    assert found_conf == expected_conf, (
        "deploy/k8s/overlays/sentinel/kustomization.yaml's sentinel.conf must read:\n"
        + json.dumps(expected_conf)
    )
    for role in K8S_ROLES.values():
        url = secret(docs, f"cancelflow-redis-{role}")["CANCELFLOW_REDIS_URL"]
        target = parse_sentinel(url)
        assert (target.username, target.password) == (role, passwords[role]), role
    assert set(data_node_users()) == set(passwords) | {"flower", "billing-consumer"}


def test_redis_has_a_replica_and_three_sentinels_every_url_names() -> None:
    docs = rendered("sentinel")
    statefulsets = of_kind(docs, "StatefulSet")
    nodes, sentinels = statefulsets["cancelflow-redis"], statefulsets["cancelflow-redis-sentinel"]
    assert nodes["spec"]["replicas"] >= 2 and sentinels["spec"]["replicas"] == 3
    services = of_kind(docs, "Service")
    for sts in (nodes, sentinels):
        headless = services[sts["spec"]["serviceName"]]["spec"]
        assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    (node,) = nodes["spec"]["template"]["spec"]["containers"]
    script = node["command"][2]
    service = nodes["spec"]["serviceName"]
    assert f"--replicaof cancelflow-redis-0.{service} 6379" in script
    assert f'me="$(hostname).{service}"' in script and '--replica-announce-ip "$me"' in script
    assert node["args"][0] == "redis-server" and "--aclfile" in node["args"]
    expected = tuple(
        (f"cancelflow-redis-sentinel-{n}.{sentinels['spec']['serviceName']}", 26379)
        for n in range(3)
    )
    for role in K8S_ROLES.values():
        url = secret(docs, f"cancelflow-redis-{role}")["CANCELFLOW_REDIS_URL"]
        assert parse_sentinel(url).sentinels == expected, role
    (sentinel,) = sentinels["spec"]["template"]["spec"]["containers"]
    assert (
        f"sentinel announce-ip $(hostname).{sentinels['spec']['serviceName']}"
        in sentinel["command"][2]
    )
    budgets = {
        json.dumps(p["spec"]["selector"]["matchLabels"]): p["spec"]
        for p in of_kind(docs, "PodDisruptionBudget").values()
    }
    for sts in (nodes, sentinels):
        labels = json.dumps(sts["spec"]["selector"]["matchLabels"])
        assert budgets[labels] == {"maxUnavailable": 1, "selector": sts["spec"]["selector"]}


# --- network policies -----------------------------------------------------------------------


def allowed(
    docs: list[dict[str, Any]], target: str, port: str, ns: dict[str, str], pod: dict[str, str]
) -> bool:
    """Whether a pod with these labels, in a namespace with these, may reach the named port
    of the target workload's pods (NetworkPolicy ingress semantics: additive)."""
    workloads = {**of_kind(docs, "Deployment"), **of_kind(docs, "StatefulSet")}
    labels = workloads[target]["spec"]["template"]["metadata"]["labels"]
    policies = [
        p
        for p in of_kind(docs, "NetworkPolicy").values()
        if "Ingress" in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"], labels)
    ]
    assert policies, f"{target}: not isolated"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
                continue
            for peer in rule.get("from", []):
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                in_ns = matches(ns_sel, ns) if ns_sel is not None else ns == NAMESPACE
                if in_ns and (pod_sel is None or matches(pod_sel, pod)):
                    return True
    return False


def pod_labels(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    workloads = {**of_kind(docs, "Deployment"), **of_kind(docs, "StatefulSet")}
    return dict(workloads[name]["spec"]["template"]["metadata"]["labels"])


def test_rabbitmq_is_reached_by_cancelflow_and_its_management_api_by_keda_only() -> None:
    docs = rendered("rabbitmq")
    for name in cancelflow_containers(docs):
        assert allowed(docs, "cancelflow-rabbitmq", "amqp", NAMESPACE, pod_labels(docs, name))
    api = pod_labels(docs, "cancelflow-api")
    assert allowed(docs, "cancelflow-rabbitmq", "management", NAMESPACE, api)
    assert allowed(docs, "cancelflow-rabbitmq", "management", KEDA_NS, KEDA_OPERATOR)
    sandbox = pod_labels(docs, "cancelflow-sandbox")
    for port in ("amqp", "management"):
        assert not allowed(docs, "cancelflow-rabbitmq", port, NAMESPACE, STRANGER), port
        assert not allowed(docs, "cancelflow-rabbitmq", port, NAMESPACE, sandbox), port
    assert not allowed(docs, "cancelflow-rabbitmq", "amqp", KEDA_NS, KEDA_OPERATOR)
    # KEDA no longer reads Redis.
    assert not allowed(docs, "cancelflow-redis", "redis", KEDA_NS, KEDA_OPERATOR)


def test_the_sentinels_and_redis_are_reached_by_whom_they_must_be() -> None:
    docs = rendered("sentinel")
    sentinel = pod_labels(docs, "cancelflow-redis-sentinel")
    node = pod_labels(docs, "cancelflow-redis")
    for name in cancelflow_containers(docs):
        labels = pod_labels(docs, name)
        assert allowed(docs, "cancelflow-redis-sentinel", "sentinel", NAMESPACE, labels), name
        assert allowed(docs, "cancelflow-redis", "redis", NAMESPACE, labels), name
    assert allowed(docs, "cancelflow-redis-sentinel", "sentinel", NAMESPACE, sentinel)
    assert allowed(docs, "cancelflow-redis", "redis", NAMESPACE, sentinel), "sentinels watch"
    assert allowed(docs, "cancelflow-redis", "redis", NAMESPACE, node), "replication"
    sandbox = pod_labels(docs, "cancelflow-sandbox")
    for target, port in (("cancelflow-redis-sentinel", "sentinel"), ("cancelflow-redis", "redis")):
        assert not allowed(docs, target, port, NAMESPACE, STRANGER), target
        assert not allowed(docs, target, port, NAMESPACE, sandbox), target


# --- RabbitMQ for real ----------------------------------------------------------------------

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
needs_rabbitmq_server = pytest.mark.skipif(
    not RABBITMQ_SERVER.exists(), reason="no rabbitmq-server here"
)


@dataclass
class Rabbit:
    amqp_port: int
    http_port: int

    def api(self, path: str, user: str, password: str) -> tuple[int, Any]:
        """GET on the management API as this user: the status and the decoded body."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/api/{path}")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, None


@contextmanager
def overlay_rabbitmq(home: Path) -> Iterator[Rabbit]:
    """rabbitmq-server with the overlay's conf.d file and definitions."""
    docs = rendered("rabbitmq")
    conf_text = next(
        d["data"]["cancelflow.conf"]
        for name, d in of_kind(docs, "ConfigMap").items()
        if name.startswith("cancelflow-rabbitmq-config")
    )
    definitions = secret(docs, "cancelflow-rabbitmq-definitions")["definitions.json"]
    with rabbitmq_with(
        home, conf=conf_text, definitions=definitions, login=login(broker_url(docs))
    ) as rabbit:
        yield rabbit


@contextmanager
def rabbitmq_with(
    home: Path, *, conf: str, definitions: str, login: tuple[str, str]
) -> Iterator[Rabbit]:
    """rabbitmq-server with this configuration (only where it listens, where it finds the
    definitions, its files and the disk alarm changed) and these definitions, the management
    plugin on, ports of its own; ready once ``login`` gets into the management API."""
    (home / "definitions.json").write_text(definitions)
    amqp, http, dist, epmd = (free_port() for _ in range(4))
    conf = re.sub(
        r"(?m)^load_definitions = .*$", f"load_definitions = {home}/definitions.json", conf
    )
    assert f"load_definitions = {home}/definitions.json" in conf
    (home / "rabbitmq.conf").write_text(
        conf
        + f"listeners.tcp.default = 127.0.0.1:{amqp}\n"
        + f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {http}\n"
        + "disk_free_limit.absolute = 50MB\n"
    )
    (home / "enabled_plugins").write_text("[rabbitmq_management].\n")
    (home / "rabbitmq-env.conf").write_text("")
    env = {
        **os.environ,
        "HOME": str(home),
        "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
        "RABBITMQ_LOG_BASE": str(home / "log"),
        "RABBITMQ_PID_FILE": str(home / "rabbitmq.pid"),
        "RABBITMQ_NODENAME": f"cancelflow-deploy-{amqp}@localhost",
        "RABBITMQ_DIST_PORT": str(dist),
        "ERL_EPMD_PORT": str(epmd),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
    log = (home / "server.log").open("ab")
    proc = subprocess.Popen(
        [str(RABBITMQ_SERVER)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    rabbit = Rabbit(amqp, http)
    user, password = login
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                if rabbit.api("whoami", user, password)[0] == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, (
                home / "server.log"
            ).read_text(errors="replace")[-2000:]
            time.sleep(0.5)
        yield rabbit
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        # Its epmd daemonised itself out of the process group: stop it by its own port.
        epmd_bin = shutil.which("epmd") or next(
            Path("/usr/lib/erlang").glob("erts-*/bin/epmd"), None
        )
        if epmd_bin is not None:
            subprocess.run(
                [str(epmd_bin), "-port", str(epmd), "-kill"],
                env=env,
                capture_output=True,
                check=False,
                timeout=10,
            )
        log.close()


def broker_url(docs: list[dict[str, Any]]) -> str:
    """The broker URL every Cancelflow process gets (the same for all: checked above)."""
    container = next(iter(cancelflow_containers(docs).values()))
    return process_env(docs, container)["CANCELFLOW_BROKER_URL"]


@needs_rabbitmq_server
def test_the_overlays_rabbitmq_lets_in_its_users_only_and_keda_reads_queue_lengths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered("rabbitmq")
    user, password = login(broker_url(docs))
    keda_user, keda_password = login(secret(docs, "cancelflow-keda-rabbitmq")["host"])
    container = next(iter(cancelflow_containers(docs).values()))
    settings = overlay_settings(docs, container, monkeypatch)
    vhost = unquote(urlsplit(settings.broker()).path.lstrip("/"))
    with overlay_rabbitmq(tmp_path) as rabbit:
        # No guest, though this is loopback; no user but the definitions'.
        assert rabbit.api("whoami", "guest", "guest")[0] == 401
        # Logged in, but no administrator (RabbitMQ says 401 for a missing tag too).
        assert rabbit.api("whoami", user, password)[0] == 200
        assert rabbit.api("users", user, password)[0] == 401, "Cancelflow's: no administrator"
        # Cancelflow declares its queues as it does (quorum) and sends to one.
        local = urlsplit(settings.broker())._replace(
            netloc=f"{quote(user)}:{quote(password)}@127.0.0.1:{rabbit.amqp_port}"
        )
        queue = next(q for q in amqp_queues(settings) if q.name == "cancellations.payway")
        with Connection(local.geturl(), connect_timeout=10) as connection:
            bound = queue(connection.default_channel)
            bound.declare()
            connection.Producer().publish(b"x", exchange="", routing_key=queue.name)
        # KEDA reads the queue's statistics through the management API, on the vhost the
        # host names...
        path = f"queues/{quote(vhost, safe='')}/{quote(queue.name, safe='')}"
        status, found = rabbit.api(path, keda_user, keda_password)
        assert status == 200 and found["type"] == "quorum", (status, found)
        # (and so does the API, for its metrics' queue depths, as Cancelflow's user)
        assert rabbit.api(path, user, password)[0] == 200
        assert rabbit.api("users", keda_user, keda_password)[0] == 401
        # ... and may not declare, send or take anything.
        keda_url = local._replace(
            netloc=f"{quote(keda_user)}:{quote(keda_password)}@127.0.0.1:{rabbit.amqp_port}"
        )
        with (
            Connection(keda_url.geturl(), connect_timeout=10) as connection,
            pytest.raises(AccessRefused),
        ):
            Queue("keda-made-this", channel=connection.channel()).declare()
        with (
            Connection(keda_url.geturl(), connect_timeout=10) as connection,
            pytest.raises(AccessRefused),
        ):
            connection.default_channel.basic_get(queue.name)


# --- Sentinel for real ----------------------------------------------------------------------

ADMIN = "user admin on >admin-pw ~* &* +@all"


def run_script(tmp: Path, argv: list[str], hostname: str) -> list[str]:
    """Run a pod's start script as its container would, as if on a pod of that name, up to
    its `exec redis-server`: the arguments it would start Redis with."""
    shims = tmp / "shims"
    shims.mkdir(exist_ok=True)
    (shims / "hostname").write_text('#!/bin/sh\necho "$FAKE_HOSTNAME"\n')
    (shims / "redis-server").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    recorded = tmp / f"{hostname}.args"
    env = {
        **os.environ,
        "PATH": f"{shims}:{os.environ['PATH']}",
        "FAKE_HOSTNAME": hostname,
        "ARGS_FILE": str(recorded),
    }
    subprocess.run(argv, env=env, check=True, timeout=30)
    return recorded.read_text().splitlines()


@needs_redis_server
def test_the_sentinel_overlays_redis_and_sentinels_run_and_fail_over(tmp_path: Path) -> None:
    docs = rendered("sentinel")
    statefulsets = of_kind(docs, "StatefulSet")
    nodes, sentinels = statefulsets["cancelflow-redis"], statefulsets["cancelflow-redis-sentinel"]
    node_service, sentinel_service = nodes["spec"]["serviceName"], sentinels["spec"]["serviceName"]
    (node,) = nodes["spec"]["template"]["spec"]["containers"]
    (sentinel,) = sentinels["spec"]["template"]["spec"]["containers"]
    # The Secrets' files where the pods mount them, here in directories of the test's.
    acl = tmp_path / "acl"
    acl.mkdir()
    acl_secret = secret(docs, "cancelflow-redis-acl")
    (acl / "users.acl").write_text(acl_secret["users.acl"] + ADMIN + "\n")
    (acl / "replication.conf").write_text(acl_secret["replication.conf"])
    sentinel_secret = tmp_path / "sentinel-secret"
    sentinel_secret.mkdir()
    shipped_conf = secret(docs, "cancelflow-redis-sentinel")["sentinel.conf"]
    (sentinel_secret / "sentinel.conf").write_text(shipped_conf)
    pods = [f"cancelflow-redis-{n}" for n in range(nodes["spec"]["replicas"])]
    sentinel_pods = tuple(f"cancelflow-redis-sentinel-{n}" for n in range(3))
    cluster = Cluster(tmp_path, passwords={})
    for name in (*pods, *sentinel_pods):
        cluster.ports[name] = free_port()
    first = f"{pods[0]}.{node_service}"

    def node_argv(pod: str) -> list[str]:
        script = node["command"][2].replace("/etc/redis/acl/", f"{acl}/")
        args = [a.replace("/etc/redis/acl/", f"{acl}/") for a in node["args"]]
        found = run_script(tmp_path, [*node["command"][:2], script, *args], pod)
        assert found[0] == f"{acl}/replication.conf", found
        announce = found.index("--replica-announce-ip")
        assert found[announce + 1] == f"{pod}.{node_service}"
        found[announce + 1] = "127.0.0.1"
        if pod == pods[0]:
            assert "--replicaof" not in found, "pod 0 starts as the master"
        else:
            at = found.index("--replicaof")
            assert found[at + 1 : at + 3] == [first, "6379"], found
            found[at + 1 : at + 3] = ["127.0.0.1", str(cluster.ports[pods[0]])]
        data = tmp_path / pod
        data.mkdir(exist_ok=True)
        where = ["--port", str(cluster.ports[pod]), "--bind", "127.0.0.1", "--dir", str(data)]
        assert REDIS_SERVER is not None
        return [REDIS_SERVER, *found, *where, "--save", ""]

    def sentinel_argv(pod: str) -> list[str]:
        data = tmp_path / pod
        data.mkdir()
        script = (
            sentinel["command"][2]
            .replace("/data/", f"{data}/")
            .replace("/etc/redis/sentinel/", f"{sentinel_secret}/")
        )
        found = run_script(tmp_path, [*sentinel["command"][:2], script], pod)
        conf = data / "sentinel.conf"
        assert found == [str(conf), "--sentinel"], found
        written = conf.read_text()
        assert written == shipped_conf + f"sentinel announce-ip {pod}.{sentinel_service}\n"
        # This machine's names and ports. The shipped down-after (5 s) is kept: with 1 s, the
        # sentinels of a loaded machine took the just-promoted master for down as well and
        # failed over again, to the restarted old master, empty (seen in CI).
        lines = []
        for line in written.splitlines():
            if line == "port 26379":
                line = f"port {cluster.ports[pod]}\nbind 127.0.0.1"
            elif line.startswith("sentinel announce-ip "):
                line = "sentinel announce-ip 127.0.0.1"
            elif line.startswith("sentinel monitor "):
                line = line.replace(f" {first} 6379 ", f" 127.0.0.1 {cluster.ports[pods[0]]} ")
            lines.append(line)
        conf.write_text("\n".join([*lines, ADMIN]) + "\n")
        assert REDIS_SERVER is not None
        return [REDIS_SERVER, str(conf), "--sentinel"]

    url = secret(docs, "cancelflow-redis-worker")["CANCELFLOW_REDIS_URL"]
    for pod in sentinel_pods:
        url = url.replace(f"{pod}.{sentinel_service}:26379", f"127.0.0.1:{cluster.ports[pod]}")
    with stopped_after(cluster):
        for pod in pods:
            cluster.start(pod, node_argv(pod))
        for pod in sentinel_pods:
            cluster.start(pod, sentinel_argv(pod))
        exercise_sentinels(
            cluster,
            master=pods[0],
            replica=pods[1],
            sentinels=sentinel_pods,
            worker_url=url,
            # Its pod restarted: the same script, so a master, until the sentinels say not.
            restart_master=lambda: cluster.start(pods[0], node_argv(pods[0])),
        )
