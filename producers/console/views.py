"""The console's pages, and the gate in front of them.

The API's middleware wants a bearer token on every route, which a browser's links and forms
cannot send; the console's gate (the app's outermost middleware) takes ``/console`` requests
instead and answers them itself, from a router of its own (so the API's router, and the
OpenAPI document that describes every route of it, hold the API alone): a signed session
cookie (``sessions``) instead of the bearer token, a CSRF token checked on every POST, HTML
error pages, and a 503 page within the Redis read timeout while Redis is unreachable, as the
API does. A failed sign-in counts against the client address's failed authentications, the
API's own bucket: once they are spent the sign-in form answers 429. Every other path goes on
to the API's middleware untouched.

A read token sees every page; only a write token replays or purges. Actions go through the
domain functions the API uses (``chain.replay`` then ``dispatch``, ``DeadLetterStore.delete``)
and each is written to the audit log (``audit``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from multidict import MultiDictProxy, MultiMapping
from pydantic import ValidationError

from cancelflow import chain, metrics
from cancelflow.contract import JOB_ID_RE, OutcomeType, Status
from cancelflow.dead_letters import KINDS, DeadLetter, DeadLetterFilter
from cancelflow.errors import CancelflowError, JobNotFound
from cancelflow.guard import breaker_state
from cancelflow.logging import get_logger, redact
from cancelflow.settings import Settings
from cancelflow.store import AWAITING, job_key
from producers import listing
from producers.api import (
    AUTH_FAILURES,
    CELERY,
    DEPS,
    REDIS_OUTAGE,
    REDIS_WAIT_S,
    RETRY_AFTER_S,
    TOKENS,
    auth_failure_bucket,
    broker_queues,
)
from producers.console import audit, sessions
from producers.schemas import DEAD_LETTER_ID_RE, JobQuery
from producers.submit import send_step

log = get_logger(__name__)

PREFIX = "/console"
HERE = Path(__file__).parent
KEY = web.AppKey("console_key", bytes)
TEMPLATES = web.AppKey("console_templates", jinja2.Environment)
STYLESHEET = web.AppKey("console_stylesheet", bytes)
ROUTER = web.AppKey("console_router", web.UrlDispatcher)
# The matched route's path parameters, on the request.
PARAMS = "console.params"
# The most dead letters one action (or the overview's breakdown) reads.
BULK_LIMIT = 1000
DEAD_LETTER_PAGE = 100
JOB_PAGE = 50
MAX_REASON_CHARS = 500
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Page = Callable[[web.Request, sessions.Session], Awaitable[web.StreamResponse]]


def _is_console(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


@web.middleware
async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Console paths: the route's own handler, with the console's errors (see the module)."""
    if not _is_console(request.path):
        return await handler(request)
    try:
        async with asyncio.timeout(request.app[REDIS_WAIT_S]):
            found = await request.app[ROUTER].resolve(request)
            request[PARAMS] = dict(found)
            response = await found.handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects
        response = _error(request, exc.status, exc.reason, exc.text or "")
    except REDIS_OUTAGE as exc:
        log.warning("console.redis_unavailable", path=request.path, error=type(exc).__name__)
        response = _error(
            request, 503, "Redis is unreachable", f"Try again in {RETRY_AFTER_S} seconds."
        )
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    except Exception:
        log.exception("console.unexpected_error", path=request.path)
        response = _error(request, 500, "Internal error", "The error is logged.")
    response.headers.update(SECURITY_HEADERS)
    return response


class _Refused(web.HTTPException):
    """A 4xx the gate renders as a page: ``status`` and a sentence saying why."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        self.status_code = status
        super().__init__(reason=reason, text=detail)


def _render(
    request: web.Request, template: str, *, status: int = 200, **context: Any
) -> web.Response:
    body = request.app[TEMPLATES].get_template(template).render(path=request.path, **context)
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def _error(request: web.Request, status: int, title: str, detail: str) -> web.Response:
    return _render(
        request,
        "error.html",
        status=status,
        session=_session(request),
        title=title,
        detail=detail,
        http_status=status,
    )


# --- sessions -----------------------------------------------------------------------------------


def _configured(request: web.Request) -> dict[str, sessions.Scope]:
    return {sessions.token_id(t.secret): t.scope for t in request.app[TOKENS]}


def _session(request: web.Request) -> sessions.Session | None:
    """The request's session, if its cookie is ours, unexpired, and its token still configured
    (with the scope the configuration gives it now)."""
    found = sessions.read_session(request.app[KEY], request.cookies.get(sessions.COOKIE))
    if found is None:
        return None
    scope = _configured(request).get(found.who)
    if scope is None:
        return None
    return sessions.Session(who=found.who, scope=scope, csrf=found.csrf, expires=found.expires)


def signed_in(page: Page) -> Handler:
    """A page for sessions only: others are sent to the sign-in form."""

    async def handler(request: web.Request) -> web.StreamResponse:
        session = _session(request)
        if session is None:
            raise web.HTTPSeeOther(f"{PREFIX}/signin")
        return await page(request, session)

    return handler


async def _form(request: web.Request, session: sessions.Session) -> MultiDictProxy[str | Any]:
    """The POSTed form, once its CSRF token is the session's; 403 otherwise."""
    form = await request.post()
    given = form.get("csrf")
    if not sessions.csrf_matches(session.csrf, given if isinstance(given, str) else None):
        log.warning("console.csrf_refused", path=request.path, who=session.who)
        raise _Refused(403, "Forbidden", "The form's CSRF token is missing or wrong.")
    return form


