"""Azotte C2A sandbox: two-phase cancellation (request, confirm) with retention offers.

Behaviour follows /work/shared/providers.md (section azotte) and seed 003 (Request Cancel).
Base URL: `http://HOST:PORT/azotte`, API under `/azotte/api/v1/c2a/`.
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sandboxes.control import sandbox_app
from sandboxes.core import ProviderError, Sandbox, SandboxSpec
from sandboxes.faults import FaultSettings

KEY = "azotte"

DEMO_API_KEY = "sk_sandbox_cancelflow_demo"
DEMO_TENANT = "e2a1c7b2-4f3a-4b8e-9c2d-1a2b3c4d5e6f"

REQUEST_PATH = "/api/v1/c2a/subscription/cancel/request"
CONFIRM_PATH = "/api/v1/c2a/subscription/cancel/confirm"

# The real API answers with this JSON-ish content type; clients must parse it as JSON.
CONTENT_TYPE = "application/clientOutput+Json"

METHODS = ("Normal", "Immediate", "EndOfPeriod")

# --- Assumptions: not in Azotte's public docs; each is one line to change. ---------------------
# Both phases on an order whose cancellation was already confirmed: 409 with this code.
ALREADY_CANCELLED = "ALREADY_CANCELLED"
# confirm without a request phase for the order: 409 with this code.
REQUEST_PHASE_REQUIRED = "REQUEST_PHASE_REQUIRED"
# confirm with another cancelationMethod than the request phase: 422 with this code.
METHOD_MISMATCH = "METHOD_MISMATCH"
# The request phase tells how the order is billed, in an extra field
# `subscription: {"billingChannel": ...}`, so a client knows a confirm SUCCESS will be pending
# the store's or payment provider's own confirmation. The confirm answer stays as documented.
# --------------------------------------------------------------------------------------------------

CANCELLATION_REASONS = (
    {"code": "PRICE", "label": "Too expensive"},
    {"code": "USAGE", "label": "I don't use it enough"},
    {"code": "CONTENT", "label": "Missing content I want"},
    {"code": "OTHER", "label": "Other"},
)


class BillingChannel(enum.Enum):
    """Who bills the order: decides whether a confirmed cancel is final or pending."""

    WEB = "web"
    APP_STORE = "app_store"
    PLAY_STORE = "play_store"
    THIRD_PARTY = "third_party"

    @property
    def pending_confirmation(self) -> str | None:
        """Who must still confirm the end after a SUCCESS confirm, or None if it is final."""
        return _PENDING[self]


_PENDING = {
    BillingChannel.WEB: None,
    BillingChannel.APP_STORE: "app_store",
    BillingChannel.PLAY_STORE: "play_store",
    BillingChannel.THIRD_PARTY: "payment_provider",
}


@dataclass
class Order:
    id: str
    tenant: str
    response_type: str  # what the request phase answers: Processed | Presentation | Offer
    billing_channel: BillingChannel
    offer_identifier: str | None = None
    requested_method: str | None = None  # set by the request phase
    cancelled: bool = False
    survey: str | None = None


@dataclass(frozen=True)
class Kind:
    response_type: str = "Processed"
    billing_channel: BillingChannel = BillingChannel.WEB
    offer: bool = False
    cancelled: bool = False


# Outcome kind -> how its order is built.
KINDS: dict[str, Kind] = {
    "processed": Kind(),
    "offer": Kind(response_type="Offer", offer=True),
    "presentation": Kind(response_type="Presentation"),
    "app_store": Kind(billing_channel=BillingChannel.APP_STORE),
    "play_store": Kind(billing_channel=BillingChannel.PLAY_STORE),
    "third_party": Kind(billing_channel=BillingChannel.THIRD_PARTY),
    "already_cancelled": Kind(cancelled=True),
}


@dataclass(frozen=True)
class AzotteDemo:
    """Named demo order identifiers; each is the outcome its name says."""

    # request -> Processed; confirm -> SUCCESS, ended
    processed: str
    # request -> Offer with a retention offer; confirm (offer rejected) -> SUCCESS, ended
    offer: str
    # request -> Presentation; confirm -> SUCCESS, ended
    presentation: str
    # request -> Processed, billingChannel app_store; confirm -> SUCCESS, pending the App Store
    app_store: str
    # same, billed by Google Play: pending play_store
    play_store: str
    # same, billed by a third-party payment provider: pending payment_provider
    third_party: str
    # request and confirm -> 409 ALREADY_CANCELLED (assumed)
    already_cancelled: str
    # request -> 404
    not_found: str
    # The offer identifier of the `offer` order.
    offer_identifier: str

    def orders(self) -> dict[str, str]:
        """Every existing demo order by outcome kind."""
        return {kind: getattr(self, kind) for kind in KINDS}


def _order_id(n: int) -> str:
    # Azotte order ids look like ULIDs prefixed with "or_" (seed 003: "or_01J3X...").
    return f"or_01J3XSANDB{n:016d}"


DEMO = AzotteDemo(
    **{kind: _order_id(n) for n, kind in enumerate(KINDS, 1)},
    not_found=_order_id(999_999),
    offer_identifier="of_01J3XSANDBOFFER00000000001",
)


class AzotteSandbox(Sandbox):
    """Azotte orders and their two-phase cancellation, in memory."""

    key = KEY
    bulk_kinds = tuple(KINDS)
    cancel_routes = frozenset({"cancel_confirm"})

    def load_demo(self) -> None:
        self.orders: dict[str, Order] = {}
        for kind, order_id in DEMO.orders().items():
            self.add_order(kind, order_id=order_id)

    def extra_state(self) -> dict[str, Any]:
        # Only orders a client touched: a bulk of thousands stays out of the snapshot.
        return {
            "cancellations": {
                order.id: {
                    "method": order.requested_method,
                    "survey": order.survey,
                    "pendingConfirmation": order.billing_channel.pending_confirmation,
                }
                for order in self.orders.values()
                if order.id in self.effective_cancels
            },
            "pending_confirmation": {
                order.id: pending
                for order in self.orders.values()
                if order.cancelled and (pending := order.billing_channel.pending_confirmation)
            },
        }

    def create_reference(self, kind: str) -> str:
        return self.add_order(kind).id

    def render_error(self, error: ProviderError) -> web.Response:
        details = {name: error.details.get(name) for name in ("field", "value", "constraint")}
        body = {
            "error": {
                "type": _ERROR_TYPES.get(error.status, "api_error"),
                "code": error.code.upper(),
                "message": error.message,
                "details": details,
                "request_id": f"req_{uuid.uuid4().hex[:24]}",
            }
        }
        return _respond(body, status=error.status)

    def add_order(
        self, kind: str = "processed", *, order_id: str | None = None, tenant: str = DEMO_TENANT
    ) -> Order:
        """Add an order of outcome `kind` (a KINDS key) for `tenant`; the order."""
        spec = KINDS[kind]
        order_id = order_id or _order_id(100_000 + self.next_serial())
        order = Order(
            id=order_id,
            tenant=tenant,
            response_type=spec.response_type,
            billing_channel=spec.billing_channel,
            offer_identifier=DEMO.offer_identifier if spec.offer else None,
            cancelled=spec.cancelled,
        )
        self.orders[order.id] = order
        return order

    def order_for(self, tenant: str, order_id: str) -> Order:
        """The tenant's live order; raises 404 if unknown, 409 if already cancelled."""
        order = self.orders.get(order_id)
        if order is None or order.tenant != tenant:
            raise ProviderError(
                404,
                "ORDER_NOT_FOUND",
                "Order not found",
                field="orderIdentifier",
                value=order_id,
                constraint="exists",
            )
        if order.cancelled:
            raise ProviderError(409, ALREADY_CANCELLED, "Subscription is already cancelled")
        return order

    def request(self, order: Order, method: str) -> dict[str, Any]:
        """Phase 1: remember the method; the RequestCancelResponse."""
        order.requested_method = method
        body: dict[str, Any] = {
            "responseType": order.response_type,
            "cancellationReasons": list(CANCELLATION_REASONS),
            "subscription": {"billingChannel": order.billing_channel.value},
            "status": {"messageCode": "SUCCESS"},
        }
        if order.offer_identifier:
            body["offer"] = {
                "offerIdentifier": order.offer_identifier,
                "title": "Stay for less",
                "description": "50% off your next 3 months",
                "discountPercent": 50,
                "durationMonths": 3,
            }
        return body

    def confirm(self, order: Order, method: str, survey: str | None) -> None:
        """Phase 2: end the order (or leave it pending its store / payment provider)."""
        if order.requested_method is None:
            raise ProviderError(
                409, REQUEST_PHASE_REQUIRED, "Call cancel/request for this order first"
            )
        if method != order.requested_method:
            raise ProviderError(
                422,
                METHOD_MISMATCH,
                "cancelationMethod must equal the one of the request phase",
                field="cancelationMethod",
                value=method,
                constraint=f"equals {order.requested_method}",
            )
        order.cancelled = True
        order.survey = survey
        self.record_effective_cancel(order.id)

    def authenticate(self, request: web.Request) -> str:
        """The request's tenant once its API key and tenant header are valid."""
        tenant = API_KEYS.get(request.headers.get("x-api-key", ""))
        if tenant is None:
            raise ProviderError(
                401, "INVALID_API_KEY", "Missing or invalid API key", field="x-api-key"
            )
        presented = request.headers.get("x-tn")
        if presented != tenant:
            raise ProviderError(
                403,
                "TENANT_MISMATCH",
                "The x-tn header does not match the API key's tenant",
                field="x-tn",
                value=presented,
                constraint="tenant of the API key",
            )
        return tenant


