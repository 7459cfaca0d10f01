"""What the command groups share: the server's settings for the process runners, the API client
and its options for every other command, errors reported as one line, tables and JSON."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import warnings
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

import click
from pydantic import BaseModel, SecretStr
from rich.console import Console
from rich.table import Table

from cancelflow.errors import ConfigError
from cancelflow.settings import Settings, load_settings
from cancelflow_client import (
    ApiError,
    AuthError,
    CancelflowClient,
    ClientError,
    ClientSettings,
    SettingsError,
    TransportError,
    Unauthorized,
)
from cancelflow_client.settings import CLIENT_ENV, TOKEN_VARIABLE

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

URL_VARIABLE = CLIENT_ENV["api_url"][0]


def die(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, then exit (2: bad usage or settings, 1: it failed)."""
    click.echo(f"cancelflow: {message}", err=True)
    sys.exit(code)


# --- the process runners' settings ----------------------------------------------------------


# What the job store and broker URL may be: Redis (redis-py's schemes).
REDIS_SCHEMES = ("redis", "rediss", "unix", "sentinel")


def server_settings() -> Settings:
    """The server's settings, or one line naming the variable that is wrong, and exit 2."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        die(str(exc))
    scheme = settings.redis_url.partition("://")[0].lower()
    if scheme not in REDIS_SCHEMES:
        # Without this, redis-py refuses it deep in start-up, with a traceback.
        die(
            f"CANCELFLOW_REDIS_URL: the job store must be Redis "
            f"(redis://, rediss://, unix:// or sentinel://), not {scheme}://"
        )
    return settings


def run_async(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    from messaging.dispatch import close_publishers, flush_sent_events

    try:
        return asyncio.run(coro_fn())
    finally:
        close_publishers()  # RabbitMQ's: their threads and connections
        flush_sent_events()  # the loop that would have published them has ended


# --- the API client's options ---------------------------------------------------------------
#
# Every command that is not a process runner talks to the API with the Python client
# (``cancelflow_client``), like any backend would: a URL and a token, the API's validation, rate
# limits and auth, and never Redis credentials.

# Where ``--token-file``'s token waits for ``client_settings`` (the option adds no parameter
# to every command).
_FROM_FILE = "cancelflow.from_file"
_SOURCE = "cancelflow.token_source"


def _warn_token_argument(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value:
        click.echo(
            "cancelflow: warning: --token is visible to every user of this machine in the "
            f"process list; set {TOKEN_VARIABLE} or use --token-file",
            err=True,
        )
    return value


def _read_token_file(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        with open(value, encoding="utf-8") as f:
            ctx.meta[_FROM_FILE] = f.read().strip()
        ctx.meta[_SOURCE] = f"--token-file {value}"


def client_options(fn: F) -> F:
    """``--api-url``, ``--token``, ``--token-file`` and ``--json``."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")(fn)
    fn = click.option(
        "--token-file",
        type=click.Path(exists=True, dir_okay=False),
        expose_value=False,
        callback=_read_token_file,
        help=f"Read the API token from this file (default: {TOKEN_VARIABLE}).",
    )(fn)
    fn = click.option(
        "--token",
        default=None,
        callback=_warn_token_argument,
        help=f"API token. Visible in the process list: prefer {TOKEN_VARIABLE} or --token-file.",
    )(fn)
    fn = click.option(
        "--api-url",
        default=None,
        help=f"API base URL (default: {URL_VARIABLE}, else http://127.0.0.1:8080).",
    )(fn)
    return fn


