"""The Prometheus scrape configurations (Compose, Kubernetes pod discovery, PodMonitors) find
the API and every worker where the manifests and the code put their metrics."""

from __future__ import annotations

import re
from typing import Any

from cancelflow.settings import WorkerSettings
from tests.deploy.support import (
    COMPOSE_FILE,
    DEPLOY,
    K8S,
    compose,
    image_entrypoint,
    kustomize_sources,
    resolve,
    yaml_documents,
)
from tests.deploy.test_compose import workers as compose_workers

PROMETHEUS = DEPLOY / "prometheus"
METRICS_PORT = WorkerSettings().metrics_port


def scrape_jobs(name: str) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in yaml_documents(PROMETHEUS / name)[0]["scrape_configs"]}


def pods() -> dict[str, list[dict[str, Any]]]:
    """The pod templates of Cancelflow's Deployments, by component (api, worker, beat)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in kustomize_sources(K8S / "overlays" / "example"):
        for doc in yaml_documents(path):
            if doc["kind"] != "Deployment":
                continue
            labels = doc["spec"]["template"]["metadata"]["labels"]
            if labels.get("app.kubernetes.io/name") == "cancelflow":
                found.setdefault(labels["app.kubernetes.io/component"], []).append(
                    doc["spec"]["template"]
                )
    return found


def templates(component: str) -> list[dict[str, Any]]:
    return pods()[component]


def port_names(template: dict[str, Any]) -> dict[str, int]:
    (container,) = template["spec"]["containers"]
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def test_every_worker_pod_declares_its_metrics_port_and_the_api_pods_ask_for_no_scrape() -> None:
    workers = templates("worker")
    assert len(workers) >= 2
    for template in workers:
        assert port_names(template)["metrics"] == METRICS_PORT
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    for template in templates("api"):
        # A generic annotation-driven job would scrape it without a token: 401.
        assert "prometheus.io/scrape" not in template["metadata"].get("annotations", {})


def relabel_keep(job: dict[str, Any], labels: dict[str, str], port: str) -> bool:
    """Whether the job's ``keep`` rules keep a pod with these labels, on this port name."""
    meta = {
        "__meta_kubernetes_pod_container_port_name": port,
        **{
            "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
            for k, v in labels.items()
        },
    }
    for rule in job["relabel_configs"]:
        if rule.get("action") == "keep":
            value = rule.get("separator", ";").join(meta.get(s, "") for s in rule["source_labels"])
            if not re.fullmatch(rule["regex"], value):
                return False
    return True


def test_kubernetes_pod_discovery_keeps_exactly_the_api_and_worker_ports() -> None:
    jobs = scrape_jobs("kubernetes.yml")
    api, worker = jobs["cancelflow-api"], jobs["cancelflow-workers"]
    assert api["authorization"]["type"] == "Bearer"
    for template in templates("api"):
        labels = template["metadata"]["labels"]
        assert relabel_keep(api, labels, "http") and "http" in port_names(template)
        assert not relabel_keep(worker, labels, "http")
    for template in templates("worker"):
        labels = template["metadata"]["labels"]
        assert relabel_keep(worker, labels, "metrics")
        assert not relabel_keep(api, labels, "metrics")


def test_podmonitors_select_the_pods_and_name_their_ports() -> None:
    monitors = {d["metadata"]["name"]: d for d in yaml_documents(PROMETHEUS / "podmonitor.yaml")}
    for name, component in (("cancelflow-api", "api"), ("cancelflow-workers", "worker")):
        spec = monitors[name]["spec"]
        for template in templates(component):
            assert spec["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
            for endpoint in spec["podMetricsEndpoints"]:
                assert endpoint["port"] in port_names(template)
    assert "authorization" in monitors["cancelflow-api"]["spec"]["podMetricsEndpoints"][0]


def test_the_compose_configuration_scrapes_the_api_and_every_worker_service() -> None:
    config = yaml_documents(PROMETHEUS / "prometheus.yml")[0]
    for rules in config["rule_files"]:
        assert (PROMETHEUS / rules).is_file(), rules
    jobs = scrape_jobs("prometheus.yml")
    services = compose()["services"]
    api = resolve([*image_entrypoint(), *services["api"]["command"]])
    ((target,),) = [c["targets"] for c in jobs["cancelflow-api"]["static_configs"]]
    assert target == f"api:{api.params['port']}"
    assert jobs["cancelflow-api"]["authorization"]["type"] == "Bearer"
    (dns,) = jobs["cancelflow-workers"]["dns_sd_configs"]
    assert set(dns["names"]) == set(compose_workers()), f"every worker of {COMPOSE_FILE.name}"
    assert dns["port"] == METRICS_PORT
