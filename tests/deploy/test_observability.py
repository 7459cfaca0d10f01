"""The alert rules, the Grafana dashboard and the runbook: well-formed, PromQL that parses,
known metric names, and a runbook section for every alert."""

from __future__ import annotations

import json
import re
from itertools import combinations
from typing import Any

import jsonschema
import promql_parser
import pytest

from cancelflow.metrics import sample_names
from cancelflow_client import CLIENT_ENV
from tests.deploy.support import DEPLOY, ROOT, setting_names, yaml_documents

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "cancelflow-dashboard.json"
RUNBOOK = DEPLOY / "RUNBOOK.md"

# Every series the code exports (histograms with their _bucket/_count/_sum series): rules and
# panels may name these and no others.
METRICS = sample_names()
# Series Prometheus makes itself for every scrape target (its job label checked against the
# scrape configuration in test_alerts_for_operations).
PROMETHEUS_SERIES = frozenset({"up"})

# What Prometheus requires of a rule file and what these rules promise on top of it.
RULES_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["groups"],
    "properties": {
        "groups": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "rules"],
                "properties": {
                    "name": {"type": "string"},
                    "interval": {"type": "string"},
                    "rules": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["alert", "expr", "for", "labels", "annotations"],
                            "properties": {
                                "alert": {"type": "string", "pattern": "^Cancelflow[A-Za-z]+$"},
                                "expr": {"type": "string"},
                                "for": {"type": "string"},
                                "keep_firing_for": {"type": "string"},
                                "labels": {
                                    "type": "object",
                                    "required": ["severity"],
                                    "properties": {
                                        "severity": {"enum": ["critical", "warning", "info"]}
                                    },
                                    "additionalProperties": {"type": "string"},
                                },
                                "annotations": {
                                    "type": "object",
                                    "required": ["summary", "description", "runbook_url"],
                                    "additionalProperties": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

# The parts of a dashboard Grafana needs on import, and the conventions this one keeps.
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "panels": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos"],
                "properties": {
                    "gridPos": {
                        "type": "object",
                        "required": ["x", "y", "w", "h"],
                        "properties": {
                            "x": {"type": "integer", "minimum": 0, "maximum": 23},
                            "w": {"type": "integer", "minimum": 1, "maximum": 24},
                        },
                    },
                    "targets": {
                        "type": "array",
                        "items": {"type": "object", "required": ["refId", "expr"]},
                    },
                },
            },
        },
    },
}


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml_documents(ALERTS)[0]["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {
        github_anchor(m) for m in re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    }


def test_alert_rules_are_well_formed() -> None:
    jsonschema.validate(yaml_documents(ALERTS)[0], RULES_SCHEMA)
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names)), "alert names are unique"
    for rule in rules():
        promql_parser.parse_duration(rule["for"])


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_alert_expression_parses_and_names_known_metrics(rule: dict[str, Any]) -> None:
    used = metric_names(rule["expr"])
    assert used, "an alert on no metric"
    assert used <= METRICS | PROMETHEUS_SERIES, f"unknown metrics: {used - METRICS}"


def test_the_parser_catches_mistakes() -> None:
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(cancelflow_queue_depth[5m])")


def test_the_alerts_the_issue_asks_for_exist() -> None:
    names = {rule["alert"] for rule in rules()}
    assert {
        "CancelflowNoWorkers",
        "CancelflowDeadLettersGrowing",
        "CancelflowProviderErrorRateHigh",
    } <= names


def test_every_alert_has_its_runbook_section() -> None:
    anchors = runbook_anchors()
    for rule in rules():
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "deploy/RUNBOOK.md", url
        assert anchor == github_anchor(rule["alert"]) and anchor in anchors, (
            f"{rule['alert']}: no section {url}"
        )


def test_runbook_links_resolve() -> None:
    anchors = runbook_anchors()
    for anchor in re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text()):
        assert anchor in anchors, f"RUNBOOK.md links to #{anchor}, which is not a heading"


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    jsonschema.validate(board, DASHBOARD_SCHEMA)
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    for a, b in combinations(panels, 2):
        ga, gb = a["gridPos"], b["gridPos"]
        overlap = (
            ga["x"] < gb["x"] + gb["w"]
            and gb["x"] < ga["x"] + ga["w"]
            and ga["y"] < gb["y"] + gb["h"]
            and gb["y"] < ga["y"] + ga["h"]
        )
        assert not overlap, f"panels {a['title']!r} and {b['title']!r} overlap"
        assert ga["x"] + ga["w"] <= 24


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables with values so the query parses as PromQL."""
    return expr.replace("$__rate_interval", "5m").replace("$provider", ".*")


def test_dashboard_queries_parse_and_name_known_metrics() -> None:
    board = dashboard()
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "provider"} <= variables
    queried: set[str] = set()
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for variable in re.findall(r"\$(\w+)", target["expr"]):
                assert variable == "__rate_interval" or variable in variables, (
                    f"{panel['title']}: ${variable}"
                )
            used = metric_names(grafana_to_promql(target["expr"]))
            known = METRICS | PROMETHEUS_SERIES
            assert used <= known, f"{panel['title']}: unknown metrics {used - known}"
            queried |= used & METRICS
    # Every metric is on the dashboard somewhere (histograms by their _bucket or _count).
    families = {re.sub(r"_(bucket|count|sum)$", "", m) for m in METRICS}
    assert families <= {re.sub(r"_(bucket|count|sum)$", "", m) for m in queried}


def test_settings_named_in_the_docs_and_rules_exist() -> None:
    # The server's settings, and the API client's (the runbook's commands go through the API).
    known = setting_names() | {name for pair in CLIENT_ENV.values() for name in pair}
    for path in (RUNBOOK, DEPLOY / "README.md", ALERTS, ROOT / "docker-compose.yml"):
        # Placeholders such as CANCELFLOW_PROVIDERS__<KEY>__X end in "__" where the regex stops.
        named = {
            n for n in re.findall(r"CANCELFLOW_[A-Z0-9_]+", path.read_text()) if not n.endswith("_")
        }
        assert named <= known, f"{path.name}: not settings: {sorted(named - known)}"
