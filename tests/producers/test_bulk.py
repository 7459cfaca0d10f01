"""``cancelflow bulk``: reading rows, and 10,000 rows with bad ones, killed half-way and run
again: every good row has exactly one job, every bad row is in the report."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from cancelflow.store import JOBS_INDEX, job_key
from producers.bulk import Report, Row, derive_key, read_rows
from producers.local import cancelflow_command, http_json
from sandboxes.payway import DEMO
from tests.fixtures.system import StartSystem
from tests.support import System

# --- reading rows ----------------------------------------------------------------------------


def test_csv_rows_nest_dotted_columns_and_keep_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text(
        "provider,subscription.order_identifier,reason.code,metadata.customer,idempotency_key\n"
        "azotte,o-1,price,c1,\n"
        ',"o-2\nwith a newline",,,own-key\n'
        "azotte,o-3,,,,surplus\n"
    )
    rows = list(read_rows(path, provider="azotte"))
    assert [r.number for r in rows] == [2, 3, 5]
    assert rows[0].body is not None and rows[0].body["subscription"] == {"order_identifier": "o-1"}
    assert rows[0].body["reason"] == {"code": "price"} and rows[0].body["metadata"] == {
        "customer": "c1"
    }
    assert rows[0].key == derive_key(
        {k: v for k, v in rows[0].body.items() if k != "idempotency_key"}
    )
    assert (
        rows[1].body is not None
        and rows[1].body["provider"] == "azotte"
        and rows[1].key == "own-key"
    )
    assert rows[2].body is None and rows[2].error is not None and "more cells" in rows[2].error


def test_jsonl_rows_and_derived_keys(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    body = {"provider": "azotte", "subscription": {"order_identifier": "o-1"}}
    path.write_text(f"{json.dumps(body)}\n\n{{nope\n[1]\n{json.dumps(body)}\n")
    rows = list(read_rows(path))
    assert [(r.number, r.error is None) for r in rows] == [
        (1, True),
        (3, False),
        (4, False),
        (5, True),
    ]
    assert rows[0].key == rows[3].key == derive_key(body)  # the same content, the same key
    assert next(read_rows(path, key_prefix="2026-11")).key != rows[0].key


def test_the_report_is_the_journal(tmp_path: Path) -> None:
    report = Report(tmp_path / "r.jsonl")
    report.write({"row": 1, "status": "ok", "job_id": "job_1", "idempotency_key": "k1"})
    report.write({"row": 2, "status": "error", "error": "x"})
    report.close()
    (tmp_path / "r.jsonl").open("a").write('{"row": 3, "sta')  # cut short by a kill
    again = Report(tmp_path / "r.jsonl")
    assert again.finished(Row(1, body={"idempotency_key": "k1"}))
    assert not again.finished(Row(1, body={"idempotency_key": "changed"}))
    assert not again.finished(Row(2, body={"idempotency_key": "k2"}))
    again.close()


# --- through the API -------------------------------------------------------------------------


def _bulk(system: System, *args: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CANCELFLOW_CLIENT__URL": system.api_url,
        "CANCELFLOW_CLIENT__TOKEN": system.token,
    }
    return subprocess.Popen(
        cancelflow_command("bulk", *args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _jobs_by_key(redis_url: str) -> Counter[str]:
    client = redis.Redis.from_url(redis_url)
    ids = [raw.decode() for raw in cast("list[bytes]", client.zrange(JOBS_INDEX, 0, -1))]
    keys: Counter[str] = Counter()
    for start in range(0, len(ids), 1000):
        with client.pipeline(transaction=False) as pipe:
            for job_id in ids[start : start + 1000]:
                pipe.hget(job_key(job_id), "request")
            for raw in pipe.execute():
                keys[json.loads(raw)["idempotency_key"]] += 1
    return keys


BAD_KINDS = ["not json", "not an object", "no provider", "bad account id", "unknown provider"]


def _bad_row(n: int, ref: dict[str, str]) -> str:
    kind = BAD_KINDS[n % len(BAD_KINDS)]
    good: dict[str, Any] = {
        "provider": "payway",
        "subscription": {**ref, "cancellation_reason_id": DEMO.reason_id},
    }
    return {
        "not json": '{"provider": "payway", ',
        "not an object": json.dumps([good]),
        "no provider": json.dumps({"subscription": good["subscription"]}),
        "bad account id": json.dumps(
            {**good, "subscription": {**good["subscription"], "account_id": "xyz"}}
        ),
        "unknown provider": json.dumps({**good, "provider": "nobody"}),
    }[kind]


@pytest.mark.integration
def test_ten_thousand_rows_killed_half_way_and_run_again(
    start_system: StartSystem, tmp_path: Path
) -> None:
    # A system of its own (Redis DB, API, worker) so the 10,000 jobs queue for nobody else.
    bulk_system = start_system(
        isolated=True,
        CANCELFLOW_API__RATE_LIMIT_PER_S="100000",
        CANCELFLOW_API__RATE_LIMIT_BURST="100000",
    )
    total, every = 10_000, 40
    status, created = http_json(
        "POST",
        f"{bulk_system.sandbox.url}/payway/_sandbox/subscriptions",
        {"count": total, "kind": "end_of_period"},
        timeout_s=120,
    )
    assert status == 200, created
    refs = created["references"]
    lines, bad_rows = [], set()
    for n, ref in enumerate(refs, 1):
        if n % every == 0:
            lines.append(_bad_row(n // every, ref))
            bad_rows.add(n)
        else:
            lines.append(
                json.dumps(
                    {
                        "provider": "payway",
                        "metadata": {"row": n},
                        "subscription": {**ref, "cancellation_reason_id": DEMO.reason_id},
                    }
                )
            )
    path = tmp_path / "cancel.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = tmp_path / "cancel.report.jsonl"
    args = (str(path), "--report", str(report), "--rate", "20000", "--concurrency", "16", "--json")

    first = _bulk(bulk_system, *args)
    deadline = time.monotonic() + 240
    while _lines(report) < total // 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    done_first = _lines(report)
    assert total // 4 < done_first < total, (
        f"killed after {done_first} rows: {first.stderr.read() if first.stderr else ''!r}"
    )

    second = _bulk(bulk_system, *args)
    out, err = second.communicate(timeout=300)
    summary = json.loads(out)
    assert second.returncode == 1, err  # some rows failed
    good = total - len(bad_rows)
    assert summary["rows"] == total
    assert summary["with_job"] == good and summary["failed"] == len(bad_rows)
    assert summary["this_run"]["skipped"] >= done_first - len(bad_rows) - 16

    # Every good row has exactly one job; nothing else made one.
    keys = {row.number: row.key for row in read_rows(path) if row.body is not None and row.key}
    jobs = _jobs_by_key(bulk_system.redis_url)
    good_keys = [key for number, key in keys.items() if number not in bad_rows]
    assert len(good_keys) == good
    assert all(jobs[key] == 1 for key in good_keys)
    assert sum(jobs.values()) == good

    # The report: each good row's job, each bad row's error.
    latest: dict[int, dict[str, Any]] = {}
    for line in report.read_text().splitlines():
        entry = json.loads(line)
        latest[entry["row"]] = entry
    assert set(latest) == set(range(1, total + 1))
    assert {n for n, e in latest.items() if e["status"] == "error"} == bad_rows
    assert all(latest[n]["error"] for n in bad_rows)
    assert {tuple(e["field"] for e in latest[n].get("errors", [])) for n in bad_rows} >= {
        ("provider",),
        ("subscription.account_id",),
    }
    bulk_system.procs.stop("worker")


@pytest.mark.integration
def test_sigterm_stops_cleanly_and_a_rerun_finishes(billing_api: System, tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    rows = [
        "provider,subscription.account_id,subscription.user_product_id,subscription.cancellation_reason_id"
    ]
    rows += [
        f"payway,{secrets.token_hex(12)},{secrets.token_hex(12)},{DEMO.reason_id}"
        for _ in range(60)
    ]
    path.write_text("\n".join(rows) + "\n")
    report = tmp_path / "rows.report.jsonl"
    first = _bulk(
        billing_api,
        str(path),
        "--report",
        str(report),
        "--rate",
        "20",
        "--concurrency",
        "2",
        "--json",
    )
    deadline = time.monotonic() + 30
    while _lines(report) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=30)
    assert first.returncode == 130
    summary = json.loads(out)
    assert summary["interrupted"] is True and 0 < summary["with_job"] < 60

    second = _bulk(billing_api, str(path), "--report", str(report), "--json")
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    again = json.loads(out)
    assert again["with_job"] == 60 and again["failed"] == 0
    assert again["this_run"]["skipped"] == summary["with_job"]
    assert (
        again["this_run"].get("created", 0) + again["this_run"].get("existing", 0)
        == 60 - summary["with_job"]
    )
