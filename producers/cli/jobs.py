"""Jobs through the API: ``enqueue``, ``status``, ``decide``, ``jobs``, ``watch``, ``bulk``,
and ``providers`` (each provider's health)."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import click

from cancelflow_client import ClientError, JobRecord, OutcomeType, Reason, Stats, Status
from producers.cli.common import (
    When,
    client,
    client_options,
    client_settings,
    fail,
    pairs,
    print_json,
    print_table,
    run_async,
    table,
)
from producers.cli.main import main


def _print_job(job: JobRecord, *, how: str | None = None) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True)  # the id whole on its line, whatever the width
    outcome = job.outcome.type.value if job.outcome else "-"
    status = f"[cyan]{job.status.value}[/cyan]"
    head = f"[bold]{job.id}[/bold]  {job.provider}  {status}  outcome: {outcome}"
    console.print(head + (f"  ({how})" if how else ""))
    console.print(f"subscription: {json.dumps(job.subscription)}")
    if job.outcome and (job.outcome.reason or job.outcome.cancellation_type or job.outcome.error):
        shown = job.outcome.model_dump(mode="json", exclude_none=True, exclude={"details"})
        console.print(f"outcome: {json.dumps(shown)}")
    if job.offer is not None:
        deadline = job.offer.decision_deadline or "none"
        waiting = job.status is Status.AWAITING_DECISION
        hint = f"; cancelflow decide {job.id} accept|reject" if waiting else ""
        console.print(
            f"offer: {job.offer.kind} {job.offer.offer_identifier or ''} "
            f"(decision due {deadline}{hint})"
        )
    console.print(f"created {job.created_at}, updated {job.updated_at}")
    if job.timeline:
        steps = table("at", "step", "event", "attempt", "error")
        for e in job.timeline:
            steps.add_row(
                e.at.isoformat(),
                e.step,
                e.event,
                str(e.attempt),
                (e.error or {}).get("message", "") if e.error else "",
            )
        print_table(steps)


@main.command()
@click.option("--provider", "-p", required=True, help="Provider key, e.g. payway.")
@click.option(
    "--subscription",
    "-s",
    "sub_pairs",
    multiple=True,
    metavar="FIELD=VALUE",
    help="A field of the provider's reference (repeat).",
)
@click.option("--subscription-json", default=None, help="The whole reference as a JSON object.")
@click.option("--reason-code", default=None)
@click.option("--reason-comment", default=None)
@click.option("--callback-url", default=None)
@click.option(
    "--idempotency-key",
    default=None,
    help="Default: a fresh key (retries inside this command stay safe).",
)
@click.option("--metadata", "-m", "meta_pairs", multiple=True, metavar="KEY=VALUE", help="Repeat.")
@click.option(
    "--wait",
    "wait_s",
    default=None,
    type=float,
    metavar="SECONDS",
    help="Wait up to this long for the job to finish.",
)
@client_options
def enqueue(
    provider: str,
    sub_pairs: tuple[str, ...],
    subscription_json: str | None,
    reason_code: str | None,
    reason_comment: str | None,
    callback_url: str | None,
    idempotency_key: str | None,
    meta_pairs: tuple[str, ...],
    wait_s: float | None,
    api_url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Queue one cancellation."""
    subscription: dict[str, Any] = {}
    if subscription_json:
        try:
            subscription = json.loads(subscription_json)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--subscription-json") from None
    subscription.update(pairs(sub_pairs, "--subscription"))
    reason = (
        Reason(code=reason_code, comment=reason_comment) if reason_code or reason_comment else None
    )
    with client(api_url, token) as api:
        try:
            enqueued = api.enqueue(
                provider,
                subscription,
                reason=reason,
                callback_url=callback_url,
                idempotency_key=idempotency_key,
                metadata=pairs(meta_pairs, "--metadata"),
            )
            job, how = enqueued.job, enqueued.how
            if wait_s is not None:
                job = api.wait(job.id, timeout=wait_s)
        except ClientError as exc:
            fail(exc, as_json)
    if as_json:
        click.echo(json.dumps({"how": how, "job": job.model_dump(mode="json")}, indent=2))
    else:
        _print_job(job, how=how)


@main.command()
@click.argument("job_id")
@client_options
def status(job_id: str, api_url: str | None, token: str | None, as_json: bool) -> None:
    """Show one job: status, outcome, timeline."""
    with client(api_url, token) as api:
        try:
            job = api.get(job_id)
        except ClientError as exc:
            fail(exc, as_json)
    if as_json:
        click.echo(json.dumps(job.model_dump(mode="json"), indent=2))
    else:
        _print_job(job)


