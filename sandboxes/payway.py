"""Payway (Adeprimo / Tulo) sandbox: token, can-cancel check, cancel, cancellation reasons.

Behaviour follows /work/shared/providers.md (section payway) and the vendor pages in seeds 001
(cancel_subscription) and 002 (can_cancel_subscription). Base URL: `http://HOST:PORT/payway`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from aiohttp import web

from sandboxes.control import sandbox_app
from sandboxes.core import ProviderError, Sandbox, SandboxSpec
from sandboxes.faults import FaultSettings
from sandboxes.tokens import InvalidToken, Token, bearer_value

KEY = "payway"

DEMO_CLIENT_ID = "cancelflow-demo"
DEMO_CLIENT_SECRET = "payway-demo-secret"
DEMO_ORGANISATION = "cancelflow-demo-org"
OTHER_ORGANISATION = "some-other-org"

SCOPE_SUBSCRIPTION_READ = "/external/subscription_system/r"
SCOPE_SUBSCRIPTION_WRITE = "/external/subscription_system/w"
SCOPE_REASONS_READ = "/external/cancellation_reason/r"
DEMO_SCOPE = f"{SCOPE_SUBSCRIPTION_READ} {SCOPE_SUBSCRIPTION_WRITE} {SCOPE_REASONS_READ}"

TOKEN_PATH = "/api/authorization/access_token"
CAN_CANCEL_PATH = "/external/api/v1/subscription_system/can_cancel_subscription"
CANCEL_PATH = "/external/api/v1/subscription_system/cancel_subscription"
REASONS_PATH = "/external/api/v1/cancellation_reasons"

# The server-to-server grant of Payway: not OAuth's client_credentials.
GRANT_TYPE = "none"

# Ids are Mongo ObjectIds; the docs give the pattern case-insensitively (/^[a-f\d]{24}$/i).
ID_PATTERN = re.compile(r"^[a-f\d]{24}$", re.IGNORECASE)
ID_FORMAT_MESSAGE = "Parameter must match format (/^[a-f\\d]{24}$/)"

# --- Assumptions: not in Payway's public docs; each is one line to change. ---------------------
# A product that is already cancelled cannot be cancelled again: can_cancel answers this reason.
ALREADY_CANCELLED = "already_cancelled"
# cancel_subscription on a product that can_cancel would refuse: HTTP 400 with this code.
NOT_CANCELLABLE = "not_cancellable"
# cancel_subscription on an already cancelled product is idempotent: 200 with the first answer
# again (see PaywaySandbox.cancel), and no second effective cancel.
# A product owned by another account than the one given is "not found" for that account.
# Period ends are rendered with the offset of the docs' example (CET, +01:00).
PERIOD_TZ = timezone(timedelta(hours=1))
# --------------------------------------------------------------------------------------------------


class Billing(enum.Enum):
    """How a product is billed right now: decides the cancellation rule of seed 001."""

    NO_OPEN_INVOICE = "no_open_invoice"
    AUTOGIRO = "autogiro"
    UNPAID_CURRENT_PERIOD = "unpaid_current_period"
    UNPAID_UPCOMING_PERIOD = "unpaid_upcoming_period"


@dataclass(frozen=True)
class PaywayRef:
    """What a client needs to cancel one subscription."""

    account_id: str
    user_product_id: str

    def as_json(self) -> dict[str, str]:
        return {"account_id": self.account_id, "user_product_id": self.user_product_id}


@dataclass
class Account:
    id: str
    organisation: str
    customer_number: str | None


@dataclass
class UserProduct:
    id: str
    account_id: str
    organisation: str
    billing: Billing
    period_end: datetime
    subscription_number: str | None
    has_external_service: bool  # an external subscription-system service is configured
    web_originated: bool
    # The item answered by the cancel that ended it; replayed on a repeated cancel.
    cancellation: dict[str, str] | None = None


@dataclass(frozen=True)
class CancellationReason:
    id: str
    name: str
    code: str
    integration_code: str
    visible_to_end_customer: bool
    internal: bool


@dataclass(frozen=True)
class Recipe:
    """How to build the records of one outcome kind."""

    billing: Billing = Billing.NO_OPEN_INVOICE
    account: Literal["ok", "missing", "other_organisation", "no_customer_number"] = "ok"
    product: Literal["ok", "missing", "other_organisation"] = "ok"
    subscription_number: bool = True
    external_service: bool = True
    web_originated: bool = True
    cancelled: bool = False


# Outcome kind -> records. Names of the not-eligible kinds are the reasons they produce.
RECIPES: dict[str, Recipe] = {
    "end_of_period": Recipe(),
    "autogiro": Recipe(billing=Billing.AUTOGIRO),
    "immediate": Recipe(billing=Billing.UNPAID_CURRENT_PERIOD),
    "end_of_period_with_credit": Recipe(billing=Billing.UNPAID_UPCOMING_PERIOD),
    "already_cancelled": Recipe(cancelled=True),
    "account_not_found": Recipe(account="missing"),
    "account_does_not_belong_to_organisation": Recipe(account="other_organisation"),
    "no_customer_number": Recipe(account="no_customer_number"),
    "user_product_not_found": Recipe(product="missing"),
    "user_product_does_not_belong_to_organisation": Recipe(product="other_organisation"),
    "no_subscription_number": Recipe(subscription_number=False),
    "no_external_service": Recipe(external_service=False),
    "not_web_originated": Recipe(web_originated=False),
}


@dataclass(frozen=True)
class PaywayDemo:
    """Named demo references: each field is the outcome its name says (see RECIPES)."""

    # cancel -> at_end_of_period (no open invoice)
    end_of_period: PaywayRef
    # cancel -> at_end_of_period (paid by Autogiro)
    autogiro: PaywayRef
    # cancel -> immediate, plus a credit invoice (unpaid invoice on the current period)
    immediate: PaywayRef
    # cancel -> at_end_of_period, plus a credit invoice (unpaid invoice on the upcoming period)
    end_of_period_with_credit: PaywayRef
    # can_cancel -> false "already_cancelled" (assumed); cancel -> 200 replay, no effective cancel
    already_cancelled: PaywayRef
    # can_cancel -> false with the reason of the same name; cancel -> 400 not_cancellable
    account_not_found: PaywayRef
    account_does_not_belong_to_organisation: PaywayRef
    no_customer_number: PaywayRef
    user_product_not_found: PaywayRef
    user_product_does_not_belong_to_organisation: PaywayRef
    no_subscription_number: PaywayRef
    no_external_service: PaywayRef
    not_web_originated: PaywayRef
    # A valid cancellation_reason_id, and a well-formed one that does not exist.
    reason_id: str
    unknown_reason_id: str

    def refs(self) -> dict[str, PaywayRef]:
        """Every demo subscription reference by outcome kind."""
        return {
            f.name: value
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), PaywayRef)
        }


def _demo_ref(n: int) -> PaywayRef:
    return PaywayRef(f"5cb80481a0000000000000{n:02x}", f"5cb80481b0000000000000{n:02x}")


DEMO = PaywayDemo(
    end_of_period=_demo_ref(1),
    autogiro=_demo_ref(2),
    immediate=_demo_ref(3),
    end_of_period_with_credit=_demo_ref(4),
    already_cancelled=_demo_ref(5),
    account_not_found=_demo_ref(6),
    account_does_not_belong_to_organisation=_demo_ref(7),
    no_customer_number=_demo_ref(8),
    user_product_not_found=_demo_ref(9),
    user_product_does_not_belong_to_organisation=_demo_ref(10),
    no_subscription_number=_demo_ref(11),
    no_external_service=_demo_ref(12),
    not_web_originated=_demo_ref(13),
    reason_id="5cb80481c00000000000000a",
    unknown_reason_id="5cb80481c0000000000000ff",
)

DEMO_REASONS: tuple[CancellationReason, ...] = (
    CancellationReason(DEMO.reason_id, "Too expensive", "price", "PRICE", True, False),
    CancellationReason("5cb80481c00000000000000b", "Not using it", "usage", "USAGE", True, False),
    CancellationReason("5cb80481c00000000000000c", "Moving abroad", "moving", "MOVE", True, False),
    CancellationReason("5cb80481c00000000000000d", "Customer service", "cs", "CS", False, True),
)


@dataclass(frozen=True)
class Client:
    secret: str
    organisation: str
    scopes: frozenset[str]


CLIENTS = {
    DEMO_CLIENT_ID: Client(DEMO_CLIENT_SECRET, DEMO_ORGANISATION, frozenset(DEMO_SCOPE.split())),
}


@dataclass
class Records:
    accounts: dict[str, Account] = field(default_factory=dict)
    products: dict[str, UserProduct] = field(default_factory=dict)


class PaywaySandbox(Sandbox):
    """Payway's accounts, user products and cancellation rules, in memory."""

    key = KEY
    bulk_kinds = tuple(RECIPES)
    cancel_routes = frozenset({"cancel_subscription"})

    def load_demo(self) -> None:
        self.records = Records()
        self.reasons = {reason.id: reason for reason in DEMO_REASONS}
        self.credit_invoices: list[dict[str, str]] = []
        self.cancellations: list[dict[str, str]] = []
        for kind, ref in DEMO.refs().items():
            self.add_subscription(kind, ref=ref)

    def extra_state(self) -> dict[str, Any]:
        return {"credit_invoices": self.credit_invoices, "cancellations": self.cancellations}

    def create_reference(self, kind: str) -> dict[str, str]:
        return self.add_subscription(kind).as_json()

    def render_error(self, error: ProviderError) -> web.Response:
        # Payway errors always carry `message`, often `code` and `field`.
        body = {"code": error.code, "message": error.message, **error.details}
        return web.json_response(body, status=error.status)

    def add_subscription(
        self,
        kind: str = "end_of_period",
        *,
        ref: PaywayRef | None = None,
        period_end: datetime | None = None,
    ) -> PaywayRef:
        """Add the account and user product of outcome `kind` (a RECIPES key); their ids."""
        recipe = RECIPES[kind]
        if ref is None:
            serial = self.next_serial()
            ref = PaywayRef(f"ac{serial:022x}", f"bd{serial:022x}")
        if recipe.account != "missing":
            self.records.accounts[ref.account_id] = Account(
                id=ref.account_id,
                organisation=_organisation(recipe.account),
                customer_number=(
                    None if recipe.account == "no_customer_number" else f"C{ref.account_id[-6:]}"
                ),
            )
        if recipe.product != "missing":
            product = UserProduct(
                id=ref.user_product_id,
                account_id=ref.account_id,
                organisation=_organisation(recipe.product),
                billing=recipe.billing,
                period_end=period_end or self._current_period_end(),
                subscription_number=(
                    f"S{ref.user_product_id[-6:]}" if recipe.subscription_number else None
                ),
                has_external_service=recipe.external_service,
                web_originated=recipe.web_originated,
            )
            if recipe.cancelled:
                product.cancellation = _item(product, "at_end_of_period", product.period_end)
            self.records.products[product.id] = product
        return ref

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), PERIOD_TZ)

    def _current_period_end(self) -> datetime:
        """Last second of the current calendar month: demo periods are monthly."""
        now = self._now()
        next_month = (now.replace(day=1) + timedelta(days=32)).replace(day=1)
        start_of_next = next_month.replace(hour=0, minute=0, second=0, microsecond=0)
        return start_of_next - timedelta(seconds=1)

    # --- rules -------------------------------------------------------------------------------

    def ineligibility(self, organisation: str, account_id: str, product_id: str) -> str | None:
        """Why `product_id` cannot be cancelled by `organisation`, or None (seed 002's reasons)."""
        account = self.records.accounts.get(account_id)
        if account is None:
            return "account_not_found"
        if account.organisation != organisation:
            return "account_does_not_belong_to_organisation"
        if not account.customer_number:
            return "no_customer_number"
        product = self.records.products.get(product_id)
        if product is None or product.account_id != account_id:
            return "user_product_not_found"
        if product.organisation != organisation:
            return "user_product_does_not_belong_to_organisation"
        if not product.subscription_number:
            return "no_subscription_number"
        if not product.has_external_service:
            return "no_external_service"
        if not product.web_originated:
            return "not_web_originated"
        if product.cancellation is not None:
            return ALREADY_CANCELLED
        return None

    def cancel(self, product: UserProduct, reason_id: str) -> dict[str, str]:
        """Cancel `product` by the rules of seed 001; the response item."""
        if product.cancellation is not None:
            return product.cancellation
        now = self._now()
        if product.billing is Billing.UNPAID_CURRENT_PERIOD:
            item = _item(product, "immediate", now)
            self._credit(product, "current", now)
        else:
            item = _item(product, "at_end_of_period", product.period_end)
            if product.billing is Billing.UNPAID_UPCOMING_PERIOD:
                self._credit(product, "upcoming", now)
        product.cancellation = item
        self.record_effective_cancel(product.id)
        self.cancellations.append({**item, "cancellation_reason_id": reason_id})
        return item

    def _credit(self, product: UserProduct, period: str, now: datetime) -> None:
        self.credit_invoices.append(
            {
                "credit_invoice_id": f"cc{len(self.credit_invoices) + 1:022x}",
                "user_product_id": product.id,
                "credited_period": period,
                "created_at": _timestamp(now),
            }
        )

    # --- auth --------------------------------------------------------------------------------

    def issue_token(self, form: dict[str, str]) -> dict[str, Any]:
        """Answer of the token endpoint for `form`; raises ProviderError when refused."""
        client = CLIENTS.get(form.get("client_id", ""))
        if client is None or client.secret != form.get("client_secret"):
            raise ProviderError(401, "invalid_client", "Invalid client credentials")
        if form.get("grant_type") != GRANT_TYPE:
            message = f"grant_type must be {GRANT_TYPE!r}"
            raise ProviderError(400, "unsupported_grant_type", message, field="grant_type")
        requested = list(dict.fromkeys(form.get("scope", "").split()))
        if not requested:
            raise ProviderError(400, "invalid_scope", "scope is required", field="scope")
        refused = [scope for scope in requested if scope not in client.scopes]
        if refused:
            raise ProviderError(
                400, "invalid_scope", f"Scope not allowed: {' '.join(refused)}", field="scope"
            )
        token = self.tokens.issue(
            client_id=form["client_id"], owner=client.organisation, scopes=frozenset(requested)
        )
        return {
            "access_token": token.value,
            "token_type": "bearer",
            "expires_in": self.tokens.ttl_s,
            "scope": " ".join(requested),
        }

    def authorize(self, request: web.Request, scope: str) -> Token:
        """The request's bearer token if valid and holding `scope`; raises ProviderError."""
        try:
            token = self.tokens.check(bearer_value(request.headers.get("Authorization")))
        except InvalidToken as problem:
            raise ProviderError(401, "invalid_token", str(problem)) from None
        if scope not in token.scopes:
            raise ProviderError(403, "insufficient_scope", f"Token lacks scope {scope}")
        return token


