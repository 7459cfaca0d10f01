"""Result callbacks: the event schema, Stripe-style signatures, URL safety, and delivery.

Schema version 1 (``docs/callbacks.md``)::

    {"id": "evt_…", "type": "cancellation.succeeded", "schema_version": 1,
     "created_at": "…Z", "data": {"job_id", "provider", "subscription", "status",
     "outcome", "offer", "idempotency_key", "metadata"}}

Header: ``Cancelflow-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">``, one ``v1``
per valid secret while a secret is being rotated.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from cancelflow.contract import JobRecord, OutcomeType, Status, isoformat, utcnow
from cancelflow.errors import CancelflowError
from cancelflow.http import parse_retry_after

SCHEMA_VERSION = 1
SIGNATURE_HEADER = "Cancelflow-Signature"

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
    """The receiver may take it later (connection error, timeout, 408, 429, 5xx)."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class CallbackRejected(CancelflowError):
    """The receiver refused it for good (another 4xx, a redirect): no retry."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UnsafeCallbackUrl(CancelflowError):
    """The URL is not https, or points at a private, loopback or link-local address."""


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


def build_event(job: JobRecord, etype: str) -> dict[str, Any]:
    return {
        "id": event_id(job, etype),
        "type": etype,
        "schema_version": SCHEMA_VERSION,
        "created_at": isoformat(utcnow()),
        "data": {
            "job_id": job.id,
            "provider": job.provider,
            "subscription": job.subscription,
            "status": job.status.value,
            "outcome": job.outcome.model_dump(mode="json") if job.outcome else None,
            "offer": job.offer.model_dump(mode="json") if job.offer else None,
            "idempotency_key": job.idempotency_key,
            "metadata": job.metadata,
        },
    }


def sign(body: bytes, secrets: Sequence[str], *, timestamp: int | None = None) -> str:
    """The signature header value for ``body``: ``t=…,v1=…[,v1=…]``."""
    t = int(time.time()) if timestamp is None else timestamp
    signed = f"{t}.".encode() + body
    parts = [f"t={t}"] + [
        f"v1={hmac.new(s.encode(), signed, hashlib.sha256).hexdigest()}" for s in secrets
    ]
    return ",".join(parts)


def _host_allowed(host: str, allowed_hosts: Iterable[str]) -> bool:
    return host.lower() in {h.lower() for h in allowed_hosts}


def _address_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


async def check_url(url: str, *, allow_http: bool, allowed_hosts: Sequence[str]) -> None:
    """Refuse URLs a producer could use to aim the worker at internal services."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UnsafeCallbackUrl(f"callback URL must be an absolute https URL: {url!r}")
    if parts.scheme == "http" and not allow_http:
        raise UnsafeCallbackUrl("callback URL must use https (set CANCELFLOW_CALLBACKS__ALLOW_HTTP for local use)")
    host = parts.hostname
    if _host_allowed(host, allowed_hosts):
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CallbackRetryable(f"cannot resolve {host}: {exc}") from exc
    addresses = {str(info[4][0]) for info in infos}
    for address in addresses:
        if not _address_public(address) and not _host_allowed(address, allowed_hosts):
            raise UnsafeCallbackUrl(
                f"callback host {host} resolves to {address}, a private, loopback or link-local "
                "address; allow-list it in CANCELFLOW_CALLBACKS__ALLOWED_HOSTS if intended"
            )


async def deliver(
    session: aiohttp.ClientSession,
    url: str,
    event: dict[str, Any],
    *,
    secrets: Sequence[str],
    timeout_s: float,
) -> tuple[int, float]:
    """POST one signed event; returns (status, seconds) on 2xx, raises otherwise."""
    body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Cancelflow-Callbacks/1",
        SIGNATURE_HEADER: sign(body, secrets),
        "Cancelflow-Event-Id": event["id"],
        "Cancelflow-Event-Type": event["type"],
    }
    started = time.perf_counter()
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,  # a body is never followed across a redirect
        ) as resp:
            await resp.read()
            status = resp.status
            retry_after = resp.headers.get("Retry-After")
    except TimeoutError as exc:
        raise CallbackRetryable(f"no answer within {timeout_s}s") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise CallbackRetryable(f"connection failed: {type(exc).__name__}: {exc}") from exc
    elapsed = time.perf_counter() - started
    if 200 <= status < 300:
        return status, elapsed
    if status in (408, 429) or status >= 500:
        raise CallbackRetryable(f"receiver answered {status}", status=status, retry_after=parse_retry_after(retry_after))
    raise CallbackRejected(f"receiver answered {status}", status=status)
