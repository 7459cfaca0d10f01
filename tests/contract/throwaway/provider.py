"""The throwaway provider's adapter: read a member's subscription, then cancel it.

Its API is the sandbox's (``tests.contract.throwaway.sandbox``): an ``X-Api-Key`` header,
``GET /v1/members/{id}`` and ``POST /v1/members/{id}/cancel``, errors as
``{"code", "message"}``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import SecretStr

from cancelflow.contract import JobRecord, Outcome, OutcomeType
from cancelflow.errors import ProviderProtocolError
from cancelflow.http import HttpResponse, ProviderHttp
from cancelflow.logging import redact
from cancelflow.providers.base import (
    Confirmation,
    Eligibility,
    PathSegment,
    ProviderSettings,
    ProviderSpec,
    SubscriptionRef,
)

KEY = "throwaway"
MEMBER_PATH = "/v1/members/{member_id}"


class ThrowawayRef(SubscriptionRef):
    identity_fields: ClassVar[tuple[str, ...]] = ("member_id",)

    member_id: PathSegment


class ThrowawaySettings(ProviderSettings):
    api_key: SecretStr


class Throwaway:
    key = KEY

    def __init__(self, settings: ThrowawaySettings, http: ProviderHttp) -> None:
        self._http = http
        self._headers = {"X-Api-Key": settings.api_key.get_secret_value()}

    async def check(self, ref: ThrowawayRef, job: JobRecord) -> Eligibility:
        resp = await self._http.request("GET", _path(ref), headers=self._headers)
        if resp.status == 404:
            return Eligibility.final(Outcome(type=OutcomeType.NOT_FOUND))
        if resp.status != 200:
            raise self._error(resp)
        body = self._status_body(resp)
        if body["status"] == "cancelled":
            return Eligibility.final(Outcome(type=OutcomeType.ALREADY_CANCELLED), response=body)
        return Eligibility.eligible(response=body)

    async def confirm(self, ref: ThrowawayRef, job: JobRecord) -> Confirmation:
        resp = await self._http.request("POST", f"{_path(ref)}/cancel", headers=self._headers)
        if resp.status == 409:
            return Confirmation(outcome=Outcome(type=OutcomeType.ALREADY_CANCELLED))
        if resp.status == 404:
            return Confirmation(outcome=Outcome(type=OutcomeType.NOT_FOUND))
        if resp.status != 200:
            raise self._error(resp)
        body = self._status_body(resp)
        if body["status"] != "cancelled":
            raise ProviderProtocolError(
                "a cancel that did not cancel", provider=self.key, body=redact(body)
            )
        return Confirmation(outcome=Outcome(type=OutcomeType.CANCELLED), response=body)

    def _status_body(self, resp: HttpResponse) -> dict[str, Any]:
        body = resp.json(self.key)
        if not isinstance(body, dict) or not isinstance(body.get("status"), str):
            raise ProviderProtocolError(
                "answer has no status", provider=self.key, body=redact(body)
            )
        return body

    def _error(self, resp: HttpResponse) -> Exception:
        body = resp.json(self.key) if resp.body.strip().startswith(b"{") else {}
        fields = body if isinstance(body, dict) else {}
        return self._http.error(resp, message=fields.get("message"), code=fields.get("code"))


def _path(ref: ThrowawayRef) -> str:
    return MEMBER_PATH.format(member_id=ref.member_id)


SPEC = ProviderSpec(key=KEY, reference=ThrowawayRef, settings=ThrowawaySettings, build=Throwaway)
