"""Axel Springer Partner Activation API ("PS-Dealer") sandbox: activation-link cancellation.

Behaviour follows /work/shared/providers.md (section axelspringer) and seed 000 (Cancel Purchase
Guide). Base URL `http://HOST:PORT/axelspringer/api/v1/`, token URL
`http://HOST:PORT/axelspringer/oauth2/token` (Cognito client credentials).
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sandboxes.control import sandbox_app
from sandboxes.core import ProviderError, Sandbox, SandboxSpec
from sandboxes.faults import FaultSettings
from sandboxes.tokens import InvalidToken, Token, bearer_value

KEY = "axelspringer"

DEMO_CLIENT_ID = "cancelflow-demo"
DEMO_CLIENT_SECRET = "axelspringer-demo-secret"
DEMO_PARTNER_ID = "partner-demo"

TOKEN_PATH = "/oauth2/token"
API = "/api/v1"
PURCHASE_PATH = API + "/partners/{partner_id}/purchases/{purchase_ref}"
CANCEL_PATH = PURCHASE_PATH + "/cancel"

# --- Assumptions: the API specification page is not public; each is one line to change. -------
# Reading a purchase answers {"purchaseRef", "status"}; cancelling it is
# POST .../purchases/{ref}/cancel answering {"purchaseRef", "previousStatus", "status"}.
# Errors are {"code", "message"}: 401 UNAUTHORIZED (no/expired token), 403 FORBIDDEN (another
# partner's path), 404 PURCHASE_NOT_FOUND, 409 ALREADY_CANCELED.
ALREADY_CANCELED = "ALREADY_CANCELED"
# --------------------------------------------------------------------------------------------------


class LinkStatus(enum.Enum):
    """Status of a purchase's single-use activation link."""

    CREATED = "Created"
    REDEEMED = "Redeemed"
    CANCELED = "Canceled"


# What cancelling a link in each status does (seed 000).
ACTIONS = {
    LinkStatus.CREATED: "link_invalidated",
    LinkStatus.REDEEMED: "subscription_cancelled_and_link_revoked",
}


@dataclass
class Purchase:
    partner_id: str
    purchase_ref: str
    status: LinkStatus


# Outcome kind -> initial link status.
KINDS = {
    "created": LinkStatus.CREATED,
    "redeemed": LinkStatus.REDEEMED,
    "canceled": LinkStatus.CANCELED,
}


@dataclass(frozen=True)
class AxelSpringerDemo:
    """Named demo purchase refs (of DEMO_PARTNER_ID); each has the outcome its name says."""

    # GET -> Created; cancel -> previousStatus Created: the link is invalidated
    created: str
    # GET -> Redeemed; cancel -> previousStatus Redeemed: subscription cancelled, link revoked
    redeemed: str
    # GET -> Canceled; cancel -> 409 ALREADY_CANCELED
    canceled: str
    # GET and cancel -> 404 PURCHASE_NOT_FOUND
    unknown: str
    partner_id: str
    # A partner the demo token does not belong to: any call under it -> 403.
    other_partner_id: str

    def purchases(self) -> dict[str, str]:
        """Every existing demo purchase ref by outcome kind."""
        return {kind: getattr(self, kind) for kind in KINDS}


DEMO = AxelSpringerDemo(
    created="demo-purchase-created-0001",
    redeemed="demo-purchase-redeemed-0001",
    canceled="demo-purchase-canceled-0001",
    unknown="demo-purchase-unknown-0001",
    partner_id=DEMO_PARTNER_ID,
    other_partner_id="partner-other",
)

# client id -> (client secret, partner the client acts for)
CLIENTS = {DEMO_CLIENT_ID: (DEMO_CLIENT_SECRET, DEMO_PARTNER_ID)}


