"""Payway (Adeprimo / Tulo): subscription-system cancellation.

Docs: https://docs.worldoftulo.com/payway/api/ (seeds 001 "cancel_subscription" and
002 "can_cancel_subscription"; ``shared/providers.md`` section payway).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import SecretStr, StringConstraints

from cancelflow.contract import JobRecord, Outcome, OutcomeType, Status
from cancelflow.errors import ProviderAuthError, ProviderError, ProviderProtocolError
from cancelflow.http import HttpResponse, ProviderHttp, TokenCache, read_token
from cancelflow.logging import redact
from cancelflow.providers.base import (
    Confirmation,
    Eligibility,
    ProviderSettings,
    ProviderSpec,
    SubscriptionRef,
)

# Payway ids are Mongo object ids: "/^[a-f\d]{24}$/i" in the docs.
Hex24 = Annotated[str, StringConstraints(pattern=r"^[a-fA-F0-9]{24}$")]

TOKEN_PATH = "/api/authorization/access_token"  # noqa: S105 - a URL path, not a secret
CAN_CANCEL_PATH = "/external/api/v1/subscription_system/can_cancel_subscription"
CANCEL_PATH = "/external/api/v1/subscription_system/cancel_subscription"
SCOPES = "/external/subscription_system/r /external/subscription_system/w"

# --- Assumptions: not in Payway's public docs; each is one line to change. ---------------------
# An already cancelled product answers can_cancel=false with this reason.
ALREADY_CANCELLED_REASON = "already_cancelled"
# Payway documents no answer for a product we cancelled ourselves. The reconcile read
# (``chain.confirm``, after a cancel whose answer was lost; the job is then confirming) comes
# after can_cancel said true: can_cancel=false then means that cancel took effect, whatever
# the reason. False to read it as at eligibility instead (the reason decides).
FALSE_AFTER_OUR_CANCEL_IS_CANCELLED = True
# -------------------------------------------------------------------------------------------------


class PaywayRef(SubscriptionRef):
    identity_fields: ClassVar[tuple[str, ...]] = ("account_id", "user_product_id")

    account_id: Hex24
    user_product_id: Hex24
    cancellation_reason_id: Hex24


class PaywaySettings(ProviderSettings):
    client_id: str
    client_secret: SecretStr
    scope: str = SCOPES


class Payway:
    key = "payway"

    def __init__(self, settings: PaywaySettings, http: ProviderHttp) -> None:
        self._settings = settings
        self._http = http
        self._tokens = TokenCache()

    async def _fetch_token(self) -> tuple[str, float]:
        # grant_type "none" is Payway's server-to-server grant (not OAuth client_credentials).
        resp = await self._http.request(
            "POST",
            TOKEN_PATH,
            data={
                "client_id": self._settings.client_id,
                "client_secret": self._settings.client_secret.get_secret_value(),
                "grant_type": "none",
                "scope": self._settings.scope,
            },
        )
        if resp.status != 200:
            raise self._error(resp, cls=ProviderAuthError)
        # Docs say 1 h in one place and 2 h in another: trust expires_in.
        return read_token(resp, self.key)

    async def _call(self, method: str, path: str, **kwargs: Any) -> HttpResponse:
        """An authenticated call; a 401 fetches a new token once, a second 401 is final."""
        resp = await self._http.request_with_token(
            self._tokens, self._fetch_token, method, path, **kwargs
        )
        if resp.status == 401:
            raise self._error(resp, cls=ProviderAuthError)
        return resp

    async def check(self, ref: PaywayRef, job: JobRecord) -> Eligibility:
        resp = await self._call(
            "GET",
            CAN_CANCEL_PATH,
            params={"account_id": ref.account_id, "user_product_id": ref.user_product_id},
        )
        item = self._item(resp)
        can_cancel, reason = item.get("can_cancel"), item.get("reason")
        if not isinstance(can_cancel, bool):
            raise ProviderProtocolError("can_cancel is not a boolean", provider=self.key)
        if can_cancel:
            return Eligibility.eligible(response=item)
        if reason == ALREADY_CANCELLED_REASON:
            return Eligibility.final(Outcome(type=OutcomeType.ALREADY_CANCELLED), response=item)
        if FALSE_AFTER_OUR_CANCEL_IS_CANCELLED and job.status is Status.CONFIRMING:
            # Eligibility said can_cancel=true; a cancel of ours may have acted since.
            return Eligibility.final(
                Outcome(type=OutcomeType.ALREADY_CANCELLED, details={"reason": reason}),
                response=item,
            )
        # Every documented reason is final: no retry can change the account's data.
        return Eligibility.final(
            Outcome(type=OutcomeType.NOT_ELIGIBLE, reason=str(reason)), response=item
        )

    async def confirm(self, ref: PaywayRef, job: JobRecord) -> Confirmation:
        resp = await self._call(
            "PUT",
            CANCEL_PATH,
            json_body={
                "account_id": ref.account_id,
                "user_product_id": ref.user_product_id,
                "cancellation_reason_id": ref.cancellation_reason_id,
            },
        )
        item = self._item(resp)
        try:
            outcome = Outcome(
                type=OutcomeType.CANCELLED,
                cancellation_type=str(item["cancellation_type"]),
                subscription_end_date=str(item["subscription_end_date"]),
            )
        except KeyError as exc:
            raise ProviderProtocolError(
                f"cancel response lacks {exc.args[0]}", provider=self.key
            ) from exc
        return Confirmation(outcome=outcome, response=item)

    def _item(self, resp: HttpResponse) -> dict[str, Any]:
        if resp.status != 200:
            raise self._error(resp)
        body = resp.json(self.key)
        item = body.get("item") if isinstance(body, dict) else None
        if not isinstance(item, dict):
            raise ProviderProtocolError(
                "response has no 'item' object", provider=self.key, body=redact(body)
            )
        return item

    def _error(self, resp: HttpResponse, cls: type[ProviderError] | None = None) -> ProviderError:
        # Payway errors: {"code": "invalid_parameter", "field": "account_id", "message": ...}
        try:
            body = resp.json(self.key)
        except ProviderProtocolError:
            body = {}
        body = body if isinstance(body, dict) else {}
        return self._http.error(
            resp,
            message=body.get("message"),
            code=body.get("code"),
            field=body.get("field"),
            cls=cls,
        )


SPEC = ProviderSpec(key="payway", reference=PaywayRef, settings=PaywaySettings, build=Payway)
