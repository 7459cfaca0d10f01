"""The ``cancelflow`` command: run the API, a worker, beat, the sandboxes or the demo, and
operate on jobs and dead letters."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cancelflow.errors import ConfigError
from cancelflow.logging import configure_logging, get_logger
from cancelflow.settings import Settings, load_settings, warn_unknown_env
from producers.flower_cmd import flower
from producers.secret_cmd import secret

T = TypeVar("T")


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        click.echo(f"cancelflow: {exc}", err=True)
        sys.exit(2)


def _run(coro_fn: Callable[[], Any]) -> Any:
    from messaging.dispatch import flush_sent_events

    try:
        return asyncio.run(coro_fn())
    finally:
        flush_sent_events()  # the loop that would have published them has ended


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Cancel subscriptions at third-party providers, reliably."""


main.add_command(flower)
main.add_command(secret)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
def api(host: str, port: int) -> None:
    """Serve the producer HTTP API."""
    from producers.api import create_app, serve

    settings = _settings()
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    warn_unknown_env()
    if not settings.api_tokens:
        click.echo(
            "cancelflow: set CANCELFLOW_API_TOKENS: every route but /healthz needs a token",
            err=True,
        )
        sys.exit(2)
    try:
        app = create_app(settings)
    except ConfigError as exc:  # the billing rules
        click.echo(f"cancelflow: {exc}", err=True)
        sys.exit(2)
    # Once every socket is bound: the line says the API is listening.
    listening = {"url": f"http://{host}:{port}", "providers": sorted(settings.enabled_providers())}
    serve(
        app,
        host=host,
        port=port,
        on_listening=lambda: get_logger(__name__).info("api.listening", **listening),
    )


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option(
    "--queues",
    "-Q",
    default=None,
    help="Comma-separated queues (default: every configured provider's, callbacks, maintenance).",
)
@click.option(
    "--concurrency",
    "-c",
    default=None,
    type=int,
    help="Steps in flight (default: CANCELFLOW_WORKER__CONCURRENCY).",
)
@click.option(
    "--beat",
    "-B",
    is_flag=True,
    help="Also run the periodic tasks (decision deadlines) in this worker.",
)
@click.pass_context
def worker(ctx: click.Context, queues: str | None, concurrency: int | None, beat: bool) -> None:
    """Run a Celery worker; further options go to ``celery worker`` unchanged."""
    settings = _settings()
    from cancelflow.contract import CALLBACKS_QUEUE, MAINTENANCE_QUEUE, provider_queue

    if queues is None:
        queues = ",".join(
            [
                *(provider_queue(k) for k in settings.enabled_providers()),
                CALLBACKS_QUEUE,
                MAINTENANCE_QUEUE,
            ]
        )
    from worker.app import app

    argv = [
        "worker",
        f"--concurrency={concurrency or settings.worker.concurrency}",
        f"--queues={queues}",
        "--task-events",
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={settings.log_level}",
        *(["--beat"] if beat else []),
        *ctx.args,
    ]
    app.worker_main(argv=argv)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def beat(ctx: click.Context) -> None:
    """Run Celery beat (decision deadlines and other periodic tasks)."""
    _settings()
    from worker.app import app

    app.start(argv=["beat", *ctx.args])


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8090, show_default=True, type=int)
@click.option("--token-ttl", default=None, type=int, help="Lifetime of issued tokens, seconds.")
def sandbox(host: str, port: int, token_ttl: int | None) -> None:
    """Serve every provider's sandbox, each under /{provider}."""
    from sandboxes.server import run

    configure_logging(fmt="auto")
    run(host, port, token_ttl_s=token_ttl)


@main.command()
@click.option("--keep-logs", is_flag=True, help="Keep the child processes' logs (path printed).")
def demo(keep_logs: bool) -> None:
    """Run the whole system locally and show every outcome."""
    from producers.demo import run_demo

    sys.exit(run_demo(keep_logs=keep_logs))


# --- health checks (for an orchestrator: exit 0 healthy, 1 not) ------------------------------


@main.group()
def healthcheck() -> None:
    """Health checks for Docker and Kubernetes: exit 0 when healthy, 1 when not."""


