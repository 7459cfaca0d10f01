"""Who signed a billing event: the signature schemes ``POST /v1/billing-events`` accepts.

Three schemes, each with its own secrets (``BillingSettings``; the previous secret is accepted
while rotating), accepted as ``BillingSettings.accepted_schemes`` says:

- ``cancelflow``: ``Cancelflow-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">``
  (``producers.signatures``);
- ``standard-webhooks``: ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature:
  v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`` (space-separated while rotating),
  under the base64 key of a ``whsec_`` secret, verified by the ``standardwebhooks`` library
  (https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md);
- ``stripe``: ``Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]``, the HMAC-SHA256 of
  ``"<t>.<body>"`` keyed with the endpoint secret's text, ``whsec_`` included; several ``v1``
  while Stripe rolls the secret, ``v0`` (test-mode) ignored
  (https://docs.stripe.com/webhooks#verify-manually). The same construction as ours.

A request is checked under the first accepted scheme whose header it carries (in the order
above). Every failure is a ``BadSignature`` saying which scheme and why (``reason``: missing,
malformed, stale, mismatch, not-accepted); its message never holds a secret or a signature.
"""

from __future__ import annotations

import binascii
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from cancelflow.settings import BillingScheme, BillingSettings
from producers import signatures

Reason = Literal["missing", "malformed", "stale", "mismatch", "not-accepted"]

CANCELFLOW_HEADER = signatures.SIGNATURE_HEADER
STRIPE_HEADER = "Stripe-Signature"
WEBHOOK_ID = "webhook-id"
WEBHOOK_TIMESTAMP = "webhook-timestamp"
WEBHOOK_SIGNATURE = "webhook-signature"
STANDARD_WEBHOOKS_HEADERS = (WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE)
# Every header a scheme reads: the API answers a value that is not ASCII in one of them 401
# (a credential), not 400.
HEADERS: dict[BillingScheme, tuple[str, ...]] = {
    "cancelflow": (CANCELFLOW_HEADER,),
    "standard-webhooks": STANDARD_WEBHOOKS_HEADERS,
    "stripe": (STRIPE_HEADER,),
}
CREDENTIAL_HEADERS = frozenset(h.lower() for names in HEADERS.values() for h in names)
# A Standard Webhooks signature: "v<n>,<base64>"; only v1 (symmetric) is checked.
_WEBHOOK_SIGNATURE = re.compile(r"^v[0-9]+,[A-Za-z0-9+/]+={0,2}$")