def _stats_table(found: Stats) -> Any:
    from rich.table import Table

    statuses = [s.value for s in Status]
    table = Table("provider", *statuses, "total", title=f"jobs created since {found.since}")
    for provider, counts in found.jobs.items():
        table.add_row(
            provider, *(str(counts.get(s, 0) or "") for s in statuses), str(sum(counts.values()))
        )
    totals = [sum(c.get(s, 0) for c in found.jobs.values()) for s in statuses]
    table.add_row(
        "[bold]all[/bold]", *(str(t or "") for t in totals), f"[bold]{found.total}[/bold]"
    )
    billing = ", ".join(f"{k} {v}" for k, v in sorted(found.billing.items())) or "none"
    table.caption = f"dead letters: {found.dead_letters}   billing events: {billing}"
    return table


@main.command()
@click.option(
    "--interval", default=2.0, show_default=True, type=float, help="Seconds between refreshes."
)
@click.option(
    "--since",
    "since_s",
    default=24 * 3600.0,
    show_default=True,
    type=float,
    help="Count jobs created in the last this many seconds.",
)
@click.option("--once", is_flag=True, help="Print the counts once and exit.")
@client_options
def watch(
    interval: float,
    since_s: float,
    once: bool,
    api_url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Live counts of jobs by provider and status (and dead letters, billing events).

    With --json, one JSON object per refresh (JSON Lines)."""
    import time

    from rich.console import Console
    from rich.live import Live

    with client(api_url, token) as api:

        def fetch() -> Any:
            try:
                return api.stats(since_s=since_s)
            except ClientError as exc:
                fail(exc, as_json)

        if as_json or once:
            while True:
                found = fetch()
                if as_json:
                    click.echo(json.dumps(found.model_dump(mode="json")))
                else:
                    Console().print(_stats_table(found))
                if once:
                    return
                time.sleep(interval)
        try:
            with Live(_stats_table(fetch()), refresh_per_second=4) as live:
                while True:
                    time.sleep(interval)
                    live.update(_stats_table(fetch()))
        except KeyboardInterrupt:
            pass


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Per-row report, JSON Lines (default: FILE.report.jsonl); "
    "also the journal a second run resumes from.",
)
@click.option(
    "--rate",
    default=50.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Rows sent per second, at most.",
)
@click.option(
    "--concurrency",
    default=8,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Requests in flight.",
)
@click.option("--provider", default=None, help="Provider of rows that name none.")
@click.option(
    "--key-prefix",
    default="",
    help="Namespace for derived idempotency keys (to send the same rows again as new jobs).",
)
@client_options
def bulk(
    file: Path,
    report_path: Path | None,
    rate: float,
    concurrency: int,
    provider: str | None,
    key_prefix: str,
    api_url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Queue a cancellation per row of a CSV or JSON Lines FILE.

    Exit status: 0 every row has a job, 1 some rows failed (see the report), 2 the token was
    refused, 130 interrupted (run it again to go on)."""
    import signal

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from cancelflow_client import AsyncCancelflowClient
    from producers.bulk import count_rows, run_bulk

    conf = client_settings(api_url, token)
    report_path = report_path or file.with_name(file.name + ".report.jsonl")
    err = Console(stderr=True)
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=as_json or not err.is_terminal,
    )
    task = progress.add_task(file.name, total=count_rows(file))

    async def go() -> Any:
        current = asyncio.current_task()
        assert current is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, current.cancel)
        async with AsyncCancelflowClient(settings=conf) as client:
            return await run_bulk(
                client,
                file,
                report_path=report_path,
                rate=rate,
                concurrency=concurrency,
                provider=provider,
                key_prefix=key_prefix,
                advance=lambda: progress.advance(task),
            )

    with progress:
        summary = run_async(go)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        state = (
            "interrupted"
            if summary.interrupted
            else ("aborted: " + summary.aborted if summary.aborted else "done")
        )
        this_run = (
            ", ".join(f"{k} {v}" for k, v in sorted(summary.this_run.items())) or "nothing to do"
        )
        err.print(f"{state} in {summary.elapsed_s:.1f}s. This run: {this_run}.")
        err.print(
            f"{summary.rows} rows: {summary.with_job} with a job, {summary.failed} failed. "
            f"Report: {summary.report}"
        )
    if summary.interrupted:
        sys.exit(130)
    if summary.aborted:
        sys.exit(2)
    sys.exit(1 if summary.failed else 0)


# --- decide, jobs, providers --------------------------------------------------------------------


