"""The result callback step: a job's outcome (or offer) event delivered, signed, to every one
of its targets (its callback URL, those of the requests that joined it, its provider's
in-process hooks), each target retried and dead-lettered alone."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cancelflow import callbacks, hooks, metrics, retry, tracing
from cancelflow.chain import load
from cancelflow.contract import CallbackAttempt, JobRecord, Step, isoformat, utcnow
from cancelflow.dead_letters import DeadLetter
from cancelflow.endpoints import EndpointStore, WebhookEndpoint
from cancelflow.errors import CancelflowError
from cancelflow.lifecycle import EVENT_OUTCOME, Next
from cancelflow.logging import get_logger
from cancelflow.wiring import Deps

log = get_logger(__name__)


# A job's callback targets: its callback URL ("webhook"), the callback URL of each request
# that joined it in flight ("url:<url>", from the job's ``extra_callbacks``), and each of its
# provider's hooks ("hook:<name>", see cancelflow.hooks), and every registered webhook endpoint
# that wants the event ("endpoint:<id>", see cancelflow.endpoints). Attempts are recorded per
# target (an attempt's ``endpoint_id`` or ``url`` tells its target), so each retries and
# dead-letters alone.
WEBHOOK = "webhook"
URL_TARGET_PREFIX = "url:"
ENDPOINT_PREFIX = "endpoint:"
# A target with an attempt that ended so is never sent the event again.
_DONE = frozenset({"delivered", "skipped"})


def _extra_urls(deps: Deps, job: JobRecord) -> list[str]:
    """The joiners' callback URLs that are targets of their own: not the job's own URL,
    which is sent the event as "webhook" already."""
    own = _webhook_url(deps, job)
    return [url for url in dict.fromkeys(job.extra_callbacks) if url != own]


def _target(attempt: CallbackAttempt, extras: list[str]) -> str:
    if attempt.endpoint_id is not None:
        return ENDPOINT_PREFIX + attempt.endpoint_id
    url = attempt.url or ""
    if url.startswith(hooks.TARGET_PREFIX):
        return url
    return URL_TARGET_PREFIX + url if url in extras else WEBHOOK


def _target_url(deps: Deps, job: JobRecord, target: str) -> str | None:
    """Where ``target`` is sent (a hook's own name for a hook)."""
    if target == WEBHOOK:
        return _webhook_url(deps, job)
    return target.removeprefix(URL_TARGET_PREFIX)


async def _endpoint_of(deps: Deps, target: str) -> WebhookEndpoint | None:
    if not target.startswith(ENDPOINT_PREFIX):
        return None
    return await EndpointStore(deps.store.redis).get(target.removeprefix(ENDPOINT_PREFIX))


async def _url_of(deps: Deps, job: JobRecord, target: str) -> str | None:
    """Where ``target`` is sent: ``_target_url``, or a registered endpoint's URL."""
    if target.startswith(ENDPOINT_PREFIX):
        endpoint = await _endpoint_of(deps, target)
        return endpoint.url if endpoint else None
    return _target_url(deps, job, target)


async def _endpoint_targets(deps: Deps, body: dict[str, Any]) -> list[str]:
    """The registered endpoints this event goes to: enabled, wanting its type, and registered
    before it happened (an endpoint gets the events that happen once it exists)."""
    happened = datetime.fromisoformat(body["created_at"])
    return [
        ENDPOINT_PREFIX + e.id
        for e in await EndpointStore(deps.store.redis).all()
        if e.wants(body["type"]) and datetime.fromisoformat(e.created_at) <= happened
    ]


def _history(deps: Deps, job: JobRecord, eid: str, target: str) -> list[CallbackAttempt]:
    extras = _extra_urls(deps, job)
    return [c for c in job.callbacks if c.event_id == eid and _target(c, extras) == target]


def _since_dead_letter(history: list[CallbackAttempt]) -> list[CallbackAttempt]:
    # A replay starts a new horizon: only attempts after the last dead letter count.
    last = max((i for i, c in enumerate(history) if c.result == "dead_lettered"), default=-1)
    return history[last + 1 :]


def _pending(deps: Deps, job: JobRecord, eid: str, target: str, *, replay: bool) -> bool:
    history = _history(deps, job, eid, target)
    if any(c.result in _DONE for c in history):
        return False  # a redelivered or retried message: this target already has the event
    # A dead-lettered target waits for an operator's replay (a message scoped to it).
    return replay or not history or history[-1].result != "dead_lettered"


def _webhook_url(deps: Deps, job: JobRecord) -> str | None:
    conf = deps.settings.provider(job.provider)
    return job.callback_url or (str(conf.callback_url) if conf.callback_url else None)


async def callback(deps: Deps, job_id: str, event: str, *, attempt: int = 0) -> Next:
    """Deliver the job's result (or offer) event to its callback URL, signed, and to its
    provider's in-process hooks.

    ``event`` is "outcome" or "offer_presented", or one of them scoped to one target
    ("outcome@webhook", "outcome@url:<url>", "outcome@hook:<name>") as a replayed dead
    letter sends it; "url:<url>" targets are the callback URLs of requests that joined the
    job (``extra_callbacks``), signed as the job's own. Targets
    are independent: one that has the event is not sent it again, one that gives up (unsafe
    URL, a 4xx, the horizon passed) is dead-lettered alone, and while any other may still
    succeed ``CallbackRetryable`` is raised so the task retries those with backoff.
    """
    kind, _, only = event.partition("@")
    job = await load(deps, job_id)
    etype = callbacks.event_type(job, kind)
    if etype is None:
        return Next.done(job_id)
    body = callbacks.build_event(job, etype)
    if only:
        targets = [only]
    else:
        provider_hooks = hooks.for_provider(deps.hooks, job.provider)
        targets = [
            WEBHOOK,
            *(URL_TARGET_PREFIX + url for url in _extra_urls(deps, job)),
            *(h.target for h in provider_hooks),
            *await _endpoint_targets(deps, body),
        ]
    pending = [t for t in targets if _pending(deps, job, body["id"], t, replay=bool(only))]
    # A target waiting for a retry_at beyond one countdown (a long Retry-After) is left until
    # then: the step's countdowns until it are hops (``_not_due_for``).
    now = utcnow()
    cap = retry.callback_policy(deps.settings).cap_s
    waits = {t: w for t in pending if (w := _not_due_for(deps, job, body["id"], t, now, cap))}
    due = [t for t in pending if t not in waits]
    if waits and not due:
        soonest = min(waits.values())
        raise callbacks.CallbackNotDue(
            f"no callback target due for {soonest:.0f}s", retry_after=soonest
        )
    # The job's last event: once it is at its end, the watchdog stops watching the job.
    last = kind == EVENT_OUTCOME and not only
    # One target (the common case): its delivery's record unwatches the job, in one round trip.
    unwatch_with = last and len(pending) == 1
    if len(due) == 1:
        results = [await _deliver(deps, job, kind, body, due[0], attempt, unwatch=unwatch_with)]
    else:
        # Concurrently: a slow or failing target never holds up another.
        results = await asyncio.gather(
            *(_deliver(deps, job, kind, body, t, attempt, unwatch=unwatch_with) for t in due)
        )
    retryable = [r for r in results if isinstance(r, callbacks.CallbackRetryable)]
    delays = [r.delay_s for r in retryable if r.delay_s is not None] + list(waits.values())
    if retryable:
        # The step runs again when the first target is due.
        first = max(retryable, key=lambda exc: exc.retry_after or 0.0)
        first.delay_s = min(delays)
        raise first
    if waits:
        raise callbacks.CallbackNotDue(
            f"callback target due in {min(delays):.0f}s", retry_after=min(delays)
        )
    if last and UNWATCHED not in results:
        await deps.store.unwatch(job_id)
    return Next.done(job_id)


def _not_due_for(
    deps: Deps, job: JobRecord, eid: str, target: str, now: datetime, cap_s: float
) -> float:
    """Seconds until ``target``'s next attempt is due, when its last failure set a wait longer
    than a countdown may be (else 0: the countdown was the wait, or it never failed)."""
    window = _since_dead_letter(_history(deps, job, eid, target))
    last = window[-1] if window else None
    if last is None or last.result != "failed" or last.retry_at is None:
        return 0.0
    due = datetime.fromisoformat(last.retry_at)
    if (due - datetime.fromisoformat(last.at)).total_seconds() <= cap_s:
        return 0.0
    return max(0.0, (due - now).total_seconds())


# What ``_deliver`` answers when its delivery's record unwatched the job.
UNWATCHED = "unwatched"


async def _deliver(
    deps: Deps,
    job: JobRecord,
    kind: str,
    body: dict[str, Any],
    target: str,
    attempt: int,
    *,
    unwatch: bool = False,
) -> callbacks.CallbackRetryable | str | None:
    """One attempt at one target, recorded on the job: the error to retry on, if any, or
    ``UNWATCHED`` when ``unwatch`` is set and the delivery's record unwatched the job."""
    eid, etype = body["id"], body["type"]
    endpoint = await _endpoint_of(deps, target)
    url = endpoint.url if endpoint else _target_url(deps, job, target)
    endpoint_id = (
        target.removeprefix(ENDPOINT_PREFIX) if target.startswith(ENDPOINT_PREFIX) else None
    )
    fields = {"target": target, "event_type": etype, "event_id": eid}

    async def note(
        result: str, elapsed_s: float | None = None, *, unwatches: bool = False, **kw: Any
    ) -> None:
        latency = round(elapsed_s * 1000, 1) if elapsed_s is not None else None
        await deps.store.add_callback_attempt(
            job.id,
            CallbackAttempt(
                at=isoformat(utcnow()),
                event_id=eid,
                event_type=etype,
                url=url,
                attempt=attempt,
                result=result,
                latency_ms=latency,
                endpoint_id=endpoint_id,
                **kw,
            ),
            unwatch=unwatches,
        )

    async def give_up(error_type: str, error: str) -> None:
        await dead_letter_callback(
            deps, job.id, f"{kind}@{target}", error=error, traceback=None, error_type=error_type
        )

    try:
        if target.startswith(hooks.TARGET_PREFIX):
            status, elapsed, answer = None, await _run_hook(deps, job, target, body), None
        elif endpoint_id is not None:
            if endpoint is None or not endpoint.enabled:
                why = "deleted" if endpoint is None else f"disabled ({endpoint.disabled_reason})"
                raise callbacks.CallbackMisconfigured(f"webhook endpoint {endpoint_id} is {why}")
            status, elapsed, answer = await _post(deps, job, endpoint.url, body, endpoint_id)
        elif url is None:
            await note("skipped", error="no callback URL for the job or its provider")
            return None
        else:
            status, elapsed, answer = await _post(deps, job, url, body)
    except (callbacks.UnsafeCallbackUrl, callbacks.CallbackMisconfigured) as exc:
        await note("refused", error=str(exc))
        if endpoint_id is not None and isinstance(exc, callbacks.UnsafeCallbackUrl):
            # An endpoint whose host now resolves to an internal address fails as any other.
            await _endpoint_failed(deps, endpoint_id, gone=False)
        await give_up(type(exc).__name__, str(exc))
        return None
    except callbacks.CallbackRejected as exc:
        await note(
            "failed", exc.elapsed_s, http_status=exc.status, error=str(exc), response=exc.response
        )
        if endpoint_id is not None:
            await _endpoint_failed(deps, endpoint_id, gone=exc.gone)
        await give_up(type(exc).__name__, str(exc))
        return None
    except callbacks.CallbackRetryable as exc:
        window = _since_dead_letter(_history(deps, job, eid, target))
        now = utcnow()
        first = datetime.fromisoformat(window[0].at) if window else now
        exc.window_age_s = (now - first).total_seconds()
        action = retry.decide_callback(
            exc,
            failures=sum(1 for c in window if c.result == "failed"),
            age_s=exc.window_age_s,
            policy=retry.callback_target_policy(deps.settings),
        )
        retry_at = (
            isoformat(now + timedelta(seconds=action.delay_s))
            if isinstance(action, retry.Retry)
            else None
        )
        await note(
            "failed",
            exc.elapsed_s,
            http_status=exc.status,
            error=str(exc),
            response=exc.response,
            retry_at=retry_at,
        )
        if endpoint_id is not None and await _endpoint_failed(deps, endpoint_id, gone=False):
            await give_up("EndpointDisabled", f"webhook endpoint {endpoint_id} disabled: {exc}")
            return None
        if isinstance(action, retry.GiveUp):
            await give_up(action.error_type, action.reason)
            return None
        exc.delay_s = action.delay_s
        log.warning(
            "callback.failed",
            http_status=exc.status,
            error=str(exc),
            retry_in_s=round(action.delay_s, 3),
            **fields,
        )
        return exc
    await note("delivered", elapsed, unwatches=unwatch, http_status=status, response=answer)
    if endpoint_id is not None:
        await EndpointStore(deps.store.redis).delivered(endpoint_id)
    log.info("callback.delivered", http_status=status, **fields)
    return UNWATCHED if unwatch else None


async def _endpoint_failed(deps: Deps, endpoint_id: str, *, gone: bool) -> bool:
    """Note a failed delivery to an endpoint; disable it when it answered 410 Gone, or when
    every delivery to it has failed for ``endpoint_disable_after_s``. Whether it is disabled
    now (by this failure)."""
    store = EndpointStore(deps.store.redis)
    now = utcnow()
    since = await store.failed(endpoint_id, at=now)
    if since is None:
        return False
    limit = deps.settings.callbacks.endpoint_disable_after_s
    if gone:
        reason, why = "gone", "it answered 410 Gone"
    elif (now - since).total_seconds() >= limit:
        reason, why = "failing", f"every delivery failed since {isoformat(since)} ({limit:g}s)"
    else:
        return False
    await store.update(endpoint_id, enabled=False, disabled_reason=why)
    # The operational event: a log line to alert on, a metric, and the endpoint's record.
    log.error("callback.endpoint.disabled", endpoint_id=endpoint_id, reason=reason, detail=why)
    metrics.endpoint_disabled(reason)
    return True


async def _post(
    deps: Deps, job: JobRecord, url: str, body: dict[str, Any], endpoint_id: str | None = None
) -> tuple[int, float, str | None]:
    if endpoint_id is not None:
        store = EndpointStore(deps.store.redis)
        secrets = await store.signing_secrets(endpoint_id, now=utcnow())
    else:
        conf = deps.settings.provider(job.provider)
        configured = (conf.callback_secret, conf.callback_secret_previous)
        secrets = [s.get_secret_value() for s in configured if s]
    if not secrets:
        raise callbacks.CallbackMisconfigured(
            "provider has no callback secret: callbacks are always signed"
        )
    cb = deps.settings.callbacks
    await callbacks.check_url(url, allow_http=cb.allow_http, allowed_hosts=cb.allowed_hosts)
    if deps.callback_session is None:
        raise CancelflowError("this process has no callbacks session (see Runtime._start)")
    if not tracing.enabled:
        return await callbacks.deliver(
            deps.callback_session, url, body, secrets=secrets, timeout_s=cb.timeout_s
        )
    # A client span per delivery; ``callbacks.deliver`` sends its traceparent.
    with tracing.span("POST callback", kind="client", attributes=_span_attributes(job, url, body)):
        try:
            status, elapsed, answer = await callbacks.deliver(
                deps.callback_session, url, body, secrets=secrets, timeout_s=cb.timeout_s
            )
        except (callbacks.CallbackRetryable, callbacks.CallbackRejected) as exc:
            tracing.record_http(status=exc.status, error=exc)
            raise
        tracing.record_http(status=status)
        return status, elapsed, answer


def _span_attributes(job: JobRecord, url: str, body: dict[str, Any]) -> dict[str, Any]:
    parts = urlsplit(url)
    return {
        "http.request.method": "POST",
        "server.address": parts.hostname,
        "server.port": parts.port,
        # Without the query: a receiver's URL may carry a key there.
        "url.full": urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
        tracing.JOB_ID: job.id,
        tracing.PROVIDER: job.provider,
        "cancelflow.event_type": body.get("type"),
        "cancelflow.event_id": body.get("id"),
    }


async def _run_hook(deps: Deps, job: JobRecord, target: str, body: dict[str, Any]) -> float:
    found = [h for h in hooks.for_provider(deps.hooks, job.provider) if h.target == target]
    if not found:
        raise callbacks.CallbackMisconfigured(f"{target} is not registered on this worker")
    # Each hook gets its own copy of exactly what a callback URL gets.
    event = json.loads(callbacks.encode(body))
    return await hooks.run(found[0], event, timeout_s=deps.settings.callbacks.timeout_s)


async def dead_letter_callback(
    deps: Deps,
    job_id: str,
    event: str,
    *,
    error: str,
    traceback: str | None,
    error_type: str = "CallbackGiveUp",
) -> str:
    """A callback that will never get through: keep it for an operator to replay; its id.

    ``event`` names the target as ``callback`` takes it ("outcome@webhook"; no target means
    the callback URL); replaying the dead letter retries that target alone.
    """
    job = await load(deps, job_id)
    kind, _, target = event.partition("@")
    target = target or WEBHOOK
    etype = callbacks.event_type(job, kind) or kind
    eid = callbacks.event_id(job, etype)
    url = await _url_of(deps, job, target)
    attempts = _since_dead_letter(_history(deps, job, eid, target))
    dl = await deps.dead_letters.add(
        DeadLetter(
            kind="callback",
            job_id=job_id,
            provider=job.provider,
            step=Step.CALLBACK.value,
            error_type=error_type,
            error=error,
            traceback=traceback,
            payload={
                "event": kind,
                "event_type": etype,
                "event_id": eid,
                "target": target,
                "url": url,
            },
            event=f"{kind}@{target}",
            errors=[{"at": c.at, "status": c.http_status, "error": c.error} for c in attempts],
        )
    )
    await deps.store.add_callback_attempt(
        job_id,
        CallbackAttempt(
            at=isoformat(utcnow()),
            event_id=eid,
            event_type=etype,
            url=url,
            result="dead_lettered",
            error=error,
            endpoint_id=target.removeprefix(ENDPOINT_PREFIX)
            if target.startswith(ENDPOINT_PREFIX)
            else None,
        ),
    )
    log.error(
        "callback.dead_lettered",
        target=target,
        event_type=etype,
        event_id=eid,
        error_type=error_type,
        error=error,
        dead_letter_id=dl.id,
    )
    return dl.id
