"""Axel Springer Partner Activation API ("PS-Dealer"): cancel a purchase's activation link.

Docs: the PS-Dealer "Cancel Purchase Guide" (seed 000; ``shared/providers.md`` section
axelspringer). Only the activation-link flow is supported: what a cancellation does depends on
the link's status (Created, Redeemed, Canceled).
"""

from __future__ import annotations

import base64
from typing import Any, ClassVar, Literal
from urllib.parse import quote

from pydantic import Field, HttpUrl, SecretStr

from cancelflow.contract import JobRecord, Outcome, OutcomeType
from cancelflow.errors import ProviderAuthError, ProviderError, ProviderProtocolError
from cancelflow.http import HttpResponse, ProviderHttp, TokenCache, read_token
from cancelflow.logging import redact
from cancelflow.providers.base import (
    Confirmation,
    Eligibility,
    PathSegment,
    ProviderSettings,
    ProviderSpec,
    SubscriptionRef,
)

# --- Assumptions: the API specification page is not public; each is one line to change. -------
# Relative to base_url (".../api/v1"). Reading a purchase answers {"purchaseRef", "status"};
# cancelling it answers {"purchaseRef", "previousStatus", "status": "Canceled"}; errors are
# {"code", "message"} with HTTP status codes.
# Cancelling a purchase that is already Canceled (by us, when an earlier answer was lost)
# answers either a 409, whatever its code (a cancel meets no other conflict), or a 200 whose
# previousStatus is already "Canceled". Both mean "already cancelled".
ALREADY_CANCELED_HTTP_STATUS = 409
ALREADY_CANCELED_PREVIOUS_STATUS = "Canceled"
PURCHASE_PATH = "/partners/{partner_id}/purchases/{purchase_ref}"
CANCEL_PATH = PURCHASE_PATH + "/cancel"
# -------------------------------------------------------------------------------------------------

CREATED, REDEEMED, CANCELED = "Created", "Redeemed", "Canceled"
# What cancelling a link in each status did (seed 000): the outcome's details.
CANCEL_EFFECTS: dict[str, dict[str, Any]] = {
    CREATED: {"link_invalidated": True},
    REDEEMED: {"subscription_cancelled": True, "link_revoked": True},
}


class AxelSpringerRef(SubscriptionRef):
    identity_fields: ClassVar[tuple[str, ...]] = ("purchase_ref",)

    # Quoted into one path segment; still refused if it is "." or "..", or carries a separator
    # or an escape that a proxy or the provider could decode into one.
    purchase_ref: PathSegment = Field(min_length=1, max_length=200)


class AxelSpringerSettings(ProviderSettings):
    # Cognito's client-credentials endpoint, e.g.
    # https://ps.auth.eu-central-1.amazoncognito.com/oauth2/token
    token_url: HttpUrl
    client_id: str
    client_secret: SecretStr
    partner_id: str = Field(min_length=1)
    # Fixed per partner by Axel Springer; only "activation_link" is supported (see below).
    flow: Literal["activation_link", "api"] = "activation_link"


def validate_settings(settings: AxelSpringerSettings) -> None:
    """Refuse at start-up a partner on the API-based flow, which this adapter cannot cancel."""
    if settings.flow != "activation_link":
        raise ValueError(
            f"partner {settings.partner_id!r} uses the {settings.flow!r} flow; Cancelflow "
            "cancels only activation-link purchases (set FLOW=activation_link if the partner "
            "is on that flow, or leave Axel Springer unconfigured)"
        )


