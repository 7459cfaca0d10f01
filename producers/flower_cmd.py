"""``cancelflow flower``: Flower on the workers' app, refusing to start without authentication.

Flower's HTTP API can send any task and shut workers down, so an open Flower is an open door
to the whole system. This command execs ``celery -A worker.app flower`` with the options it is
given, only once basic auth is set (``FLOWER_BASIC_AUTH`` or ``--basic-auth``), or with
``--no-auth`` on a loopback address.
"""

from __future__ import annotations

import os
import sys

import click

from cancelflow.errors import ConfigError
from cancelflow.settings import load_settings

# What an unchanged example file or an old default would hand out.
_KNOWN_DEFAULT_PASSWORDS = frozenset({"change-me", "changeme", "admin", "password", "flower"})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _option(args: list[str], name: str) -> str | None:
    """The last value of a Flower option in ``--name=value`` or ``--name value`` form, where
    Flower's parser accepts either ``-`` or ``_`` inside the name."""
    found = None
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    for i, arg in enumerate(args):
        key, sep, value = arg.partition("=")
        if key in spellings:
            found = value if sep else (args[i + 1] if i + 1 < len(args) else "")
    return found


def auth_problem(args: list[str], env: dict[str, str], *, no_auth: bool) -> str | None:
    """Why Flower must not start with these options and environment, or None when it may."""
    if env.get("FLOWER_UNAUTHENTICATED_API"):
        return "unset FLOWER_UNAUTHENTICATED_API: Flower's API is only served behind basic auth"
    basic_auth = _option(args, "basic_auth") or env.get("FLOWER_BASIC_AUTH", "")
    address = _option(args, "address") or env.get("FLOWER_ADDRESS", "")
    if no_auth:
        if basic_auth:
            return "--no-auth given together with basic auth credentials: choose one"
        if address not in _LOOPBACK:
            return f"--no-auth needs --address=127.0.0.1 (got {address or 'all interfaces'!r})"
        return None
    if not basic_auth:
        return (
            "set FLOWER_BASIC_AUTH=user:password (or --basic-auth=user:password); "
            "--no-auth runs Flower open on 127.0.0.1 only"
        )
    for pair in basic_auth.split(","):
        user, sep, password = pair.partition(":")
        if not (user and sep and password):
            return "FLOWER_BASIC_AUTH must be user:password[,user:password...]"
        if password.lower() in _KNOWN_DEFAULT_PASSWORDS:
            return f"FLOWER_BASIC_AUTH: {user}'s password is a well-known default; choose another"
    return None


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.option("--no-auth", is_flag=True, help="Run without authentication (loopback only).")
@click.pass_context
def flower(ctx: click.Context, no_auth: bool) -> None:
    """Run Flower on the workers' broker; Flower's options are passed through."""
    args = list(ctx.args)
    problem = auth_problem(args, dict(os.environ), no_auth=no_auth)
    if problem is not None:
        click.echo(f"cancelflow flower: {problem}", err=True)
        sys.exit(2)
    # The broker's URL comes from the settings (worker.app): refuse a bad one in one line
    # here, not with a traceback from Celery's loader.
    try:
        settings = load_settings()
    except ConfigError as exc:
        click.echo(f"cancelflow flower: {exc}", err=True)
        sys.exit(2)
    if (
        settings.broker_kind() == "amqp"
        and settings.broker_management_url
        and _option(args, "broker_api") is None
    ):
        # Flower's Broker page and queue lengths read RabbitMQ's management API.
        args.append(f"--broker-api={settings.broker_management_url.rstrip('/')}/api/")
    # The same interpreter, so it works from a virtualenv that is not on PATH.
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "flower", *args]
    os.execv(sys.executable, argv)  # noqa: S606 - our own interpreter, argv as a list