@healthcheck.command("worker")
@click.option(
    "--hostname",
    "-n",
    default="celery@%h",
    show_default=True,
    help="The worker's node name, as given to `cancelflow worker -n` (%h: this host).",
)
@click.option(
    "--timeout", default=5.0, show_default=True, type=float, help="Seconds to wait for the pong."
)
def healthcheck_worker(hostname: str, timeout: float) -> None:
    """Ping one worker by node name through the broker (Celery's control ``ping``)."""
    settings = _settings()
    from celery.utils.nodenames import host_format
    from kombu.exceptions import OperationalError

    from messaging.config import create_celery

    node = host_format(hostname)
    celery = create_celery(settings)
    try:
        replies = celery.control.ping(destination=[node], timeout=timeout)
    except (OperationalError, OSError) as exc:
        click.echo(f"unhealthy: broker unreachable ({type(exc).__name__})", err=True)
        sys.exit(1)
    finally:
        celery.close()
    # A reply is {node: {"ok": "pong"}}; a worker too busy to answer in time is unhealthy.
    if not any(reply.get(node, {}).get("ok") == "pong" for reply in replies):
        click.echo(f"unhealthy: no pong from {node} within {timeout:g}s", err=True)
        sys.exit(1)
    click.echo(f"{node}: pong")