API_KEYS = {DEMO_API_KEY: DEMO_TENANT}

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "validation_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
}


def _respond(body: dict[str, Any], *, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, content_type=CONTENT_TYPE)


def _invalid(field: str, value: Any, constraint: str, message: str) -> ProviderError:
    return ProviderError(
        422, "VALIDATION_ERROR", message, field=field, value=value, constraint=constraint
    )


@dataclass(frozen=True)
class CancelBody:
    """The fields both phases share, validated."""

    order_identifier: str
    method: str
    current_step: int
    survey: str | None


async def _parse(request: web.Request) -> CancelBody:
    try:
        body = json.loads(await request.text())
    except json.JSONDecodeError:
        raise ProviderError(400, "INVALID_JSON", "Body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ProviderError(400, "INVALID_JSON", "Body must be a JSON object")
    order_id = body.get("orderIdentifier")
    if not order_id or not isinstance(order_id, str):
        raise _invalid("orderIdentifier", order_id, "required", "orderIdentifier is required")
    method = body.get("cancelationMethod", "Normal")
    if method not in METHODS:
        raise _invalid(
            "cancelationMethod", method, f"one of {', '.join(METHODS)}", "Unknown cancelationMethod"
        )
    step = body.get("currentStep", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _invalid("currentStep", step, "integer >= 0", "currentStep must be an integer >= 0")
    survey = body.get("survey")
    if survey is not None and not isinstance(survey, str):
        raise _invalid("survey", survey, "string", "survey must be a string")
    return CancelBody(order_id, method, step, survey)


AZOTTE_STATE = web.AppKey("azotte_state", AzotteSandbox)


def create_app(
    *, faults: FaultSettings | None = None, token_ttl_s: int | None = None
) -> web.Application:
    """The Azotte sub-application (mount it at `/azotte`). Azotte has no tokens: API keys."""
    sandbox = AzotteSandbox(faults=faults, token_ttl_s=token_ttl_s)
    app = sandbox_app(sandbox)
    app[AZOTTE_STATE] = sandbox

    async def request_cancel(request: web.Request) -> web.Response:
        tenant = sandbox.authenticate(request)
        body = await _parse(request)
        order = sandbox.order_for(tenant, body.order_identifier)
        return _respond(sandbox.request(order, body.method))

    async def confirm_cancel(request: web.Request) -> web.Response:
        tenant = sandbox.authenticate(request)
        body = await _parse(request)
        order = sandbox.order_for(tenant, body.order_identifier)
        sandbox.confirm(order, body.method, body.survey)
        return _respond({"status": {"messageCode": "SUCCESS"}})

    app.router.add_post(REQUEST_PATH, request_cancel, name="cancel_request")
    app.router.add_post(CONFIRM_PATH, confirm_cancel, name="cancel_confirm")
    return app


SPEC = SandboxSpec(
    key=KEY,
    create_app=create_app,
    settings=lambda url: {"base_url": url, "api_key": DEMO_API_KEY, "tenant": DEMO_TENANT},
    # app_store: billed by the store, the job ends pending_provider_confirmation.
    succeeding_kinds=("processed", "app_store"),
    subscription=lambda ref: {"order_identifier": ref},
)
