"""The Kubernetes manifests: valid against the Kubernetes schemas (and KEDA's), and consistent
with the code: real commands, real queues, real settings, probes and grace periods that fit."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
from referencing import Registry, Resource

from cancelflow.contract import MAINTENANCE_QUEUE
from cancelflow.providers import REGISTRY
from cancelflow.settings import Limits, load_settings
from sandboxes.env import provider_env
from tests.deploy.support import (
    CONSUMED_QUEUES,
    K8S,
    Command,
    generator_literals,
    image_entrypoint,
    kustomization,
    kustomize_build,
    kustomize_sources,
    resolve,
    secret_setting_names,
    setting_names,
    yaml_documents,
)

# The oldest Kubernetes minor still commonly run; nothing here needs a newer API.
K8S_VERSION = "1.31"
BASE = K8S / "base"
KEDA = K8S / "components" / "keda"
EXAMPLE = K8S / "overlays" / "example"
KEDA_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "keda.json").read_text())
# The longest any task may run: the hard time limit, whatever the visibility timeout.
LONGEST_TASK_S = Limits.from_visibility_timeout(10**9).task_time_limit_s


def source_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every manifest the example overlay is built from (base, component, overlay files)."""
    return [(path, doc) for path in kustomize_sources(EXAMPLE) for doc in yaml_documents(path)]


def docs_of(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in source_documents() if doc["kind"] == kind]


