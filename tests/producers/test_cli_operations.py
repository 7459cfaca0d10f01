"""The operator's commands against a live API and worker, as an operator runs them: `dlq`,
`decide`, `jobs`, `providers`, with nothing but the API's URL and a token (the job store's
Redis named in their environment is one that does not answer: they never use it)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from producers.local import cancelflow_command, free_port, http_json
from sandboxes.payway import DEMO
from tests.fixtures.system import READ_TOKEN, StartSystem
from tests.support import System

pytestmark = pytest.mark.integration

NO_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture(scope="module")
def ops(start_system: StartSystem) -> System:
    """A system of its own (its dead letters are the only ones on its DB), where an AppDirect
    job dead-letters at its first failure."""
    return start_system(isolated=True, CANCELFLOW_PROVIDERS__APPDIRECT__MAX_ATTEMPTS="1")


def cli(
    system: System | None,
    *args: str,
    token: str | None = None,
    stdin: str | None = None,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CANCELFLOW_")}
    token = token if token is not None else (system.token if system else "")
    return subprocess.run(
        cancelflow_command(*args),
        env={
            **base,
            "CANCELFLOW_REDIS_URL": NO_REDIS,
            **({"CANCELFLOW_CLIENT__URL": system.api_url} if system else {}),
            **({"CANCELFLOW_CLIENT__TOKEN": token} if token else {}),
            "COLUMNS": "40",  # a narrow terminal's width; the output is a pipe anyway
            **env,
        },
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def sandbox_ref(system: System, provider: str, kind: str) -> Any:
    status, body = http_json(
        "POST",
        f"{system.sandbox.url}/{provider}/_sandbox/subscriptions",
        {"count": 1, "kind": kind},
    )
    assert status == 200, body
    return body["references"][0]


@pytest.fixture
def failing_appdirect(ops: System) -> Iterator[None]:
    ops.sandbox.faults("appdirect", error_rate=1)
    try:
        yield
    finally:
        ops.sandbox.faults("appdirect")


def dead_lettered_jobs(ops: System, count: int) -> list[str]:
    jobs = [
        ops.enqueue({"provider": "appdirect", "subscription": {"subscription_id": str(ref)}})["id"]
        for ref in (sandbox_ref(ops, "appdirect", "active") for _ in range(count))
    ]
    for job_id in jobs:
        ops.wait(job_id, until={"dead_lettered"})
    return jobs


def test_dead_letters_listed_shown_replayed_and_purged_through_the_api(
    ops: System, failing_appdirect: None
) -> None:
    jobs = dead_lettered_jobs(ops, 3)

    listed = cli(ops, "dlq", "list", "--provider", "appdirect", "--json")
    assert listed.returncode == 0, listed.stderr
    found = {d["job_id"]: d["id"] for d in json.loads(listed.stdout)}
    assert set(jobs) <= set(found)
    ids = [found[j] for j in jobs]

    # Full ids in the table, however narrow the terminal and though it is a pipe.
    table = cli(ops, "dlq", "list", "--provider", "appdirect")
    assert table.returncode == 0, table.stderr
    for dl_id, job_id in zip(ids, jobs, strict=True):
        assert dl_id in table.stdout and job_id in table.stdout

    # The provider's health shows what happened (every one of its jobs ended dead-lettered).
    health = cli(ops, "providers", "--json")
    assert health.returncode == 0, health.stderr
    appdirect = next(p for p in json.loads(health.stdout) if p["provider"] == "appdirect")
    assert appdirect["dead_lettered_last_hour"] >= 3 and appdirect["error_rate"] == 1.0
    shown = cli(ops, "providers")
    assert "appdirect" in shown.stdout and "100.0%" in shown.stdout

    # show takes the start of an id.
    one = cli(ops, "dlq", "show", ids[0][:12])
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["id"] == ids[0]
    assert cli(ops, "dlq", "show", "dl_ffffffffffff").returncode == 1

    ops.sandbox.faults("appdirect")  # the provider is back

    # A dry run replays nothing; replay-all asks first, like purge, and "no" replays nothing.
    dry = cli(ops, "dlq", "replay", "--provider", "appdirect", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would replay 3 dead letters" in dry.stderr
    refused = cli(ops, "dlq", "replay", "--provider", "appdirect", stdin="n\n")
    assert refused.returncode == 1 and "Aborted" in refused.stderr
    assert len(json.loads(cli(ops, "dlq", "list", "--json").stdout)) == 3

    # A read token may look but not act.
    read_only = cli(ops, "dlq", "replay", ids[0], token=READ_TOKEN)
    assert read_only.returncode == 1 and "403" in read_only.stdout + read_only.stderr

    # One by the start of its id, then the rest by filter, confirmed.
    first = cli(ops, "dlq", "replay", ids[0][:14], "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["results"][0]["result"] == "replayed -> eligibility"
    rest = cli(ops, "dlq", "replay", "--provider", "appdirect", "--json", stdin="y\n")
    assert rest.returncode == 0, rest.stderr
    answer = json.loads(rest.stdout[rest.stdout.index("{") :])
    assert (answer["matched"], answer["failed"]) == (2, 0)
    for job_id in jobs:
        done = ops.wait(job_id)
        assert done["outcome"]["type"] == "cancelled", done
    # Nothing left to match: that is a failure to say so, not a silent success.
    again = cli(ops, "dlq", "replay", "--provider", "appdirect", "--yes")
    assert again.returncode == 1 and "no dead letter matches" in again.stderr
    assert cli(ops, "dlq", "list", "--provider", "appdirect").returncode == 1


def test_purge_by_id_with_a_dry_run_first(ops: System, failing_appdirect: None) -> None:
    (job_id,) = dead_lettered_jobs(ops, 1)
    listed = json.loads(cli(ops, "dlq", "list", "--json").stdout)
    dl_id = next(d["id"] for d in listed if d["job_id"] == job_id)

    dry = cli(ops, "dlq", "purge", dl_id, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["matched"] == 1
    assert cli(ops, "dlq", "show", dl_id).returncode == 0  # still there

    purged = cli(ops, "dlq", "purge", dl_id)
    assert purged.returncode == 0, purged.stderr
    assert f"{dl_id}: purged" in purged.stdout
    gone = cli(ops, "dlq", "purge", dl_id)
    assert gone.returncode == 1  # nothing matched: not a success
    assert cli(ops, "dlq", "purge", "--kind", "billing_event", "--yes").returncode == 1


def test_decide_answers_an_offer(ops: System) -> None:
    order = sandbox_ref(ops, "azotte", "offer")
    job = ops.enqueue({"provider": "azotte", "subscription": {"order_identifier": order}})
    ops.wait(job["id"], until={"awaiting_decision"})
    shown = cli(ops, "status", job["id"])
    assert f"cancelflow decide {job['id']} accept|reject" in shown.stdout

    decided = cli(ops, "decide", job["id"], "reject", "-s", "why=price", "--wait", "30", "--json")
    assert decided.returncode == 0, decided.stderr
    answer = json.loads(decided.stdout)
    assert answer["decision"] == {"decision": "reject", "survey": {"why": "price"}}
    assert answer["status"] == "finished" and answer["outcome"]["type"] == "cancelled"
    # No offer waits any more: refused (409), and said so.
    late = cli(ops, "decide", job["id"], "accept")
    assert late.returncode == 1 and "409" in late.stderr
    assert cli(ops, "decide", job["id"], "maybe").returncode == 2


def test_jobs_are_found_by_every_filter(ops: System) -> None:
    ref = sandbox_ref(ops, "payway", "immediate")
    ticket = f"T-{secrets.token_hex(4)}"
    key = f"order-{secrets.token_hex(4)}"
    job = ops.enqueue(
        {
            "provider": "payway",
            "subscription": {**ref, "cancellation_reason_id": DEMO.reason_id},
            "idempotency_key": key,
            "metadata": {"ticket": ticket, "vip": True},
        }
    )
    ops.wait(job["id"])

    def ids(*filters: str) -> list[str]:
        found = cli(ops, "jobs", *filters, "--json")
        assert found.returncode == 0, found.stderr
        return [j["id"] for j in json.loads(found.stdout)["items"]]

    assert ids("--metadata", f"ticket={ticket}") == [job["id"]]
    assert ids("-m", f"ticket={ticket}", "-m", "vip=true") == [job["id"]]
    assert ids("--idempotency-key", key) == [job["id"]]
    assert job["id"] in ids("--reference", ref["account_id"][-10:].upper())
    assert job["id"] in ids("--provider", "payway", "--outcome", "cancelled", "--since", "10m")
    assert ids("--id", job["id"]) == [job["id"]]
    queued = cli(ops, "jobs", "--provider", "payway", "--status", "queued", "--json")
    assert job["id"] not in {j["id"] for j in json.loads(queued.stdout)["items"]}

    nothing = cli(ops, "jobs", "-m", f"ticket={ticket}", "--outcome", "retained")
    assert nothing.returncode == 1 and "no job matches" in nothing.stderr
    table = cli(ops, "jobs", "--metadata", f"ticket={ticket}")
    assert job["id"] in table.stdout and ticket in table.stdout
    bad = cli(ops, "jobs", "--metadata", "no-equals-sign")
    assert bad.returncode == 2 and "--metadata" in bad.stderr

    # The API refuses a malformed filter by name.
    status, problem = ops.get("/v1/cancellations?metadata=oops")
    assert status == 422 and problem["errors"][0]["field"] == "query.metadata.0"


def test_errors_say_what_failed(ops: System) -> None:
    missing = cli(ops, "jobs", token="")
    assert missing.returncode == 2
    assert "no API token: set CANCELFLOW_CLIENT__TOKEN" in missing.stderr
    wrong = cli(ops, "jobs", token="not-a-token")
    assert wrong.returncode == 2
    assert "refused the token from CANCELFLOW_CLIENT__TOKEN" in wrong.stderr
    assert "not-a-token" not in wrong.stderr
    port = free_port()
    unreachable = cli(
        None,
        "dlq",
        "list",
        token="t",
        CANCELFLOW_CLIENT__URL=f"http://127.0.0.1:{port}",
        CANCELFLOW_CLIENT__RETRIES="1",
    )
    assert unreachable.returncode == 1
    assert f"cannot reach the API: no answer from http://127.0.0.1:{port}" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_start_up_failures_are_one_line() -> None:
    env = {"CANCELFLOW_API_TOKENS": "t"}
    amqp = cli(
        None, "api", "--port", str(free_port()),
        CANCELFLOW_REDIS_URL="amqp://guest:guest@127.0.0.1:5672//", **env,
    )  # fmt: skip
    assert amqp.returncode == 2
    # Refused by the settings, as any invalid variable is: the header, then one line for it.
    assert amqp.stderr.strip().splitlines() == [
        "cancelflow: invalid settings:",
        "  CANCELFLOW_REDIS_URL: Value error, scheme 'amqp' is not Redis: the job store needs "
        "redis://, rediss://, unix://, sentinel://; a RabbitMQ broker goes in "
        "CANCELFLOW_BROKER_URL",
    ]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = cli(None, "api", "--port", str(port), **env)
    assert busy.returncode == 2, busy.stderr
    (last,) = [line for line in busy.stderr.splitlines() if line.startswith("cancelflow:")]
    assert f"cannot listen: error while attempting to bind on address ('127.0.0.1', {port})" in (
        last
    )
    assert "pass --port" in last and "Traceback" not in busy.stderr
