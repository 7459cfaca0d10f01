"""A deployment locked down by default: Redis takes no connection without a password, in
Compose and in Kubernetes (checked against a real redis-server started with the shipped
arguments), every service's Redis URL carries credentials, network policies let only
Cancelflow reach Redis and only Prometheus reach the workers' metrics."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from cancelflow.settings import WorkerSettings
from tests.deploy.support import ENV_EXAMPLE, compose, env_file, generator_literals
from tests.deploy.test_k8s import EXAMPLE, docs_of, is_cancelflow_image, pod_specs

PASSWORD_VAR = re.compile(r"\$\{REDIS_PASSWORD:\?[^}]+\}")
REDIS_SERVER = shutil.which("redis-server")
needs_redis_server = pytest.mark.skipif(REDIS_SERVER is None, reason="no redis-server here")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(args: list[str], tmp_path: Path) -> Iterator[int]:
    """redis-server with a deployment's arguments, on a free loopback port of its own."""
    assert REDIS_SERVER is not None and args[0] == "redis-server"
    port = free_port()
    # Later options win: only where it listens and writes changes.
    extra = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", ""]
    proc = subprocess.Popen(
        [REDIS_SERVER, *args[1:], *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def assert_no_access_without_password(port: int) -> None:
    anonymous = redis.Redis(port=port)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):
        anonymous.set("x", "1")


def on_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    assert parts.username and parts.password, f"{url}: no credentials"
    return parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{port}").geturl()


# --- Compose ------------------------------------------------------------------------------


def test_every_compose_service_logs_in_to_redis_with_the_required_password() -> None:
    services = compose()["services"]
    ours = {name: s for name, s in services.items() if "build" in s}
    assert "CANCELFLOW_REDIS_URL" not in env_file(ENV_EXAMPLE), "no URL without credentials"
    for name, service in ours.items():
        url = service["environment"]["CANCELFLOW_REDIS_URL"]
        # `:?`: Compose refuses to start while REDIS_PASSWORD is unset or empty.
        assert len(PASSWORD_VAR.findall(url)) == 1, f"{name}: {url}"
        parts = urlsplit(PASSWORD_VAR.sub("pw", url))
        assert parts.hostname == "redis" and parts.username == "cancelflow", name
        assert parts.password == "pw", f"{name}: {url}"
    redis_service = services["redis"]
    assert PASSWORD_VAR.fullmatch(redis_service["environment"]["REDISCLI_AUTH"])
    assert any(PASSWORD_VAR.search(arg) for arg in redis_service["command"])


def compose_redis_args(password: str) -> list[str]:
    return [PASSWORD_VAR.sub(password, arg) for arg in compose()["services"]["redis"]["command"]]


@needs_redis_server
def test_compose_redis_refuses_anonymous_clients_and_takes_the_services_url(
    tmp_path: Path,
) -> None:
    password = "compose-test-password"
    for port in start_redis(compose_redis_args(password), tmp_path):
        assert_no_access_without_password(port)
        url = PASSWORD_VAR.sub(
            password, compose()["services"]["api"]["environment"]["CANCELFLOW_REDIS_URL"]
        )
        client = redis.Redis.from_url(on_port(url, port))
        assert client.ping() and client.set("x", "1")
        # The health check is healthy on an authenticated PONG only (redis-cli exits 0 on
        # a NOAUTH error, so the plain `redis-cli ping` never failed).
        test = compose()["services"]["redis"]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "sh", "-c"]
        script = test[3].replace("redis-cli", f"redis-cli -p {port}")
        ok = subprocess.run(["sh", "-c", script], env={"REDISCLI_AUTH": password}, check=False)
        assert ok.returncode == 0
        bad = subprocess.run(["sh", "-c", script], env={"REDISCLI_AUTH": "wrong"}, check=False)
        assert bad.returncode != 0


# --- Kubernetes -----------------------------------------------------------------------------


def redis_statefulset() -> dict[str, Any]:
    (sts,) = [d for d in docs_of("StatefulSet") if d["metadata"]["name"] == "cancelflow-redis"]
    return sts


def acl_secret() -> dict[str, str]:
    literals = generator_literals(EXAMPLE, "Secret", "cancelflow-redis-acl")
    # YAML's "\n" in a kustomize literal: the file's lines.
    return {k: v.replace("\\n", "\n") for k, v in literals.items()}


