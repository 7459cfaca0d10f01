"""components/keda-rabbitmq: the RabbitMQ scaler on the same worker groups and queues as the
Redis one (components/keda), valid against KEDA's schema."""

from __future__ import annotations

from typing import Any

from cancelflow.contract import MAINTENANCE_QUEUE
from tests.deploy.support import K8S, kustomization, yaml_documents
from tests.deploy.test_k8s import KEDA, schema_errors, workers

KEDA_RABBITMQ = K8S / "components" / "keda-rabbitmq"


def documents(kind: str) -> list[dict[str, Any]]:
    return [
        doc
        for entry in kustomization(KEDA_RABBITMQ)["resources"]
        for doc in yaml_documents(KEDA_RABBITMQ / entry)
        if doc["kind"] == kind
    ]


def test_every_file_is_listed_and_every_manifest_matches_its_schema() -> None:
    listed = set(kustomization(KEDA_RABBITMQ)["resources"])
    present = {p.name for p in KEDA_RABBITMQ.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    for entry in listed:
        for doc in yaml_documents(KEDA_RABBITMQ / entry):
            assert schema_errors(doc) == [], (entry, doc["metadata"]["name"])


def test_each_worker_group_scales_on_the_ready_messages_of_its_own_queues() -> None:
    groups = workers()
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in documents("ScaledObject")}
    assert set(scaled) == set(groups), "one ScaledObject per worker group"
    (auth,) = documents("TriggerAuthentication")
    for name, (_, command) in groups.items():
        triggers = scaled[name]["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"rabbitmq"}
        queues = [t["metadata"]["queueName"] for t in triggers]
        assert sorted(queues) == sorted(q for q in command.queues if q != MAINTENANCE_QUEUE), name
        for trigger in triggers:
            meta = trigger["metadata"]
            # Messages waiting, as LLEN counts them on Redis; through the management API.
            assert (meta["mode"], meta["excludeUnacknowledged"], meta["protocol"]) == (
                "QueueLength",
                "true",
                "http",
            )
            assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_the_rabbitmq_scaling_matches_the_redis_one_but_for_its_triggers() -> None:
    redis_scaled = {
        doc["metadata"]["name"]: doc
        for entry in kustomization(KEDA)["resources"]
        for doc in yaml_documents(KEDA / entry)
        if doc["kind"] == "ScaledObject"
    }
    for doc in documents("ScaledObject"):
        twin = redis_scaled[doc["metadata"]["name"]]
        same = {k: v for k, v in doc["spec"].items() if k != "triggers"}
        assert same == {k: v for k, v in twin["spec"].items() if k != "triggers"}
        assert [t["metadata"]["value"] for t in doc["spec"]["triggers"]] == [
            t["metadata"]["listLength"] for t in twin["spec"]["triggers"]
        ]