class AxelSpringerSandbox(Sandbox):
    """Axel Springer purchases and their activation links, in memory."""

    key = KEY
    bulk_kinds = tuple(KINDS)
    cancel_routes = frozenset({"cancel_purchase"})

    def load_demo(self) -> None:
        self.purchases: dict[tuple[str, str], Purchase] = {}
        self.actions: list[dict[str, str]] = []
        for kind, purchase_ref in DEMO.purchases().items():
            self.add_purchase(kind, purchase_ref=purchase_ref)

    def extra_state(self) -> dict[str, Any]:
        return {"actions": self.actions}

    def create_reference(self, kind: str) -> str:
        return self.add_purchase(kind).purchase_ref

    def render_error(self, error: ProviderError) -> web.Response:
        if error.details.get("oauth"):
            # The token endpoint is Cognito's: OAuth 2 error bodies.
            return web.json_response({"error": error.code}, status=error.status)
        body = {"code": error.code.upper(), "message": error.message}
        return web.json_response(body, status=error.status)

    def add_purchase(
        self,
        kind: str = "redeemed",
        *,
        purchase_ref: str | None = None,
        partner_id: str = DEMO_PARTNER_ID,
    ) -> Purchase:
        """Add a purchase of outcome `kind` (a KINDS key); the purchase."""
        purchase = Purchase(
            partner_id=partner_id,
            purchase_ref=purchase_ref or f"bulk-purchase-{self.next_serial():08d}",
            status=KINDS[kind],
        )
        self.purchases[(partner_id, purchase.purchase_ref)] = purchase
        return purchase

    def purchase(self, partner_id: str, purchase_ref: str) -> Purchase:
        """The partner's purchase; raises 404."""
        purchase = self.purchases.get((partner_id, purchase_ref))
        if purchase is None:
            raise ProviderError(404, "PURCHASE_NOT_FOUND", f"Purchase {purchase_ref} not found")
        return purchase

    def cancel(self, purchase: Purchase) -> dict[str, str]:
        """Cancel by link status (seed 000); the answer. 409 if already Canceled."""
        previous = purchase.status
        if previous is LinkStatus.CANCELED:
            raise ProviderError(409, ALREADY_CANCELED, "Purchase is already canceled")
        purchase.status = LinkStatus.CANCELED
        self.record_effective_cancel(purchase.purchase_ref)
        self.actions.append(
            {
                "purchaseRef": purchase.purchase_ref,
                "previousStatus": previous.value,
                "action": ACTIONS[previous],
            }
        )
        return {
            "purchaseRef": purchase.purchase_ref,
            "previousStatus": previous.value,
            "status": LinkStatus.CANCELED.value,
        }

    async def issue_token(self, request: web.Request) -> dict[str, Any]:
        """Cognito's client-credentials grant: Basic client auth, form content type."""
        if request.content_type != "application/x-www-form-urlencoded":
            raise ProviderError(400, "invalid_request", "Form content type required", oauth=True)
        form = await request.post()
        grant_type = request.query.get("grant_type") or form.get("grant_type")
        client_id = _basic_client(request.headers.get("Authorization"), CLIENTS)
        if client_id is None:
            raise ProviderError(401, "invalid_client", "Invalid client credentials", oauth=True)
        if grant_type != "client_credentials":
            raise ProviderError(400, "unsupported_grant_type", "Unsupported grant", oauth=True)
        token = self.tokens.issue(client_id=client_id, owner=CLIENTS[client_id][1])
        return {
            "access_token": token.value,
            "expires_in": self.tokens.ttl_s,
            "token_type": "Bearer",
        }

    def authorize(self, request: web.Request) -> Token:
        """A valid bearer token whose partner is the path's; raises 401 / 403."""
        try:
            token = self.tokens.check(bearer_value(request.headers.get("Authorization")))
        except InvalidToken as problem:
            raise ProviderError(401, "UNAUTHORIZED", str(problem)) from None
        if token.owner != request.match_info["partner_id"]:
            raise ProviderError(403, "FORBIDDEN", "Token does not belong to this partner")
        return token


def _basic_client(authorization: str | None, clients: dict[str, tuple[str, str]]) -> str | None:
    """The client id of valid `Authorization: Basic base64(id:secret)` credentials, or None."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        client_id, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    known = clients.get(client_id)
    return client_id if known is not None and known[0] == secret else None


AXELSPRINGER_STATE = web.AppKey("axelspringer_state", AxelSpringerSandbox)


def create_app(
    *, faults: FaultSettings | None = None, token_ttl_s: int | None = None
) -> web.Application:
    """The Axel Springer sub-application (mount it at `/axelspringer`)."""
    sandbox = AxelSpringerSandbox(faults=faults, token_ttl_s=token_ttl_s)
    app = sandbox_app(sandbox)
    app[AXELSPRINGER_STATE] = sandbox

    async def token(request: web.Request) -> web.Response:
        return web.json_response(await sandbox.issue_token(request))

    async def read(request: web.Request) -> web.Response:
        sandbox.authorize(request)
        info = request.match_info
        purchase = sandbox.purchase(info["partner_id"], info["purchase_ref"])
        return web.json_response(
            {"purchaseRef": purchase.purchase_ref, "status": purchase.status.value}
        )

    async def cancel(request: web.Request) -> web.Response:
        sandbox.authorize(request)
        info = request.match_info
        purchase = sandbox.purchase(info["partner_id"], info["purchase_ref"])
        return web.json_response(sandbox.cancel(purchase))

    app.router.add_post(TOKEN_PATH, token, name="token")
    app.router.add_get(PURCHASE_PATH, read, name="get_purchase")
    app.router.add_post(CANCEL_PATH, cancel, name="cancel_purchase")
    return app


SPEC = SandboxSpec(
    key=KEY,
    create_app=create_app,
    settings=lambda url: {
        "base_url": f"{url}{API}",
        "token_url": f"{url}{TOKEN_PATH}",
        "client_id": DEMO_CLIENT_ID,
        "client_secret": DEMO_CLIENT_SECRET,
        "partner_id": DEMO_PARTNER_ID,
    },
    succeeding_kinds=("created", "redeemed"),
    subscription=lambda ref: {"purchase_ref": ref},
)