@healthcheck.command("http")
@click.argument("url", default="http://127.0.0.1:8080/healthz")
@click.option("--timeout", default=5.0, show_default=True, type=float, help="Seconds.")
def healthcheck_http(url: str, timeout: float) -> None:
    """GET a health URL (the API's /healthz, the sandbox's, Flower's): healthy on a 2xx."""
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise click.BadParameter("must be an http(s) URL", param_hint="URL")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - scheme checked above
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        click.echo(f"unhealthy: {url}: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    if not 200 <= status < 300:
        click.echo(f"unhealthy: {url}: HTTP {status}", err=True)
        sys.exit(1)
    click.echo(f"{url}: {status}")


# --- dead letters ----------------------------------------------------------------------------


@main.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters."""


def _dl_filter(
    provider: str | None, kind: str | None, error_type: str | None, older_than: float | None
) -> Any:
    from datetime import timedelta

    from cancelflow.contract import utcnow
    from cancelflow.dead_letters import DeadLetterFilter

    return DeadLetterFilter(
        provider=provider,
        kind=kind,
        error_type=error_type,
        older_than=utcnow() - timedelta(seconds=older_than) if older_than else None,
    )


_filters = [
    click.option("--provider"),
    click.option("--kind", type=click.Choice(["job", "callback", "poison", "billing_event"])),
    click.option("--error-type"),
    click.option("--older-than", type=float, help="Seconds."),
]


def _with_filters(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_filters):
        fn = option(fn)
    return fn


async def _deps(settings: Settings) -> Any:
    from cancelflow.wiring import build_deps, redis_client

    return build_deps(settings, redis=redis_client(settings))


@dlq.command("list")
@_with_filters
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dlq_list(
    provider: str | None,
    kind: str | None,
    error_type: str | None,
    older_than: float | None,
    limit: int,
    as_json: bool,
) -> None:
    """List dead letters, newest first."""
    settings = _settings()

    async def go() -> Any:
        deps = await _deps(settings)
        return await deps.dead_letters.list(
            _dl_filter(provider, kind, error_type, older_than), limit=limit
        )

    items = _run(go)
    if as_json:
        click.echo(json.dumps([d.model_dump(mode="json") for d in items], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "kind", "provider", "step", "error type", "job", "created")
    for d in items:
        table.add_row(
            d.id, d.kind, d.provider or "", d.step or "", d.error_type, d.job_id or "", d.created_at
        )
    Console().print(table)


@dlq.command("show")
@click.argument("dl_id")
def dlq_show(dl_id: str) -> None:
    """Show one dead letter whole (payload, every error, the last traceback)."""
    settings = _settings()

    async def go() -> Any:
        return await (await _deps(settings)).dead_letters.get(dl_id)

    dl = _run(go)
    if dl is None:
        click.echo(f"no dead letter {dl_id}", err=True)
        sys.exit(1)
    click.echo(json.dumps(dl.model_dump(mode="json"), indent=2))


@dlq.command("replay")
@click.argument("dl_ids", nargs=-1)
@_with_filters
def dlq_replay(
    dl_ids: tuple[str, ...],
    provider: str | None,
    kind: str | None,
    error_type: str | None,
    older_than: float | None,
) -> None:
    """Replay dead letters (by id, or all the filters match) from the step they failed at."""
    settings = _settings()
    from cancelflow import chain
    from cancelflow.errors import CancelflowError
    from messaging.config import create_celery
    from messaging.dispatch import dispatch

    celery = create_celery(settings)

    async def go() -> list[tuple[str, str]]:
        deps = await _deps(settings)
        ids = list(dl_ids) or [
            d.id
            for d in await deps.dead_letters.list(
                _dl_filter(provider, kind, error_type, older_than), limit=100_000
            )
        ]
        results = []
        for dl_id in ids:
            dl = await deps.dead_letters.get(dl_id)
            try:
                nxt = await chain.replay(deps, dl_id)
            except CancelflowError as exc:
                results.append((dl_id, f"not replayed: {exc}"))
                continue
            if nxt.step is not None and dl is not None and dl.job_id:
                dispatch(celery, nxt)
            results.append(
                (dl_id, f"replayed -> {nxt.step.value if nxt.step else 'nothing to do'}")
            )
        return results

    for dl_id, result in _run(go):
        click.echo(f"{dl_id}: {result}")


@dlq.command("purge")
@click.argument("dl_ids", nargs=-1)
@_with_filters
@click.option("--yes", is_flag=True, help="Do not ask.")
def dlq_purge(
    dl_ids: tuple[str, ...],
    provider: str | None,
    kind: str | None,
    error_type: str | None,
    older_than: float | None,
    yes: bool,
) -> None:
    """Delete dead letters (by id, or all the filters match)."""
    settings = _settings()
    if not dl_ids and not yes:
        click.confirm("Purge every dead letter the filters match?", abort=True)

    async def go() -> int:
        deps = await _deps(settings)
        if dl_ids:
            return sum([await deps.dead_letters.delete(i) for i in dl_ids])
        return int(
            await deps.dead_letters.purge(_dl_filter(provider, kind, error_type, older_than))
        )

    click.echo(f"purged {_run(go)}")


# --- producing through the API: enqueue, bulk, status, watch ---------------------------------
#
# These talk to the API with the Python client (``producers.client``), like any backend would:
# they need only a URL and a token, go through the same validation, rate limits and auth, and
# never need Redis credentials. Only ``billing-consumer`` reads Redis (the stream) directly.


# Where ``--token-file``'s token waits for ``_client_settings`` (the option adds no parameter
# to every command).
_FROM_FILE = "cancelflow.from_file"


def _warn_token_argument(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value:
        click.echo(
            "cancelflow: warning: --token is visible to every user of this machine in the "
            "process list; set CANCELFLOW_API_TOKEN or use --token-file",
            err=True,
        )
    return value


def _read_token_file(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        with open(value, encoding="utf-8") as f:
            ctx.meta[_FROM_FILE] = f.read().strip()


def _client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")(fn)
    fn = click.option(
        "--token-file",
        type=click.Path(exists=True, dir_okay=False),
        expose_value=False,
        callback=_read_token_file,
        help="Read the API token from this file (default: CANCELFLOW_API_TOKEN).",
    )(fn)
    fn = click.option(
        "--token",
        default=None,
        callback=_warn_token_argument,
        help="API token. Visible in the process list: prefer CANCELFLOW_API_TOKEN or --token-file.",
    )(fn)
    fn = click.option(
        "--api-url",
        default=None,
        help="API base URL (default: CANCELFLOW_API_URL, else http://127.0.0.1:8080).",
    )(fn)
    return fn


def _client_settings(api_url: str | None, token: str | None) -> Any:
    from pydantic import SecretStr, ValidationError

    from producers.client import ClientSettings

    try:
        conf = ClientSettings()
    except ValidationError as exc:
        click.echo(f"cancelflow: invalid client settings: {exc}", err=True)
        sys.exit(2)
    ctx = click.get_current_context(silent=True)
    token = token or (ctx.meta.get(_FROM_FILE) if ctx is not None else None)
    conf = conf.model_copy(
        update={
            **({"api_url": api_url} if api_url else {}),
            **({"api_token": SecretStr(token)} if token else {}),
        }
    )
    if conf.api_token is None:
        click.echo(
            "cancelflow: no API token: set CANCELFLOW_API_TOKEN or pass --token-file", err=True
        )
        sys.exit(2)
    return conf


def _client(api_url: str | None, token: str | None) -> Any:
    from producers.client import CancelflowClient

    return CancelflowClient(settings=_client_settings(api_url, token))


def _fail(exc: Exception, as_json: bool) -> None:
    """Report a client error and exit 1 (2 for a refused token)."""
    from producers.client import ApiError, AuthError

    if as_json:
        body = (
            exc.problem.model_dump(mode="json", exclude_none=True)
            if isinstance(exc, ApiError)
            else {"error": str(exc)}
        )
        click.echo(json.dumps(body, indent=2))
    else:
        click.echo(f"cancelflow: {exc}", err=True)
        if isinstance(exc, ApiError):
            for error in exc.problem.errors or []:
                click.echo(f"  {error.field}: {error.message}", err=True)
    sys.exit(2 if isinstance(exc, AuthError) else 1)


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        out[key] = value
    return out


def _print_job(job: Any, *, how: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    outcome = job.outcome.type.value if job.outcome else "-"
    status = f"[cyan]{job.status.value}[/cyan]"
    head = f"[bold]{job.id}[/bold]  {job.provider}  {status}  outcome: {outcome}"
    console.print(head + (f"  ({how})" if how else ""))
    console.print(f"subscription: {json.dumps(job.subscription)}")
    if job.outcome and (job.outcome.reason or job.outcome.cancellation_type or job.outcome.error):
        shown = job.outcome.model_dump(mode="json", exclude_none=True, exclude={"details"})
        console.print(f"outcome: {json.dumps(shown)}")
    console.print(f"created {job.created_at}, updated {job.updated_at}")
    if job.timeline:
        table = Table("at", "step", "event", "attempt", "error")
        for e in job.timeline:
            table.add_row(
                e.at,
                e.step,
                e.event,
                str(e.attempt),
                (e.error or {}).get("message", "") if e.error else "",
            )
        console.print(table)


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
@_client_options
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
    from cancelflow.contract import Reason
    from producers.client import ClientError

    subscription: dict[str, Any] = {}
    if subscription_json:
        try:
            subscription = json.loads(subscription_json)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--subscription-json") from None
    subscription.update(_pairs(sub_pairs, "--subscription"))
    reason = (
        Reason(code=reason_code, comment=reason_comment) if reason_code or reason_comment else None
    )
    with _client(api_url, token) as client:
        try:
            enqueued = client.enqueue(
                provider,
                subscription,
                reason=reason,
                callback_url=callback_url,
                idempotency_key=idempotency_key,
                metadata=_pairs(meta_pairs, "--metadata"),
            )
            job, how = enqueued.job, enqueued.how
            if wait_s is not None:
                job = client.wait(job.id, timeout=wait_s)
        except ClientError as exc:
            _fail(exc, as_json)
    if as_json:
        click.echo(json.dumps({"how": how, "job": job.model_dump(mode="json")}, indent=2))
    else:
        _print_job(job, how=how)


@main.command()
@click.argument("job_id")
@_client_options
def status(job_id: str, api_url: str | None, token: str | None, as_json: bool) -> None:
    """Show one job: status, outcome, timeline."""
    from producers.client import ClientError

    with _client(api_url, token) as client:
        try:
            job = client.get(job_id)
        except ClientError as exc:
            _fail(exc, as_json)
    if as_json:
        click.echo(json.dumps(job.model_dump(mode="json"), indent=2))
    else:
        _print_job(job)


def _stats_table(found: Any) -> Any:
    from rich.table import Table

    from cancelflow.contract import Status

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
@_client_options
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

    from producers.client import ClientError

    with _client(api_url, token) as client:

        def fetch() -> Any:
            try:
                return client.stats(since_s=since_s)
            except ClientError as exc:
                _fail(exc, as_json)

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
@_client_options
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

    from producers.bulk import count_rows, run_bulk
    from producers.client import AsyncCancelflowClient

    conf = _client_settings(api_url, token)
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
        summary = _run(go)
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


# --- billing events -------------------------------------------------------------------------


@main.command("billing-consumer")
@click.option(
    "--consumer",
    default=None,
    help="Consumer name in the group (default: CANCELFLOW_BILLING__CONSUMER, else the host name).",
)
@click.option("--check", is_flag=True, help="Check the rules file and exit.")
def billing_consumer(consumer: str | None, check: bool) -> None:
    """Turn billing events from the Redis Stream into cancellations (a consumer group member)."""
    import signal

    from producers.billing_rules import load_rules

    settings = _settings()
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    warn_unknown_env()
    if settings.billing.rules_path is None:
        click.echo(
            "cancelflow: set CANCELFLOW_BILLING__RULES_PATH to a YAML or TOML rules file", err=True
        )
        sys.exit(2)
    try:
        rules = load_rules(settings.billing.rules_path, configured=settings.enabled_providers())
    except ConfigError as exc:
        click.echo(f"cancelflow: {exc}", err=True)
        sys.exit(2)
    if check:
        click.echo(f"{settings.billing.rules_path}: {len(rules.rules)} rules, valid")
        return
    conf = (
        settings.billing.model_copy(update={"consumer": consumer}) if consumer else settings.billing
    )

    async def go() -> None:
        from cancelflow.wiring import build_deps, redis_client
        from messaging.config import create_celery
        from producers.billing import BillingConsumer, BillingProcessor

        redis = redis_client(settings)
        deps = build_deps(settings, redis=redis)
        processor = BillingProcessor(deps, create_celery(settings), rules)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        try:
            await BillingConsumer(processor, redis, conf).run(stop)
        finally:
            await deps.store.flush_marks()
            await redis.aclose()

    get_logger(__name__).info(
        "billing.consumer.starting",
        stream=conf.stream,
        group=conf.group,
        consumer=conf.consumer,
        rules=len(rules.rules),
    )
    _run(go)


if __name__ == "__main__":
    main()
