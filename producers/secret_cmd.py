"""``cancelflow secret``: a new callback signing secret, in the Standard Webhooks format.

Prints ``whsec_<base64 of 32 random bytes>``, ready for
``CANCELFLOW_PROVIDERS__<KEY>__CALLBACK_SECRET`` and for the receiver's verifying library.
"""

from __future__ import annotations

import base64
import secrets

import click

from cancelflow.providers.base import CALLBACK_SECRET_PREFIX, callback_secret_key

DEFAULT_BYTES = 32


def new_callback_secret(nbytes: int = DEFAULT_BYTES) -> str:
    """A fresh ``whsec_<base64>`` secret of ``nbytes`` random bytes (24 to 64)."""
    secret = CALLBACK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(nbytes)).decode()
    callback_secret_key(secret)  # the same check the settings make: refuse what they would
    return secret


@click.command("secret")
@click.option(
    "--bytes",
    "nbytes",
    default=DEFAULT_BYTES,
    show_default=True,
    type=click.IntRange(24, 64),
    help="random bytes in the secret",
)
def secret(nbytes: int) -> None:
    """Print a new callback signing secret (whsec_<base64>, Standard Webhooks)."""
    click.echo(new_callback_secret(nbytes))