def cancelflow_deployments() -> list[dict[str, Any]]:
    return [
        d
        for d in docs_of("Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "cancelflow"
    ]


def workers() -> dict[str, tuple[dict[str, Any], Command]]:
    """Worker Deployments by name, with their worker command resolved."""
    found = {}
    for d in cancelflow_deployments():
        (container,) = d["spec"]["template"]["spec"]["containers"]
        command = resolve(argv(container))
        if command.path == ["cancelflow", "worker"]:
            found[d["metadata"]["name"]] = (d, command)
    return found


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("Deployment", "StatefulSet"):
        for doc in docs_of(kind):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def is_cancelflow_image(image: str) -> bool:
    return image.rsplit("/", 1)[-1].split(":")[0] == "cancelflow"


def argv(container: dict[str, Any]) -> list[str]:
    """What the container runs: its command (or our image's ENTRYPOINT) and its args. Other
    images (Redis) wrap their args in an entrypoint script that runs them as given."""
    if "command" in container:
        return [*container["command"], *container.get("args", [])]
    if not is_cancelflow_image(container["image"]):
        return list(container["args"])
    return [*image_entrypoint(), *container.get("args", [])]


# --- schemas ----------------------------------------------------------------------------------


@cache
def keda_registry() -> Registry:
    # The HPA behavior inside a ScaledObject is Kubernetes' own type: take it from the same
    # bundled definitions the other manifests are checked against.
    definitions = (
        files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{K8S_VERSION}.0-local-strict"
        / "_definitions.json"
    )
    k8s = Resource.from_contents(json.loads(definitions.read_text()))
    return Registry().with_resources(
        [(KEDA_SCHEMA["$id"], Resource.from_contents(KEDA_SCHEMA)), (k8s.id() or "", k8s)]
    )


def schema_errors(doc: dict[str, Any]) -> list[str]:
    if doc["apiVersion"].startswith("keda.sh/"):
        schema = {"$ref": f"{KEDA_SCHEMA['$id']}#/$defs/{doc['kind']}"}
        validator = jsonschema.Draft202012Validator(schema, registry=keda_registry())
        return [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"]
    return []


def test_every_manifest_file_is_listed_in_its_kustomization() -> None:
    for directory in (BASE, KEDA, EXAMPLE):
        listed = {
            entry
            for entry in [*kustomization(directory).get("resources", [])]
            if (directory / entry).is_file()
        }
        present = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == present, f"{directory}: listed {sorted(listed)}, present {sorted(present)}"


@pytest.mark.parametrize(
    ("path", "doc"),
    source_documents(),
    ids=[
        f"{p.relative_to(K8S)}:{d['kind']}/{d['metadata']['name']}" for p, d in source_documents()
    ],
)
def test_manifest_matches_its_schema(path: Path, doc: dict[str, Any]) -> None:
    assert schema_errors(doc) == []


def test_the_schemas_catch_mistakes() -> None:
    deployment = next(iter(workers().values()))[0]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 360  # not the field's name
    assert schema_errors(broken)
    scaled = json.loads(json.dumps(docs_of("ScaledObject")[0]))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 100  # KEDA takes strings
    assert schema_errors(scaled)


@pytest.mark.parametrize("directory", [BASE, EXAMPLE], ids=["base", "overlays/example"])
def test_rendered_manifests_are_valid_and_refer_to_what_exists(directory: Path) -> None:
    rendered = kustomize_build(directory)
    if rendered is None:
        pytest.skip("kubectl is not installed: the kustomization is not rendered")
    for doc in rendered:
        assert schema_errors(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    for doc in rendered:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                kind, ref = (
                    ("ConfigMap", source["configMapRef"])
                    if "configMapRef" in source
                    else ("Secret", source["secretRef"])
                )
                # The base alone leaves the Secret to overlays; an overlay must supply it.
                if directory != BASE or kind == "ConfigMap":
                    assert (kind, ref["name"]) in names, (
                        f"{doc['metadata']['name']}: no {kind} {ref['name']}"
                    )
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names
    for doc in rendered:
        if doc["kind"] == "ScaledObject":
            assert ("Deployment", doc["spec"]["scaleTargetRef"]["name"]) in names
        if doc["kind"] == "TriggerAuthentication":
            for ref in doc["spec"]["secretTargetRef"]:
                assert ("Secret", ref["name"]) in names, (
                    f"TriggerAuthentication needs Secret {ref['name']}"
                )


# --- commands and queues ----------------------------------------------------------------------


def test_every_command_is_a_real_command() -> None:
    for _, spec in pod_specs():
        for container in spec["containers"]:
            resolve(argv(container))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "exec" in container.get(probe, {}):
                    resolve(container[probe]["exec"]["command"])
            pre_stop = container.get("lifecycle", {}).get("preStop", {})
            if "exec" in pre_stop:
                resolve(pre_stop["exec"]["command"])


def test_each_consumed_queue_has_exactly_one_worker_group() -> None:
    consumed = [q for _, command in workers().values() for q in command.queues]
    assert set(consumed) <= CONSUMED_QUEUES, f"unknown queues: {set(consumed) - CONSUMED_QUEUES}"
    assert sorted(consumed) == sorted(CONSUMED_QUEUES), (
        "every queue needs one worker group, and one only"
    )


def test_scaled_objects_scale_each_worker_group_on_its_own_queues() -> None:
    groups = workers()
    secret_url = generator_literals(EXAMPLE, "Secret", "cancelflow-redis-worker")[
        "CANCELFLOW_REDIS_URL"
    ]
    database = urlsplit(secret_url).path.strip("/") or "0"
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in docs_of("ScaledObject")}
    assert set(scaled) == set(groups), "one ScaledObject per worker group"
    for name, (_, command) in groups.items():
        triggers = scaled[name]["spec"]["triggers"]
        assert all(t["type"] == "redis" for t in triggers)
        lists = [t["metadata"]["listName"] for t in triggers]
        # Maintenance carries one periodic task: no reason to scale on it.
        assert sorted(lists) == sorted(q for q in command.queues if q != MAINTENANCE_QUEUE), name
        assert {t["metadata"]["databaseIndex"] for t in triggers} == {database}
        # Zero replicas would strand the retries a worker holds until their countdown ends.
        assert scaled[name]["spec"]["minReplicaCount"] >= 1


# --- pods: probes, draining, security ---------------------------------------------------------


def test_worker_probes_ping_the_worker_of_their_own_pod() -> None:
    for name, (deployment, command) in workers().items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        node = command.option("-n", "--hostname")
        assert node and node.endswith("@%h"), f"{name}: name the worker <group>@%h (-n)"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check = resolve(container[probe]["exec"]["command"])
            assert check.path == ["cancelflow", "healthcheck", "worker"], f"{name} {probe}"
            assert check.params["hostname"] == node, (
                f"{name} {probe} pings {check.params['hostname']}"
            )
            # The probe's own timeout leaves the ping its time, and Python its start-up.
            assert container[probe]["timeoutSeconds"] > check.params["timeout"] + 5


def test_workers_drain_before_they_are_killed() -> None:
    for name, (deployment, _) in workers().items():
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > LONGEST_TASK_S, (
            f"{name}: {grace}s grace < the {LONGEST_TASK_S}s a task may run"
        )
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        assert rolling["maxUnavailable"] == 0, f"{name}: start the new worker first"
        # Replicas belong to the ScaledObject; a fixed count would fight it on every apply.
        assert "replicas" not in deployment["spec"], name


def test_api_probes_and_service() -> None:
    (api,) = [d for d in cancelflow_deployments() if d["metadata"]["name"] == "cancelflow-api"]
    (container,) = api["spec"]["template"]["spec"]["containers"]
    command = resolve(argv(container))
    assert command.path == ["cancelflow", "api"]
    assert command.params["host"] == "0.0.0.0"  # noqa: S104 - the pod's own network
    (port,) = container["ports"]
    assert port["containerPort"] == command.params["port"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    (service,) = [s for s in docs_of("Service") if s["metadata"]["name"] == "cancelflow-api"]
    assert (
        service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    )
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_exactly_one_beat_and_never_two_during_a_rollout() -> None:
    beats = [
        d
        for d in cancelflow_deployments()
        if resolve(argv(d["spec"]["template"]["spec"]["containers"][0])).path
        == ["cancelflow", "beat"]
    ]
    assert len(beats) == 1
    assert beats[0]["spec"]["replicas"] == 1
    assert beats[0]["spec"]["strategy"] == {"type": "Recreate"}


def test_pods_run_as_non_root_with_a_read_only_root() -> None:
    for name, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["automountServiceAccountToken"] is False, name
        mounts_by_volume = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            if is_cancelflow_image(container["image"]):
                # Beat's schedule file (and any temporary file) goes to /tmp.
                tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in mounts_by_volume[tmp[0]["name"]], (
                    f"{name}: mount an emptyDir on /tmp"
                )


def test_disruption_budgets_cover_api_and_workers_but_not_beat() -> None:
    budgets = docs_of("PodDisruptionBudget")
    covered = set()
    for pdb in budgets:
        selector = pdb["spec"]["selector"]["matchLabels"]
        matched = [
            d["metadata"]["name"]
            for d in cancelflow_deployments()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matched) == 1, f"{pdb['metadata']['name']} selects {matched}"
        covered.add(matched[0])
    assert covered == {"cancelflow-api", *workers()}


# --- settings ---------------------------------------------------------------------------------


def configured_env() -> dict[str, dict[str, str]]:
    """Every variable the example sets, by where it is set."""
    return {
        "base ConfigMap": generator_literals(BASE, "ConfigMap", "cancelflow-config"),
        "example ConfigMap": generator_literals(EXAMPLE, "ConfigMap", "cancelflow-config"),
        "example Secret": generator_literals(EXAMPLE, "Secret", "cancelflow-secrets"),
        **{
            f"{name} env": {
                e["name"]: e.get("value", "")
                for c in spec["containers"]
                if is_cancelflow_image(c["image"])  # Redis' own (REDISCLI_AUTH) are not ours
                for e in c.get("env", [])
            }
            for name, spec in pod_specs()
        },
    }


def test_every_variable_set_is_a_setting() -> None:
    known = setting_names()
    for where, env in configured_env().items():
        unknown = sorted(k for k in env if k.startswith("CANCELFLOW_") and k not in known)
        assert not unknown, f"{where}: not settings: {unknown}"
        assert all(k.startswith("CANCELFLOW_") for k in env), f"{where}: {sorted(env)}"


def test_secrets_are_not_in_the_config_map() -> None:
    # The Redis URL is not a SecretStr but carries the Redis password.
    secret = secret_setting_names() | {"CANCELFLOW_REDIS_URL"}
    assert secret & setting_names() >= {
        "CANCELFLOW_API_TOKENS",
        "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_SECRET",
    }
    for where in ("base ConfigMap", "example ConfigMap"):
        leaked = sorted(set(configured_env()[where]) & secret)
        assert not leaked, f"{where} holds secrets: {leaked}"


def test_example_settings_load_and_point_every_provider_at_the_sandbox(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env: dict[str, str] = {}
    for where in ("base ConfigMap", "example ConfigMap", "example Secret"):
        env.update(configured_env()[where])
    expected = provider_env("http://cancelflow-sandbox:8090")
    assert {k: v for k, v in env.items() if k.startswith("CANCELFLOW_PROVIDERS__")} == expected
    for key in list(os.environ):
        if key.startswith("CANCELFLOW_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert set(settings.enabled_providers()) == set(REGISTRY)
    assert len(settings.api_tokens) >= 1
