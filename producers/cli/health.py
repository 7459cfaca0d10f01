"""``cancelflow healthcheck``: for Docker and Kubernetes (exit 0 healthy, 1 not)."""

from __future__ import annotations

import sys

import click

from producers.cli.common import server_settings as _settings
from producers.cli.main import main


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