def test_every_cancelflow_pod_takes_its_redis_url_from_a_secret() -> None:
    secret_names = {"cancelflow-secrets"}
    for name, spec in pod_specs():
        for container in spec["containers"]:
            # The sandboxes play the providers and never touch Redis.
            if not is_cancelflow_image(container["image"]) or name == "cancelflow-sandbox":
                continue
            env_names = {e["name"] for e in container.get("env", [])}
            assert "CANCELFLOW_REDIS_URL" not in env_names, f"{name}: the URL belongs in a Secret"
            refs = {s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s}
            assert refs & secret_names, f"{name}: no Secret with CANCELFLOW_REDIS_URL"
    url = generator_literals(EXAMPLE, "Secret", "cancelflow-secrets")["CANCELFLOW_REDIS_URL"]
    parts = urlsplit(url)
    assert parts.username == "cancelflow" and parts.password == acl_secret()["password"]


def test_kubernetes_redis_reads_its_users_from_the_secret() -> None:
    sts = redis_statefulset()
    spec = sts["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    acl_path = Path(args[args.index("--aclfile") + 1])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(acl_path.parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "cancelflow-redis-acl"
    assert {"key": "users.acl", "path": acl_path.name} in volume["secret"]["items"]
    assert not any("requirepass" in a or a.startswith(">") for a in args), "no password in args"
    keda = generator_literals(EXAMPLE, "Secret", "cancelflow-keda-redis")
    users = acl_secret()["users.acl"]
    assert "user default off" in users.splitlines()
    assert f"user keda on >{keda['password']} " in users and keda["username"] == "keda"


@needs_redis_server
def test_kubernetes_redis_refuses_anonymous_clients_and_limits_keda(tmp_path: Path) -> None:
    (container,) = redis_statefulset()["spec"]["template"]["spec"]["containers"]
    args = list(container["args"])
    acl = tmp_path / "users.acl"
    acl.write_text(acl_secret()["users.acl"])
    args[args.index("--aclfile") + 1] = str(acl)
    for port in start_redis(args, tmp_path):
        assert_no_access_without_password(port)
        url = generator_literals(EXAMPLE, "Secret", "cancelflow-secrets")["CANCELFLOW_REDIS_URL"]
        client = redis.Redis.from_url(on_port(url, port))
        assert client.ping() and client.set("x", "1") and client.rpush("callbacks", "m")
        keda = generator_literals(EXAMPLE, "Secret", "cancelflow-keda-redis")
        scaler = redis.Redis(port=port, username=keda["username"], password=keda["password"])
        for scaled in docs_of("ScaledObject"):
            for trigger in scaled["spec"]["triggers"]:
                # Allowed to read the length (a refused command raises NoPermissionError).
                assert isinstance(scaler.llen(trigger["metadata"]["listName"]), int)
        assert scaler.llen("callbacks") == 1
        with pytest.raises(redis.exceptions.NoPermissionError):
            scaler.set("x", "2")
        with pytest.raises(redis.exceptions.NoPermissionError):
            scaler.lpop("callbacks")
        with pytest.raises(redis.exceptions.NoPermissionError):
            scaler.llen("cf:job:1")


# --- network policies -----------------------------------------------------------------------


def matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and In/NotIn/Exists/DoesNotExist)."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


NAMESPACE = {"kubernetes.io/metadata.name": "cancelflow-example"}


def pod_templates() -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]
        for kind in ("Deployment", "StatefulSet")
        for d in docs_of(kind)
    }


