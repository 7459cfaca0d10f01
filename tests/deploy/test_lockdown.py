"""A deployment locked down by default: Redis takes no connection without a password, in
Compose and in Kubernetes (checked against a real redis-server started with the shipped
arguments), every service's Redis URL names its role's ACL user (tests/deploy/test_redis_acl.py:
the users are deploy/redis/acl.yaml's), network policies let only
Cancelflow reach Redis and only Prometheus reach the workers' metrics."""

from __future__ import annotations

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
from tests.redis_acl import compose_password, redis_users

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

# Each Compose service's role, by the command it runs: its Redis user (deploy/redis/acl.yaml).
COMPOSE_ROLES = {"api": "api", "worker": "worker", "beat": "beat", "flower": "flower"}
# Each Kubernetes Deployment's role, by the `cancelflow` command its container runs.
K8S_ROLES = {"api": "api", "worker": "worker", "beat": "beat"}


def compose_role(service: dict[str, Any]) -> str | None:
    """The Redis user a Compose service logs in as: the role of the command it runs (the
    sandbox plays the providers and never touches Redis)."""
    command = service.get("command") or []
    return COMPOSE_ROLES.get(command[0]) if command else None


def test_every_compose_service_logs_in_to_redis_as_its_role_with_a_required_password() -> None:
    services = compose()["services"]
    ours = {name: s for name, s in services.items() if "build" in s}
    assert "CANCELFLOW_REDIS_URL" not in env_file(ENV_EXAMPLE), "no URL without credentials"
    users = redis_users()
    roles_seen = set()
    for name, service in ours.items():
        role = compose_role(service)
        env = service.get("environment") or {}
        if role is None:
            assert "CANCELFLOW_REDIS_URL" not in env, f"{name}: no Redis for the sandbox"
            continue
        roles_seen.add(role)
        url = env["CANCELFLOW_REDIS_URL"]
        var = users[role].password_var
        # `:?`: Compose refuses to start while the role's password is unset or empty.
        assert url.count(compose_password(var)) == 1, f"{name}: {url}"
        parts = urlsplit(url.replace(compose_password(var), "pw"))
        assert parts.hostname == "redis" and parts.username == role, f"{name}: {url}"
        assert parts.password == "pw", f"{name}: {url}"
    assert roles_seen == set(COMPOSE_ROLES.values())
    redis_service = services["redis"]
    assert redis_service["environment"]["REDISCLI_AUTH"] == compose_password("REDIS_API_PASSWORD")


def compose_redis_args(passwords: dict[str, str]) -> list[str]:
    """The Compose Redis's arguments with each role's password put in."""
    args = list(compose()["services"]["redis"]["command"])
    for user in redis_users().values():
        args = [a.replace(compose_password(user.password_var), passwords[user.name]) for a in args]
    return args


@needs_redis_server
def test_compose_redis_refuses_anonymous_clients_and_takes_each_services_url(
    tmp_path: Path,
) -> None:
    passwords = {name: f"compose-{name}-password" for name in redis_users()}
    for port in start_redis(compose_redis_args(passwords), tmp_path):
        assert_no_access_without_password(port)
        for name, service in compose()["services"].items():
            role = compose_role(service)
            if role is None or "build" not in service:
                continue
            url = service["environment"]["CANCELFLOW_REDIS_URL"].replace(
                compose_password(redis_users()[role].password_var), passwords[role]
            )
            client = redis.Redis.from_url(on_port(url, port))
            assert client.ping(), name
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.flushall()
        # The health check is healthy on an authenticated PONG only (redis-cli exits 0 on
        # a NOAUTH error, so the plain `redis-cli ping` never failed).
        test = compose()["services"]["redis"]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "sh", "-c"]
        script = test[3].replace("redis-cli", f"redis-cli -p {port}")
        good = {"REDISCLI_AUTH": passwords["api"]}
        ok = subprocess.run(["sh", "-c", script], env=good, check=False)
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


def acl_passwords() -> dict[str, str]:
    """Each user's password in the example's users.acl."""
    found = {}
    for line in acl_secret()["users.acl"].splitlines():
        words = line.split()
        if len(words) > 3 and words[3].startswith(">"):
            found[words[1]] = words[3][1:]
    return found


def k8s_role(container: dict[str, Any]) -> str | None:
    args = container.get("args") or container.get("command") or []
    return next((K8S_ROLES[a] for a in args if a in K8S_ROLES), None)


def test_every_cancelflow_pod_takes_its_roles_redis_url_from_a_secret() -> None:
    passwords = acl_passwords()
    roles_seen = set()
    for name, spec in pod_specs():
        for container in spec["containers"]:
            # The sandboxes play the providers and never touch Redis.
            if not is_cancelflow_image(container["image"]) or name == "cancelflow-sandbox":
                continue
            env_names = {e["name"] for e in container.get("env", [])}
            assert "CANCELFLOW_REDIS_URL" not in env_names, f"{name}: the URL belongs in a Secret"
            role = k8s_role(container)
            assert role is not None, f"{name}: which role?"
            roles_seen.add(role)
            refs = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
            # The role's Secret last: its CANCELFLOW_REDIS_URL wins.
            assert refs[-1].startswith(f"cancelflow-redis-{role}"), f"{name}: {refs}"
            url = generator_literals(EXAMPLE, "Secret", f"cancelflow-redis-{role}")[
                "CANCELFLOW_REDIS_URL"
            ]
            parts = urlsplit(url)
            assert parts.username == role and parts.password == passwords[role], name
    assert roles_seen == set(K8S_ROLES.values())
    shared = generator_literals(EXAMPLE, "Secret", "cancelflow-secrets")
    assert "CANCELFLOW_REDIS_URL" not in shared, "one URL per role, none shared"


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
    assert acl_passwords()["keda"] == keda["password"] and keda["username"] == "keda"
    # The readiness probe's user and password are the api's.
    probe = container["readinessProbe"]["exec"]["command"]
    assert "--user api " in probe[-1] and acl_secret()["password"] == acl_passwords()["api"]


@needs_redis_server
def test_kubernetes_redis_refuses_anonymous_clients_and_limits_keda(tmp_path: Path) -> None:
    (container,) = redis_statefulset()["spec"]["template"]["spec"]["containers"]
    args = list(container["args"])
    acl = tmp_path / "users.acl"
    acl.write_text(acl_secret()["users.acl"])
    args[args.index("--aclfile") + 1] = str(acl)
    for port in start_redis(args, tmp_path):
        assert_no_access_without_password(port)
        for role in K8S_ROLES.values():
            url = generator_literals(EXAMPLE, "Secret", f"cancelflow-redis-{role}")[
                "CANCELFLOW_REDIS_URL"
            ]
            client = redis.Redis.from_url(on_port(url, port))
            assert client.ping(), role
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.config_set("appendonly", "no")
        api = redis.Redis.from_url(
            on_port(
                generator_literals(EXAMPLE, "Secret", "cancelflow-redis-api")[
                    "CANCELFLOW_REDIS_URL"
                ],
                port,
            )
        )
        assert api.set("cf:x", "1") and api.rpush("callbacks", "m")
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
