"""The ``cancelflow`` command: run the API, a worker, beat, the sandboxes or the demo, and
operate on jobs and dead letters."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from cancelflow.errors import ConfigError
from cancelflow.logging import configure_logging
from cancelflow.settings import Settings, load_settings

T = TypeVar("T")


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        click.echo(f"cancelflow: {exc}", err=True)
        sys.exit(2)


def _run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Cancel subscriptions at third-party providers, reliably."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
def api(host: str, port: int) -> None:
    """Serve the producer HTTP API."""
    from aiohttp import web

    from producers.api import create_app

    settings = _settings()
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    if not settings.api_tokens:
        click.echo("cancelflow: set CANCELFLOW_API_TOKENS: every route but /healthz needs a token", err=True)
        sys.exit(2)
    web.run_app(create_app(settings), host=host, port=port, access_log=None, print=None)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--queues", "-Q", default=None, help="Comma-separated queues (default: every configured provider's, callbacks, maintenance).")
@click.option("--concurrency", "-c", default=None, type=int, help="Threads (default: CANCELFLOW_WORKER__CONCURRENCY).")
@click.option("--beat", "-B", is_flag=True, help="Also run the periodic tasks (decision deadlines) in this worker.")
@click.pass_context
def worker(ctx: click.Context, queues: str | None, concurrency: int | None, beat: bool) -> None:
    """Run a Celery worker; further options go to ``celery worker`` unchanged."""
    settings = _settings()
    from cancelflow.contract import CALLBACKS_QUEUE, MAINTENANCE_QUEUE, provider_queue

    if queues is None:
        queues = ",".join([*(provider_queue(k) for k in settings.enabled_providers()), CALLBACKS_QUEUE, MAINTENANCE_QUEUE])
    from worker.app import app

    argv = [
        "worker",
        "--pool=threads",
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
@click.option("--hostname", "-n", default="celery@%h", show_default=True, help="The worker's node name, as given to `cancelflow worker -n` (%h: this host).")
@click.option("--timeout", default=5.0, show_default=True, type=float, help="Seconds to wait for the pong.")
def healthcheck_worker(hostname: str, timeout: float) -> None:
    """Ping one worker by node name through the broker (Celery's control ``ping``)."""
    settings = _settings()
    from celery.utils.nodenames import host_format
    from kombu.exceptions import OperationalError

    from cancelflow.messaging import create_celery

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


def _dl_filter(provider: str | None, kind: str | None, error_type: str | None, older_than: float | None) -> Any:
    from datetime import timedelta

    from cancelflow.contract import utcnow
    from cancelflow.dead_letters import DeadLetterFilter

    return DeadLetterFilter(
        provider=provider, kind=kind, error_type=error_type,  # type: ignore[arg-type]
        older_than=utcnow() - timedelta(seconds=older_than) if older_than else None,
    )


_filters = [
    click.option("--provider"),
    click.option("--kind", type=click.Choice(["job", "callback", "poison"])),
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
def dlq_list(provider: str | None, kind: str | None, error_type: str | None, older_than: float | None, limit: int, as_json: bool) -> None:
    """List dead letters, newest first."""
    settings = _settings()

    async def go() -> Any:
        deps = await _deps(settings)
        return await deps.dead_letters.list(_dl_filter(provider, kind, error_type, older_than), limit=limit)

    items = _run(go)
    if as_json:
        click.echo(json.dumps([d.model_dump(mode="json") for d in items], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "kind", "provider", "step", "error type", "job", "created")
    for d in items:
        table.add_row(d.id, d.kind, d.provider or "", d.step or "", d.error_type, d.job_id or "", d.created_at)
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
def dlq_replay(dl_ids: tuple[str, ...], provider: str | None, kind: str | None, error_type: str | None, older_than: float | None) -> None:
    """Replay dead letters (by id, or all the filters match) from the step they failed at."""
    settings = _settings()
    from cancelflow import steps
    from cancelflow.errors import CancelflowError
    from cancelflow.messaging import create_celery, send_step

    celery = create_celery(settings)

    async def go() -> list[tuple[str, str]]:
        deps = await _deps(settings)
        ids = list(dl_ids) or [d.id for d in await deps.dead_letters.list(_dl_filter(provider, kind, error_type, older_than), limit=100_000)]
        results = []
        for dl_id in ids:
            dl = await deps.dead_letters.get(dl_id)
            try:
                nxt = await steps.replay(deps, dl_id)
            except CancelflowError as exc:
                results.append((dl_id, f"not replayed: {exc}"))
                continue
            if nxt.step is not None and dl is not None and dl.job_id:
                send_step(celery, nxt.step, dl.job_id, nxt.provider, *nxt.args)
            results.append((dl_id, f"replayed -> {nxt.step.value if nxt.step else 'nothing to do'}"))
        return results

    for dl_id, result in _run(go):
        click.echo(f"{dl_id}: {result}")


@dlq.command("purge")
@click.argument("dl_ids", nargs=-1)
@_with_filters
@click.option("--yes", is_flag=True, help="Do not ask.")
def dlq_purge(dl_ids: tuple[str, ...], provider: str | None, kind: str | None, error_type: str | None, older_than: float | None, yes: bool) -> None:
    """Delete dead letters (by id, or all the filters match)."""
    settings = _settings()
    if not dl_ids and not yes:
        click.confirm("Purge every dead letter the filters match?", abort=True)

    async def go() -> int:
        deps = await _deps(settings)
        if dl_ids:
            return sum([await deps.dead_letters.delete(i) for i in dl_ids])
        return int(await deps.dead_letters.purge(_dl_filter(provider, kind, error_type, older_than)))

    click.echo(f"purged {_run(go)}")


if __name__ == "__main__":
    main()
