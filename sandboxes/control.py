"""The shell of every provider sub-application: middlewares plus the `/_sandbox/` control routes.

Control routes (never faulted, never counted as calls, no auth):

- `GET  _sandbox/state`          calls by route, faults injected by kind, effective cancels, extras
- `POST _sandbox/reset`          demo data back, counters zeroed (faults and tokens kept)
- `POST _sandbox/expire-tokens`  every issued token becomes expired
- `GET  _sandbox/faults`, `PUT _sandbox/faults`  read / replace the FaultSettings (422 if invalid)
- `POST _sandbox/subscriptions`  `{"count": N, "kind": K}` -> `{"kind", "count", "references"}`
- `GET  _sandbox/traceparents`   `{"traceparents": [...]}`: the W3C `traceparent` header of each
  recent provider call (null: none sent), oldest first
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandboxes.core import Sandbox, call_counter, provider_errors
from sandboxes.faults import CONTROL_SEGMENT, FaultSettings, fault_middleware

# Every provider sub-app carries its sandbox under this key; each provider module also stores
# it under its own typed key (e.g. payway.PAYWAY_STATE) for typed access in tests.
SANDBOX = web.AppKey("sandbox", Sandbox)

MAX_BULK = 100_000


class BulkRequest(BaseModel):
    """Body of `POST _sandbox/subscriptions`."""

    model_config = ConfigDict(extra="forbid")

    count: int = Field(ge=1, le=MAX_BULK)
    kind: str


def sandbox_app(sandbox: Sandbox) -> web.Application:
    """A provider sub-app with counting, faults, error rendering and the control routes."""
    app = web.Application(
        middlewares=[
            call_counter(sandbox),
            fault_middleware(sandbox.faults, sandbox.render_fault, sandbox.cancel_routes),
            provider_errors(sandbox),
        ]
    )
    app[SANDBOX] = sandbox
    _add_control_routes(app, sandbox)
    return app


def _add_control_routes(app: web.Application, sandbox: Sandbox) -> None:
    async def state(request: web.Request) -> web.Response:
        return web.json_response(sandbox.state())

    async def traceparents(request: web.Request) -> web.Response:
        return web.json_response({"traceparents": list(sandbox.traceparents)})

    async def reset(request: web.Request) -> web.Response:
        sandbox.reset()
        return web.json_response({"reset": True})

    async def expire_tokens(request: web.Request) -> web.Response:
        return web.json_response({"expired": sandbox.tokens.expire_all()})

    async def get_faults(request: web.Request) -> web.Response:
        return web.json_response(sandbox.faults.settings.model_dump(mode="json"))

    async def put_faults(request: web.Request) -> web.Response:
        # PUT replaces: fields left out go back to their defaults (no faults).
        settings = FaultSettings.model_validate(await _json_object(request))
        sandbox.faults.replace(settings)
        return web.json_response(settings.model_dump(mode="json"))

    async def create_subscriptions(request: web.Request) -> web.Response:
        bulk = BulkRequest.model_validate(await _json_object(request))
        if bulk.kind not in sandbox.bulk_kinds:
            return _unprocessable(f"unknown kind {bulk.kind!r}", allowed=list(sandbox.bulk_kinds))
        references = sandbox.create_bulk(bulk.kind, bulk.count)
        return web.json_response(
            {"kind": bulk.kind, "count": len(references), "references": references}
        )

    prefix = CONTROL_SEGMENT.rstrip("/")
    app.router.add_get(f"{prefix}/state", state)
    app.router.add_get(f"{prefix}/traceparents", traceparents)
    app.router.add_post(f"{prefix}/reset", reset)
    app.router.add_post(f"{prefix}/expire-tokens", expire_tokens)
    app.router.add_get(f"{prefix}/faults", get_faults)
    app.router.add_put(f"{prefix}/faults", _validated(put_faults))
    app.router.add_post(f"{prefix}/subscriptions", _validated(create_subscriptions))


def _validated(handler: Handler) -> Handler:
    """Answer 422 with pydantic's errors when `handler` meets invalid input."""

    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ValidationError as error:
            return _unprocessable("invalid body", errors=json.loads(error.json(include_url=False)))

    return wrapper


async def _json_object(request: web.Request) -> Any:
    """The request's JSON body; `{}` when empty. Validation of its shape is the caller's."""
    text = await request.text()
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # Let pydantic report it like any other invalid input.
        return text


def _unprocessable(message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=422)