@main.command()
@click.argument("job_id")
@click.argument("decision", type=click.Choice(["accept", "reject"]))
@click.option("--survey", "-s", "survey_pairs", multiple=True, metavar="KEY=VALUE", help="Repeat.")
@click.option("--survey-json", default=None, help="The whole survey as a JSON object.")
@click.option(
    "--wait",
    "wait_s",
    default=None,
    type=float,
    metavar="SECONDS",
    help="Wait up to this long for the job to finish.",
)
@client_options
def decide(
    job_id: str,
    decision: str,
    survey_pairs: tuple[str, ...],
    survey_json: str | None,
    wait_s: float | None,
    api_url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Send a customer's DECISION on the retention offer of a job awaiting one: accept (the job
    ends retained) or reject (it goes on to confirm the cancellation)."""
    survey: dict[str, Any] | None = None
    if survey_json:
        try:
            survey = json.loads(survey_json)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--survey-json") from None
        if not isinstance(survey, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--survey-json")
    if survey_pairs:
        survey = {**(survey or {}), **pairs(survey_pairs, "--survey")}
    wanted: Literal["accept", "reject"] = "accept" if decision == "accept" else "reject"
    with client(api_url, token) as api:
        try:
            job = api.decide(job_id, wanted, survey=survey)
            if wait_s is not None:
                job = api.wait(job.id, timeout=wait_s)
        except ClientError as exc:
            fail(exc, as_json)
    if as_json:
        print_json(job)
    else:
        _print_job(job)


def _cell(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if value else ""


@main.command("jobs")
@click.option("--id", "job_id", default=None, help="One job by its id.")
@click.option("--provider", "-p", default=None)
@click.option(
    "--status", multiple=True, type=click.Choice([s.value for s in Status]), help="Repeat."
)
@click.option(
    "--outcome", multiple=True, type=click.Choice([o.value for o in OutcomeType]), help="Repeat."
)
@click.option(
    "--reference", "-r", default=None, help="A part of any value of the subscription reference."
)
@click.option("--idempotency-key", default=None)
@click.option(
    "--metadata", "-m", "meta_pairs", multiple=True, metavar="KEY=VALUE", help="Repeat: all match."
)
@click.option(
    "--since",
    "created_after",
    type=When(),
    default=None,
    help="Created at or after: ISO 8601 (UTC if no offset) or a duration ago (2h, 7d).",
)
@click.option(
    "--until", "created_before", type=When(), default=None, help="Created before (as --since)."
)
@click.option(
    "--limit", default=50, show_default=True, type=click.IntRange(1, 10_000), help="Jobs shown."
)
@click.option("--cursor", default=None, help="Go on from a previous run's next cursor.")
@client_options
def jobs(
    job_id: str | None,
    provider: str | None,
    status: tuple[str, ...],
    outcome: tuple[str, ...],
    reference: str | None,
    idempotency_key: str | None,
    meta_pairs: tuple[str, ...],
    created_after: datetime | None,
    created_before: datetime | None,
    limit: int,
    cursor: str | None,
    api_url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Find jobs, newest first, by the console's filters. Exit 1 when none matches.

    Follows the API's cursor pages until --limit jobs are found or none is left; a "next"
    cursor is printed (stderr, or next_cursor in --json) when more may match."""
    metadata = pairs(meta_pairs, "--metadata")
    found: list[Any] = []
    with client(api_url, token) as api:
        try:
            if job_id:
                job = api.get(job_id)
                found = [job]
                cursor = None
            else:
                while len(found) < limit:
                    page = api.list(
                        provider=provider,
                        status=list(status) or None,
                        outcome=list(outcome) or None,
                        reference=reference,
                        idempotency_key=idempotency_key,
                        metadata=metadata or None,
                        created_after=created_after,
                        created_before=created_before,
                        limit=min(500, limit - len(found)),
                        cursor=cursor,
                    )
                    found += page.items
                    cursor = page.next_cursor
                    if cursor is None:
                        break
        except ClientError as exc:
            fail(exc, as_json)
    if as_json:
        print_json({"items": found, "next_cursor": cursor})
    else:
        shown = table("id", "provider", "status", "outcome", "created", "subscription", "metadata")
        for job in found:
            kind = job.outcome.type if isinstance(job, JobRecord) and job.outcome else job.outcome
            shown.add_row(
                job.id,
                job.provider,
                job.status.value,
                kind.value if kind else "",
                job.created_at.isoformat(),
                _cell(job.subscription),
                _cell(job.metadata),
            )
        if found:
            print_table(shown)
        if cursor:
            click.echo(f"more may match: --cursor {cursor}", err=True)
    if not found:
        click.echo("cancelflow: no job matches", err=True)
        sys.exit(1)


@main.command()
@client_options
def providers(api_url: str | None, token: str | None, as_json: bool) -> None:
    """Each configured provider's health: its circuit breaker (shared by every worker), calls
    in flight now, and the error rate of its jobs of the last hour (dead-lettered / ended).
    Exit 1 when a circuit is open."""
    with client(api_url, token) as api:
        try:
            found = api.providers().items
        except ClientError as exc:
            fail(exc, as_json)
    if as_json:
        print_json(found)
    else:
        shown = table(
            "provider", "circuit", "open for", "failures", "opened", "in flight", "jobs 1h",
            "dead-lettered 1h", "error rate",
        )  # fmt: skip
        for p in found:
            shown.add_row(
                p.provider,
                p.circuit,
                f"{p.open_for_s:g}s" if p.open_for_s else "",
                str(p.consecutive_failures),
                str(p.times_opened),
                str(p.in_flight),
                str(p.jobs_last_hour),
                str(p.dead_lettered_last_hour),
                f"{p.error_rate:.1%}" if p.error_rate is not None else "-",
            )
        print_table(shown)
    if any(p.circuit == "open" for p in found):
        sys.exit(1)
