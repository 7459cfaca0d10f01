"""AppDirect billing API: read a subscription, then cancel it with DELETE; OAuth 1.0 signed.

Docs: AppDirect's "Canceling a subscription" page (seed 004; ``shared/providers.md`` section
appdirect).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Annotated, ClassVar

from oauthlib.oauth1 import SIGNATURE_HMAC, SIGNATURE_TYPE_AUTH_HEADER, Client
from pydantic import SecretStr, StringConstraints

from cancelflow.contract import JobRecord, Outcome, OutcomeType
from cancelflow.errors import ProviderError, ProviderProtocolError
from cancelflow.http import HttpResponse, ProviderHttp
from cancelflow.logging import redact
from cancelflow.providers.base import (
    SEGMENT_CHECK,
    Confirmation,
    Eligibility,
    ProviderSettings,
    ProviderSpec,
    SubscriptionRef,
)

SUBSCRIPTION_PATH = "/api/billing/v1/subscriptions/{subscription_id}"

# A read subscription in this status was cancelled before (DELETE moves every status to it).
CANCELLED_STATUS = "CANCELLED"

# Error bodies larger than this are not parsed: an error is a code and a message.
MAX_ERROR_BODY = 64 * 1024

# Ids go into the signed URL's path as they are: only URL-unreserved characters, so the URL
# we sign is byte for byte the URL sent (no percent-encoding for a client to get wrong).
# "." and ".." are unreserved too, but as a segment they move the request to another resource:
# at least one character is not a dot.
SubscriptionId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9._~-]*[A-Za-z0-9_~-][A-Za-z0-9._~-]*$", max_length=128),
    SEGMENT_CHECK,
]


class AppDirectRef(SubscriptionRef):
    identity_fields: ClassVar[tuple[str, ...]] = ("subscription_id",)

    subscription_id: SubscriptionId


class AppDirectSettings(ProviderSettings):
    consumer_key: str
    consumer_secret: SecretStr


class AppDirect:
    key = "appdirect"

    def __init__(self, settings: AppDirectSettings, http: ProviderHttp) -> None:
        self._http = http
        # Two-legged OAuth 1.0: consumer key and secret, no token. Each sign() draws a fresh
        # nonce and timestamp.
        self._oauth = Client(
            settings.consumer_key,
            client_secret=settings.consumer_secret.get_secret_value(),
            signature_method=SIGNATURE_HMAC,
            signature_type=SIGNATURE_TYPE_AUTH_HEADER,
        )

    async def _call(self, method: str, path: str) -> HttpResponse:
        """A signed call; a 401 (bad key or signature) is final: signatures do not expire."""
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        _, signed, _ = self._oauth.sign(self._http.url(path), http_method=method, headers=headers)
        resp = await self._http.request(method, path, headers=signed)
        if resp.status == 401:
            raise self._error(resp)
        return resp

    async def check(self, ref: AppDirectRef, job: JobRecord) -> Eligibility:
        resp = await self._call("GET", _path(ref))
        if resp.status == 404:
            return Eligibility.final(
                Outcome(type=OutcomeType.NOT_FOUND), response=self._error_fields(resp)
            )
        if resp.status != 200:
            raise self._error(resp)
        body = resp.json(self.key)
        status = body.get("status") if isinstance(body, dict) else None
        if not isinstance(status, str):
            raise ProviderProtocolError(
                "subscription has no status", provider=self.key, body=redact(body)
            )
        if status.upper() == CANCELLED_STATUS:
            return Eligibility.final(Outcome(type=OutcomeType.ALREADY_CANCELLED), response=body)
        return Eligibility.eligible(response=body, status=status)

    async def confirm(self, ref: AppDirectRef, job: JobRecord) -> Confirmation:
        resp = await self._call("DELETE", _path(ref))
        # Seed 004: 204 deleted; 400 "previously deleted"; 404 not found. Any 2xx is a delete
        # that happened: failing a job on an unexpected 200 would hide a real cancellation.
        if 200 <= resp.status < 300:
            return Confirmation(outcome=Outcome(type=OutcomeType.CANCELLED))
        if resp.status == 400:
            fields = self._error_fields(resp)
            return Confirmation(
                outcome=Outcome(type=OutcomeType.ALREADY_CANCELLED, details=fields), response=fields
            )
        if resp.status == 404:
            return Confirmation(
                outcome=Outcome(type=OutcomeType.NOT_FOUND), response=self._error_fields(resp)
            )
        raise self._error(resp)

    def _error_fields(self, resp: HttpResponse) -> dict[str, str]:
        """``code`` and ``message`` of an error body in JSON or XML (a 404 is XML even when
        JSON was asked for); ``{}`` for an empty or plain-text body."""
        return parse_error(resp, self.key)

    def _error(self, resp: HttpResponse) -> ProviderError:
        fields = self._error_fields(resp)
        return self._http.error(resp, message=fields.get("message"), code=fields.get("code"))


def _path(ref: AppDirectRef) -> str:
    return SUBSCRIPTION_PATH.format(subscription_id=ref.subscription_id)


def parse_error(resp: HttpResponse, provider: str) -> dict[str, str]:
    """An AppDirect error body as ``{"code", "message"}`` (either may be absent).

    JSON ``{"code", "message"}`` or XML ``<errors><error><code/><message/></error></errors>``;
    a body that claims to be one of them but is not parses to a ``ProviderProtocolError``.
    """
    text = resp.body.strip()
    if not text:
        return {}
    content_type = resp.headers.get("Content-Type", "").lower()
    if text.startswith(b"<") or "xml" in content_type:
        return _parse_xml(resp, provider)
    if text.startswith((b"{", b"[")) or "json" in content_type:
        body = resp.json(provider)
        if not isinstance(body, dict):
            raise ProviderProtocolError(
                "error body is not a JSON object", provider=provider, status=resp.status
            )
        return {k: str(body[k]) for k in ("code", "message") if body.get(k) is not None}
    return {}


def _parse_xml(resp: HttpResponse, provider: str) -> dict[str, str]:
    # The body comes from the configured provider, but is still untrusted input: no DTD (so no
    # entity expansion; ElementTree never fetches external entities anyway) and a size cap.
    if len(resp.body) > MAX_ERROR_BODY or b"<!DOCTYPE" in resp.body.upper():
        raise ProviderProtocolError(
            "XML error body is too large or declares a DTD",
            provider=provider,
            status=resp.status,
        )
    try:
        root = ET.fromstring(resp.body)  # noqa: S314 - guarded above
    except ET.ParseError as exc:
        raise ProviderProtocolError(
            f"error body is not well-formed XML: {exc}",
            provider=provider,
            status=resp.status,
            body=resp.text[:500],
        ) from exc
    error = root if root.tag == "error" else root.find("error")
    if error is None:
        return {}
    return {
        name: text for name in ("code", "message") if (text := (error.findtext(name) or "").strip())
    }


SPEC = ProviderSpec(
    key="appdirect", reference=AppDirectRef, settings=AppDirectSettings, build=AppDirect
)
