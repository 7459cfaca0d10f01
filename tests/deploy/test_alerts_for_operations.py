"""The alerts of issue 16 (an open breaker, queue latency, the API down): they exist, name
metrics the code exports (or Prometheus's own `up` of a job it scrapes), and each has its
runbook section and a dashboard panel showing what it watches."""

from __future__ import annotations

import re
from typing import Any

import promql_parser
import pytest

from cancelflow import metrics
from tests.deploy.support import DEPLOY, yaml_documents
from tests.deploy.test_observability import (
    RUNBOOK,
    dashboard,
    github_anchor,
    metric_names,
    rules,
    runbook_anchors,
)

NEW_ALERTS = {
    "CancelflowCircuitOpen": metrics.CIRCUIT_STATE,
    "CancelflowQueueLatencyHigh": metrics.QUEUE_OLDEST_AGE,
    "CancelflowApiDown": "up",
}


def rule(name: str) -> dict[str, Any]:
    (found,) = [r for r in rules() if r["alert"] == name]
    return found


def scrape_jobs() -> set[str]:
    jobs: set[str] = set()
    for name in ("prometheus.yml", "kubernetes.yml"):
        for doc in yaml_documents(DEPLOY / "prometheus" / name):
            jobs |= {c["job_name"] for c in doc.get("scrape_configs", [])}
    return jobs


def label_matchers(expr: str, metric: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name == metric:
            found.extend((m.name, m.value) for m in node.matchers.matchers)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


@pytest.mark.parametrize(("alert", "metric"), NEW_ALERTS.items())
def test_each_new_alert_watches_its_metric_and_has_a_runbook_section(
    alert: str, metric: str
) -> None:
    found = rule(alert)
    used = metric_names(found["expr"])
    assert metric in used
    assert used - {"up"} <= metrics.sample_names()
    assert github_anchor(alert) in runbook_anchors()
    # The section says what the alert means and what to do: more than a heading.
    section = RUNBOOK.read_text().split(f"### {alert}\n", 1)[1].split("\n#", 1)[0]
    assert len(section.split()) > 60, f"{alert}: runbook section too thin"
    assert re.search(r"^(- |\d\. )", section, flags=re.MULTILINE), f"{alert}: no steps"


def test_the_api_down_alert_names_a_job_prometheus_scrapes_and_fires_when_absent() -> None:
    expr = rule("CancelflowApiDown")["expr"]
    jobs = [value for name, value in label_matchers(expr, "up") if name == "job"]
    assert jobs == ["cancelflow-api"] and set(jobs) <= scrape_jobs()
    # No series at all (no replica scraped) must fire too, not leave the alert silent.
    assert "vector(0)" in expr or "absent(" in expr


def test_the_circuit_alert_fires_on_the_open_value() -> None:
    expr = rule("CancelflowCircuitOpen")["expr"]
    assert re.search(rf"==\s*{metrics.CIRCUIT_OPEN}\b", expr), expr


def test_the_new_metrics_are_on_the_dashboard() -> None:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for name in (
        metrics.CIRCUIT_STATE,
        metrics.IN_FLIGHT,
        metrics.QUEUE_OLDEST_AGE,
        "cancelflow_api_requests_total",
        "cancelflow_api_request_duration_seconds_bucket",
        "cancelflow_build_info",
    ):
        assert any(name in e for e in exprs), name
    assert any('up{job="cancelflow-api"}' in e for e in exprs)
