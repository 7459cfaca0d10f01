"""Result callbacks: the event schema, Standard Webhooks signatures, URL safety, and delivery.

Schema version 1 (``docs/callbacks.md``, ``docs/callback-event.schema.json``)::

    {"id": "evt_…", "type": "cancellation.succeeded", "schema_version": 1,
     "created_at": "…Z", "data": {"job_id", "provider", "subscription", "status",
     "outcome", "offer", "error", "idempotency_key", "metadata"}}

Headers (Standard Webhooks, https://www.standardwebhooks.com/): ``webhook-id`` (the event's
id, the same on every retry), ``webhook-timestamp`` (Unix seconds of this attempt) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``, keyed with the
base64-decoded bytes of a ``whsec_`` secret, one signature per secret (space-separated) while
a secret is being rotated. Deprecated, still sent: ``Cancelflow-Signature: t=<unix>,v1=<hex
HMAC-SHA256 of "<t>.<body>">`` keyed with the secret's text (``producers.signatures``).

URL safety is checked twice: ``check_url`` before a delivery, and ``PolicyResolver`` (the
resolver of the callbacks session, ``open_session``) on the addresses actually connected to,
so a name that resolves to a public address for the check and to an internal one for the
connection (DNS rebinding) is refused too.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlsplit

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from cancelflow import tracing
from cancelflow.contract import JobRecord, OutcomeType, Status
from cancelflow.errors import CancelflowError
from cancelflow.http import parse_retry_after
from cancelflow.logging import is_secret_key
from cancelflow.providers.base import callback_secret_key
from cancelflow.settings import CallbackSettings

SCHEMA_VERSION = 1
# Deprecated (docs/callbacks.md, "Migrating from Cancelflow-Signature"): still sent.
SIGNATURE_HEADER = "Cancelflow-Signature"
WEBHOOK_ID = "webhook-id"
WEBHOOK_TIMESTAMP = "webhook-timestamp"
WEBHOOK_SIGNATURE = "webhook-signature"
# The most of a receiver's answer read: only its status decides what happens next.
MAX_RESPONSE_BODY = 4 * 1024
# The most of it kept on the job's callback attempt (``response``), to show what it said.
RESPONSE_EXCERPT_CHARS = 256
# Statuses that say "later" (RFC 9110: 408 Request Timeout, 409 Conflict, RFC 8470: 425 Too
# Early, RFC 6585: 429 Too Many Requests; and every 5xx): retried until the horizon.
RETRY_LATER = frozenset({408, 409, 425, 429})
# "Gone": the receiver says this URL will never take an event again (Svix and Stripe stop
# there too). An endpoint answering it is disabled; nothing is retried.
GONE = 410

EVENT_BY_OUTCOME: dict[OutcomeType, str] = {
    OutcomeType.CANCELLED: "cancellation.succeeded",
    OutcomeType.ALREADY_CANCELLED: "cancellation.succeeded",
    OutcomeType.PENDING_PROVIDER_CONFIRMATION: "cancellation.succeeded",
    OutcomeType.RETAINED: "cancellation.retained",
    OutcomeType.NOT_ELIGIBLE: "cancellation.not_eligible",
    OutcomeType.NOT_FOUND: "cancellation.not_found",
    OutcomeType.FAILED: "cancellation.failed",
    # Not in the first list of events: the customer never decided and nothing was cancelled.
    OutcomeType.ABANDONED: "cancellation.abandoned",
}
OFFER_PRESENTED = "cancellation.offer_presented"
DEAD_LETTERED = "cancellation.dead_lettered"
EVENT_TYPES = (*dict.fromkeys(EVENT_BY_OUTCOME.values()), OFFER_PRESENTED, DEAD_LETTERED)


class CallbackRetryable(CancelflowError):
    """The receiver may take it later: a connection error, a timeout, 408, 409, 425, 429 or
    5xx (retried until the horizon), or another 4xx (``client_error``: retried only within
    the short client-error window, ``CANCELFLOW_CALLBACKS__CLIENT_ERROR_WINDOW_S``)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        elapsed_s: float | None = None,
        response: str | None = None,
        client_error: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.elapsed_s = elapsed_s
        self.response = response
        self.client_error = client_error
        # How long its target's retry window has been open (set by ``cancelflow.delivery``,
        # which gives up a target past the horizon: see ``cancelflow.retry.decide``).
        self.window_age_s = 0.0
        # When set (by ``cancelflow.delivery``, which has decided each target's next attempt),
        # the step runs again after exactly this long: no second draw of the backoff.
        self.delay_s: float | None = None


