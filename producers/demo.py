"""``cancelflow demo``: the whole system on one machine, every outcome in one table.

Starts (or finds) Redis, the sandboxes, a worker with beat and the API; sends a batch of
cancellations through the API like a backend would; waits for each to end; prints a table
of job, input, status and outcome with a check against what the sandbox data should give;
stops everything it started. Exit status 0 when every row is as expected.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from producers.local import (
    EmbeddedRedis,
    ProcessGroup,
    cancelflow_command,
    free_port,
    http_json,
    http_ok,
    redis_answers,
    wait_until,
)

# The table fits in 100 columns (job ids whole, the rest wrapped in its cell): a file or a CI
# log gets it at that width; a terminal at its own.
WIDTH = 100
console = Console(width=None if Console().is_terminal else WIDTH)


@dataclass(frozen=True)
class Case:
    """One row of the demo: a sandbox subscription of some kind and the outcome it must get."""

    provider: str
    kind: str
    expect: str  # outcome type, or "422" for a request the API must reject
    extra: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] | None = None  # a literal (bad) request instead of a sandbox reference
    decision: str | None = None  # for offers: what the customer answers
    detail: Callable[[dict[str, Any]], str] | None = None


PAYWAY_REASON = "5cb80481c00000000000000a"
PAYWAY_NOT_ELIGIBLE = (
    "account_not_found",
    "account_does_not_belong_to_organisation",
    "no_customer_number",
    "user_product_not_found",
    "no_subscription_number",
    "no_external_service",
    "not_web_originated",
)


def _cases() -> list[Case]:
    payway = {"cancellation_reason_id": PAYWAY_REASON}
    return [
        Case("payway", "immediate", "cancelled", payway),
        Case("payway", "end_of_period", "cancelled", payway),
        Case("payway", "autogiro", "cancelled", payway),
        Case("payway", "end_of_period_with_credit", "cancelled", payway),
        Case("payway", "already_cancelled", "already_cancelled", payway),
        *(Case("payway", reason, "not_eligible", payway) for reason in PAYWAY_NOT_ELIGIBLE),
        Case("azotte", "processed", "cancelled"),
        Case("azotte", "offer", "retained", decision="accept"),
        Case("azotte", "offer", "cancelled", decision="reject"),
        Case("azotte", "presentation", "cancelled", decision="reject"),
        Case("azotte", "app_store", "pending_provider_confirmation"),
        Case("azotte", "play_store", "pending_provider_confirmation"),
        Case("azotte", "third_party", "pending_provider_confirmation"),
        Case("azotte", "already_cancelled", "already_cancelled"),
        Case("azotte", "not_found", "not_found"),
        Case("appdirect", "active", "cancelled"),
        Case("appdirect", "free_trial", "cancelled"),
        Case("appdirect", "cancelled", "already_cancelled"),
        Case("appdirect", "not_found", "not_found"),
        Case("axelspringer", "created", "cancelled"),
        Case("axelspringer", "redeemed", "cancelled"),
        Case("axelspringer", "canceled", "already_cancelled"),
        Case("axelspringer", "unknown", "not_found"),
        Case(
            "payway",
            "bad account id",
            "422",
            body={
                "provider": "payway",
                "subscription": {
                    "account_id": "not-hex",
                    "user_product_id": "5cb80481b000000000000001",
                    "cancellation_reason_id": PAYWAY_REASON,
                },
            },
        ),
        Case("payway", "missing fields", "422", body={"provider": "payway", "subscription": {}}),
        Case(
            "azotte",
            "bad method",
            "422",
            body={
                "provider": "azotte",
                "subscription": {"order_identifier": "or_1", "cancelation_method": "Sometime"},
            },
        ),
        Case(
            "acme",
            "unknown provider",
            "422",
            body={"provider": "acme", "subscription": {"id": "1"}},
        ),
    ]


# How each provider's sandbox reference becomes the request's subscription.
REFERENCE_FIELD = {
    "azotte": "order_identifier",
    "appdirect": "subscription_id",
    "axelspringer": "purchase_ref",
}
# Kinds that exist by not existing: a fresh id the sandbox has never seen.
UNKNOWN_KINDS = {"not_found", "unknown"}


def _subscription(sandbox_url: str, case: Case) -> dict[str, Any]:
    if case.kind in UNKNOWN_KINDS:
        return {REFERENCE_FIELD[case.provider]: f"unknown-{secrets.token_hex(6)}"}
    status, created = http_json(
        "POST",
        f"{sandbox_url}/{case.provider}/_sandbox/subscriptions",
        {"count": 1, "kind": case.kind},
    )
    if status != 200:
        raise RuntimeError(f"sandbox refused to create a {case.provider} {case.kind}: {created}")
    ref = created["references"][0]
    if isinstance(ref, dict):
        return {**ref, **case.extra}
    return {REFERENCE_FIELD[case.provider]: ref, **case.extra}


def _outcome_text(job: dict[str, Any]) -> str:
    outcome = job.get("outcome") or {}
    parts = [outcome.get("type", "-")]
    for key in ("cancellation_type", "reason", "offer_identifier"):
        if outcome.get(key):
            parts.append(f"{key}: {outcome[key]}")
    if outcome.get("details"):
        parts.append(json.dumps(outcome["details"], separators=(",", ":")))
    if outcome.get("error"):
        parts.append(outcome["error"].get("message", ""))
    return " ".join(parts)


def run_demo(*, keep_logs: bool = False, keep: bool = False) -> int:
    """Run every case; with ``keep``, leave the system running after the table (until Ctrl-C
    or SIGTERM) and say where the console is and which token signs in."""
    log_dir = Path(tempfile.mkdtemp(prefix="cancelflow-demo-"))
    redis_url = os.environ.get("CANCELFLOW_REDIS_URL", "redis://127.0.0.1:6379/0")
    embedded: EmbeddedRedis | None = None
    if redis_answers(redis_url):
        console.print(f"[bold]Redis[/]: using {redis_url}")
    else:
        embedded = EmbeddedRedis().start()
        redis_url = embedded.url
        console.print(
            f"[bold]Redis[/]: none answered; started an embedded one (fakeredis) at {redis_url}"
        )
    token = secrets.token_urlsafe(24)
    sandbox_port, api_port = free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    api_url = f"http://127.0.0.1:{api_port}"
    from sandboxes.env import provider_env

    env = {
        "CANCELFLOW_REDIS_URL": redis_url,
        "CANCELFLOW_API_TOKENS": token,
        "CANCELFLOW_LOG_FORMAT": "json",
        "CANCELFLOW_CALLBACKS__ALLOW_HTTP": "true",
        "CANCELFLOW_CALLBACKS__ALLOWED_HOSTS": "127.0.0.1",
        **provider_env(sandbox_url),
        # Every result goes to the sandbox's receiver, which checks each signature.
        **{
            f"CANCELFLOW_PROVIDERS__{key.upper()}__CALLBACK_URL": f"{sandbox_url}/receiver/events"
            for key in ("payway", "azotte", "appdirect", "axelspringer")
        },
    }
    procs = ProcessGroup(env=env, log_dir=log_dir)
    ok = False
    try:
        procs.start("sandbox", cancelflow_command("sandbox", "--port", str(sandbox_port)))
        wait_until(lambda: http_ok(f"{sandbox_url}/healthz"), timeout_s=30, what="sandbox")
        procs.start("worker", cancelflow_command("worker", "--beat", "-c", "16"))
        procs.start("api", cancelflow_command("api", "--port", str(api_port)))
        wait_until(lambda: http_ok(f"{api_url}/readyz"), timeout_s=30, what="API")
        console.print(
            f"[bold]Started[/]: sandboxes {sandbox_url}, API {api_url}, "
            f"a worker (logs in {log_dir})"
        )
        ok = _run_cases(sandbox_url, api_url, token)
        if keep:
            _keep_running(procs, api_url=api_url, sandbox_url=sandbox_url, token=token)
    except TimeoutError as exc:  # a process that did not start: one line, and where its log is
        console.print(f"[bold red]cancelflow demo[/]: {exc} (logs in {log_dir})", soft_wrap=True)
    finally:
        procs.stop_all()
        if embedded is not None:
            embedded.stop()
    if not keep_logs and ok:
        for f in log_dir.glob("*.log"):
            f.unlink()
        log_dir.rmdir()
    return 0 if ok else 1


def _keep_running(procs: ProcessGroup, *, api_url: str, sandbox_url: str, token: str) -> None:
    """Until Ctrl-C (SIGTERM too: ``ProcessGroup`` makes it one), or until a process ends."""
    console.print(
        f"\n[bold]Still running[/] (Ctrl-C stops it all).\n"
        f"Console: {api_url}/console/  sign in with the API token: {token}\n"
        f"Command line: export CANCELFLOW_CLIENT__URL={api_url} CANCELFLOW_CLIENT__TOKEN={token}\n"
        f"  then cancelflow jobs, cancelflow dlq list, cancelflow providers\n"
        f"Sandboxes: {sandbox_url}",
        soft_wrap=True,  # the URL and the token whole, to copy
    )
    try:
        while all(p.poll() is None for p in procs.procs.values()):
            time.sleep(0.5)
        ended = [name for name, p in procs.procs.items() if p.poll() is not None]
        console.print(f"[bold red]stopped[/]: {', '.join(ended)} ended")
    except KeyboardInterrupt:
        console.print("stopping")


def _callbacks_text(sandbox_url: str, job: dict[str, Any]) -> str:
    """Each event the job sent, as the receiver saw it: delivered and signature verified?"""
    _, seen = http_json("GET", f"{sandbox_url}/receiver/_events?job_id={job['id']}")
    verified = {r["event_id"]: r.get("verified") for r in (seen or {}).get("requests", [])}
    parts = []
    for attempt in job["callbacks"]:
        if attempt["result"] != "delivered":
            continue
        name = attempt["event_type"].removeprefix("cancellation.")
        parts.append(f"{name} {'✓' if verified.get(attempt['event_id']) else 'unverified'}")
    return ", ".join(parts) or "-"


def _decision(case: Case) -> str:
    return f" + {case.decision}" if case.decision else ""


def outcome_table() -> Table:
    """The demo's table: a row per case, readable at ``WIDTH`` columns (job ids whole, every
    other cell wrapped within its column)."""
    table = Table(
        title="Cancelflow demo: every outcome (callbacks ✓: delivered, signature verified)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    table.add_column("ok")
    table.add_column("#", justify="right")
    table.add_column("case", ratio=2, overflow="fold")
    table.add_column("job", no_wrap=True, min_width=36)
    table.add_column("outcome", ratio=3, overflow="fold")
    table.add_column("callbacks", ratio=2, overflow="fold")
    return table


def _run_cases(sandbox_url: str, api_url: str, token: str) -> bool:
    rows: list[tuple[Case, int, Any]] = []
    for case in _cases():
        if case.body is not None:
            status, answer = http_json(
                "POST", f"{api_url}/v1/cancellations", case.body, token=token
            )
        else:
            subscription = _subscription(sandbox_url, case)
            status, answer = http_json(
                "POST",
                f"{api_url}/v1/cancellations",
                {
                    "provider": case.provider,
                    "subscription": subscription,
                    "reason": {"code": "too_expensive", "comment": "demo"},
                    "idempotency_key": f"demo-{secrets.token_hex(8)}",
                    "metadata": {"demo_case": case.kind},
                },
                token=token,
            )
        rows.append((case, status, answer))
    deadline = time.monotonic() + 60
    finals: dict[int, dict[str, Any]] = {}
    while time.monotonic() < deadline and len(finals) < sum(1 for _, s, _ in rows if s == 202):
        for i, (case, status, answer) in enumerate(rows):
            if status != 202 or i in finals:
                continue
            _, job = http_json("GET", f"{api_url}/v1/cancellations/{answer['id']}", token=token)
            if job["status"] == "awaiting_decision" and case.decision:
                http_json(
                    "POST",
                    f"{api_url}/v1/cancellations/{answer['id']}/decision",
                    {"decision": case.decision},
                    token=token,
                )
            elif job["status"] in ("finished", "dead_lettered") and any(
                c["result"] == "delivered" and c["event_type"] != "cancellation.offer_presented"
                for c in job.get("callbacks", [])
            ):
                finals[i] = job
        time.sleep(0.2)

    table = outcome_table()
    all_ok = True
    for i, (case, status, answer) in enumerate(rows):
        what = f"{case.provider} {case.kind}{_decision(case)}"
        if status != 202:
            fields = ", ".join(e["field"] for e in (answer or {}).get("errors", []))
            good = case.expect == str(status)
            row = ("-", f"rejected {status}: {fields or answer}", "-")
        elif (job := finals.get(i)) is None:
            good = False
            row = (answer["id"], "unfinished", "-")
        else:
            outcome = (job.get("outcome") or {}).get("type")
            good = outcome == case.expect and (
                case.expect != "not_eligible" or job["outcome"]["reason"] == case.kind
            )
            callbacks = _callbacks_text(sandbox_url, job)
            good = good and "unverified" not in callbacks and "✓" in callbacks
            shown = _outcome_text(job)
            row = (
                job["id"],
                shown if job["status"] == "finished" else f"{job['status']}: {shown}",
                callbacks,
            )
        table.add_row("✓" if good else "✗", str(i + 1), what, *row)
        all_ok &= good
    console.print(table)
    console.print(
        "[bold green]every outcome as expected[/]"
        if all_ok
        else "[bold red]some outcomes were not as expected[/]"
    )
    return all_ok
