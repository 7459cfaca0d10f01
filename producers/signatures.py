"""Verifying a ``Cancelflow-Signature`` header, for whoever receives our callbacks.

The header is ``t=<unix seconds>,v1=<hex>[,v1=<hex>]``: each ``v1`` is the hex HMAC-SHA256,
under one of the sender's secrets, of ``"<t>.<raw body>"`` (Stripe's scheme). While a secret
is being rotated the sender signs with both its current and its previous secret, one ``v1``
each; a receiver holding either one verifies.

Standard library only, so a receiver may copy this file as it is::

    from producers.signatures import SignatureError, verify_signature

    try:
        verify_signature(raw_body, request.headers["Cancelflow-Signature"], [secret])
    except SignatureError:
        return 400
    event = json.loads(raw_body)  # then deduplicate by event["id"]
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence

SIGNATURE_HEADER = "Cancelflow-Signature"
DEFAULT_TOLERANCE_S = 300
SCHEME = "v1"


class SignatureError(ValueError):
    """The signature does not prove the body came from the holder of a secret, just now."""


class MalformedSignature(SignatureError):
    """The header is not ``t=<int>,v1=<hex>[,v1=<hex>…]``."""


class TimestampOutsideTolerance(SignatureError):
    """The signed timestamp is further than the tolerance from now: stale (a replay), or
    from the future (a skewed clock)."""


class SignatureMismatch(SignatureError):
    """No ``v1`` matches the body under any of the secrets."""


def parse_header(header: str) -> tuple[int, list[str]]:
    """The header's timestamp and ``v1`` signatures; ``MalformedSignature`` if unreadable.

    Unknown schemes (a future ``v2``) are ignored, so a sender can add one without breaking
    receivers.
    """
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key or not value:
            raise MalformedSignature(f"not key=value: {item.strip()[:40]!r}")
        if key == "t":
            if timestamp is not None:
                raise MalformedSignature("more than one t=")
            if not value.isascii() or not value.isdigit():
                raise MalformedSignature("t= is not a unix timestamp")
            timestamp = int(value)
        elif key == SCHEME:
            signatures.append(value.lower())
    if timestamp is None:
        raise MalformedSignature("no t= timestamp")
    if not signatures:
        raise MalformedSignature(f"no {SCHEME}= signature")
    return timestamp, signatures


def expected_signature(body: bytes, timestamp: int, secret: str) -> str:
    """The hex ``v1`` for ``body`` signed at ``timestamp`` with ``secret``."""
    signed = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def verify_signature(
    body: bytes,
    header: str | None,
    secrets: Sequence[str],
    tolerance: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> int:
    """Check ``header`` against the raw ``body``; the signed timestamp if it holds.

    Raises a ``SignatureError``: ``MalformedSignature`` (missing or unreadable header),
    ``TimestampOutsideTolerance`` (more than ``tolerance`` seconds before or after ``now``,
    default the current time), ``SignatureMismatch``. ``body`` must be the bytes received,
    before any JSON parsing. Comparisons take constant time.
    """
    if not secrets or not all(secrets):
        raise ValueError("verify_signature needs at least one non-empty secret")
    if not header:
        raise MalformedSignature(f"no {SIGNATURE_HEADER} header")
    timestamp, signatures = parse_header(header)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise TimestampOutsideTolerance(
            f"signed {current - timestamp:+.0f}s ago (tolerance {tolerance}s)"
        )
    matched = False
    # Every pair is compared, so the time taken does not say which secret matched.
    for secret in secrets:
        expected = expected_signature(body, timestamp, secret).encode()
        for signature in signatures:
            matched |= hmac.compare_digest(expected, signature.encode())
    if not matched:
        raise SignatureMismatch("no signature matches the body under the given secrets")
    return timestamp