def _organisation(variant: str) -> str:
    return OTHER_ORGANISATION if variant == "other_organisation" else DEMO_ORGANISATION


def _item(product: UserProduct, cancellation_type: str, end: datetime) -> dict[str, str]:
    return {
        "user_product_id": product.id,
        "cancellation_type": cancellation_type,
        "subscription_end_date": _timestamp(end),
    }


def _timestamp(moment: datetime) -> str:
    """ISO-8601 with milliseconds and offset, as in the docs: 2024-01-12T23:59:59.000+01:00."""
    return moment.isoformat(timespec="milliseconds")


# --- request parsing ---------------------------------------------------------------------------


async def _body_params(request: web.Request) -> dict[str, Any]:
    """The JSON object body; `{}` when there is none (the seed's GET sends one, others don't)."""
    text = await request.text()
    if not text.strip():
        return {}
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        raise ProviderError(400, "invalid_body", "Body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ProviderError(400, "invalid_body", "Body must be a JSON object")
    return body


def _checked_params(params: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, str]:
    """Present parameters, lower-cased, after Payway's unknown-parameter and format checks."""
    for name in params:
        if name not in allowed:
            raise ProviderError(400, "unknown_parameter", "Unknown parameter", field=name)
    checked: dict[str, str] = {}
    for name in allowed:
        value = params.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str) or not ID_PATTERN.match(value):
            raise ProviderError(400, "invalid_parameter", ID_FORMAT_MESSAGE, field=name)
        checked[name] = value.lower()
    return checked