class CallbackNotDue(CancelflowError):
    """No target of the step is due yet: each waits for a ``retry_at`` further away than a
    countdown may be (a long ``Retry-After``), so the step waits again, spending no attempt."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CallbackRejected(CancelflowError):
    """The receiver refused it for good (410 Gone, a redirect): no retry."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        elapsed_s: float | None = None,
        response: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.elapsed_s = elapsed_s
        self.response = response

    @property
    def gone(self) -> bool:
        """The receiver answered 410: its endpoint is disabled."""
        return self.status == GONE


class UnsafeCallbackUrl(CancelflowError):
    """The URL is not https, or points at a private, loopback or link-local address."""


class CallbackMisconfigured(CancelflowError):
    """Nothing can be delivered until an operator fixes settings (no secret, no such hook)."""


def event_type(job: JobRecord, event: str) -> str | None:
    """The event a job's state calls for: ``event`` is "outcome" or "offer_presented"."""
    if event == "offer_presented":
        return OFFER_PRESENTED
    if job.status is Status.DEAD_LETTERED:
        return DEAD_LETTERED
    if job.status is Status.FINISHED and job.outcome is not None:
        return EVENT_BY_OUTCOME[job.outcome.type]
    return None


def event_id(job: JobRecord, etype: str) -> str:
    """Deterministic, so a redelivered step sends the same id and receivers deduplicate.

    A replayed job is a new generation: its events get new ids.
    """
    generation = sum(1 for e in job.timeline if e.event == "replayed")
    digest = hashlib.sha256(f"{job.id}:{etype}:{generation}".encode()).hexdigest()
    return f"evt_{digest[:32]}"


# The timeline entry each event reports: its time is the event's ``created_at``.
_OCCURRED = {OFFER_PRESENTED: frozenset({"awaiting_decision"})}
_ENDED = frozenset({"finished", "dead_lettered"})


def _occurred_at(job: JobRecord, etype: str) -> str:
    # When the thing happened, not when this attempt runs: every retry of an event sends
    # the same body, so a receiver can order events and compare redeliveries byte for byte.
    wanted = _OCCURRED.get(etype, _ENDED)
    return next((e.at for e in reversed(job.timeline) if e.event in wanted), job.updated_at)


def _dead_letter_error(job: JobRecord) -> dict[str, Any] | None:
    if job.status is not Status.DEAD_LETTERED:
        return None
    return next((e.error for e in reversed(job.timeline) if e.event == "dead_lettered"), None)


def build_event(job: JobRecord, etype: str) -> dict[str, Any]:
    """The event body (schema version 1): what happened, and the job as it is now."""
    return {
        "id": event_id(job, etype),
        "type": etype,
        "schema_version": SCHEMA_VERSION,
        "created_at": _occurred_at(job, etype),
        "data": {
            "job_id": job.id,
            "provider": job.provider,
            "subscription": job.subscription,
            "status": job.status.value,
            "outcome": job.outcome.model_dump(mode="json") if job.outcome else None,
            "offer": job.offer.model_dump(mode="json") if job.offer else None,
            "error": _dead_letter_error(job),
            "idempotency_key": job.idempotency_key,
            "metadata": job.metadata,
        },
    }


def encode(event: dict[str, Any]) -> bytes:
    """The exact bytes sent and signed: compact JSON with sorted keys."""
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


