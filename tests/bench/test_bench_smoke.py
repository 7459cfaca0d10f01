"""The bench's machinery at a tiny size: it runs end to end and writes what it promises.

No timing is asserted (the machine is shared and noisy): only the shape of the results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PCTS = {"p50", "p95", "p99"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--jobs",
            "20",
            "--rounds",
            "1",
            "--scenarios",
            "no_latency",
            "--window",
            "10",
            "--api-jobs",
            "20",
            "--profile-jobs",
            "10",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    # 1 is "a target failed", which a run this small may well do; 2 and up are errors.
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Targets [redis]:" in proc.stdout
    return out


def test_writes_latest_a_timestamped_copy_and_the_chart(results: Path) -> None:
    assert (results / "latest.json").is_file()
    copies = list(results.glob("run-*.json"))
    assert len(copies) == 1
    assert json.loads(copies[0].read_text()) == json.loads((results / "latest.json").read_text())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (results / "latest.png").stat().st_size > 0


def test_results_have_every_figure(results: Path) -> None:
    doc = json.loads((results / "latest.json").read_text())
    assert set(doc["scenarios"]) == {"baseline", "no_latency"}
    for scenario in doc["scenarios"].values():
        assert scenario["completed"] == scenario["jobs"] == 20
        assert scenario["jobs_per_s"] > 0
        assert set(scenario["latency_ms"]) == PCTS
        assert scenario["peak_rss_mb"] > 0
    ours = doc["scenarios"]["no_latency"]
    assert set(ours["ratio_to_baseline"]) == {
        "jobs_per_s",
        "latency_p50",
        "latency_p95",
        "peak_rss",
    }
    assert "broker wait: eligibility" in ours["segments_ms"]
    assert doc["machine"]["cpus"] and doc["machine"]["cpu_model"]  # which machine ran it
    assert [t["id"] for t in doc["targets"]] == ["a", "b", "c", "d"]
    assert all(t["status"] in ("PASS", "FAIL", "SKIP") for t in doc["targets"])
    assert {t["id"]: t["status"] for t in doc["targets"]}["b"] == "SKIP"  # no latency scenario run
    api = doc["api"]
    assert (
        api["statuses"] == {"202": 60} and api["api_per_s"] > 0 and api["send_task_loop_per_s"] > 0
    )
    run = doc["runs"][0]
    assert {"cpu_ms_per_job", "max_in_flight", "peak_rss_mb_by_worker", "outcomes"} <= set(run)
    assert (
        run["broker"] == "redis" and doc["broker"] == "redis" and set(doc["brokers"]) == {"redis"}
    )
    assert doc["brokers"]["redis"]["scenarios"] == doc["scenarios"]


def test_scaling_runs_each_side_with_two_processes(results: Path) -> None:
    doc = json.loads((results / "latest.json").read_text())
    assert {r["workers"] for r in doc["runs"]} == {1, 2}
    for side in ("baseline", "no_latency"):
        rates = doc["scaling"][side]["jobs_per_s"]
        assert set(rates) == {"1", "2"} and all(v > 0 for v in rates.values())
        assert doc["scaling"][side]["x_base"]["1"] == 1.0
    assert set(doc["scaling"]["ratio_to_baseline"]) == {"1", "2"}


def test_profile_counts_round_trips_and_step_times(results: Path) -> None:
    prof = json.loads((results / "latest.json").read_text())["profile"]
    assert prof["jobs"] == 10
    rt = prof["round_trips_per_job"]
    assert (
        rt["total"] > 0
        and rt["producer"] > 0
        and rt["worker_store"] > 0
        and rt["worker_broker"] > 0
    )
    assert {"eligibility", "confirm", "callback"} <= set(prof["time_by_step_ms"])
    assert prof["time_by_step_ms"]["eligibility"]["provider_http_ms"] > 0
    # The baseline's chains, counted the same way: every round trip is the broker's.
    base = prof["baseline"]
    assert base["jobs"] == 10
    brt = base["round_trips_per_job"]
    assert brt["producer"] > 0 and brt["worker_broker"] > 0 and "worker_store" not in brt


def test_reports_read_back(results: Path) -> None:
    doc = json.loads((results / "latest.json").read_text())
    assert "| no_latency |" in report.table(doc)
    assert "no_latency: jobs/s" in report.delta(doc, doc)
    assert "Redis round trips per job" in report.profile_text(doc)
    assert "| redis | no_latency |" in report.table(doc)
    assert "Scaling (redis)" in report.table(doc)
    assert "Targets [redis]:" in report.targets_text(doc)


def test_the_charts_title_gives_each_legs_own_targets() -> None:
    from typing import Any

    from bench.report import targets_line

    def leg(*statuses: str) -> dict[str, Any]:
        return {"targets": [{"id": i, "status": s} for i, s in zip("abcd", statuses, strict=True)]}

    redis, amqp = leg("PASS", "PASS", "PASS", "PASS"), leg("FAIL", "PASS", "PASS", "PASS")
    # The top level repeats the first leg's: a RabbitMQ failure must not read as a pass.
    doc = {"targets": redis["targets"], "brokers": {"redis": redis, "amqp": amqp}}
    assert targets_line(doc) == (
        "Redis: (a) PASS, (b) PASS, (c) PASS, (d) PASS; "
        "RabbitMQ: (a) FAIL, (b) PASS, (c) PASS, (d) PASS"
    )
