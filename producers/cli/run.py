"""The process runners: ``api``, ``worker``, ``beat``, ``sandbox``, ``demo`` and
``billing-consumer`` (``flower`` is ``producers.flower_cmd``). Only these read the server's
settings (``CANCELFLOW_*``, Redis among them); every other command goes through the API."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from cancelflow import tracing
from cancelflow.errors import ConfigError
from cancelflow.logging import configure_logging, get_logger
from cancelflow.settings import Settings, warn_unknown_env
from producers.cli.common import run_async as _run
from producers.cli.common import server_settings as _settings
from producers.cli.main import main

F = TypeVar("F", bound=Callable[..., Any])


def _processes_option(what: str, setting: str) -> Callable[[F], F]:
    """``--processes`` of a process runner (``producers.supervisor``)."""
    return click.option(
        "--processes",
        default=None,
        type=click.IntRange(1, 64),
        help=f"{what}: one per core uses them all (default: {setting}).",
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@_processes_option("API processes on the one port", "CANCELFLOW_API__PROCESSES")
@click.option("--reuse-port", is_flag=True, hidden=True, help="SO_REUSEPORT (--processes' own).")
def api(host: str, port: int, processes: int | None, reuse_port: bool) -> None:
    """Serve the producer HTTP API."""
    from producers.api import create_app, new_event_loop, serve

    settings = _settings()
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    warn_unknown_env()
    if not settings.api_tokens:
        click.echo(
            "cancelflow: set CANCELFLOW_API_TOKENS: every route but /healthz needs a token",
            err=True,
        )
        sys.exit(2)
    processes = processes or settings.api.processes
    if processes > 1:
        if port == 0:
            click.echo("cancelflow: --processes needs a port of its own, not 0", err=True)
            sys.exit(2)
        from producers.local import cancelflow_command
        from producers.supervisor import api_children, exec_supervisor

        children, metrics_dir = api_children(
            cancelflow_command("api", "--host", host, "--port", str(port), "--reuse-port"),
            processes,
            console_secret=settings.api.console_secret is not None,
        )
        exec_supervisor(children, log_format=settings.log_format, remove_dir=metrics_dir)
    try:
        app = create_app(settings)
        loop = new_event_loop(settings)
    except ConfigError as exc:  # the billing rules, uvloop asked for and missing
        click.echo(f"cancelflow: {exc}", err=True)
        sys.exit(2)
    # Once every socket is bound: the line says the API is listening, and on which loop.
    listening = {"url": f"http://{host}:{port}", "providers": sorted(settings.enabled_providers())}
    serve(
        app,
        host=host,
        port=port,
        reuse_port=reuse_port,
        on_listening=lambda: get_logger(__name__).info(
            "api.listening", **listening, event_loop=type(loop).__module__.split(".")[0]
        ),
        loop_factory=lambda: loop,
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
@_processes_option("Worker processes, each with --concurrency", "CANCELFLOW_WORKER__PROCESSES")
@click.option(
    "--beat",
    "-B",
    is_flag=True,
    help="Also run the periodic tasks (decision deadlines) in this worker.",
)
@click.pass_context
def worker(
    ctx: click.Context,
    queues: str | None,
    concurrency: int | None,
    processes: int | None,
    beat: bool,
) -> None:
    """Run a Celery worker; further options go to ``celery worker`` unchanged."""
    settings = _settings()
    processes = processes or settings.worker.processes
    if processes > 1:
        sys.exit(_supervise(ctx, settings, queues, concurrency, processes, beat))
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
    from messaging.patches import run_celery_command

    sys.exit(run_celery_command(app, argv))


def _supervise(
    ctx: click.Context,
    settings: Settings,
    queues: str | None,
    concurrency: int | None,
    processes: int,
    beat: bool,
) -> int:
    """Become ``producers.supervisor`` over ``processes`` one-process workers of these options."""
    from producers.local import cancelflow_command
    from producers.supervisor import exec_supervisor, split_hostname, worker_children

    hostname, rest = split_hostname(ctx.args)
    command = cancelflow_command(
        "worker",
        *(["--queues", queues] if queues else []),
        *(["--concurrency", str(concurrency)] if concurrency else []),
        *rest,
    )
    try:
        children = worker_children(
            command,
            processes,
            hostname=hostname or "celery@%h",
            metrics_port=settings.worker.metrics_port,
            beat=beat,
        )
    except ValueError as exc:
        click.echo(f"cancelflow: --processes {processes}: no room for {exc}", err=True)
        return 2
    exec_supervisor(children, log_format=settings.log_format)
    return 0  # not reached: exec_supervisor replaces this process


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
@click.option(
    "--print-env",
    is_flag=True,
    help="Print the settings that point every provider, and the result callbacks, at this "
    "sandbox (as export lines, for eval), then exit.",
)
def sandbox(host: str, port: int, token_ttl: int | None, print_env: bool) -> None:
    """Serve every provider's sandbox, each under /{provider}."""
    if print_env:
        import shlex

        from sandboxes.env import sandbox_env

        for name, value in sandbox_env(f"http://{host}:{port}").items():
            click.echo(f"export {name}={shlex.quote(value)}")
        return
    from sandboxes.server import run

    configure_logging(fmt="auto")
    run(host, port, token_ttl_s=token_ttl)


@main.command()
@click.option("--keep-logs", is_flag=True, help="Keep the child processes' logs (path printed).")
@click.option(
    "--keep",
    is_flag=True,
    help="Leave the system running after the table (until Ctrl-C), and print the console's "
    "URL and a token to sign in with.",
)
def demo(keep_logs: bool, keep: bool) -> None:
    """Run the whole system locally and show every outcome."""
    from producers.demo import run_demo

    sys.exit(run_demo(keep_logs=keep_logs, keep=keep))


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

        tracing.configure(settings, service="cancelflow-billing")
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
            tracing.flush()

    get_logger(__name__).info(
        "billing.consumer.starting",
        stream=conf.stream,
        group=conf.group,
        consumer=conf.consumer,
        rules=len(rules.rules),
    )
    _run(go)
