"""Which broker and which job store a URL names, checked at start-up (no Celery, no kombu).

The broker (``CANCELFLOW_BROKER_URL``) is Redis or RabbitMQ; the job store
(``CANCELFLOW_REDIS_URL``) is always Redis. Either Redis may be reached through Sentinel
(``sentinel://``). A URL whose scheme cannot work is refused with one line naming what
would, instead of a traceback from whichever client first tries it.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

BrokerKind = Literal["redis", "amqp"]

REDIS_SCHEMES = ("redis", "rediss", "unix")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


def scheme_of(url: str) -> str:
    """The URL's scheme, lower case ("" when it has none)."""
    return urlsplit(url.strip()).scheme.lower()


def broker_kind(url: str) -> BrokerKind:
    """``amqp`` for a RabbitMQ URL, ``redis`` for a Redis one (``ValueError`` otherwise)."""
    scheme = scheme_of(url)
    if scheme in AMQP_SCHEMES:
        return "amqp"
    if scheme in REDIS_SCHEMES:
        return "redis"
    raise ValueError(
        f"scheme {scheme or '(none)'!r} is not a broker Cancelflow runs on: use "
        f"{', '.join(s + '://' for s in AMQP_SCHEMES[:2])} (RabbitMQ) or "
        f"{', '.join(s + '://' for s in REDIS_SCHEMES)} (Redis)"
    )


def check_store_url(url: str) -> str:
    """``url`` if it names a Redis for the job store, else ``ValueError`` saying why."""
    scheme = scheme_of(url)
    if scheme in REDIS_SCHEMES:
        return url
    hint = "; a RabbitMQ broker goes in CANCELFLOW_BROKER_URL" if scheme in AMQP_SCHEMES else ""
    raise ValueError(
        f"scheme {scheme or '(none)'!r} is not Redis: the job store needs "
        f"{', '.join(s + '://' for s in REDIS_SCHEMES)}{hint}"
    )


def check_broker_url(url: str) -> str:
    """``url`` if it names a broker Cancelflow runs on, else ``ValueError`` saying why."""
    broker_kind(url)
    return url
