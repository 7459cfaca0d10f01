"""The producer HTTP API (aiohttp). Every route but the health checks takes a bearer token."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from celery import Celery
from pydantic import ValidationError

from cancelflow import steps
from cancelflow.contract import CancellationRequest, Decision, Step
from cancelflow.dead_letters import DeadLetterFilter
from cancelflow.errors import CancelflowError, JobNotFound
from cancelflow.logging import get_logger
from cancelflow.messaging import create_celery, send_step
from cancelflow.providers import REGISTRY
from cancelflow.settings import Settings
from cancelflow.store import IdempotencyConflict
from cancelflow.wiring import build_deps, redis_client
from producers.problems import field_errors, invalid, problem

log = get_logger(__name__)

MAX_BODY_BYTES = 64 * 1024
DEPS = web.AppKey("deps", steps.Deps)
CELERY = web.AppKey("celery", Celery)
TOKENS = web.AppKey("tokens", list)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})

Scope = Literal["read", "write"]


@dataclass(frozen=True)
class ApiToken:
    secret: str
    scope: Scope


def parse_tokens(settings: Settings) -> list[ApiToken]:
    """``secret`` (read and write) or ``secret:read`` (read-only), comma-separated."""
    tokens = []
    for raw in settings.api_tokens:
        value = raw.get_secret_value()
        secret, _, scope = value.partition(":")
        tokens.append(ApiToken(secret, "read" if scope == "read" else "write"))
    return tokens


def _authorised(request: web.Request) -> ApiToken | None:
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return None
    found = None
    for token in request.app[TOKENS]:
        # Compare with every token in constant time, so timing tells nothing.
        if hmac.compare_digest(token.secret.encode(), presented.strip().encode()):
            found = token
    return found


@web.middleware
async def errors_and_auth(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path not in PUBLIC_PATHS:
        token = _authorised(request)
        if token is None:
            return problem(401, "Unauthorized", "send Authorization: Bearer <token>",
                           headers={"WWW-Authenticate": "Bearer"})
        if request.method not in ("GET", "HEAD") and token.scope != "write":
            return problem(403, "Forbidden", "this token is read-only")
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return problem(413, "Payload too large", f"request bodies are limited to {MAX_BODY_BYTES} bytes")
    except web.HTTPException as exc:
        if exc.status >= 400:
            return problem(exc.status, exc.reason)
        raise
    except JobNotFound as exc:
        return problem(404, "Not found", f"no job {exc.args[0]}")
    except Exception:
        log.exception("api.unexpected_error", path=request.path)
        return problem(500, "Internal error", "the error is logged; nothing was enqueued twice")


async def _json_body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=request.content_length)
    raw = await request.read()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise _BadJson(str(exc)) from exc


class _BadJson(Exception):
    pass


def validate_request(body: Any, settings: Settings) -> CancellationRequest | list[dict[str, str]]:
    """The request, or the list of invalid fields (provider reference included)."""
    try:
        req = CancellationRequest.model_validate(body)
    except ValidationError as exc:
        return field_errors(exc)
    spec = REGISTRY.get(req.provider)
    if spec is None:
        return [{"field": "provider", "message": f"unknown provider; one of {sorted(REGISTRY)}"}]
    try:
        conf = settings.provider(req.provider)
    except KeyError:
        return [{"field": "provider", "message": f"provider {req.provider!r} is not configured"}]
    try:
        spec.reference.model_validate(req.subscription)
    except ValidationError as exc:
        return field_errors(exc, prefix=("subscription",))
    if req.callback_url is not None and conf.callback_secret is None:
        return [{"field": "callback_url", "message": "the provider has no callback secret configured; callbacks are always signed"}]
    return req


async def create_cancellation(request: web.Request) -> web.Response:
    deps, settings = request.app[DEPS], request.app[DEPS].settings
    try:
        body = await _json_body(request)
    except _BadJson as exc:
        return problem(400, "Malformed JSON", str(exc))
    checked = validate_request(body, settings)
    if isinstance(checked, list):
        return invalid(checked)
    identity = REGISTRY[checked.provider].reference.model_validate(checked.subscription).identity()
    try:
        created = await deps.store.create(checked, identity=identity)
    except IdempotencyConflict as exc:
        return problem(409, "Idempotency key reused", str(exc), job_id=exc.job_id)
    if created.how == "created":
        send_step(request.app[CELERY], Step.ELIGIBILITY, created.job.id, checked.provider)
        log.info("job.enqueued", job_id=created.job.id, provider=checked.provider)
    return web.json_response(
        created.job.model_dump(mode="json"),
        status=202,
        headers={"Location": f"/v1/cancellations/{created.job.id}", "Cancelflow-Enqueue": created.how},
    )


async def get_cancellation(request: web.Request) -> web.Response:
    job = await request.app[DEPS].store.get(request.match_info["job_id"])
    return web.json_response(job.model_dump(mode="json"))


async def post_decision(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    try:
        decision = Decision.model_validate(await _json_body(request))
    except _BadJson as exc:
        return problem(400, "Malformed JSON", str(exc))
    except ValidationError as exc:
        return invalid(field_errors(exc))
    job_id = request.match_info["job_id"]
    try:
        nxt = await steps.decide(deps, job_id, decision)
    except steps.DecisionConflict as exc:
        return problem(409, "Not awaiting a decision", str(exc))
    if nxt.step is not None:
        send_step(request.app[CELERY], nxt.step, job_id, nxt.provider, *nxt.args)
    job = await deps.store.get(job_id)
    return web.json_response(job.model_dump(mode="json"), status=202)


def _dl_filter(request: web.Request) -> DeadLetterFilter | web.Response:
    try:
        return DeadLetterFilter.model_validate(dict(request.query))
    except ValidationError as exc:
        return invalid(field_errors(exc, prefix=("query",)))


async def list_dead_letters(request: web.Request) -> web.Response:
    flt = _dl_filter(request)
    if isinstance(flt, web.Response):
        return flt
    limit = min(int(request.query.get("limit", "100")), 1000) if request.query.get("limit", "100").isdigit() else 100
    items = await request.app[DEPS].dead_letters.list(flt, limit=limit)
    return web.json_response({"items": [d.model_dump(mode="json") for d in items]})


async def get_dead_letter(request: web.Request) -> web.Response:
    dl = await request.app[DEPS].dead_letters.get(request.match_info["dl_id"])
    if dl is None:
        return problem(404, "Not found", f"no dead letter {request.match_info['dl_id']}")
    return web.json_response(dl.model_dump(mode="json"))


async def replay_dead_letter(request: web.Request) -> web.Response:
    deps, dl_id = request.app[DEPS], request.match_info["dl_id"]
    dl = await deps.dead_letters.get(dl_id)
    if dl is None:
        return problem(404, "Not found", f"no dead letter {dl_id} (already replayed or purged?)")
    try:
        nxt = await steps.replay(deps, dl_id)
    except CancelflowError as exc:
        return problem(409, "Cannot replay", str(exc))
    if nxt.step is not None and dl.job_id:
        send_step(request.app[CELERY], nxt.step, dl.job_id, nxt.provider, *nxt.args)
    return web.json_response({"replayed": dl_id, "job_id": dl.job_id, "next": nxt.step}, status=202)


async def delete_dead_letter(request: web.Request) -> web.Response:
    if not await request.app[DEPS].dead_letters.delete(request.match_info["dl_id"]):
        return problem(404, "Not found", f"no dead letter {request.match_info['dl_id']}")
    return web.Response(status=204)


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[DEPS].store.redis.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return problem(503, "Not ready", f"redis unreachable: {type(exc).__name__}")
    return web.json_response({"status": "ready", "providers": sorted(request.app[DEPS].settings.enabled_providers())})


def create_app(settings: Settings, *, celery: Celery | None = None) -> web.Application:
    """The API application; Redis and Celery connections open on start-up."""
    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY_BYTES)
    app[TOKENS] = parse_tokens(settings)
    app[CELERY] = celery or create_celery(settings)

    async def lifecycle(app: web.Application) -> Any:
        redis = redis_client(settings)
        app[DEPS] = build_deps(settings, redis=redis)
        yield
        await redis.aclose()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/v1/cancellations", create_cancellation)
    app.router.add_get("/v1/cancellations/{job_id}", get_cancellation)
    app.router.add_post("/v1/cancellations/{job_id}/decision", post_decision)
    app.router.add_get("/v1/dead-letters", list_dead_letters)
    app.router.add_get("/v1/dead-letters/{dl_id}", get_dead_letter)
    app.router.add_post("/v1/dead-letters/{dl_id}/replay", replay_dead_letter)
    app.router.add_delete("/v1/dead-letters/{dl_id}", delete_dead_letter)
    return app