class BadSignature(Exception):
    """The request does not prove it comes from the holder of an accepted secret, just now."""

    def __init__(self, scheme: BillingScheme | None, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.scheme = scheme
        self.reason = reason


@dataclass(frozen=True)
class BillingVerifier:
    """The accepted schemes with their secrets; ``verify`` checks one request."""

    secrets: Mapping[BillingScheme, Sequence[str]]
    tolerance_s: int = signatures.DEFAULT_TOLERANCE_S

    @classmethod
    def from_settings(cls, conf: BillingSettings) -> BillingVerifier:
        return cls(
            secrets={s: conf.scheme_secrets(s) for s in conf.accepted_schemes()},
            tolerance_s=conf.signature_tolerance_s,
        )

    @property
    def schemes(self) -> list[BillingScheme]:
        return list(self.secrets)

    def verify(
        self, headers: Mapping[str, str], body: bytes, *, now: float | None = None
    ) -> BillingScheme:
        """The scheme that signed ``body`` (the raw bytes received); ``BadSignature``
        otherwise. ``headers`` are looked up case-insensitively by the caller's mapping
        (aiohttp's are)."""
        current = time.time() if now is None else now
        for scheme, secrets in self.secrets.items():
            if any(name in headers for name in HEADERS[scheme]):
                if scheme == "standard-webhooks":
                    self._standard_webhooks(headers, body, secrets, current)
                else:
                    self._timestamped(scheme, headers[HEADERS[scheme][0]], body, secrets, current)
                return scheme
        sent = [s for s in get_args(BillingScheme) if any(h in headers for h in HEADERS[s])]
        wanted = " or ".join(_named(s) for s in self.secrets)
        if sent:
            raise BadSignature(
                sent[0],
                "not-accepted",
                f"{_named(sent[0])} is not accepted here (CANCELFLOW_BILLING__SIGNATURE_SCHEMES);"
                f" sign with {wanted}",
            )
        raise BadSignature(None, "missing", f"no signature: send {wanted}")

    def _timestamped(
        self,
        scheme: BillingScheme,
        header: str,
        body: bytes,
        secrets: Sequence[str],
        now: float,
    ) -> None:
        name = HEADERS[scheme][0]
        if not header.strip():
            raise BadSignature(scheme, "missing", f"the {name} header is empty")
        if not header.isascii():
            # Undecodable bytes arrive as surrogate escapes, which cannot be encoded to compare.
            raise BadSignature(scheme, "malformed", f"the {name} header is not ASCII")
        try:
            signatures.verify_signature(body, header, secrets, self.tolerance_s, now)
        except signatures.MalformedSignature as exc:
            raise BadSignature(scheme, "malformed", f"{name}: {exc}") from None
        except signatures.TimestampOutsideTolerance as exc:
            raise BadSignature(scheme, "stale", f"{name}: {exc}") from None
        except signatures.SignatureError as exc:
            raise BadSignature(scheme, "mismatch", f"{name}: {exc}") from None

    def _standard_webhooks(
        self, headers: Mapping[str, str], body: bytes, secrets: Sequence[str], now: float
    ) -> None:
        scheme: BillingScheme = "standard-webhooks"
        missing = [h for h in STANDARD_WEBHOOKS_HEADERS if not headers.get(h)]
        if missing:
            raise BadSignature(scheme, "missing", f"no {', '.join(missing)} header")
        given = {h: headers[h] for h in STANDARD_WEBHOOKS_HEADERS}
        for name, value in given.items():
            if not value.isascii() or not value.isprintable():
                raise BadSignature(scheme, "malformed", f"the {name} header is not printable ASCII")
        timestamp = given[WEBHOOK_TIMESTAMP]
        if not timestamp.isdigit() or len(timestamp) > 12:
            raise BadSignature(scheme, "malformed", f"{WEBHOOK_TIMESTAMP} is not a unix timestamp")
        # The library would refuse a stale one too, but only past its own 5 minutes: checked
        # here first, at the configured tolerance, to name it as stale.
        age = now - int(timestamp)
        if abs(age) > self.tolerance_s:
            raise BadSignature(
                scheme,
                "stale",
                f"{WEBHOOK_TIMESTAMP}: signed {age:+.0f}s ago (tolerance {self.tolerance_s}s)",
            )
        items = given[WEBHOOK_SIGNATURE].split(" ")
        if not all(_WEBHOOK_SIGNATURE.fullmatch(item) for item in items) or not any(
            item.startswith("v1,") for item in items
        ):
            raise BadSignature(
                scheme, "malformed", f"{WEBHOOK_SIGNATURE} is not v1,<base64>[ v1,<base64>…]"
            )
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            # The library signs the body as text: bytes that are not UTF-8 carry no signature.
            raise BadSignature(scheme, "mismatch", "the body is not UTF-8") from None
        matched = False
        # Every secret is tried, so the time taken does not say which one matched.
        for secret in secrets:
            try:
                Webhook(secret).verify(body, given, json_parse=False)
                matched = True
            except (WebhookVerificationError, binascii.Error, ValueError):
                pass
        if not matched:
            raise BadSignature(
                scheme, "mismatch", "no webhook-signature matches the body under our secrets"
            )


def _named(scheme: BillingScheme) -> str:
    return {
        "cancelflow": CANCELFLOW_HEADER,
        "standard-webhooks": "webhook-id/webhook-timestamp/webhook-signature",
        "stripe": STRIPE_HEADER,
    }[scheme]
