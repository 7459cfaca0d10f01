"""The producer HTTP API (aiohttp).

Every route takes a bearer token but the health checks, ``/openapi.json`` and its page
``/docs`` (public: they hold nothing secret) and ``POST /v1/billing-events`` (signed by
the billing system instead); ``/metrics`` too (Prometheus sends one: a read-only token is
enough). Each token is rate-limited (``ratelimit``); bodies over ``api.max_body_bytes`` get
413; every error is ``application/problem+json``.

Tokens (``CANCELFLOW_API_TOKENS``, see ``cancelflow.settings.parse_token_entry``) are
``[name=]secret[:read|write]``; the name is bound to the request's log context as
``token_name``, never the secret. Failed authentication (a bad or missing bearer token, a
billing event whose signature does not verify) is limited per client address
(``request.remote``: behind a proxy, the proxy's) in a bucket of its own; once it is spent
that address gets 429 whatever credential it sends, so guessing stays slow (that bucket and
the token's are asked in one round trip, ``ratelimit.Gate``).
A billing event's signature is checked before the billing bucket is charged, so unsigned
floods spend only their own address's failures, never the billing system's rate.

Nothing a client sends makes a 5xx: JSON bodies are decoded by ``cancelflow.jsonsafe`` within
``api.max_json_depth`` and ``api.max_json_string_chars`` (400 otherwise); every route's query
goes through ``parse_query`` (an unknown or malformed parameter is 422); an id in a URL that is
not of its format (``job_<32 hex>``, ``dl_<32 hex>``) is 404 before it reaches Redis, as an id
of the right format that names nothing is; a header value that is not ASCII is 401 when it is
a credential (``Authorization``, the billing signature) and 400 when it is not UTF-8. A
request aiohttp's own parser refuses (``producers.http_refusals``) is a 400 problem too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from pydantic import BaseModel, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from brokers.queues import QueueReader, queue_reader
from cancelflow import chain, decisions, jsonsafe, metrics, tracing
from cancelflow.callbacks import UnsafeCallbackUrl, check_url_form
from cancelflow.contract import JOB_ID_RE, Decision
from cancelflow.dead_letters import AlreadyReplayed
from cancelflow.endpoints import ENDPOINT_ID_RE, MAX_ENDPOINTS, EndpointStore
from cancelflow.errors import CancelflowError, ConfigError, DecisionConflict, JobNotFound
from cancelflow.guard import breaker_state
from cancelflow.logging import get_logger
from cancelflow.settings import Settings, parse_token_entry
from cancelflow.store import IdempotencyConflict
from cancelflow.wiring import (
    Deps,
    build_deps,
    redis_client,
    redis_persistence,
    report_persistence,
)
from messaging.config import create_celery
from messaging.dispatch import close_publishers, flush_sent_events
from producers import console, docs_page, listing, openapi
from producers.billing import BillingProcessor, Rejected
from producers.billing_auth import CREDENTIAL_HEADERS, BadSignature, BillingVerifier
from producers.billing_rules import Rules, load_rules
from producers.http_refusals import ProblemAppRunner, parser_reason, refusal_detail
from producers.problems import Problem, field_errors, invalid, problem, unavailable
from producers.ratelimit import Admission, Gate, RateLimiter
from producers.schemas import (
    DEAD_LETTER_ID_RE,
    DeadLetterQuery,
    EndpointCreate,
    EndpointPage,
    EndpointSecret,
    EndpointUpdate,
    JobQuery,
    NoQuery,
    ProviderState,
    ProviderStates,
    SecretRotation,
    StatsQuery,
)
from producers.submit import (
    IDEMPOTENCY_HEADER,
    KeyRefused,
    header_key,
    reserved_key,
    send_step,
    submit,
    validate_request,
    with_header_key,
)

log = get_logger(__name__)

# The default of ``api.max_body_bytes``; the app's own limit is ``request.app[MAX_BODY]``.
MAX_BODY_BYTES = 64 * 1024
DEPS = web.AppKey("deps", Deps)
CELERY = web.AppKey("celery", Celery)
TOKENS = web.AppKey("tokens", list)
LIMITER = web.AppKey("limiter", RateLimiter)
AUTH_FAILURES = web.AppKey("auth_failures", RateLimiter)
GATE = web.AppKey("gate", Gate)
MAX_BODY = web.AppKey("max_body", int)
JSON_LIMITS = web.AppKey("json_limits", jsonsafe.JsonLimits)
RULES = web.AppKey("billing_rules", Rules)
BILLING = web.AppKey("billing", BillingProcessor)
BILLING_VERIFIER = web.AppKey("billing_verifier", BillingVerifier)
OPENAPI = web.AppKey("openapi", bytes)
# Reads the broker's queues when it is not the job store's Redis (brokers.queues).
BROKER_QUEUES = web.AppKey("broker_queues", object)
# The longest a request waits on Redis (the read timeout): then it answers 503.
REDIS_WAIT_S = web.AppKey("redis_wait_s", float)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
# Authenticated by their own signature, not a bearer token.
SIGNED_PATHS = frozenset({"/v1/billing-events"})

Scope = Literal["read", "write"]
Query = TypeVar("Query", bound=BaseModel)

# Redis (job store, rate limits, broker) unreachable: refused, reset, or no answer in time.
# redis-py raises its own ConnectionError and TimeoutError (retried with backoff first,
# see wiring.redis_client); kombu raises OperationalError once a publish's retries are spent;
# TimeoutError is the request's own bound on waiting (``REDIS_WAIT_S``).
REDIS_OUTAGE = (RedisConnectionError, RedisTimeoutError, BrokerError, TimeoutError)
# A Redis restart or failover takes seconds: clients come back after this many.
RETRY_AFTER_S = 5
TOKEN = web.RequestKey("token", object)


@dataclass(frozen=True)
class ApiToken:
    secret: bytes
    scope: Scope
    # Shown in logs instead of the secret: the configured name, else "unnamed-<position>".
    name: str
    # What its idempotency keys are scoped to: the name when it has one, else a hash of the
    # secret (stable however the list is reordered; renaming a token changes it).
    namespace: str


def parse_tokens(settings: Settings) -> list[ApiToken]:
    """``[name=]secret[:read|write]`` (no scope: ``write``), comma-separated; a ``ConfigError``
    naming CANCELFLOW_API_TOKENS (and the entry's position, never its text) otherwise."""
    tokens = []
    for n, raw in enumerate(settings.api_tokens, start=1):
        try:
            entry = parse_token_entry(raw.get_secret_value())
        except ValueError as exc:
            raise ConfigError(
                f"invalid settings:\n  CANCELFLOW_API_TOKENS: entry {n}: {exc}"
            ) from None
        if entry.name is not None:
            name, namespace = entry.name, f"name:{entry.name}"
        else:
            digest = hashlib.sha256(entry.secret.encode()).hexdigest()
            name, namespace = f"unnamed-{n}", f"sha256:{digest}"
        tokens.append(ApiToken(entry.secret.encode(), entry.scope, name, namespace))
    return tokens


def _client(request: web.Request) -> str:
    """The address failed authentications are counted against (the TCP peer)."""
    return request.remote or "unknown"


def auth_failure_bucket(request: web.Request) -> str:
    """The failed-authentication bucket (``AUTH_FAILURES``) of the request's client address:
    one for its bearer tokens, billing signatures and console sign-ins alike."""
    return "authfail:" + _client(request)


def _authorised(request: web.Request) -> ApiToken | None:
    header = request.headers.get("Authorization", "")
    if not header.isascii():
        # Tokens are ASCII; undecodable bytes arrive as surrogate escapes, which cannot be
        # encoded to compare: no token of ours, whatever the bytes.
        return None
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return None
    given = presented.strip().encode()
    tokens: list[ApiToken] = request.app[TOKENS]
    # Every configured token is compared, each in constant time, with no early exit: how
    # long this takes tells nothing about which token (or how much of one) matched.
    matches = [hmac.compare_digest(token.secret, given) for token in tokens]
    return next((t for t, hit in zip(tokens, matches, strict=True) if hit), None)


# A caller's request id is kept when it is 1-128 printable ASCII characters (it goes into log
# lines and a response header as it is); anything else is replaced by one of ours.
REQUEST_ID_HEADER = "Request-Id"
_GIVEN_REQUEST_ID = re.compile(r"[\x20-\x7e]{1,128}")


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is not None and _GIVEN_REQUEST_ID.fullmatch(given):
        return given
    return f"req_{uuid.uuid4().hex}"


@web.middleware
async def request_context(request: web.Request, handler: Any) -> web.StreamResponse:
    """The request's id (the caller's ``Request-Id`` when well formed, else a new one) on every
    log line the request causes, on the steps it sends (``dispatch``) and in ``Request-Id``
    on the answer; one ``api.request`` access line per request, whatever its status."""
    request_id = _request_id(request)
    started = time.perf_counter()
    status = 500  # unless an answer says otherwise: an error no middleware turned into one
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        try:
            response: web.StreamResponse = await handler(request)
            status = response.status
            if not response.prepared:  # a streamed answer has sent its headers already
                response.headers[REQUEST_ID_HEADER] = request_id
            return response
        except web.HTTPException as exc:  # a redirect, or an error of a route of its own
            status = exc.status
            exc.headers[REQUEST_ID_HEADER] = request_id
            raise
        finally:
            token = request.get(TOKEN)
            if token is None and status in (403, 429):
                # Refused after the token was recognised (read-only, rate limit): named too.
                token = _authorised(request)
            route = request.match_info.route.resource
            log.info(
                "api.request",
                method=request.method,
                route=route.canonical if route is not None else None,
                **({} if route is not None else {"path": _shown(request.path)}),
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                token_name=token.name if isinstance(token, ApiToken) else None,
            )


@web.middleware
async def errors_and_auth(request: web.Request, handler: Any) -> web.StreamResponse:
    """Auth, rate limits and problem+json errors; while Redis is unreachable every route
    answers 503 with ``Retry-After`` within the Redis read timeout, never 500, never a hang."""
    try:
        async with asyncio.timeout(request.app[REDIS_WAIT_S]):
            return await _authorised_call(request, handler)
    except REDIS_OUTAGE as exc:
        return _redis_unavailable(request, exc)


@web.middleware
async def request_metrics(request: web.Request, handler: Any) -> web.StreamResponse:
    """Count and time each request by method, route template (never the raw path: the
    label's values stay bounded) and the status it was answered with."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    resource = request.match_info.route.resource  # resolved before any middleware runs
    route = resource.canonical if resource is not None else "unmatched"
    status = 500  # what aiohttp answers for an exception that escapes every middleware
    try:
        response: web.StreamResponse = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # a redirect, or an error no middleware answered
        status = exc.status
        raise
    finally:
        metrics.api_request_done(request.method, route, status, loop.time() - started)


def _redis_unavailable(request: web.Request, exc: BaseException) -> web.Response:
    error = "no answer in time" if type(exc) is TimeoutError else type(exc).__name__
    log.warning("api.redis_unavailable", path=request.path, error=f"{type(exc).__name__}: {exc}")
    return unavailable(
        f"Redis is unreachable ({error}): retry in {RETRY_AFTER_S}s "
        "(an enqueue with the same idempotency key is safe to retry)",
        retry_after_s=RETRY_AFTER_S,
    )


class _Refused(Exception):
    """A request refused with ``response`` (a 4xx problem), raised from a helper."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


# What aiohttp makes of bytes that are not UTF-8 (surrogate escapes).
_SURROGATE = re.compile("[\ud800-\udfff]")
_CREDENTIAL_HEADERS = frozenset({"authorization", *CREDENTIAL_HEADERS})


def _undecodable_header(request: web.Request) -> web.Response | None:
    """400 when a header value is not UTF-8 (aiohttp hands those bytes on as surrogate
    escapes, which fail wherever the value is encoded again: logging, hashing, comparing).
    The credentials are checked where they are read, and answered 401."""
    for name, value in request.headers.items():
        if name.lower() in _CREDENTIAL_HEADERS:
            continue
        if not value.isascii() and _SURROGATE.search(value):
            return problem(400, Problem.BAD_HEADER, f"the {_shown(name)} header is not UTF-8")
    return None


async def _authorised_call(request: web.Request, handler: Any) -> web.StreamResponse:
    refused = _undecodable_header(request)
    if refused is not None:
        return refused
    if (
        request.path in SIGNED_PATHS
        or request.path in PUBLIC_PATHS
        or docs_page.is_docs(request.path)
    ):
        # Signed routes check their signature, then their rate limit, in the handler: an
        # HMAC cannot be guessed, so a flood of bad ones from the billing system's own
        # address (its failures are limited) never holds back its signed events.
        return await _handled(request, handler)
    token = _authorised(request)
    # Both limits in one round trip (``Gate``): an address that spent its failed
    # authentications is answered 429 whatever it presents (the comparison above takes the
    # same time for any credential, and its result is not shown), so guessing stays slow.
    admission = await _admit(request, token)
    if admission.outcome in ("failures_spent", "token_limited"):
        return _too_many(admission.retry_after_s)
    if token is None:
        log.warning(
            "api.auth.failed",
            credential="bearer token",
            client=_client(request),
            path=_shown(request.path),
        )
        return _unauthorised("send Authorization: Bearer <token>")
    with structlog.contextvars.bound_contextvars(token_name=token.name):
        if request.method not in ("GET", "HEAD") and token.scope != "write":
            log.info("api.auth.forbidden", method=request.method, path=_shown(request.path))
            return problem(403, Problem.FORBIDDEN, "this token is read-only")
        request[TOKEN] = token
        return await _handled(request, handler)


async def _admit(request: web.Request, token: ApiToken | None) -> Admission:
    """The client address's failed authentications and the token's rate, asked at once."""
    try:
        return await request.app[GATE].admit(
            _client(request), None if token is None else token.namespace
        )
    except REDIS_OUTAGE:
        raise  # every route needs Redis: the outage is the answer
    except Exception as exc:
        log.warning("api.rate_limit.unavailable", error=type(exc).__name__)
        return Admission("admitted" if token is not None else "failure_counted", 0.0)


async def _failures_spent(request: web.Request) -> web.Response | None:
    """A 429 when the client's address has spent its failed authentications (counts nothing):
    asked before a bearer token is compared, so a guesser learns nothing once it is spent."""
    return await _rate_limited(
        request, auth_failure_bucket(request), limiter=AUTH_FAILURES, count=False
    )


async def _failed_authentication(request: web.Request, what: str) -> web.Response | None:
    """Count one failed authentication against the client's address and log it; a 429 when
    the address had already spent its failures."""
    client = _client(request)
    log.warning("api.auth.failed", credential=what, client=client, path=_shown(request.path))
    return await _rate_limited(request, auth_failure_bucket(request), limiter=AUTH_FAILURES)


def _token(request: web.Request) -> ApiToken:
    found = request[TOKEN]
    assert isinstance(found, ApiToken)  # set by _authorised_call on every token route
    return found


async def _handled(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        if request.match_info.http_exception is None and handler not in _TAKES_QUERY:
            parse_query(request, NoQuery)
        response: web.StreamResponse = await handler(request)
        return response
    except _Refused as exc:
        return exc.response
    except web.HTTPRequestEntityTooLarge:
        return _too_large(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            detail = f"{request.method} {_shown(request.path)}: {exc.reason.lower()}"
            return problem(exc.status, _HTTP_PROBLEMS.get(exc.status, Problem.HTTP_ERROR), detail)
        raise
    except JobNotFound as exc:
        return problem(404, Problem.NOT_FOUND, f"no job {exc.args[0]}")
    except (HttpProcessingError, web.RequestPayloadError) as exc:
        # The body is not what its headers say (chunked framing, Content-Encoding): the
        # parser's refusal, reaching the handler reading it (see http_refusals).
        log.info("api.request.malformed", error=type(exc).__name__, reason=parser_reason(exc))
        response = problem(400, Problem.MALFORMED_REQUEST, refusal_detail(exc))
        response.force_close()  # the rest of the stream cannot be parsed
        return response
    except ConnectionResetError:
        # The client went away while sending its body: nothing was read, nothing was done.
        log.info("api.client_disconnected", path=request.path)
        return problem(400, Problem.CLIENT_DISCONNECTED, "the request body was cut short")
    except REDIS_OUTAGE:
        raise  # a 503, not a 500: see errors_and_auth
    except Exception:
        log.exception("api.unexpected_error", path=request.path)
        return problem(
            500, Problem.INTERNAL_ERROR, "the error is logged; nothing was enqueued twice"
        )


# aiohttp's own refusals (no route, wrong method) as problem types.
_HTTP_PROBLEMS = {404: Problem.NOT_FOUND, 405: Problem.METHOD_NOT_ALLOWED}


def _unauthorised(detail: str) -> web.Response:
    return problem(401, Problem.UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


async def _rate_limited(
    request: web.Request,
    key: str,
    *,
    limiter: web.AppKey[RateLimiter] = LIMITER,
    count: bool = True,
) -> web.Response | None:
    """A 429 when ``key`` has spent its rate in ``limiter``, else None (``count=False``: ask
    without counting this request)."""
    try:
        verdict = await request.app[limiter].hit(key, count=count)
    except REDIS_OUTAGE:
        raise  # every route needs Redis: the outage is the answer
    except Exception as exc:
        log.warning("api.rate_limit.unavailable", error=type(exc).__name__)
        return None
    return None if verdict.allowed else _too_many(verdict.retry_after_s)


def _too_many(wait: float) -> web.Response:
    return problem(
        429,
        Problem.RATE_LIMITED,
        f"rate limit reached: retry in {wait:.2f}s",
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
        retry_after=round(wait, 3),
    )


def _too_large(request: web.Request) -> web.Response:
    return problem(
        413,
        Problem.PAYLOAD_TOO_LARGE,
        f"request bodies are limited to {request.app[MAX_BODY]} bytes",
    )


async def _raw_body(request: web.Request) -> bytes:
    limit = request.app[MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    return await request.read()  # raises 413 too once a chunked body passes client_max_size


def json_limits(settings: Settings) -> jsonsafe.JsonLimits:
    """What a JSON request body may be: ``api.max_body_bytes``, ``api.max_json_depth`` and
    ``api.max_json_string_chars``."""
    return jsonsafe.JsonLimits(
        max_bytes=settings.api.max_body_bytes,
        max_depth=settings.api.max_json_depth,
        max_string_chars=settings.api.max_json_string_chars,
    )


async def _json_body(request: web.Request) -> Any:
    """The body's JSON value; a 400 problem (``_Refused``) naming why it is not bounded JSON."""
    raw = await _raw_body(request)
    try:
        return jsonsafe.loads(raw, request.app[JSON_LIMITS])
    except jsonsafe.JsonRejected as exc:
        raise _Refused(
            problem(
                400,
                Problem.MALFORMED_JSON,
                str(exc),
                errors=[{"field": "(body)", "message": f"{exc.reason}: {exc}"}],
            )
        ) from None


def parse_query(
    request: web.Request,
    model: type[Query],
    *,
    lists: tuple[str, ...] = (),
    repeats: tuple[str, ...] = (),
) -> Query:
    """The query string as ``model``; a 422 problem (``_Refused``) naming each unknown,
    repeated or malformed parameter. ``lists`` may repeat or hold comma-separated values;
    ``repeats`` may repeat (a value may hold a comma). The one way every route reads its
    query, so every route refuses the same way."""
    values: dict[str, Any] = {}
    errors: list[dict[str, str]] = []
    for key in dict.fromkeys(request.query):
        given = request.query.getall(key)
        if key in lists:
            # An empty value is kept: ``status=`` names no status, which is refused (422).
            values[key] = [v for raw in given for v in raw.split(",")]
        elif key in repeats:
            values[key] = given
        elif len(given) > 1:
            errors.append({"field": f"query.{_shown(key)}", "message": "given more than once"})
        else:
            values[key] = given[0]
    try:
        parsed = model.model_validate(values)
    except ValidationError as exc:
        errors.extend(field_errors(exc, prefix=("query",)))
    if errors:
        for error in errors:
            error["field"] = _shown(error["field"])
        raise _Refused(invalid(errors))
    return parsed


def _shown(text: str) -> str:
    """A client's name fit to answer with: short, and escaped if not printable ASCII."""
    text = text if len(text) <= 64 else text[:64] + "..."
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _path_id(request: web.Request, name: str, pattern: re.Pattern[str], what: str) -> str:
    """The URL's ``name`` when it has the format of ``what``'s ids; else 404 before any key
    is built from it (an id of another format names nothing, as an unknown id does)."""
    value = request.match_info[name]
    if not pattern.fullmatch(value):  # fullmatch: "$" would let a trailing newline in
        raise _Refused(problem(404, Problem.NOT_FOUND, f"no {what} with this id (not a {what} id)"))
    return value


def _job_id(request: web.Request) -> str:
    return _path_id(request, "job_id", JOB_ID_RE, "job")


def _dead_letter_id(request: web.Request) -> str:
    return _path_id(request, "dl_id", DEAD_LETTER_ID_RE, "dead letter")


async def create_cancellation(request: web.Request) -> web.Response:
    deps, settings = request.app[DEPS], request.app[DEPS].settings
    body = await _json_body(request)
    try:
        body = with_header_key(body, header_key(request.headers.getall(IDEMPOTENCY_HEADER, [])))
    except KeyRefused as exc:
        if exc.mismatch:
            return problem(400, Problem.IDEMPOTENCY_KEY_MISMATCH, str(exc))
        return invalid([{"field": f"header.{IDEMPOTENCY_HEADER}", "message": str(exc)}])
    checked = validate_request(body, settings)
    if isinstance(checked, list):
        return invalid(checked)
    if checked.idempotency_key is not None and reserved_key(checked.idempotency_key):
        return invalid(
            [
                {
                    "field": "idempotency_key",
                    "message": f"keys starting {reserved_key(checked.idempotency_key)!r} "
                    "are reserved for Cancelflow's own producers",
                }
            ]
        )
    try:
        created = await submit(
            deps, request.app[CELERY], checked, namespace="api:" + _token(request).namespace
        )
    except IdempotencyConflict as exc:
        # draft-ietf-httpapi-idempotency-key-header §2.7: reused with another payload, 422.
        # (No 409 "still in flight": JobStore.create records the job and its key in one
        # Redis script, so a second request with the key sees the first's job or nothing.)
        return problem(422, Problem.IDEMPOTENCY_KEY_REUSED, str(exc), job_id=exc.job_id)
    job_json = created.job.model_dump_json()
    return web.Response(
        # pydantic's own JSON (the busiest route: twice as fast as dump + json.dumps), with
        # how the request was met added as the object's last member.
        body=f'{job_json[:-1]},"how":"{created.how}"}}',
        content_type="application/json",
        status=202,
        headers={
            "Location": f"/v1/cancellations/{created.job.id}",
            "Cancelflow-Enqueue": created.how,
        },
    )


async def list_cancellations(request: web.Request) -> web.Response:
    query = parse_query(request, JobQuery, lists=("status", "outcome"), repeats=("metadata",))
    try:
        page = await listing.list_jobs(request.app[DEPS].store.redis, query)
    except listing.BadCursor as exc:
        return invalid([{"field": "query.cursor", "message": str(exc)}])
    return web.json_response(page.model_dump(mode="json"))


async def get_stats(request: web.Request) -> web.Response:
    query = parse_query(request, StatsQuery)
    found = await listing.stats(request.app[DEPS].store.redis, since_s=query.since_s)
    return web.json_response(found.model_dump(mode="json"))


async def post_billing_event(request: web.Request) -> web.Response:
    verifier = request.app[BILLING_VERIFIER]
    if BILLING not in request.app or not verifier.schemes:
        return problem(
            503,
            Problem.BILLING_NOT_CONFIGURED,
            "set CANCELFLOW_BILLING__RULES_PATH and a signing secret (CANCELFLOW_BILLING__SECRET, "
            "__STANDARD_WEBHOOKS_SECRET or __STRIPE_SECRET)",
        )
    raw = await _raw_body(request)
    try:
        verifier.verify(request.headers, raw)
    except BadSignature as exc:
        limited = await _failed_authentication(request, "billing signature")
        return limited or problem(
            401, Problem.BAD_SIGNATURE, str(exc), scheme=exc.scheme, reason=exc.reason
        )
    # Only a verified event spends the billing system's rate: unsigned floods cannot starve it.
    limited = await _rate_limited(request, "signed:" + request.path)
    if limited is not None:
        return limited
    processor = request.app[BILLING]
    # Bounded decoding (cancelflow.jsonsafe: api.max_json_depth, no lone surrogates, UTF-8):
    # a body that is not an event is the sender's to fix, so it is answered, not stored.
    parsed = processor.parse(raw)
    if isinstance(parsed, Rejected):
        errors = [e.model_dump() for e in parsed.errors]
        if parsed.error_type == "BillingEventUnreadable":
            return problem(400, Problem.MALFORMED_JSON, parsed.errors[0].message, errors=errors)
        return problem(
            422, Problem.INVALID_BILLING_EVENT, "the body is not a billing event", errors=errors
        )
    result = await processor.process_event(parsed, raw=raw, source={"http": request.path})
    if result.result == "dead_lettered":
        detail = "the event cannot make a valid request; it is dead-lettered"
        return problem(
            422,
            Problem.INVALID_BILLING_EVENT,
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
    job = await request.app[DEPS].store.get(_job_id(request))
    return web.json_response(job.model_dump(mode="json"))


async def post_decision(request: web.Request) -> web.Response:
    deps, job_id = request.app[DEPS], _job_id(request)
    tracing.set_attributes({tracing.JOB_ID: job_id})  # the job's steps go on in its own trace
    try:
        decision = Decision.model_validate(await _json_body(request))
    except ValidationError as exc:
        return invalid(field_errors(exc))
    try:
        nxt = await decisions.decide(deps, job_id, decision)
    except DecisionConflict as exc:
        return problem(409, Problem.JOB_NOT_AWAITING_DECISION, str(exc))
    await send_step(deps, request.app[CELERY], nxt)
    job = await deps.store.get(job_id)
    return web.json_response(job.model_dump(mode="json"), status=202)


async def list_dead_letters(request: web.Request) -> web.Response:
    query = parse_query(request, DeadLetterQuery)
    items = await request.app[DEPS].dead_letters.list(query, limit=query.limit)
    return web.json_response({"items": [d.model_dump(mode="json") for d in items]})


async def get_dead_letter(request: web.Request) -> web.Response:
    dl_id = _dead_letter_id(request)
    dl = await request.app[DEPS].dead_letters.get(dl_id)
    if dl is None:
        return problem(404, Problem.NOT_FOUND, f"no dead letter {dl_id}")
    return web.json_response(dl.model_dump(mode="json"))


async def replay_dead_letter(request: web.Request) -> web.Response:
    deps, dl_id = request.app[DEPS], _dead_letter_id(request)
    dl = await deps.dead_letters.get(dl_id)
    if dl is None:
        return problem(
            404, Problem.NOT_FOUND, f"no dead letter {dl_id} (already replayed or purged?)"
        )
    tracing.set_attributes({tracing.JOB_ID: dl.job_id})  # replayed in the job's own trace
    try:
        nxt = await chain.replay(deps, dl_id)
    except AlreadyReplayed as exc:
        # A concurrent replay claimed it between the read above and ours: it delivers, not us.
        return problem(409, Problem.ALREADY_REPLAYED, str(exc))
    except CancelflowError as exc:
        return problem(409, Problem.REPLAY_REFUSED, str(exc))
    if nxt.step is not None and dl.job_id:
        await send_step(deps, request.app[CELERY], nxt)
    return web.json_response({"replayed": dl_id, "job_id": dl.job_id, "next": nxt.step}, status=202)


async def delete_dead_letter(request: web.Request) -> web.Response:
    dl_id = _dead_letter_id(request)
    if not await request.app[DEPS].dead_letters.delete(dl_id):
        return problem(404, Problem.NOT_FOUND, f"no dead letter {dl_id}")
    return web.Response(status=204)


# --- webhook endpoints (cancelflow.endpoints; docs/callbacks.md, "Webhook endpoints") ----------


def _endpoint_id(request: web.Request) -> str:
    return _path_id(request, "endpoint_id", ENDPOINT_ID_RE, "webhook endpoint")


def _endpoints(request: web.Request) -> EndpointStore:
    return EndpointStore(request.app[DEPS].store.redis)


def _endpoint_url_refused(settings: Settings, url: str) -> list[dict[str, str]]:
    """The same checks as a job's ``callback_url`` at submission (the value not echoed:
    it may carry credentials); its host's addresses are checked at each delivery."""
    cb = settings.callbacks
    try:
        check_url_form(url, allow_http=cb.allow_http, allowed_hosts=cb.allowed_hosts)
    except UnsafeCallbackUrl as exc:
        return [{"field": "url", "message": str(exc)}]
    return []


def _no_endpoint(endpoint_id: str) -> web.Response:
    return problem(404, Problem.NOT_FOUND, f"no webhook endpoint {endpoint_id}")


async def create_endpoint(request: web.Request) -> web.Response:
    settings = request.app[DEPS].settings
    try:
        body = EndpointCreate.model_validate(await _json_body(request))
    except ValidationError as exc:
        return invalid(field_errors(exc))
    if refused := _endpoint_url_refused(settings, body.url):
        return invalid(refused)
    store = _endpoints(request)
    if await store.count() >= MAX_ENDPOINTS:
        return problem(
            409,
            Problem.TOO_MANY_ENDPOINTS,
            f"at most {MAX_ENDPOINTS} webhook endpoints: delete one first",
        )
    overlap = body.rotation_overlap_s
    endpoint, secret = await store.create(
        url=body.url,
        description=body.description,
        event_types=list(dict.fromkeys(body.event_types)),
        rotation_overlap_s=(
            settings.callbacks.endpoint_rotation_overlap_s if overlap is None else overlap
        ),
        enabled=body.enabled,
    )
    log.info("callback.endpoint.created", endpoint_id=endpoint.id)
    answer = EndpointSecret(endpoint=endpoint, secret=secret)
    return web.json_response(
        answer.model_dump(mode="json"),
        status=201,
        headers={"Location": f"/v1/webhook-endpoints/{endpoint.id}"},
    )


async def list_endpoints(request: web.Request) -> web.Response:
    parse_query(request, NoQuery)
    page = EndpointPage(items=await _endpoints(request).all())
    return web.json_response(page.model_dump(mode="json"))


async def get_endpoint(request: web.Request) -> web.Response:
    endpoint_id = _endpoint_id(request)
    endpoint = await _endpoints(request).get(endpoint_id)
    if endpoint is None:
        return _no_endpoint(endpoint_id)
    return web.json_response(endpoint.model_dump(mode="json"))


async def update_endpoint(request: web.Request) -> web.Response:
    endpoint_id = _endpoint_id(request)
    try:
        body = EndpointUpdate.model_validate(await _json_body(request))
    except ValidationError as exc:
        return invalid(field_errors(exc))
    if body.url is not None and (
        refused := _endpoint_url_refused(request.app[DEPS].settings, body.url)
    ):
        return invalid(refused)
    changes = body.model_dump(exclude_none=True)
    if "event_types" in changes:
        changes["event_types"] = list(dict.fromkeys(changes["event_types"]))
    endpoint = await _endpoints(request).update(endpoint_id, **changes)
    if endpoint is None:
        return _no_endpoint(endpoint_id)
    log.info("callback.endpoint.updated", endpoint_id=endpoint_id, fields=sorted(changes))
    return web.json_response(endpoint.model_dump(mode="json"))


async def rotate_endpoint_secret(request: web.Request) -> web.Response:
    endpoint_id = _endpoint_id(request)
    raw = await _raw_body(request)
    try:
        body = SecretRotation.model_validate(await _json_body(request) if raw.strip() else {})
    except ValidationError as exc:
        return invalid(field_errors(exc))
    rotated = await _endpoints(request).rotate(endpoint_id, overlap_s=body.overlap_s)
    if rotated is None:
        return _no_endpoint(endpoint_id)
    endpoint, secret = rotated
    log.info(
        "callback.endpoint.secret_rotated",
        endpoint_id=endpoint_id,
        previous_secret_expires_at=endpoint.previous_secret_expires_at,
    )
    return web.json_response(
        EndpointSecret(endpoint=endpoint, secret=secret).model_dump(mode="json")
    )


async def delete_endpoint(request: web.Request) -> web.Response:
    endpoint_id = _endpoint_id(request)
    if not await _endpoints(request).delete(endpoint_id):
        return _no_endpoint(endpoint_id)
    log.info("callback.endpoint.deleted", endpoint_id=endpoint_id)
    return web.Response(status=204)


async def list_providers(request: web.Request) -> web.Response:
    """Each configured provider's circuit breaker and in-flight calls, shared by all workers,
    and the error rate of its jobs of the last hour (``listing.recent_outcomes``)."""
    deps = request.app[DEPS]
    recent = await listing.recent_outcomes(deps.store.redis)
    items = [
        ProviderState.model_validate(
            {
                "provider": key,
                **await breaker_state(deps.store.redis, key),
                **recent.get(key, {}),
            }
        )
        for key in deps.settings.enabled_providers()
    ]
    return web.json_response(ProviderStates(items=items).model_dump(mode="json"))


async def get_metrics(request: web.Request) -> web.Response:
    """This process's metrics, and the shared state's gauges read from Redis now."""
    deps = request.app[DEPS]
    snapshot = await metrics.read_store(
        deps.store.redis,
        providers=deps.settings.enabled_providers(),
        broker_queues=broker_queues(request.app),
    )
    body = metrics.render(metrics.StoreGauges(snapshot))
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


# The handlers that read a query (``parse_query``): every other route takes none (422).
_TAKES_QUERY = frozenset({list_cancellations, get_stats, list_dead_letters})


async def _index_dead_letter_kinds(deps: Deps) -> None:
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
            kind=Problem.NOT_READY,
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


def broker_queues(app: web.Application) -> QueueReader | None:
    """What reads the broker's queues, None when the broker is the job store's Redis."""
    found = app.get(BROKER_QUEUES)
    return found if found is not None else None  # type: ignore[return-value]


def new_event_loop(settings: Settings) -> asyncio.AbstractEventLoop:
    """The loop the API runs on (``api.event_loop``): uvloop's when it is installed, unless
    asyncio's is asked for; ``ConfigError`` when uvloop is asked for and missing. uvloop runs
    the sockets, timers and callbacks in C: the API spends a quarter to a third less CPU per
    request on it (``python -m bench.enqueue``); everything runs the same on either."""
    choice = settings.api.event_loop
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError(
                    "invalid settings:\n  CANCELFLOW_API__EVENT_LOOP: uvloop is not installed"
                ) from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@web.middleware
async def request_span(request: web.Request, handler: Any) -> web.StreamResponse:
    """The request's server span, continuing the caller's ``traceparent`` (in the middleware
    list only while tracing is on: docs/tracing.md); the steps it sends are its children.
    Probes and scrapes (``UNTRACED_PATHS``) get none: a trace every few seconds per probe
    would bury the jobs' traces."""
    if request.path in UNTRACED_PATHS:
        untraced: web.StreamResponse = await handler(request)
        return untraced
    route = request.match_info.route.resource
    template = route.canonical if route is not None else None
    attributes = {
        "http.request.method": request.method,
        "http.route": template,
        "url.path": request.path,
        "url.scheme": request.scheme,
        tracing.REQUEST_ID: structlog.contextvars.get_contextvars().get("request_id"),
    }
    name = f"{request.method} {template}" if template else request.method
    with (
        tracing.span(name, kind="server", parent=request.headers, attributes=attributes) as span,
        structlog.contextvars.bound_contextvars(**tracing.log_fields(span)),
    ):
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            tracing.record_http(status=exc.status)
            raise
        tracing.record_http(status=response.status)
        return response


def create_app(settings: Settings, *, celery: Celery | None = None) -> web.Application:
    """The API application; Redis and Celery connections open on start-up. The billing rules,
    when configured, are checked here: a ``RulesError`` stops start-up."""
    limit = settings.api.max_body_bytes
    # request_context first: every line the request causes carries its id. request_span
    # (tracing on only) next: the request's id is on its span. request_metrics next
    # (outside errors_and_auth): it sees the answer errors_and_auth gives, its 401, 429
    # and 503 included, and the status a handler's error is mapped to.
    traced = [request_span] if tracing.configure(settings, service="cancelflow-api") else []
    app = web.Application(
        middlewares=[request_context, *traced, request_metrics, errors_and_auth],
        client_max_size=limit,
    )
    app[TOKENS] = parse_tokens(settings)
    app[CELERY] = celery or create_celery(settings)
    app[MAX_BODY] = limit
    app[JSON_LIMITS] = json_limits(settings)
    app[REDIS_WAIT_S] = settings.redis_read_timeout_s
    document = openapi.document(
        max_body_bytes=limit,
        max_json_depth=settings.api.max_json_depth,
        max_json_string_chars=settings.api.max_json_string_chars,
        providers={
            key: conf.callback_secret is not None
            for key, conf in settings.enabled_providers().items()
        },
        billing_schemes=settings.billing.accepted_schemes(),
    )
    app[OPENAPI] = json.dumps(document).encode()
    app[BILLING_VERIFIER] = BillingVerifier.from_settings(settings.billing)
    if settings.billing.rules_path is not None:
        app[RULES] = load_rules(
            settings.billing.rules_path, configured=settings.enabled_providers()
        )

    async def lifecycle(app: web.Application) -> Any:
        redis = redis_client(settings)
        app[BROKER_QUEUES] = queue_reader(settings)
        # Decisions end jobs in the API process (an accepted offer): counted here.
        app[DEPS] = build_deps(settings, redis=redis, job_observer=metrics.JOB_METRICS)
        app[LIMITER] = RateLimiter(
            redis, rate_per_s=settings.api.rate_limit_per_s, burst=settings.api.rate_limit_burst
        )
        app[AUTH_FAILURES] = RateLimiter(
            redis,
            rate_per_s=settings.api.auth_failures_per_s,
            burst=settings.api.auth_failures_burst,
        )
        app[GATE] = Gate(redis, failures=app[AUTH_FAILURES], tokens=app[LIMITER])
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
        close_publishers(app[CELERY])  # RabbitMQ's: its thread and connection
        await app[DEPS].store.flush_marks()
        flush_sent_events(app[CELERY])
        if (reader := broker_queues(app)) is not None:
            await reader.close()
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
    app.router.add_post("/v1/webhook-endpoints", create_endpoint)
    app.router.add_get("/v1/webhook-endpoints", list_endpoints)
    app.router.add_get("/v1/webhook-endpoints/{endpoint_id}", get_endpoint)
    app.router.add_patch("/v1/webhook-endpoints/{endpoint_id}", update_endpoint)
    app.router.add_delete("/v1/webhook-endpoints/{endpoint_id}", delete_endpoint)
    app.router.add_post("/v1/webhook-endpoints/{endpoint_id}/rotate-secret", rotate_endpoint_secret)
    app.router.add_get("/metrics", get_metrics)
    docs_page.setup(app)
    console.setup(app, settings)
    return app


def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    on_listening: Callable[[], None],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve ``app`` on ``host:port`` until SIGINT or SIGTERM, as ``web.run_app`` does, on a
    runner whose connections answer aiohttp's own refusals (a request its parser cannot
    read) as problem+json (``producers.http_refusals``); ``on_listening`` once bound. On
    the loop ``loop_factory`` makes (``new_event_loop``), else asyncio's. ``reuse_port``:
    the port is shared with the other processes of ``cancelflow api --processes``."""

    async def run() -> None:
        # handle_signals: SIGINT and SIGTERM raise GracefulExit, which ends asyncio.run; the
        # task is cancelled and cleanup waits for requests in flight, as run_app's does.
        runner = ProblemAppRunner(app, access_log=None, handle_signals=True)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
            on_listening()
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with (
        contextlib.suppress(web.GracefulExit, KeyboardInterrupt),
        asyncio.Runner(loop_factory=loop_factory) as runner,
    ):
        runner.run(run())
