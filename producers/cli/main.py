"""The ``cancelflow`` group itself; each command group registers on it from its own module."""

from __future__ import annotations

import errno
import sys
from typing import Any

import click

from cancelflow.errors import ConfigError


class _Main(click.Group):
    """Start-up failures as one line naming what failed, never a traceback: a setting the
    process runners refuse (``ConfigError`` names the variable), a port already taken."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            click.echo(f"cancelflow: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            click.echo(
                f"cancelflow: cannot listen: {exc.strerror or exc}; "
                "another process has the port: stop it or pass --port",
                err=True,
            )
            sys.exit(2)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Cancel subscriptions at third-party providers, reliably.

    The process runners (api, worker, beat, billing-consumer, sandbox, demo, flower) read the
    server's CANCELFLOW_* settings; every other command goes through the API with
    CANCELFLOW_CLIENT__URL and CANCELFLOW_CLIENT__TOKEN only."""