def sign_standard(msg_id: str, timestamp: int, body: bytes, secrets: Sequence[str]) -> str:
    """The ``webhook-signature`` value: ``v1,<base64>`` per ``whsec_`` secret, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(callback_secret_key(s), signed, "sha256")).decode()
        for s in secrets
    )


def signature_headers(
    event_id: str, body: bytes, secrets: Sequence[str], *, timestamp: int | None = None
) -> dict[str, str]:
    """Every signature header of one delivery attempt: the Standard Webhooks three, and the
    deprecated ``Cancelflow-Signature`` over the same timestamp."""
    t = int(time.time()) if timestamp is None else timestamp
    return {
        WEBHOOK_ID: event_id,
        WEBHOOK_TIMESTAMP: str(t),
        WEBHOOK_SIGNATURE: sign_standard(event_id, t, body, secrets),
        SIGNATURE_HEADER: sign(body, secrets, timestamp=t),
    }


def sign(body: bytes, secrets: Sequence[str], *, timestamp: int | None = None) -> str:
    """The deprecated ``Cancelflow-Signature`` value for ``body``: ``t=…,v1=…[,v1=…]``, keyed
    with each secret's text (as before ``whsec_`` secrets were decoded), so a receiver using
    ``producers.signatures`` keeps verifying during the deprecation period."""
    t = int(time.time()) if timestamp is None else timestamp
    signed = f"{t}.".encode() + body
    parts = [f"t={t}"] + [
        f"v1={hmac.new(s.encode(), signed, hashlib.sha256).hexdigest()}" for s in secrets
    ]
    return ",".join(parts)


def _canonical(host: str) -> str:
    # One spelling per address ("::ffff:127.0.0.1" is "::ffff:7f00:1"), one per name.
    try:
        return str(ipaddress.ip_address(host.split("%")[0]))
    except ValueError:
        return host.lower().rstrip(".")


def _host_allowed(host: str, allowed_hosts: Iterable[str]) -> bool:
    return _canonical(host) in {_canonical(h) for h in allowed_hosts}


# Where a callback may not go: every special-purpose block of the IANA registries
# (https://www.iana.org/assignments/iana-ipv4-special-registry/,
# https://www.iana.org/assignments/iana-ipv6-special-registry/) that is not globally
# reachable, written out rather than taken from ``ipaddress.is_global`` / ``is_private``,
# whose answers changed across 3.11, 3.12 and 3.13 patch releases. Only parsing is taken from
# ``ipaddress`` (which refuses leading-zero IPv4 forms since 3.9.5; names such as
# "2130706433" or "0x7f.1" are resolved, and their addresses checked, like any name).
_NON_GLOBAL_V4 = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # carrier-grade NAT (shared address space)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local (cloud metadata services)
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
    )
)
# Only 2000::/3 is global unicast; everything outside it (loopback, unspecified, IPv4-mapped
# and -compatible, NAT64, discard, unique-local fc00::/7, site-local fec0::/10, link-local,
# multicast) is refused unless an IPv4 address embedded in it is checked instead (below).
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_NON_GLOBAL_V6 = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "2001::/23",  # IETF protocol assignments (Teredo, 2001::/32, is unpacked first)
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
    )
)
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # IPv4-mapped
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known NAT64 prefix
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")  # 6to4: the IPv4 address in bits 16-47
_TEREDO = ipaddress.IPv6Network("2001::/32")  # server in bits 32-63, client (inverted) in 96-127


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses an IPv6 address leads to, for the forms that embed one."""
    n = int(ip)
    if ip in _MAPPED or ip in _NAT64:
        return [ipaddress.IPv4Address(n & 0xFFFFFFFF)]
    if ip in _SIX_TO_FOUR:
        return [ipaddress.IPv4Address((n >> 80) & 0xFFFFFFFF)]
    if ip in _TEREDO:
        return [
            ipaddress.IPv4Address((n >> 64) & 0xFFFFFFFF),
            ipaddress.IPv4Address(~n & 0xFFFFFFFF),
        ]
    return None


def _v4_public(ip: ipaddress.IPv4Address) -> bool:
    return not any(ip in net for net in _NON_GLOBAL_V4)