def _field_of(reason: str) -> str:
    return "account_id" if reason.startswith(("account", "no_customer")) else "user_product_id"


# --- routes ----------------------------------------------------------------------------------

PAYWAY_STATE = web.AppKey("payway_state", PaywaySandbox)


def create_app(
    *, faults: FaultSettings | None = None, token_ttl_s: int | None = None
) -> web.Application:
    """The Payway sub-application (mount it at `/payway`)."""
    sandbox = PaywaySandbox(faults=faults, token_ttl_s=token_ttl_s)
    app = sandbox_app(sandbox)
    app[PAYWAY_STATE] = sandbox

    async def access_token(request: web.Request) -> web.Response:
        form = {name: str(value) for name, value in (await request.post()).items()}
        return web.json_response(sandbox.issue_token(form))

    async def can_cancel(request: web.Request) -> web.Response:
        token = sandbox.authorize(request, SCOPE_SUBSCRIPTION_READ)
        params = {**(await _body_params(request)), **request.query}
        checked = _checked_params(params, ("account_id", "user_product_id"))
        if "account_id" not in checked:
            reason: str | None = "no_account_id"
        elif "user_product_id" not in checked:
            reason = "no_user_product_id"
        else:
            reason = sandbox.ineligibility(
                token.owner, checked["account_id"], checked["user_product_id"]
            )
        return web.json_response({"item": {"can_cancel": reason is None, "reason": reason}})

    async def cancel(request: web.Request) -> web.Response:
        token = sandbox.authorize(request, SCOPE_SUBSCRIPTION_WRITE)
        names = ("account_id", "user_product_id", "cancellation_reason_id")
        checked = _checked_params(await _body_params(request), names)
        for name in names:
            if name not in checked:
                raise ProviderError(400, "invalid_parameter", "Parameter is required", field=name)
        reason_id = checked["cancellation_reason_id"]
        if reason_id not in sandbox.reasons:
            raise ProviderError(
                400,
                "invalid_parameter",
                "Cancellation reason not found",
                field="cancellation_reason_id",
            )
        product_id = checked["user_product_id"]
        reason = sandbox.ineligibility(token.owner, checked["account_id"], product_id)
        if reason is not None and reason != ALREADY_CANCELLED:
            raise ProviderError(
                400,
                NOT_CANCELLABLE,
                f"Subscription cannot be cancelled: {reason}",
                field=_field_of(reason),
            )
        product = sandbox.records.products[product_id]
        return web.json_response({"item": sandbox.cancel(product, reason_id)})

    async def reasons(request: web.Request) -> web.Response:
        sandbox.authorize(request, SCOPE_REASONS_READ)
        items = [dataclasses.asdict(reason) for reason in sandbox.reasons.values()]
        return web.json_response({"items": items})

    app.router.add_post(TOKEN_PATH, access_token, name="access_token")
    app.router.add_get(CAN_CANCEL_PATH, can_cancel, name="can_cancel_subscription")
    app.router.add_put(CANCEL_PATH, cancel, name="cancel_subscription")
    app.router.add_get(REASONS_PATH, reasons, name="cancellation_reasons")
    return app


SPEC = SandboxSpec(
    key=KEY,
    create_app=create_app,
    settings=lambda url: {
        "base_url": url,
        "client_id": DEMO_CLIENT_ID,
        "client_secret": DEMO_CLIENT_SECRET,
    },
    succeeding_kinds=("immediate", "end_of_period"),
    # A bulk reference is the account and user product; the request also names a reason.
    subscription=lambda ref: {**ref, "cancellation_reason_id": DEMO.reason_id},
)