def _text(form: MultiDictProxy[str | Any], name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


async def signin_form(request: web.Request) -> web.StreamResponse:
    if _session(request) is not None:
        raise web.HTTPSeeOther(f"{PREFIX}/")
    return _signin_page(request)


def _signin_page(request: web.Request, *, status: int = 200, error: str = "") -> web.Response:
    csrf = secrets.token_urlsafe(24)
    response = _render(request, "signin.html", status=status, session=None, csrf=csrf, error=error)
    response.set_cookie(
        sessions.SIGNIN_COOKIE,
        csrf,
        max_age=3600,
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


async def _signin_limited(request: web.Request, *, count: bool) -> web.Response | None:
    """The sign-in page answered 429 (with ``Retry-After``) when the client's address has
    spent its failed authentications, the API's bucket (``auth_failure_bucket``): a failed
    sign-in is a failed authentication, and a guesser is held to the same rate by either
    door. ``count``: this request is a failure to count; else only ask, counting nothing."""
    try:
        verdict = await request.app[AUTH_FAILURES].hit(auth_failure_bucket(request), count=count)
    except REDIS_OUTAGE:
        raise  # the gate's 503 page
    except Exception as exc:  # as the API's limits: a limiter fault never locks everyone out
        log.warning("console.rate_limit.unavailable", error=type(exc).__name__)
        return None
    if verdict.allowed:
        return None
    wait_s = max(1, math.ceil(verdict.retry_after_s))
    log.warning("console.signin.limited", client=request.remote, retry_after_s=wait_s)
    response = _signin_page(
        request,
        status=429,
        error=f"Too many failed sign-ins from this address: try again in {wait_s} seconds.",
    )
    response.headers["Retry-After"] = str(wait_s)
    return response


async def signin(request: web.Request) -> web.StreamResponse:
    # Asked before the form is read or any token compared: once an address has spent its
    # failures, nothing it sends is looked at, so guessing stays slow.
    limited = await _signin_limited(request, count=False)
    if limited is not None:
        return limited
    form = await request.post()
    given = form.get("csrf")
    if not sessions.csrf_matches(
        request.cookies.get(sessions.SIGNIN_COOKIE, ""), given if isinstance(given, str) else None
    ):
        raise _Refused(403, "Forbidden", "The form's CSRF token is missing or wrong.")
    presented = _text(form, "token")
    found = None
    if presented.isascii():
        for token in request.app[TOKENS]:
            # Every token compared, in constant time, as the API does.
            if hmac.compare_digest(token.secret, presented.encode()):
                found = token
    if found is None:
        log.info("console.signin.refused", client=request.remote)
        limited = await _signin_limited(request, count=True)
        return limited or _signin_page(
            request, status=401, error="That is not a token this API accepts."
        )
    who = sessions.token_id(found.secret)
    log.info("console.signin", who=who, token_name=found.name, scope=found.scope)
    response = web.HTTPSeeOther(f"{PREFIX}/")
    response.set_cookie(
        sessions.COOKIE,
        sessions.open_session(request.app[KEY], who=who, scope=found.scope),
        max_age=sessions.LIFETIME_S,
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    response.del_cookie(sessions.SIGNIN_COOKIE, path=PREFIX)
    raise response


async def signout(request: web.Request, session: sessions.Session) -> web.StreamResponse:
    await _form(request, session)
    response = web.HTTPSeeOther(f"{PREFIX}/signin")
    response.del_cookie(sessions.COOKIE, path=PREFIX)
    raise response


# --- overview -----------------------------------------------------------------------------------


async def overview(request: web.Request, session: sessions.Session) -> web.StreamResponse:
    deps = request.app[DEPS]
    redis = deps.store.redis
    snapshot = await metrics.read_store(redis, broker_queues=broker_queues(request.app))
    stats = await listing.stats(redis, since_s=24 * 3600)
    by_status: Counter[str] = Counter()
    for counts in stats.jobs.values():
        by_status.update(counts)
    newest = await deps.dead_letters.list(limit=BULK_LIMIT)
    groups = Counter((d.kind, d.provider or "", d.error_type) for d in newest)
    circuits = [
        {"provider": key, **await breaker_state(redis, key)}
        for key in sorted(deps.settings.enabled_providers())
    ]
    return _render(
        request,
        "overview.html",
        session=session,
        snapshot=snapshot,
        stats=stats,
        by_status=sorted(by_status.items()),
        groups=sorted(groups.items(), key=lambda g: -g[1]),
        groups_partial=len(newest) >= BULK_LIMIT,
        bulk_limit=BULK_LIMIT,
        circuits=circuits,
    )


# --- jobs ---------------------------------------------------------------------------------------


def _when(raw: str) -> str | None:
    """A ``datetime-local`` field (or ISO 8601) as ISO 8601, UTC when it names no offset."""
    if not raw:
        return None
    parsed = datetime.fromisoformat(raw)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).isoformat()


# The search form's one-value fields, as ``JobQuery`` names them.
_JOB_FIELDS = ("provider", "reference", "idempotency_key", "created_after", "created_before")
# Its repeatable fields: a checkbox per status and per outcome, a ``key=value`` per input.
_JOB_LISTS = ("status", "outcome", "metadata")


def _job_search(q: MultiMapping[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The search form's fields as given (one-value, then repeatable), blanks dropped."""
    fields = {name: q.get(name, "").strip() for name in _JOB_FIELDS}
    lists = {name: [v.strip() for v in q.getall(name, []) if v.strip()] for name in _JOB_LISTS}
    return fields, lists


def _job_query(fields: dict[str, str], lists: dict[str, list[str]], cursor: str | None) -> JobQuery:
    """The API's own query model (``GET /v1/cancellations``) for the console's search, so both
    filter alike; a ``ValidationError`` (or ``ValueError`` for a time) names what is wrong."""
    return JobQuery.model_validate(
        {
            "provider": fields["provider"] or None,
            "status": lists["status"] or None,
            "outcome": lists["outcome"] or None,
            "reference": fields["reference"] or None,
            "idempotency_key": fields["idempotency_key"] or None,
            "metadata": lists["metadata"] or None,
            "created_after": _when(fields["created_after"]),
            "created_before": _when(fields["created_before"]),
            "cursor": cursor,
            "limit": JOB_PAGE,
        }
    )


async def jobs(request: web.Request, session: sessions.Session) -> web.StreamResponse:
    q = request.query
    job_id = q.get("id", "").strip()
    fields, lists = _job_search(q)
    # One blank ``key=value`` input after those given; ``Add a metadata pair`` asks for another
    # (a plain submit: no JavaScript needed to add a field).
    blanks = 1 + ("more_metadata" in q)
    context: dict[str, Any] = {
        "session": session,
        "job_id": job_id,
        "fields": fields,
        "lists": lists,
        "metadata_inputs": [*lists["metadata"], *[""] * blanks],
        "providers": sorted(request.app[DEPS].settings.enabled_providers()),
        "statuses": [s.value for s in Status],
        "outcomes": [o.value for o in OutcomeType],
        "items": None,
        "next_page": None,
        "errors": [],
    }
    if job_id:
        if JOB_ID_RE.fullmatch(job_id) and await request.app[DEPS].store.redis.exists(
            job_key(job_id)
        ):
            raise web.HTTPSeeOther(f"{PREFIX}/jobs/{job_id}")
        context["errors"] = [f"No job has the id {job_id!r}."]
        return _render(request, "jobs.html", status=404, **context)
    if "search" not in q and not any(fields.values()) and not any(lists.values()):
        return _render(request, "jobs.html", **context)
    try:
        query = _job_query(fields, lists, q.get("cursor") or None)
        page = await listing.list_jobs(request.app[DEPS].store.redis, query)
    except ValidationError as exc:
        context["errors"] = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return _render(request, "jobs.html", status=422, **context)
    except (ValueError, listing.BadCursor) as exc:
        context["errors"] = [str(exc)]
        return _render(request, "jobs.html", status=422, **context)
    context["items"] = page.items
    if page.next_cursor:
        # The same search, from the cursor on: every field as given, each repeat kept.
        pairs = [("search", "1"), *((k, v) for k, v in fields.items() if v)]
        pairs += [(k, v) for k in _JOB_LISTS for v in lists[k]]
        context["next_page"] = f"{PREFIX}/jobs?{urlencode([*pairs, ('cursor', page.next_cursor)])}"
    return _render(request, "jobs.html", **context)


async def job(request: web.Request, session: sessions.Session) -> web.StreamResponse:
    job_id = request[PARAMS]["job_id"]
    if not JOB_ID_RE.fullmatch(job_id):
        raise _Refused(404, "Not found", "That is not a job id.")
    deps = request.app[DEPS]
    try:
        record = await deps.store.get(job_id)
    except JobNotFound:
        raise _Refused(404, "Not found", f"No job {job_id}.") from None
    deadline = await deps.store.redis.zscore(AWAITING, job_id)
    attempts = [e for e in record.timeline if e.response is not None or e.error is not None]
    return _render(
        request,
        "job.html",
        session=session,
        job=record,
        attempts=attempts,
        deadline=(datetime.fromtimestamp(float(deadline), UTC).isoformat() if deadline else None),
    )


# --- dead letters -------------------------------------------------------------------------------


def _dl_filter(values: Any) -> DeadLetterFilter:
    """The filter named by ``kind``, ``provider`` and ``error_type`` (empty: any);
    ``_Refused`` (422) for a kind that is none."""
    raw = {k: (values.get(k) or "").strip() or None for k in ("kind", "provider", "error_type")}
    try:
        return DeadLetterFilter.model_validate(raw)
    except ValidationError:
        raise _Refused(422, "Invalid filter", "Kind must be one of " + ", ".join(KINDS)) from None


def _filter_fields(flt: DeadLetterFilter) -> dict[str, str]:
    return {
        "kind": flt.kind or "",
        "provider": flt.provider or "",
        "error_type": flt.error_type or "",
    }


async def dead_letters(request: web.Request, session: sessions.Session) -> web.StreamResponse:
    flt = _dl_filter(request.query)
    items = await request.app[DEPS].dead_letters.list(flt, limit=DEAD_LETTER_PAGE)
    return _render(
        request,
        "dead_letters.html",
        session=session,
        items=items,
        filters=_filter_fields(flt),
        kinds=KINDS,
        providers=sorted(request.app[DEPS].settings.enabled_providers()),
        page=DEAD_LETTER_PAGE,
    )


async def dead_letter(request: web.Request, session: sessions.Session) -> web.StreamResponse:
    dl_id = request[PARAMS]["dl_id"]
    found = None
    if DEAD_LETTER_ID_RE.fullmatch(dl_id):
        found = await request.app[DEPS].dead_letters.get(dl_id)
    if found is None:
        raise _Refused(404, "Not found", f"No dead letter {dl_id} (replayed or purged?).")
    return _render(request, "dead_letter.html", session=session, dl=found)


def _action(form: MultiDictProxy[str | Any]) -> tuple[str, str]:
    """``(replay|purge, selected|all|<dead letter id>)`` from the button pressed."""
    action, _, which = _text(form, "do").partition(":")
    if action not in ("replay", "purge") or not (
        which in ("selected", "all") or DEAD_LETTER_ID_RE.fullmatch(which)
    ):
        raise _Refused(400, "Bad request", "Choose Replay or Purge.")
    return action, which


async def _targets(
    request: web.Request, form: MultiDictProxy[str | Any], which: str
) -> tuple[list[DeadLetter], DeadLetterFilter | None]:
    """The dead letters an action names, as they are now, and the filter when by filter."""
    store = request.app[DEPS].dead_letters
    if which == "all":
        flt = _dl_filter(form)
        return await store.list(flt, limit=BULK_LIMIT), flt
    ids = (
        [which] if which != "selected" else [v for v in form.getall("id", []) if isinstance(v, str)]
    )
    found = []
    for dl_id in dict.fromkeys(ids):
        if DEAD_LETTER_ID_RE.fullmatch(dl_id) and (dl := await store.get(dl_id)) is not None:
            found.append(dl)
    return found, None


async def confirm(request: web.Request, session: sessions.Session) -> web.StreamResponse:
    """The dry run: what an action would touch, and a reason to give before it runs."""
    form = await _form(request, session)
    action, which = _action(form)
    targets, flt = await _targets(request, form, which)
    if not targets:
        raise _Refused(400, "Nothing selected", "Select dead letters, or act on all that match.")
    replayable = [d for d in targets if d.kind != "poison" and d.job_id]
    return _render(
        request,
        "confirm.html",
        session=session,
        action=action,
        which=which,
        targets=targets,
        count=len(replayable) if action == "replay" else len(targets),
        not_replayable=len(targets) - len(replayable),
        filters=_filter_fields(flt) if flt is not None else None,
        capped=len(targets) >= BULK_LIMIT,
        bulk_limit=BULK_LIMIT,
        max_reason=MAX_REASON_CHARS,
    )


async def _act_on(request: web.Request, action: str, dl: DeadLetter) -> tuple[str, str]:
    """Replay or purge one dead letter: its result, and why when it was not done."""
    deps = request.app[DEPS]
    if action == "purge":
        return ("purged" if await deps.dead_letters.delete(dl.id) else "gone"), ""
    # As ``POST /v1/dead-letters/{id}/replay`` does: the step replay names, sent.
    try:
        nxt = await chain.replay(deps, dl.id)
    except CancelflowError as exc:
        return "not replayed", str(exc)
    if nxt.step is not None and dl.job_id:
        await send_step(deps, request.app[CELERY], nxt)
    return "replayed", ""


async def act(request: web.Request, session: sessions.Session) -> web.StreamResponse:
    """Replay or purge what the confirm page showed (as it is now), and audit it."""
    form = await _form(request, session)
    if not session.can_act:
        log.warning("console.action_refused", who=session.who, path=request.path)
        raise _Refused(403, "Forbidden", "This token is read-only: it cannot replay or purge.")
    action, which = _action(form)
    reason = _text(form, "reason")
    if not reason or len(reason) > MAX_REASON_CHARS:
        raise _Refused(
            400, "A reason is needed", f"Give a reason of 1 to {MAX_REASON_CHARS} characters."
        )
    targets, flt = await _targets(request, form, which)
    deps = request.app[DEPS]
    results: Counter[str] = Counter()
    rows: list[tuple[DeadLetter, str, str]] = []
    try:
        for dl in targets:
            rows.append((dl, *await _act_on(request, action, dl)))
            results[rows[-1][1]] += 1
    finally:
        # Written even when the action stops part way (Redis gone, the request's time up):
        # the log says what was done.
        if len(rows) < len(targets):
            results["not attempted"] = len(targets) - len(rows)
        done = results["purged" if action == "purge" else "replayed"]
        selection: dict[str, Any] = (
            {"filter": _filter_fields(flt)} if flt else {"ids": len(targets)}
        )
        await audit.record(
            deps.store.redis,
            audit.AuditEntry(
                who=session.who,
                action=action,
                count=done,
                reason=reason,
                selection=selection,
                ids=[dl.id for dl, _, _ in rows],
                results=dict(results),
            ),
        )
    return _render(
        request, "done.html", session=session, action=action, rows=rows, done=done, results=results
    )


async def audit_log(request: web.Request, session: sessions.Session) -> web.StreamResponse:
    entries = await audit.recent(request.app[DEPS].store.redis)
    return _render(request, "audit.html", session=session, entries=entries)


async def stylesheet(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[STYLESHEET], content_type="text/css")


async def to_console(_: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect(f"{PREFIX}/")


def _pretty(value: Any) -> str:
    return json.dumps(redact(value), indent=2, sort_keys=True, default=str)


def register(app: web.Application, settings: Settings) -> None:
    """The console's routes and gate on the API's ``app`` (see ``producers.console.setup``)."""
    secret = settings.api.console_secret
    app[KEY] = sessions.signing_key(secret.get_secret_value() if secret else None)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["pretty"] = _pretty
    env.globals["prefix"] = PREFIX
    app[TEMPLATES] = env
    app[STYLESHEET] = (HERE / "static" / "console.css").read_bytes()
    # Outermost, so console requests never reach the API's bearer-token middleware.
    app.middlewares.insert(0, gate)
    router = app[ROUTER] = web.UrlDispatcher()
    add_get, add_post = router.add_get, router.add_post
    add_get(PREFIX, to_console)
    add_get(f"{PREFIX}/", signed_in(overview))
    add_get(f"{PREFIX}/signin", signin_form)
    add_post(f"{PREFIX}/signin", signin)
    add_post(f"{PREFIX}/signout", signed_in(signout))
    add_get(f"{PREFIX}/jobs", signed_in(jobs))
    add_get(f"{PREFIX}/jobs/{{job_id}}", signed_in(job))
    add_get(f"{PREFIX}/dead-letters", signed_in(dead_letters))
    add_get(f"{PREFIX}/dead-letters/{{dl_id}}", signed_in(dead_letter))
    add_post(f"{PREFIX}/dead-letters/confirm", signed_in(confirm))
    add_post(f"{PREFIX}/dead-letters/act", signed_in(act))
    add_get(f"{PREFIX}/audit", signed_in(audit_log))
    add_get(f"{PREFIX}/static/console.css", stylesheet)