def port_number(template: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [
        p["containerPort"]
        for c in template["spec"]["containers"]
        for p in c.get("ports", [])
        if p["name"] == port
    ]
    return int(number)


def allowed(target: str, port: int, ns: dict[str, str], pod: dict[str, str]) -> bool:
    """Whether a pod with these labels, in a namespace with these, may connect to the target
    pod's port, by the policies NetworkPolicy semantics give (ingress is additive)."""
    template = pod_templates()[target]
    labels = template["metadata"]["labels"]
    policies = [
        p
        for p in docs_of("NetworkPolicy")
        if "Ingress" in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True  # not isolated
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = [port_number(template, p["port"]) for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                in_ns = matches(ns_sel, ns) if ns_sel is not None else ns == NAMESPACE
                if in_ns and (pod_sel is None or matches(pod_sel, pod)):
                    return True
    return False


def labels_of(name: str) -> dict[str, str]:
    return dict(pod_templates()[name]["metadata"]["labels"])


MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
KEDA_NS = {"kubernetes.io/metadata.name": "keda"}
KEDA_OPERATOR = {"app": "keda-operator"}
STRANGER = {"app.kubernetes.io/name": "something-else"}


def test_every_pod_is_isolated_by_a_default_deny() -> None:
    deny = [
        p
        for p in docs_of("NetworkPolicy")
        if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
    ]
    assert deny, "a default-deny ingress policy for the example namespace"
    for name in pod_templates():
        assert not allowed(name, 1, NAMESPACE, STRANGER), f"{name}: open to any pod"


def test_only_cancelflow_and_keda_reach_redis() -> None:
    port = port_number(pod_templates()["cancelflow-redis"], "redis")
    cancelflow = {n for n in pod_templates() if n.startswith("cancelflow-") and "redis" not in n}
    for name in cancelflow:
        expected = name != "cancelflow-sandbox"
        assert allowed("cancelflow-redis", port, NAMESPACE, labels_of(name)) is expected, name
    assert allowed("cancelflow-redis", port, KEDA_NS, KEDA_OPERATOR)
    assert not allowed("cancelflow-redis", port, NAMESPACE, STRANGER)
    assert not allowed("cancelflow-redis", port, KEDA_NS, STRANGER)
    assert not allowed("cancelflow-redis", port, MONITORING, KEDA_OPERATOR)
    assert not allowed(
        "cancelflow-redis", port, {"kubernetes.io/metadata.name": "x"}, labels_of("cancelflow-api")
    )


def test_worker_metrics_are_opened_only_with_a_policy_for_prometheus() -> None:
    # Loopback by default: a worker nobody configured serves no metrics to the network.
    assert WorkerSettings().metrics_host == "127.0.0.1"
    opened = set()
    for name, spec in pod_specs():
        for container in spec["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if env.get("CANCELFLOW_WORKER__METRICS_HOST") == "0.0.0.0":  # noqa: S104
                opened.add(name)
    workers = {
        n for n in pod_templates() if labels_of(n).get("app.kubernetes.io/component") == "worker"
    }
    assert opened == workers, "every scraped worker opens its metrics, nothing else does"
    port = WorkerSettings().metrics_port
    for name in opened:
        assert allowed(name, port, MONITORING, PROMETHEUS), name
        assert not allowed(name, port, NAMESPACE, labels_of("cancelflow-api")), name
        assert not allowed(name, port, NAMESPACE, PROMETHEUS), f"{name}: Prometheus, but elsewhere"
        assert not allowed(name, port, MONITORING, STRANGER), name
        assert not allowed(name, 6379, MONITORING, PROMETHEUS), f"{name}: the metrics port only"


def test_the_api_and_the_sandbox_are_reachable_where_they_must_be() -> None:
    api = port_number(pod_templates()["cancelflow-api"], "http")
    assert allowed("cancelflow-api", api, {"kubernetes.io/metadata.name": "x"}, STRANGER)
    assert not allowed("cancelflow-api", api + 1, NAMESPACE, STRANGER)
    sandbox = port_number(pod_templates()["cancelflow-sandbox"], "http")
    worker = next(n for n in pod_templates() if "worker" in n)
    assert allowed("cancelflow-sandbox", sandbox, NAMESPACE, labels_of(worker))
    assert not allowed("cancelflow-sandbox", sandbox, NAMESPACE, labels_of("cancelflow-api"))
    beat = labels_of("cancelflow-beat")
    assert not any(
        allowed(n, 1, NAMESPACE, STRANGER) for n in pod_templates() if labels_of(n) == beat
    )


def test_the_policy_evaluator_catches_mistakes() -> None:
    assert matches({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"})
    assert not matches({"matchLabels": {"a": "1"}}, {"a": "2"})
    assert not matches({"matchExpressions": [{"key": "a", "operator": "In", "values": ["x"]}]}, {})
    assert matches({}, {"any": "pod"})
