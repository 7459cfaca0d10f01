"""The producer HTTP API (aiohttp).

Every route takes a bearer token but the health checks, ``/openapi.json`` (public: it holds
nothing secret) and ``POST /v1/billing-events`` (signed by the billing system instead);
``/metrics`` too (Prometheus sends one: a read-only token is enough). Each
token is rate-limited (``ratelimit``); bodies over ``api.max_body_bytes`` get 413; every error
is ``application/problem+json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cancelflow import metrics, steps
from cancelflow.contract import Decision
from cancelflow.dead_letters import DeadLetterFilter
from cancelflow.errors import CancelflowError, JobNotFound
from cancelflow.guard import breaker_state
from cancelflow.logging import get_logger
from cancelflow.messaging import create_celery, flush_sent_events, send_step
from cancelflow.settings import Settings
from cancelflow.store import IdempotencyConflict
from cancelflow.wiring import build_deps, redis_client, redis_persistence, report_persistence
from producers import listing, openapi
from producers.billing import BillingProcessor, Rejected
from producers.billing_rules import Rules, load_rules
from producers.problems import field_errors, invalid, problem, unavailable
from producers.ratelimit import RateLimiter
from producers.schemas import JobQuery, ProviderState, ProviderStates, StatsQuery
from producers.signatures import SIGNATURE_HEADER, SignatureError, verify_signature
from producers.submit import submit, validate_request

log = get_logger(__name__)

# The default of ``api.max_body_bytes``; the app's own limit is ``request.app[MAX_BODY]``.
MAX_BODY_BYTES = 64 * 1024
DEPS = web.AppKey("deps", steps.Deps)
CELERY = web.AppKey("celery", Celery)
TOKENS = web.AppKey("tokens", list)
LIMITER = web.AppKey("limiter", RateLimiter)
MAX_BODY = web.AppKey("max_body", int)
RULES = web.AppKey("billing_rules", Rules)
BILLING = web.AppKey("billing", BillingProcessor)
OPENAPI = web.AppKey("openapi", bytes)
# The longest a request waits on Redis (the read timeout): then it answers 503.
REDIS_WAIT_S = web.AppKey("redis_wait_s", float)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
# Authenticated by their own signature, not a bearer token.
SIGNED_PATHS = frozenset({"/v1/billing-events"})

Scope = Literal["read", "write"]

# Redis (job store, rate limits, broker) unreachable: refused, reset, or no answer in time.
# redis-py raises its own ConnectionError and TimeoutError (retried with backoff first,
# see wiring.redis_client); kombu raises OperationalError once a publish's retries are spent;
# TimeoutError is the request's own bound on waiting (``REDIS_WAIT_S``).
REDIS_OUTAGE = (RedisConnectionError, RedisTimeoutError, BrokerError, TimeoutError)
# A Redis restart or failover takes seconds: clients come back after this many.
RETRY_AFTER_S = 5


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
    """Auth, rate limits and problem+json errors; while Redis is unreachable every route
    answers 503 with ``Retry-After`` within the Redis read timeout, never 500, never a hang."""
    try:
        async with asyncio.timeout(request.app[REDIS_WAIT_S]):
            return await _authorised_call(request, handler)
    except REDIS_OUTAGE as exc:
        return _redis_unavailable(request, exc)


def _redis_unavailable(request: web.Request, exc: BaseException) -> web.Response:
    error = "no answer in time" if type(exc) is TimeoutError else type(exc).__name__
    log.warning("api.redis_unavailable", path=request.path, error=f"{type(exc).__name__}: {exc}")
    return unavailable(
        f"Redis is unreachable ({error}): retry in {RETRY_AFTER_S}s "
        "(an enqueue with the same idempotency key is safe to retry)",
        retry_after_s=RETRY_AFTER_S,
    )


async def _authorised_call(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path in SIGNED_PATHS:
        limited = await _rate_limited(request, "signed:" + request.path)
        if limited is not None:
            return limited
    elif request.path not in PUBLIC_PATHS:
        token = _authorised(request)
        if token is None:
            return problem(
                401,
                "Unauthorized",
                "send Authorization: Bearer <token>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        limited = await _rate_limited(request, "token:" + token.secret)
        if limited is not None:
            return limited
        if request.method not in ("GET", "HEAD") and token.scope != "write":
            return problem(403, "Forbidden", "this token is read-only")
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPRequestEntityTooLarge:
        return _too_large(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return problem(exc.status, exc.reason)
        raise
    except JobNotFound as exc:
        return problem(404, "Not found", f"no job {exc.args[0]}")
    except ConnectionResetError:
        # The client went away while sending its body: nothing was read, nothing was done.
        log.info("api.client_disconnected", path=request.path)
        return problem(400, "Client disconnected", "the request body was cut short")
    except REDIS_OUTAGE:
        raise  # a 503, not a 500: see errors_and_auth
    except Exception:
        log.exception("api.unexpected_error", path=request.path)
        return problem(500, "Internal error", "the error is logged; nothing was enqueued twice")


async def _rate_limited(request: web.Request, key: str) -> web.Response | None:
    """A 429 when ``key`` has spent its rate, else None."""
    try:
        verdict = await request.app[LIMITER].hit(key)
    except REDIS_OUTAGE:
        raise  # every route needs Redis: the outage is the answer
    except Exception as exc:
        log.warning("api.rate_limit.unavailable", error=type(exc).__name__)
        return None
    if verdict.allowed:
        return None
    wait = verdict.retry_after_s
    return problem(
        429,
        "Too many requests",
        f"rate limit reached: retry in {wait:.2f}s",
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
        retry_after=round(wait, 3),
    )


def _too_large(request: web.Request) -> web.Response:
    return problem(
        413, "Payload too large", f"request bodies are limited to {request.app[MAX_BODY]} bytes"
    )


async def _raw_body(request: web.Request) -> bytes:
    limit = request.app[MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    return await request.read()  # raises 413 too once a chunked body passes client_max_size


async def _json_body(request: web.Request) -> Any:
    raw = await _raw_body(request)
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise _BadJson(str(exc)) from exc


class _BadJson(Exception):
    pass


def _query(request: web.Request, *, lists: tuple[str, ...] = ()) -> dict[str, Any]:
    """Query parameters as a dict; ``lists`` may repeat or hold comma-separated values."""
    out: dict[str, Any] = {}
    for key in request.query:
        if key in lists:
            out[key] = [v for raw in request.query.getall(key) for v in raw.split(",") if v]
        else:
            out[key] = request.query[key]
    return out


async def create_cancellation(request: web.Request) -> web.Response:
    deps, settings = request.app[DEPS], request.app[DEPS].settings
    try:
        body = await _json_body(request)
    except _BadJson as exc:
        return problem(400, "Malformed JSON", str(exc))
    checked = validate_request(body, settings)
    if isinstance(checked, list):
        return invalid(checked)
    try:
        created = await submit(deps, request.app[CELERY], checked)
    except IdempotencyConflict as exc:
        return problem(409, "Idempotency key reused", str(exc), job_id=exc.job_id)
    return web.Response(
        # pydantic's own JSON: the busiest route, and twice as fast as dump + json.dumps.
        body=created.job.model_dump_json(),
        content_type="application/json",
        status=202,
        headers={
            "Location": f"/v1/cancellations/{created.job.id}",
            "Cancelflow-Enqueue": created.how,
        },
    )


async def list_cancellations(request: web.Request) -> web.Response:
    try:
        query = JobQuery.model_validate(_query(request, lists=("status",)))
        page = await listing.list_jobs(request.app[DEPS].store.redis, query)
    except ValidationError as exc:
        return invalid(field_errors(exc, prefix=("query",)))
    except listing.BadCursor as exc:
        return invalid([{"field": "query.cursor", "message": str(exc)}])
    return web.json_response(page.model_dump(mode="json"))


async def get_stats(request: web.Request) -> web.Response:
    try:
        query = StatsQuery.model_validate(_query(request))
    except ValidationError as exc:
        return invalid(field_errors(exc, prefix=("query",)))
    found = await listing.stats(request.app[DEPS].store.redis, since_s=query.since_s)
    return web.json_response(found.model_dump(mode="json"))


async def post_billing_event(request: web.Request) -> web.Response:
    conf = request.app[DEPS].settings.billing
    secrets = [s.get_secret_value() for s in (conf.secret, conf.secret_previous) if s is not None]
    if BILLING not in request.app or not secrets:
        return problem(
            503,
            "Billing events not configured",
            "set CANCELFLOW_BILLING__RULES_PATH and CANCELFLOW_BILLING__SECRET",
        )
    raw = await _raw_body(request)
    try:
        verify_signature(
            raw,
            request.headers.get(SIGNATURE_HEADER),
            secrets,
            tolerance=conf.signature_tolerance_s,
        )
    except SignatureError as exc:
        return problem(401, "Bad signature", str(exc))
    processor = request.app[BILLING]
    # Bounded decoding (cancelflow.jsonsafe: api.max_json_depth, no lone surrogates, UTF-8):
    # a body that is not an event is the sender's to fix, so it is answered, not stored.
    parsed = processor.parse(raw)
    if isinstance(parsed, Rejected):
        errors = [e.model_dump() for e in parsed.errors]
        if parsed.error_type == "BillingEventUnreadable":
            return problem(400, "Malformed JSON", parsed.errors[0].message, errors=errors)
        return problem(
            422, "Invalid billing event", "the body is not a billing event", errors=errors
        )
    result = await processor.process_event(parsed, raw=raw, source={"http": request.path})
    if result.result == "dead_lettered":
        detail = "the event cannot make a valid request; it is dead-lettered"
        return problem(
            422,
            "Invalid billing event",
            detail,
            errors=[e.model_dump() for e in result.errors],
            dead_letter_id=result.dead_letter_id,
        )
    return web.json_response(
        result.model_dump(mode="json"), status=200 if result.result == "ignored" else 202
    )


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


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
    limit = (
        min(int(request.query.get("limit", "100")), 1000)
        if request.query.get("limit", "100").isdigit()
        else 100
    )
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


async def list_providers(request: web.Request) -> web.Response:
    """Each configured provider's circuit breaker and in-flight calls, shared by all workers."""
    deps = request.app[DEPS]
    items = [
        ProviderState.model_validate(
            {"provider": key, **await breaker_state(deps.store.redis, key)}
        )
        for key in deps.settings.enabled_providers()
    ]
    return web.json_response(ProviderStates(items=items).model_dump(mode="json"))


