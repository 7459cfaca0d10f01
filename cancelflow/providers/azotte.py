"""Azotte C2A: two-phase cancellation (request, then confirm) with retention offers.

Docs: Azotte's "Request Cancel" page (seed 003; ``shared/providers.md`` section azotte).
Phase 1 says whether the order can be cancelled and may answer a retention offer or a
presentation step; phase 2 confirms with the customer's survey.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import SecretStr, StringConstraints

from cancelflow.contract import JobRecord, Offer, Outcome, OutcomeType, Step
from cancelflow.errors import (
    ProviderError,
    ProviderProtocolError,
    ProviderRejected,
    ProviderUnavailable,
)
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

# Some headings of the docs omit "/v1"; every example uses it.
API_PREFIX = "/api/v1/c2a"
REQUEST_PATH = f"{API_PREFIX}/subscription/cancel/request"
CONFIRM_PATH = f"{API_PREFIX}/subscription/cancel/confirm"

SUCCESS = "SUCCESS"

# --- Assumptions: not in Azotte's public docs; each is one line to change. -----------------------
# confirm (and request) on an order whose cancellation is already confirmed: 409 with one of
# these codes, or a 200 whose status.messageCode is one of them.
ALREADY_CANCELLED_CODES = frozenset({"ALREADY_CANCELLED", "ALREADY_CANCELED"})
# currentStep of the confirm call: the funnel step after the request phase (step 0).
CONFIRM_STEP = 1
# A non-SUCCESS status.messageCode on a 200 is final unless the code itself says it is transient.
TRANSIENT_CODE_WORDS = ("UNAVAILABLE", "TIMEOUT", "TRY_AGAIN", "RETRY")
# How the order is billed: the request phase answers it as `subscription.billingChannel`. A
# confirm SUCCESS ends the subscription only for web billing; for a store or a third-party
# payment provider it still waits for them (seed 003). The request answer is on the job timeline
# (see `_billing_channel`), so confirm reads it from there. An answer without the field is taken
# as web billing; any channel other than "web" is taken as pending, naming who must confirm.
WEB_CHANNEL = "web"
PENDING_ON = {
    "app_store": "app_store",
    "play_store": "play_store",
    "third_party": "payment_provider",
}
# -------------------------------------------------------------------------------------------------

CancelationMethod = Literal["Normal", "Immediate", "EndOfPeriod"]
Uuid = Annotated[
    str, StringConstraints(pattern=r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
]


class AzotteRef(SubscriptionRef):
    identity_fields: ClassVar[tuple[str, ...]] = ("order_identifier",)

    # Sent in a JSON body today, but held to the rule of every reference: it stays one path
    # segment's worth of text, whatever Azotte or a proxy in front of it does with it.
    order_identifier: Annotated[PathSegment, StringConstraints(min_length=1, max_length=200)]
    cancelation_method: CancelationMethod = "Normal"


class AzotteSettings(ProviderSettings):
    api_key: SecretStr
    tenant: Uuid  # sent as x-tn


class Azotte:
    key = "azotte"

    def __init__(self, settings: AzotteSettings, http: ProviderHttp) -> None:
        self._settings = settings
        self._http = http

    async def _call(self, path: str, body: dict[str, Any]) -> HttpResponse:
        """One authenticated POST: API key and tenant headers on every call."""
        return await self._http.request(
            "POST",
            path,
            json_body=body,
            headers={
                "x-api-key": self._settings.api_key.get_secret_value(),
                "x-tn": self._settings.tenant,
                "Accept": "application/json",
            },
        )

    async def check(self, ref: AzotteRef, job: JobRecord) -> Eligibility:
        resp = await self._call(
            REQUEST_PATH,
            {
                "orderIdentifier": ref.order_identifier,
                "cancelationMethod": ref.cancelation_method,
                "currentStep": 0,
            },
        )
        final = self._final_outcome(resp)
        if final is not None:
            return Eligibility.final(final, response=self._error_body(resp))
        body = self._success(resp)
        reasons = body.get("cancellationReasons", [])
        if not isinstance(reasons, list) or not all(isinstance(r, dict) for r in reasons):
            raise ProviderProtocolError(
                "cancellationReasons is not a list of objects", provider=self.key, body=redact(body)
            )
        kind = body.get("responseType")
        if kind == "Processed":
            return Eligibility.eligible(response=body, cancellation_reasons=reasons)
        if kind == "Offer":
            offer = body.get("offer")
            identifier = offer.get("offerIdentifier") if isinstance(offer, dict) else None
            if not isinstance(offer, dict) or not isinstance(identifier, str) or not identifier:
                raise ProviderProtocolError(
                    "an Offer answer without offer.offerIdentifier",
                    provider=self.key,
                    body=redact(body),
                )
            return Eligibility.offered(
                Offer(
                    kind="offer",
                    offer_identifier=identifier,
                    details=redact(offer),
                    cancellation_reasons=reasons,
                ),
                response=body,
            )
        if kind == "Presentation":
            envelope = ("responseType", "status", "cancellationReasons", "offer")
            details = {k: v for k, v in body.items() if k not in envelope}
            return Eligibility.offered(
                Offer(kind="presentation", details=redact(details), cancellation_reasons=reasons),
                response=body,
            )
        raise ProviderProtocolError(
            f"unknown responseType {kind!r}", provider=self.key, body=redact(body)
        )

    async def confirm(self, ref: AzotteRef, job: JobRecord) -> Confirmation:
        body: dict[str, Any] = {
            "orderIdentifier": ref.order_identifier,
            # Must equal the request phase's method: both come from the same reference.
            "cancelationMethod": ref.cancelation_method,
            "currentStep": CONFIRM_STEP,
        }
        survey = _survey(job)
        if survey is not None:
            body["survey"] = survey
        resp = await self._call(CONFIRM_PATH, body)
        final = self._final_outcome(resp)
        if final is not None:
            return Confirmation(outcome=final, response=self._error_body(resp))
        answer = self._success(resp)
        channel = _billing_channel(job)
        if channel is None or channel == WEB_CHANNEL:
            details = {"billing_channel": channel} if channel else {}
            outcome = Outcome(type=OutcomeType.CANCELLED, details=details)
        else:
            outcome = Outcome(
                type=OutcomeType.PENDING_PROVIDER_CONFIRMATION,
                details={
                    "billing_channel": channel,
                    "pending_confirmation_by": PENDING_ON.get(channel, channel),
                },
            )
        return Confirmation(outcome=outcome, response=answer)

    def _final_outcome(self, resp: HttpResponse) -> Outcome | None:
        """The outcome an error answer stands for (unknown order, already cancelled), if any."""
        if resp.status == 404:
            return Outcome(type=OutcomeType.NOT_FOUND)
        if resp.status == 409 and self._error_fields(resp).get("code") in ALREADY_CANCELLED_CODES:
            return Outcome(type=OutcomeType.ALREADY_CANCELLED)
        if resp.status == 200 and _message_code(self._error_body(resp)) in ALREADY_CANCELLED_CODES:
            return Outcome(type=OutcomeType.ALREADY_CANCELLED)
        return None

    def _success(self, resp: HttpResponse) -> dict[str, Any]:
        """The body of a 200 whose status.messageCode is SUCCESS; a typed error otherwise."""
        if resp.status != 200:
            raise self._error(resp)
        body = resp.json(self.key)
        code = _message_code(body)
        if not isinstance(body, dict) or code is None:
            raise ProviderProtocolError(
                "response has no status.messageCode", provider=self.key, body=redact(body)
            )
        if code != SUCCESS:
            transient = any(word in code.upper() for word in TRANSIENT_CODE_WORDS)
            cls = ProviderUnavailable if transient else ProviderRejected
            raise cls(
                f"provider answered messageCode {code}",
                provider=self.key,
                status=resp.status,
                code=code,
                body=resp.text[:500],
            )
        return body

    def _error_fields(self, resp: HttpResponse) -> dict[str, Any]:
        # {"error": {"type", "code", "message", "details": {"field", "value", "constraint"},
        #  "request_id"}}; an unreadable body leaves the status to speak for itself.
        try:
            body = resp.json(self.key)
        except ProviderProtocolError:
            return {}
        error = body.get("error") if isinstance(body, dict) else None
        return error if isinstance(error, dict) else {}

    def _error_body(self, resp: HttpResponse) -> Any:
        try:
            return resp.json(self.key)
        except ProviderProtocolError:
            return None

    def _error(self, resp: HttpResponse) -> ProviderError:
        error = self._error_fields(resp)
        details = error.get("details")
        field = details.get("field") if isinstance(details, dict) else None
        message = error.get("message")
        if message and error.get("request_id"):
            # Azotte support finds a call by its request id.
            message = f"{message} (request_id {error['request_id']})"
        return self._http.error(
            resp,
            message=str(message) if message else None,
            code=str(error["code"]) if error.get("code") else None,
            field=str(field) if field else None,
        )


def _message_code(body: Any) -> str | None:
    """``status.messageCode`` of an answer, if it has one."""
    status = body.get("status") if isinstance(body, dict) else None
    code = status.get("messageCode") if isinstance(status, dict) else None
    return code if isinstance(code, str) else None


def _survey(job: JobRecord) -> str | None:
    """The confirm call's survey string: the job's reason, then the customer's survey answers."""
    answers: dict[str, Any] = {}
    if job.reason is not None:
        answers = {"reasonCode": job.reason.code, "comment": job.reason.comment}
    if job.decision is not None and job.decision.decision == "reject" and job.decision.survey:
        answers.update(job.decision.survey)
    answers = {k: v for k, v in answers.items() if v is not None}
    return json.dumps(answers, separators=(",", ":")) if answers else None


def _billing_channel(job: JobRecord) -> str | None:
    """The billing channel the request phase answered, read from the job's timeline."""
    for entry in reversed(job.timeline):
        if entry.step == Step.ELIGIBILITY.value and isinstance(entry.response, dict):
            subscription = entry.response.get("subscription")
            channel = subscription.get("billingChannel") if isinstance(subscription, dict) else None
            return str(channel) if channel else None
    return None


SPEC = ProviderSpec(key="azotte", reference=AzotteRef, settings=AzotteSettings, build=Azotte)