class AxelSpringer:
    key = "axelspringer"

    def __init__(self, settings: AxelSpringerSettings, http: ProviderHttp) -> None:
        self._settings = settings
        self._http = http
        self._tokens = TokenCache()

    async def _fetch_token(self) -> tuple[str, float]:
        # Cognito client credentials: Basic client auth, form-encoded grant (the docs put
        # grant_type in the query string; Cognito takes it in the body as RFC 6749 says).
        # The header is built here: aiohttp 3.14 deprecates BasicAuth and the auth= argument.
        secret = self._settings.client_secret.get_secret_value()
        credentials = f"{self._settings.client_id}:{secret}"
        resp = await self._http.request(
            "POST",
            str(self._settings.token_url),
            data={"grant_type": "client_credentials"},
            headers={"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()},
        )
        if resp.status != 200:
            raise self._error(resp, cls=ProviderAuthError)
        # Tokens last 1 h and there is no refresh token: a new one is fetched after.
        return read_token(resp, self.key)

    async def _call(self, method: str, path: str) -> HttpResponse:
        """An authenticated call; a 401 fetches a new token once, a second 401 is final."""
        resp = await self._http.request_with_token(self._tokens, self._fetch_token, method, path)
        if resp.status == 401:
            raise self._error(resp, cls=ProviderAuthError)
        return resp

    def _path(self, template: str, ref: AxelSpringerRef) -> str:
        return template.format(
            partner_id=quote(self._settings.partner_id, safe=""),
            purchase_ref=quote(ref.purchase_ref, safe=""),
        )

    async def check(self, ref: AxelSpringerRef, job: JobRecord) -> Eligibility:
        resp = await self._call("GET", self._path(PURCHASE_PATH, ref))
        if resp.status == 404:
            return Eligibility.final(
                Outcome(type=OutcomeType.NOT_FOUND), response=self._error_body(resp)
            )
        body = self._body(resp)
        status = body.get("status")
        if status == CANCELED:
            return Eligibility.final(Outcome(type=OutcomeType.ALREADY_CANCELLED), response=body)
        if status in CANCEL_EFFECTS:
            # The response (with the link status) lands on the job timeline.
            return Eligibility.eligible(response=body, link_status=status)
        raise ProviderProtocolError(
            f"unknown purchase status {status!r}", provider=self.key, body=redact(body)
        )

    async def confirm(self, ref: AxelSpringerRef, job: JobRecord) -> Confirmation:
        resp = await self._call("POST", self._path(CANCEL_PATH, ref))
        if resp.status == 404:
            return Confirmation(
                outcome=Outcome(type=OutcomeType.NOT_FOUND), response=self._error_body(resp)
            )
        if resp.status == ALREADY_CANCELED_HTTP_STATUS:
            # Canceled since the check (or by our own earlier call): nothing left to do.
            return Confirmation(
                outcome=Outcome(type=OutcomeType.ALREADY_CANCELLED),
                response=self._error_body(resp),
            )
        body = self._body(resp)
        if body.get("previousStatus") == ALREADY_CANCELED_PREVIOUS_STATUS:
            return Confirmation(outcome=Outcome(type=OutcomeType.ALREADY_CANCELLED), response=body)
        # The cancel answer's previousStatus, not the check's: a link may be redeemed between.
        effects = CANCEL_EFFECTS.get(str(body.get("previousStatus")))
        if effects is None or body.get("status") != CANCELED:
            raise ProviderProtocolError(
                "cancel answer lacks a known previousStatus or status Canceled",
                provider=self.key,
                body=redact(body),
            )
        return Confirmation(
            outcome=Outcome(type=OutcomeType.CANCELLED, details=dict(effects)), response=body
        )

    def _body(self, resp: HttpResponse) -> dict[str, Any]:
        if resp.status != 200:
            raise self._error(resp)
        body = resp.json(self.key)
        if not isinstance(body, dict):
            raise ProviderProtocolError(
                "response is not a JSON object", provider=self.key, body=redact(body)
            )
        return body

    def _error_body(self, resp: HttpResponse) -> Any:
        try:
            return resp.json(self.key)
        except ProviderProtocolError:
            return None

    def _error(self, resp: HttpResponse, cls: type[ProviderError] | None = None) -> ProviderError:
        # API errors: {"code", "message"}; the token endpoint's (Cognito): {"error": "..."}.
        body = self._error_body(resp)
        body = body if isinstance(body, dict) else {}
        code = body.get("code") or body.get("error")
        message = body.get("message") or body.get("error_description")
        return self._http.error(
            resp,
            message=str(message) if message else None,
            code=str(code) if code else None,
            cls=cls,
        )


SPEC = ProviderSpec(
    key="axelspringer",
    reference=AxelSpringerRef,
    settings=AxelSpringerSettings,
    build=AxelSpringer,
    validate_settings=validate_settings,
)