def address_public(address: str) -> bool:
    """Whether ``address`` (an IP literal, IPv6 with or without a zone) is globally routable,
    by the tables above; for the IPv6 forms that embed an IPv4 address, whether that is."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_public(ip)
    embedded = _embedded_v4(ip)
    if embedded is not None:
        return all(_v4_public(v4) for v4 in embedded)
    return ip in _GLOBAL_UNICAST_V6 and not any(ip in net for net in _NON_GLOBAL_V6)


def _refuse(host: str, address: str) -> UnsafeCallbackUrl:
    where = (
        f"callback address {host} is"
        if host == address
        else f"callback host {host} resolves to {address},"
    )
    return UnsafeCallbackUrl(
        f"{where} not a globally routable address (private, loopback, link-local, shared, "
        "or reserved); allow-list it in CANCELFLOW_CALLBACKS__ALLOWED_HOSTS if intended"
    )


def check_addresses(host: str, addresses: Iterable[str], allowed_hosts: Sequence[str]) -> None:
    """Refuse ``host`` if any of its addresses is not public, unless it is allow-listed
    (by name, or each such address by itself)."""
    if _host_allowed(host, allowed_hosts):
        return
    for address in addresses:
        if not address_public(address) and not _host_allowed(address, allowed_hosts):
            raise _refuse(host, address)


def _refuse_credentials(parts: SplitResult) -> None:
    # A URL is kept on the job and shown to every token that may read jobs (read-only ones
    # too), and written to callback attempts and logs: it must not carry a secret.
    if parts.username is not None or parts.password is not None:
        raise UnsafeCallbackUrl(
            "callback URL must not carry credentials (user:password@); "
            "callbacks are authenticated by their signature"
        )
    for where, text in (("query", parts.query), ("fragment", parts.fragment)):
        names = sorted({name for name, _ in parse_qsl(text, keep_blank_values=True)})
        if secret := [name for name in names if is_secret_key(name)]:
            raise UnsafeCallbackUrl(
                f"callback URL must not carry credentials: {where} parameter(s) "
                f"{', '.join(secret)} look like a secret; callbacks are authenticated by "
                "their signature"
            )


def check_url_form(url: str, *, allow_http: bool, allowed_hosts: Sequence[str]) -> None:
    """What can be told of a callback URL without resolving its host: an absolute https URL
    (http only where allowed), without credentials (``user:pass@``, or a query parameter
    named like a token, key, secret, signature, password or auth), and not an address literal
    that is not globally routable unless allow-listed. Producers check this when a job is
    submitted; ``check_url`` (and the callbacks session's resolver and sockets) check the
    addresses a name resolves to at delivery."""
    parts = urlsplit(url)
    # Before anything that quotes the URL back: its credentials must not reach a message.
    _refuse_credentials(parts)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UnsafeCallbackUrl(f"callback URL must be an absolute https URL: {url!r}")
    if parts.scheme == "http" and not allow_http:
        raise UnsafeCallbackUrl(
            "callback URL must use https (set CANCELFLOW_CALLBACKS__ALLOW_HTTP for local use)"
        )
    host = parts.hostname
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return  # a name: its addresses are checked when it is resolved
    check_addresses(host, [host], allowed_hosts)


async def check_url(url: str, *, allow_http: bool, allowed_hosts: Sequence[str]) -> None:
    """Refuse URLs a producer could use to aim the worker at internal services."""
    check_url_form(url, allow_http=allow_http, allowed_hosts=allowed_hosts)
    parts = urlsplit(url)
    host = parts.hostname or ""
    if _host_allowed(host, allowed_hosts):
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, parts.port or 443, type=socket.SOCK_STREAM
        )
    except OSError as exc:
        raise CallbackRetryable(f"cannot resolve {host}: {exc}") from exc
    check_addresses(host, {str(info[4][0]) for info in infos}, allowed_hosts)


class PolicyResolver(AbstractResolver):
    """aiohttp's resolver, refusing the addresses ``check_url`` refuses.

    The callbacks session connects only to addresses this returned (or to IP literals, which
    skip resolvers: ``PolicySockets`` checks every address connected to), so the address
    connected to is the address checked, whatever the name resolves to by then. Raises
    ``UnsafeCallbackUrl``, which aiohttp lets through unwrapped.
    """

    def __init__(
        self, *, allowed_hosts: Sequence[str], resolver: AbstractResolver | None = None
    ) -> None:
        self._allowed = tuple(allowed_hosts)
        self._resolver = resolver or DefaultResolver()
        # Addresses that allow-listed names resolved to: the sockets let these through.
        self.vouched: set[str] = set()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        addresses = [r["host"] for r in results]
        check_addresses(host, addresses, self._allowed)
        if _host_allowed(host, self._allowed):
            self.vouched.update(_canonical(a) for a in addresses)
        return results

    async def close(self) -> None:
        await self._resolver.close()


class PolicySockets:
    """The callbacks connector's socket factory: the last check, on the address a socket is
    about to connect to, whether it came from a name or from an IP literal in the URL.

    An address passes if it is globally routable, listed itself in the allow-list, or what an
    allow-listed name resolved to (``PolicyResolver.vouched``). Raises ``UnsafeCallbackUrl``
    before the socket exists; aiohttp (through aiohappyeyeballs) lets it through unwrapped.
    """

    def __init__(self, *, allowed_hosts: Sequence[str], resolver: PolicyResolver) -> None:
        self._allowed = tuple(allowed_hosts)
        self._resolver = resolver

    def __call__(self, addr_info: AddrInfoType) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        address = str(sockaddr[0])
        if not (
            address_public(address)
            or _host_allowed(address, self._allowed)
            or _canonical(address) in self._resolver.vouched
        ):
            raise _refuse(address, address)
        return socket.socket(family=family, type=type_, proto=proto)


def open_session(
    settings: CallbackSettings, *, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """The HTTP session for callbacks (one per worker, apart from the providers' session):
    every connection it opens passes the URL policy. Call it in the loop that will use it.

    Needs aiohttp 3.12 or later (``socket_factory``)."""
    policy = PolicyResolver(allowed_hosts=settings.allowed_hosts, resolver=resolver)
    connector = aiohttp.TCPConnector(
        resolver=policy,
        socket_factory=PolicySockets(allowed_hosts=settings.allowed_hosts, resolver=policy),
        limit=200,
        limit_per_host=20,
        ttl_dns_cache=60,
    )
    # trust_env stays False: a proxy from the environment would connect on our behalf,
    # to addresses this resolver never sees.
    return aiohttp.ClientSession(connector=connector, trust_env=False)


def excerpt(raw: bytes) -> str | None:
    """What is kept of a receiver's answer: its first characters, as text, or None if empty."""
    text = raw.decode("utf-8", errors="replace")[:RESPONSE_EXCERPT_CHARS]
    return text or None


def classify(
    status: int, *, retry_after: str | None, elapsed_s: float, response: str | None
) -> CallbackRetryable | CallbackRejected | None:
    """What a receiver's status means: None for 2xx (delivered), else the error to raise."""
    if 200 <= status < 300:
        return None
    message = f"receiver answered {status}"
    if status in RETRY_LATER or status >= 500 or (400 <= status < 500 and status != GONE):
        return CallbackRetryable(
            message,
            status=status,
            retry_after=parse_retry_after(retry_after),
            elapsed_s=elapsed_s,
            response=response,
            client_error=400 <= status < 500 and status not in RETRY_LATER,
        )
    # 410, and a 1xx or 3xx: redirects are never followed (the body would go elsewhere).
    return CallbackRejected(message, status=status, elapsed_s=elapsed_s, response=response)


async def deliver(
    session: aiohttp.ClientSession,
    url: str,
    event: dict[str, Any],
    *,
    secrets: Sequence[str],
    timeout_s: float,
) -> tuple[int, float, str | None]:
    """POST one signed event; returns (status, seconds, response excerpt) on 2xx, raises
    otherwise (``CallbackRetryable``, ``CallbackRejected``, or ``UnsafeCallbackUrl`` from
    the resolver)."""
    body = encode(event)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Cancelflow-Callbacks/1",
        **signature_headers(event["id"], body, secrets),
        "Cancelflow-Event-Id": event["id"],
        "Cancelflow-Event-Type": event["type"],
    }
    tracing.inject(headers)  # the delivery's span (docs/tracing.md); nothing while off
    started = time.perf_counter()
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,  # a body is never followed across a redirect
        ) as resp:
            # Only the status decides; a little of the answer is kept to show on the job.
            # Read that little (so a short answer leaves the connection reusable) and drop
            # the connection on more.
            answer = await resp.content.read(MAX_RESPONSE_BODY)
            if not resp.content.at_eof():
                resp.close()
            status = resp.status
            retry_after = resp.headers.get("Retry-After")
    except TimeoutError as exc:
        raise CallbackRetryable(
            f"no answer within {timeout_s}s", elapsed_s=time.perf_counter() - started
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise CallbackRetryable(
            f"connection failed: {type(exc).__name__}: {exc}",
            elapsed_s=time.perf_counter() - started,
        ) from exc
    elapsed = time.perf_counter() - started
    error = classify(status, retry_after=retry_after, elapsed_s=elapsed, response=excerpt(answer))
    if error is not None:
        raise error
    return status, elapsed, excerpt(answer)
