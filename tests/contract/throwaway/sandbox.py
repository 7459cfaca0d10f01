"""The throwaway provider's sandbox: members with a subscription, behind an API key."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sandboxes.control import sandbox_app
from sandboxes.core import ProviderError, Sandbox, SandboxSpec
from sandboxes.faults import FaultSettings
from tests.contract.throwaway.provider import KEY, MEMBER_PATH

DEMO_API_KEY = "throwaway-demo-key"
KINDS = ("active", "cancelled")


@dataclass(frozen=True)
class ThrowawayDemo:
    """Named demo member ids; each has the outcome its name says."""

    active: str = "member-active"
    cancelled: str = "member-cancelled"
    not_found: str = "member-unknown"


DEMO = ThrowawayDemo()


class ThrowawaySandbox(Sandbox):
    key = KEY
    bulk_kinds = KINDS
    cancel_routes = frozenset({"cancel_member"})

    def load_demo(self) -> None:
        self.members: dict[str, str] = {DEMO.active: "active", DEMO.cancelled: "cancelled"}

    def extra_state(self) -> dict[str, Any]:
        return {"members": dict(self.members)}

    def create_reference(self, kind: str) -> str:
        member_id = f"member-{kind}-{self.next_serial()}"
        self.members[member_id] = kind
        return member_id

    def render_error(self, error: ProviderError) -> web.Response:
        body = {"code": error.code, "message": error.message}
        return web.json_response(body, status=error.status)

    def authorize(self, request: web.Request) -> None:
        given = request.headers.get("X-Api-Key", "")
        if not hmac.compare_digest(given.encode(), DEMO_API_KEY.encode()):
            raise ProviderError(401, "unauthorized", "Unknown API key")

    def member(self, request: web.Request) -> str:
        self.authorize(request)
        member_id = request.match_info["member_id"]
        if member_id not in self.members:
            raise ProviderError(404, "not_found", f"No member {member_id}")
        return member_id


THROWAWAY_STATE = web.AppKey("throwaway_state", ThrowawaySandbox)


def create_app(
    *, faults: FaultSettings | None = None, token_ttl_s: int | None = None
) -> web.Application:
    """The throwaway provider's sub-application (mount it at `/throwaway`)."""
    sandbox = ThrowawaySandbox(faults=faults, token_ttl_s=token_ttl_s)
    app = sandbox_app(sandbox)
    app[THROWAWAY_STATE] = sandbox

    async def read(request: web.Request) -> web.Response:
        member_id = sandbox.member(request)
        return web.json_response({"member_id": member_id, "status": sandbox.members[member_id]})

    async def cancel(request: web.Request) -> web.Response:
        member_id = sandbox.member(request)
        if sandbox.members[member_id] == "cancelled":
            raise ProviderError(409, "already_cancelled", f"Member {member_id} cancelled before")
        sandbox.members[member_id] = "cancelled"
        sandbox.record_effective_cancel(member_id)
        return web.json_response({"member_id": member_id, "status": "cancelled"})

    app.router.add_get(MEMBER_PATH, read, name="read_member")
    app.router.add_post(f"{MEMBER_PATH}/cancel", cancel, name="cancel_member")
    return app


SPEC = SandboxSpec(
    key=KEY,
    create_app=create_app,
    settings=lambda url: {"base_url": url, "api_key": DEMO_API_KEY},
    succeeding_kinds=("active",),
    subscription=lambda ref: {"member_id": ref},
)
