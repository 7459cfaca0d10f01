"""structlog set-up: JSON lines in production, readable lines in a terminal, secrets redacted.

A JSON line is what log collectors (Cloud Logging, Datadog, Loki's JSON parser) read without
configuration: the event name under ``message``, ``level``, ``timestamp`` (RFC 3339, UTC,
``Z``), ``logger``, then the event's fields.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

LogFormat = Literal["auto", "json", "console"]

# A key is secret if one of its words (split at camelCase, snake_case, kebab-case, dots) is
# one of these, or if, with the separators dropped, it contains one of ``_SECRET_PARTS``
# ("apikey", "refreshtoken", "setcookie" written as one word). "key" and "auth" count as whole
# words only, so "monkey" or "author" pass.
_SECRET_WORDS = frozenset(
    {
        "auth",
        "authorization",
        "cookie",
        "cookies",
        "credential",
        "credentials",
        "key",
        "keys",
        "passphrase",
        "passwd",
        "password",
        "secret",
        "secrets",
        "signature",
        "token",
        "tokens",
    }
)
_SECRET_PARTS = (
    "apikey",
    "authorization",
    "cookie",
    "credential",
    "passwd",
    "password",
    "secret",
    "signature",
    "token",
)
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
REDACTED = "[redacted]"
# Keys that name or describe a secret without holding one: kept, so the logs still say which
# token made a request and which OAuth method a provider asked for.
_NOT_SECRET = frozenset(
    {"token_name", "token_type", "token_url", "oauth_signature_method", "idempotency_key"}
)


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """Whether a value under ``key`` is a secret, in any case or style (``refresh_token``,
    ``apiKey``, ``X-Api-Key``, ``oauth_signature``, ``Set-Cookie``)."""
    if key.lower().replace("-", "_") in _NOT_SECRET:
        return False
    words = {w.lower() for w in _WORDS.findall(key)}
    if words & _SECRET_WORDS:
        return True
    compact = "".join(ch for ch in key.lower() if ch.isalnum())
    return any(part in compact for part in _SECRET_PARTS)


def _container(value: Any) -> dict[Any, Any] | list[Any] | None:
    if isinstance(value, dict):
        return {}
    if isinstance(value, list | tuple):
        return []
    return None


def redact(value: Any) -> Any:
    """Return ``value`` with every secret-looking key's value replaced, at any depth.

    Iterative, not recursive: a provider's answer nested thousands deep is redacted too
    rather than raising ``RecursionError``. Tuples come back as lists (as JSON would).
    """
    root = _container(value)
    if root is None:
        return value
    pending: list[tuple[Any, dict[Any, Any] | list[Any]]] = [(value, root)]
    while pending:
        source, target = pending.pop()
        pairs = source.items() if isinstance(source, dict) else enumerate(source)
        for k, v in pairs:
            if isinstance(source, dict) and is_secret_key(str(k)):
                out: Any = REDACTED
            else:
                out = _container(v)
                if out is None:
                    out = v
                else:
                    pending.append((v, out))
            if isinstance(target, dict):
                target[k] = out
            else:
                target.append(out)
    return root


def _redact_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if key != "event" and is_secret_key(key):
            event_dict[key] = REDACTED
        elif isinstance(event_dict[key], dict | list | tuple):
            event_dict[key] = redact(event_dict[key])
    return event_dict


def configure_logging(*, fmt: LogFormat = "auto", level: str = "INFO") -> None:
    """Configure structlog and the stdlib root logger (Celery, aiohttp) to share one format.

    Our own lines go straight from structlog to stderr (no stdlib record, handler or
    formatter on the way: a worker writes several per job); the stdlib's records (Celery,
    aiohttp) pass the same processors through ``ProcessorFormatter``.
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_processor,
    ]
    # Celery's and aiohttp's own records carry exc_info as a tuple: render it as text too.
    foreign = [*shared, structlog.stdlib.add_logger_name, structlog.processors.format_exc_info]
    # structlog keeps the event name under "event"; collectors look for "message". Renamed
    # last, just before rendering: the console renderer and the processors above read "event".
    rendering: list[Any] = (
        [structlog.processors.EventRenamer("message"), structlog.processors.JSONRenderer()]
        if use_json
        else [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.add_logger_name,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            *rendering,
        ],
        logger_factory=_NamedWriteLoggerFactory(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=foreign,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log repeats what our own request logging says.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Celery's "Task ... received" and "... succeeded in" lines, two per task, repeat what
    # the steps' own lines say with the job id, and cost a worker more CPU than those: shown
    # at DEBUG only. Failures and warnings still come through.
    quiet = logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(quiet)


def get_logger(name: str) -> Any:
    """A structlog logger; context bound with ``bind_contextvars`` rides along."""
    return structlog.get_logger(name)


class _NamedWriteLoggerFactory(structlog.WriteLoggerFactory):
    """structlog's writer to a file, named as ``get_logger`` was called (``add_logger_name``
    reads the name, as it does a stdlib logger's)."""

    def __call__(self, *args: Any) -> structlog.WriteLogger:
        logger = super().__call__()
        logger.name = str(args[0]) if args else "root"  # type: ignore[attr-defined]
        return logger
