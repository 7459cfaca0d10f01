"""AppDirect billing API sandbox: read, list and cancel (DELETE) subscriptions, OAuth 1.0 signed.

Behaviour follows /work/shared/providers.md (section appdirect) and seed 004 (Canceling a
subscription). Base URL: `http://HOST:PORT/appdirect`, API under `/appdirect/api/billing/v1/`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from aiohttp import web

from sandboxes.control import sandbox_app
from sandboxes.core import ProviderError, Sandbox, SandboxSpec
from sandboxes.faults import FaultSettings
from sandboxes.oauth1 import OAuth1Rejected, OAuth1Verifier
from sandboxes.tokens import Clock

KEY = "appdirect"

DEMO_CONSUMER_KEY = "cancelflow-demo"
DEMO_CONSUMER_SECRET = "appdirect-demo-secret"
CONSUMERS = {DEMO_CONSUMER_KEY: DEMO_CONSUMER_SECRET}

API = "/api/billing/v1"
SUBSCRIPTION_PATH = API + "/subscriptions/{subscription_id}"
COMPANY_SUBSCRIPTIONS_PATH = API + "/companies/{company_id}/subscriptions"
USER_SUBSCRIPTIONS_PATH = API + "/companies/{company_id}/users/{user_id}/subscriptions"

# Statuses of a live subscription; DELETE moves any of them to CANCELLED.
LIVE_STATUSES = ("ACTIVE", "FREE_TRIAL", "SUSPENDED")
CANCELLED = "CANCELLED"

# Bulk records get stable UUIDs from their serial: reproducible across runs.
_BULK_NAMESPACE = uuid.UUID("6d1f4f0e-3c55-4c1e-9a57-0b7c2b1d0a11")


@dataclass
class Subscription:
    id: str
    status: str
    company_id: str
    user_id: str
    edition_code: str = "STANDARD"
    created_ms: int = 1_438_728_054_000

    def as_json(self) -> dict[str, Any]:
        """The sandbox's subscription representation (the fields a client relies on)."""
        return {
            "id": self.id,
            "status": self.status,
            "creationDate": self.created_ms,
            "company": {"id": self.company_id},
            "user": {"id": self.user_id},
            "order": {"editionCode": self.edition_code, "pricingDuration": "MONTHLY"},
        }


# Outcome kind -> status of its subscription.
KINDS = {"active": "ACTIVE", "free_trial": "FREE_TRIAL", "cancelled": CANCELLED}


@dataclass(frozen=True)
class AppDirectDemo:
    """Named demo ids; each subscription id has the outcome its name says."""

    # GET -> ACTIVE; DELETE -> 204
    active: str
    # GET -> FREE_TRIAL; DELETE -> 204
    free_trial: str
    # GET -> CANCELLED; DELETE -> 400 SUBSCRIPTION_NOT_EDITABLE ("previously deleted")
    cancelled: str
    # GET and DELETE -> 404 with an XML body
    not_found: str
    # Owner of every demo subscription, for the list routes.
    company_id: str
    user_id: str

    def subscriptions(self) -> dict[str, str]:
        """Every existing demo subscription id by outcome kind."""
        return {kind: getattr(self, kind) for kind in KINDS}


DEMO = AppDirectDemo(
    active="7845d75c-0fc0-4ec3-ac17-df95a746eff9",
    free_trial="3b0f6e2a-8d1c-4f7e-a5b9-2c4d6e8f0a13",
    cancelled="c1d2e3f4-a5b6-4c7d-8e9f-0a1b2c3d4e5f",
    not_found="00000000-dead-4bee-8f00-000000000404",
    company_id="9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d",
    user_id="1f2e3d4c-5b6a-4978-8a6b-5c4d3e2f1a0b",
)


