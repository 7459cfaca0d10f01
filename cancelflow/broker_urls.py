"""Which broker and which job store a URL names, checked at start-up (no Celery, no kombu).

The broker (``CANCELFLOW_BROKER_URL``) is Redis or RabbitMQ; the job store
(``CANCELFLOW_REDIS_URL``) is always Redis. Either Redis may be reached through Sentinel
(``sentinel://``). A URL whose scheme cannot work is refused with one line naming what
would, instead of a traceback from whichever client first tries it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

BrokerKind = Literal["redis", "amqp"]

REDIS_SCHEMES = ("redis", "rediss", "unix", "sentinel")
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


@dataclass(frozen=True)
class SentinelUrl:
    """A Redis reached through Sentinel: ``sentinel://[[user]:password@]host:port[;sentinel://
    host:port...][/db]?master=NAME``, the sentinels separated by ``;`` (kombu's form), the
    master's name in the query (Cancelflow's; kombu takes it as a transport option)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    username: str | None
    password: str | None

    def kombu_url(self) -> str:
        """The URL kombu's Sentinel transport takes (no query; the master goes apart)."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:{self.password}@"
        first, *rest = (f"sentinel://{h}:{p}" for h, p in self.sentinels)
        first = first.replace("sentinel://", f"sentinel://{auth}", 1)
        return ";".join([first, *rest]) + f"/{self.db}"


def parse_sentinel(url: str) -> SentinelUrl:
    """The sentinels, master and DB a ``sentinel://`` URL names (``ValueError`` if unclear)."""
    sentinels: list[tuple[str, int]] = []
    master: str | None = None
    db = 0
    username = password = None
    for n, part in enumerate(url.strip().split(";")):
        split = urlsplit(part)
        if split.scheme.lower() != "sentinel" or not split.hostname:
            raise ValueError("each sentinel is sentinel://host:port, separated by ';'")
        sentinels.append((split.hostname, split.port or 26379))
        if n == 0 and split.password is not None:
            username, password = unquote(split.username or "") or None, unquote(split.password)
        if split.path.strip("/"):
            try:
                db = int(split.path.strip("/"))
            except ValueError:
                raise ValueError("the DB (the path) is a number") from None
        master = next(iter(parse_qs(split.query).get("master", [])), master)
    if not master:
        raise ValueError("name the master: sentinel://host:26379;sentinel://...?master=NAME")
    return SentinelUrl(tuple(sentinels), master, db, username, password)


def check_store_url(url: str) -> str:
    """``url`` if it names a Redis for the job store, else ``ValueError`` saying why."""
    scheme = scheme_of(url)
    if scheme == "sentinel":
        parse_sentinel(url)
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
    if scheme_of(url) == "sentinel":
        parse_sentinel(url)
    return url