def client_settings(api_url: str | None, token: str | None) -> ClientSettings:
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always", FutureWarning)
            conf = ClientSettings.from_env()
    except SettingsError as exc:
        die(f"invalid client settings: {exc}")
    for warning in warned:  # the old variable names: one line each, not Python's two
        click.echo(f"cancelflow: warning: {warning.message}", err=True)
    ctx = click.get_current_context(silent=True)
    meta = ctx.meta if ctx is not None else {}
    if token:
        meta[_SOURCE] = "--token"
    elif meta.get(_FROM_FILE):
        token = meta[_FROM_FILE]
    elif conf.api_token is not None:
        meta.setdefault(_SOURCE, TOKEN_VARIABLE)
    conf = conf.model_copy(
        update={
            **({"api_url": api_url} if api_url else {}),
            **({"api_token": SecretStr(token)} if token else {}),
        }
    )
    if conf.api_token is None or not conf.api_token.get_secret_value():
        die(f"no API token: set {TOKEN_VARIABLE} or pass --token-file")
    return conf


def client(api_url: str | None, token: str | None) -> CancelflowClient:
    conf = client_settings(api_url, token)
    try:
        return CancelflowClient(settings=conf)
    except ValueError as exc:  # a URL that is not http(s)
        die(f"{exc} (--api-url or {URL_VARIABLE})")


def fail(exc: ClientError, as_json: bool, *, api_url: str | None = None) -> NoReturn:
    """Report a client error and exit: 2 for a refused token, 1 otherwise. The message says
    what failed: a token the API does not know (told apart from none given), the host that did
    not answer, each invalid field."""
    ctx = click.get_current_context(silent=True)
    source = (ctx.meta.get(_SOURCE) if ctx is not None else None) or TOKEN_VARIABLE
    if isinstance(exc, Unauthorized):
        message = (
            f"the API refused the token from {source} ({exc}): it is not one of the "
            "server's CANCELFLOW_API_TOKENS"
        )
    elif isinstance(exc, TransportError):
        message = f"cannot reach the API: {exc} (set {URL_VARIABLE} or --api-url)"
    else:
        message = str(exc)
    if as_json:
        body = (
            exc.problem.model_dump(mode="json", exclude_none=True)
            if isinstance(exc, ApiError)
            else {"error": message}
        )
        click.echo(json.dumps(body, indent=2))
    click.echo(f"cancelflow: {message}", err=True)
    if isinstance(exc, ApiError):
        for error in exc.problem.errors or []:
            click.echo(f"  {error.field}: {error.message}", err=True)
    sys.exit(2 if isinstance(exc, AuthError) else 1)


# --- output ---------------------------------------------------------------------------------


def print_json(value: Any) -> None:
    click.echo(json.dumps(_plain(value), indent=2))


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def table(*columns: str, title: str | None = None) -> Table:
    """A table whose cells are never cut short: see ``print_table``."""
    out = Table(title=title, title_justify="left")
    for column in columns:
        out.add_column(column, no_wrap=True, overflow="ignore")
    return out


def print_table(found: Table, *, err: bool = False) -> None:
    """The table whole, ids in full, whatever the terminal's width and also when piped (rich
    would fit it to the terminal, or to 80 columns in a pipe, cutting cells): lines longer
    than the terminal wrap there instead."""
    wide = Console(width=100_000, stderr=err)
    needed = wide.measure(found).maximum
    here = Console(stderr=err)
    width = max(needed, here.width if here.is_terminal else 0)
    Console(width=width, stderr=err).print(found)


def pairs(values: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        out[key] = value
    return out


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


class Duration(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    """Seconds, or a number with ``s``, ``m``, ``h`` or ``d``: ``90``, ``15m``, ``2h``."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float | int):
            return float(value)
        found = _DURATION.match(str(value))
        if found is None:
            self.fail(f"{value!r} is not a duration (e.g. 90, 15m, 2h, 7d)", param, ctx)
        return float(found[1]) * _UNITS[found[2]]


class When(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    """An ISO 8601 time (UTC if no offset), or a duration ago (``2h``)."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        found = _DURATION.match(str(value))
        if found is not None:
            return datetime.now(UTC) - timedelta(seconds=float(found[1]) * _UNITS[found[2]])
        try:
            parsed = datetime.fromisoformat(str(value))
        except ValueError:
            self.fail(f"{value!r} is neither an ISO 8601 time nor a duration ago (2h)", param, ctx)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