class AppDirectSandbox(Sandbox):
    """AppDirect subscriptions, in memory, behind OAuth 1.0 signature checks."""

    key = KEY
    bulk_kinds = tuple(KINDS)
    cancel_routes = frozenset({"delete_subscription"})

    def __init__(
        self,
        *,
        faults: FaultSettings | None = None,
        token_ttl_s: int | None = None,
        clock: Clock = time.time,
    ) -> None:
        # Nonce memory is auth state, like tokens: a reset of the data keeps it.
        self.oauth = OAuth1Verifier(CONSUMERS, clock=clock)
        super().__init__(faults=faults, token_ttl_s=token_ttl_s, clock=clock)

    def load_demo(self) -> None:
        self.subscriptions: dict[str, Subscription] = {}
        for kind, subscription_id in DEMO.subscriptions().items():
            self.add_subscription(kind, subscription_id=subscription_id)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def create_reference(self, kind: str) -> str:
        return self.add_subscription(kind).id

    def render_error(self, error: ProviderError) -> web.Response:
        if error.status == 404:
            # The real API answers 404s in XML even to a JSON request.
            xml = (
                "<?xml version='1.0' encoding='UTF-8'?>"
                f"<errors><error><code>{escape(error.code.upper())}</code>"
                f"<message>{escape(error.message)}</message></error></errors>"
            )
            return web.Response(text=xml, status=404, content_type="application/xml")
        body = {"code": error.code.upper(), "message": error.message}
        return web.json_response(body, status=error.status)

    def add_subscription(
        self,
        kind: str = "active",
        *,
        subscription_id: str | None = None,
        company_id: str = DEMO.company_id,
        user_id: str = DEMO.user_id,
    ) -> Subscription:
        """Add a subscription of outcome `kind` (a KINDS key); the subscription."""
        subscription = Subscription(
            id=subscription_id or str(uuid.uuid5(_BULK_NAMESPACE, str(self.next_serial()))),
            status=KINDS[kind],
            company_id=company_id,
            user_id=user_id,
        )
        self.subscriptions[subscription.id] = subscription
        return subscription

    def get(self, subscription_id: str) -> Subscription:
        """The subscription; raises the provider's 404."""
        subscription = self.subscriptions.get(subscription_id)
        if subscription is None:
            raise ProviderError(404, "NOT_FOUND", f"Subscription {subscription_id} not found")
        return subscription

    def cancel(self, subscription_id: str) -> None:
        """DELETE: CANCELLED now; 400 if it was already (seed 004: 'previously deleted')."""
        subscription = self.get(subscription_id)
        if subscription.status == CANCELLED:
            raise ProviderError(
                400,
                "SUBSCRIPTION_NOT_EDITABLE",
                f"Cannot cancel a subscription in {CANCELLED} status",
            )
        subscription.status = CANCELLED
        self.record_effective_cancel(subscription.id)

    def listed(self, company_id: str, user_id: str | None = None) -> list[dict[str, Any]]:
        """Subscriptions of a company (or of one of its users); 404 if it has none."""
        found = [
            subscription.as_json()
            for subscription in self.subscriptions.values()
            if subscription.company_id == company_id
            and (user_id is None or subscription.user_id == user_id)
        ]
        if not found:
            owner = f"user {user_id}" if user_id else f"company {company_id}"
            raise ProviderError(404, "NOT_FOUND", f"No subscriptions found for {owner}")
        return found

    async def authenticate(self, request: web.Request) -> str:
        """The consumer key of a correctly signed request; raises the provider's 401."""
        form_body = None
        if request.content_type == "application/x-www-form-urlencoded":
            form_body = await request.text()
        # The URL as the client signed it: scheme, Host header, raw path and query.
        url = f"{request.scheme}://{request.host}{request.raw_path}"
        try:
            return self.oauth.verify(
                method=request.method,
                url=url,
                authorization=request.headers.get("Authorization"),
                form_body=form_body,
            )
        except OAuth1Rejected as rejected:
            raise ProviderError(401, "UNAUTHORIZED", str(rejected)) from None


APPDIRECT_STATE = web.AppKey("appdirect_state", AppDirectSandbox)


def create_app(
    *, faults: FaultSettings | None = None, token_ttl_s: int | None = None
) -> web.Application:
    """The AppDirect sub-application (mount it at `/appdirect`). Signed requests, no tokens."""
    sandbox = AppDirectSandbox(faults=faults, token_ttl_s=token_ttl_s)
    app = sandbox_app(sandbox)
    app[APPDIRECT_STATE] = sandbox

    async def read(request: web.Request) -> web.Response:
        await sandbox.authenticate(request)
        return web.json_response(sandbox.get(request.match_info["subscription_id"]).as_json())

    async def delete(request: web.Request) -> web.Response:
        await sandbox.authenticate(request)
        sandbox.cancel(request.match_info["subscription_id"])
        return web.Response(status=204)

    async def company_list(request: web.Request) -> web.Response:
        await sandbox.authenticate(request)
        return web.json_response(sandbox.listed(request.match_info["company_id"]))

    async def user_list(request: web.Request) -> web.Response:
        await sandbox.authenticate(request)
        info = request.match_info
        return web.json_response(sandbox.listed(info["company_id"], info["user_id"]))

    app.router.add_get(SUBSCRIPTION_PATH, read, name="get_subscription")
    app.router.add_delete(SUBSCRIPTION_PATH, delete, name="delete_subscription")
    app.router.add_get(COMPANY_SUBSCRIPTIONS_PATH, company_list, name="company_subscriptions")
    app.router.add_get(USER_SUBSCRIPTIONS_PATH, user_list, name="user_subscriptions")
    return app


SPEC = SandboxSpec(
    key=KEY,
    create_app=create_app,
    settings=lambda url: {
        "base_url": url,
        "consumer_key": DEMO_CONSUMER_KEY,
        "consumer_secret": DEMO_CONSUMER_SECRET,
    },
    succeeding_kinds=("active",),
    subscription=lambda ref: {"subscription_id": ref},
)