async def get_metrics(request: web.Request) -> web.Response:
    """This process's metrics, and the shared state's gauges read from Redis now."""
    snapshot = await metrics.read_store(request.app[DEPS].store.redis)
    body = metrics.render(metrics.StoreGauges(snapshot))
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


async def _index_dead_letter_kinds(deps: steps.Deps) -> None:
    # Dead letters written before the per-kind sets existed: counted once, in the background.
    try:
        indexed = await deps.dead_letters.index_kinds()
    except Exception as exc:  # the next start-up tries again
        log.warning("api.dead_letters.index_failed", error=f"{type(exc).__name__}: {exc}")
        return
    if indexed:
        log.info("api.dead_letters.indexed", entries=indexed)


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when Redis answers; ``persistence`` says whether a Redis restart loses data."""
    redis = request.app[DEPS].store.redis
    try:
        # Well within the request's own bound, so the answer carries the details.
        async with asyncio.timeout(request.app[REDIS_WAIT_S] / 2):
            await redis.ping()
    except REDIS_OUTAGE as exc:
        error = "no answer in time" if type(exc) is TimeoutError else type(exc).__name__
        return unavailable(
            f"redis unreachable: {error}",
            retry_after_s=RETRY_AFTER_S,
            title="Not ready",
            redis="unreachable",
            persistence="unknown",
        )
    return web.json_response(
        {
            "status": "ready",
            "providers": sorted(request.app[DEPS].settings.enabled_providers()),
            "redis": "ok",
            "persistence": await redis_persistence(redis),
        }
    )


def create_app(settings: Settings, *, celery: Celery | None = None) -> web.Application:
    """The API application; Redis and Celery connections open on start-up. The billing rules,
    when configured, are checked here: a ``RulesError`` stops start-up."""
    limit = settings.api.max_body_bytes
    app = web.Application(middlewares=[errors_and_auth], client_max_size=limit)
    app[TOKENS] = parse_tokens(settings)
    app[CELERY] = celery or create_celery(settings)
    app[MAX_BODY] = limit
    app[REDIS_WAIT_S] = settings.redis_read_timeout_s
    app[OPENAPI] = json.dumps(openapi.document(max_body_bytes=limit)).encode()
    if settings.billing.rules_path is not None:
        app[RULES] = load_rules(
            settings.billing.rules_path, configured=settings.enabled_providers()
        )

    async def lifecycle(app: web.Application) -> Any:
        redis = redis_client(settings)
        # Decisions end jobs in the API process (an accepted offer): counted here.
        app[DEPS] = build_deps(settings, redis=redis, job_observer=metrics.JOB_METRICS)
        app[LIMITER] = RateLimiter(
            redis, rate_per_s=settings.api.rate_limit_per_s, burst=settings.api.rate_limit_burst
        )
        if RULES in app:
            app[BILLING] = BillingProcessor(app[DEPS], app[CELERY], app[RULES])
        background = [
            asyncio.create_task(_index_dead_letter_kinds(app[DEPS])),
            # In the background: a Redis down at start-up must not delay serving 503s.
            asyncio.create_task(report_persistence(redis, settings, process="api")),
        ]
        yield
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await app[DEPS].store.flush_marks()
        flush_sent_events(app[CELERY])
        await redis.aclose()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", get_openapi)
    app.router.add_post("/v1/cancellations", create_cancellation)
    app.router.add_get("/v1/cancellations", list_cancellations)
    app.router.add_get("/v1/stats", get_stats)
    app.router.add_post("/v1/billing-events", post_billing_event)
    app.router.add_get("/v1/cancellations/{job_id}", get_cancellation)
    app.router.add_post("/v1/cancellations/{job_id}/decision", post_decision)
    app.router.add_get("/v1/dead-letters", list_dead_letters)
    app.router.add_get("/v1/dead-letters/{dl_id}", get_dead_letter)
    app.router.add_post("/v1/dead-letters/{dl_id}/replay", replay_dead_letter)
    app.router.add_delete("/v1/dead-letters/{dl_id}", delete_dead_letter)
    app.router.add_get("/v1/providers", list_providers)
    app.router.add_get("/metrics", get_metrics)
    return app
