"""Turning a cancellation request into a queued job: validate, record, send the first step.

The one way producers (the API, the billing consumer) create jobs, so each gets the same
validation and the same at-least-once guarantee.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from pydantic import ValidationError

from cancelflow import metrics, tracing
from cancelflow.callbacks import UnsafeCallbackUrl, check_url_form
from cancelflow.contract import CancellationRequest, Status, Step, new_job_id
from cancelflow.lifecycle import Next
from cancelflow.logging import get_logger
from cancelflow.providers import REGISTRY
from cancelflow.settings import Settings
from cancelflow.store import DEFAULT_NAMESPACE, Created
from cancelflow.wiring import Deps
from messaging.dispatch import (
    confirmed_publisher,
    dispatch,
    dispatch_async,
    step_message_for,
    step_message_sent_by,
)
from messaging.patches import StepMessage
from producers.problems import field_errors

log = get_logger(__name__)

# Idempotency-key prefixes Cancelflow's own producers write (``producers.billing``): an API
# caller may not send one, so nothing it sends can be read as theirs.
RESERVED_KEY_PREFIXES = ("billing:",)


def reserved_key(key: str) -> str | None:
    """The reserved prefix ``key`` starts with, if any."""
    return next((p for p in RESERVED_KEY_PREFIXES if key.startswith(p)), None)


IDEMPOTENCY_HEADER = "Idempotency-Key"
_MAX_KEY_CHARS = 255  # CancellationRequest.idempotency_key's own bound


class KeyRefused(ValueError):
    """The ``Idempotency-Key`` header cannot be used; ``mismatch`` when it differs from the
    body's ``idempotency_key`` (else it is malformed)."""

    def __init__(self, message: str, *, mismatch: bool = False) -> None:
        super().__init__(message)
        self.mismatch = mismatch


def header_key(values: list[str]) -> str | None:
    """The key an ``Idempotency-Key`` header carries (draft-ietf-httpapi-idempotency-key-header:
    an RFC 8941 string, ``"…"``; a bare token is taken as it is too), or None when absent."""
    if not values:
        return None
    if len(values) > 1:
        raise KeyRefused(f"{IDEMPOTENCY_HEADER} given more than once")
    value = values[0].strip()
    if value.startswith('"'):
        value = _sf_string(value)
    if not value:
        raise KeyRefused(f"{IDEMPOTENCY_HEADER} is empty")
    if len(value) > _MAX_KEY_CHARS:
        raise KeyRefused(f"{IDEMPOTENCY_HEADER} is longer than {_MAX_KEY_CHARS} characters")
    if not value.isprintable() or not value.isascii():
        raise KeyRefused(f"{IDEMPOTENCY_HEADER} must be printable ASCII")
    return value


def _sf_string(text: str) -> str:
    """The content of an RFC 8941 sf-string (``"…"`` with ``\\"`` and ``\\\\`` escapes)."""
    out, i = [], 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in '"\\':
            out.append(text[i + 1])
            i += 2
        elif ch == '"':
            if i != len(text) - 1:
                break
            return "".join(out)
        else:
            out.append(ch)
            i += 1
    raise KeyRefused(f"{IDEMPOTENCY_HEADER} is not a valid structured-field string")


def with_header_key(body: Any, key: str | None) -> Any:
    """``body`` with the header's idempotency key as its ``idempotency_key``: the header and
    the body field are one key, so a retry may send it either way and meet the same job.
    ``KeyRefused(mismatch=True)`` when the body names another key."""
    if key is None or not isinstance(body, dict):
        return body  # no header; or not an object, which validation refuses anyway
    given = body.get("idempotency_key")
    if given is not None and given != key:
        raise KeyRefused(
            f"the {IDEMPOTENCY_HEADER} header and the body's idempotency_key differ",
            mismatch=True,
        )
    return {**body, "idempotency_key": key}


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
        return [
            {
                "field": "callback_url",
                "message": "the provider has no callback secret configured; "
                "callbacks are always signed",
            }
        ]
    if req.callback_url is not None:
        cb = settings.callbacks
        try:
            check_url_form(
                str(req.callback_url), allow_http=cb.allow_http, allowed_hosts=cb.allowed_hosts
            )
        except UnsafeCallbackUrl as exc:
            return [{"field": "callback_url", "message": str(exc)}]
    return req


def _broker_is_store(deps: Deps, celery: Celery) -> bool:
    return bool(celery.conf.broker_url == deps.settings.redis_url)


def first_step_message(deps: Deps, celery: Celery, nxt: Next) -> StepMessage | None:
    """The message of a new job's first step, for ``JobStore.create`` to push with the job's
    record, when the broker is the job store's Redis and ``send_task``'s message can be
    copied (``step_message_for``); else None (the job is recorded, then ``send_step``)."""
    return step_message_for(celery, nxt) if _broker_is_store(deps, celery) else None


async def send_step(deps: Deps, celery: Celery, nxt: Next) -> None:
    """Send ``nxt`` from a producer's event loop; returns once its message is in the broker
    (on RabbitMQ: confirmed)."""
    if _broker_is_store(deps, celery):
        # The broker is the job store's Redis: its asyncio client sends the message on this
        # loop, where kombu's publish would block the loop for a round trip.
        await dispatch_async(celery, deps.store.redis, nxt)
    elif deps.settings.broker_kind() == "amqp":
        # From the publisher's thread, confirmed with the others sent meanwhile: kombu's
        # publish here would stop the loop until RabbitMQ confirmed it.
        await confirmed_publisher(celery).send(nxt)
    else:
        dispatch(celery, nxt)


async def _send_first(
    deps: Deps, celery: Celery, request: CancellationRequest, created: Created
) -> None:
    """A first step sent after its job was recorded (the broker is not the job store's Redis,
    or ``send_task``'s message cannot be copied): for a new job, or a repeated request whose
    job is still queued with its first step not confirmed sent."""
    job = created.job
    first = created.how == "created"
    if not first and created.how == "existing" and job.status is Status.QUEUED:
        # Sending twice is harmless (a step that finds its job moved on does nothing) and
        # is only possible while a first sender is between recording and sending.
        first = not await deps.store.dispatched(job.id)
        if first:
            log.warning("job.first_step.resent", job_id=job.id)
    if first:
        await send_step(deps, celery, Next(Step.ELIGIBILITY, job.id, request.provider))
        deps.store.mark_dispatched_soon(job.id)
        log.info("job.enqueued", job_id=job.id, provider=request.provider)


async def submit(
    deps: Deps, celery: Celery, request: CancellationRequest, *, namespace: str = DEFAULT_NAMESPACE
) -> Created:
    """Create the job (or find the one it repeats or joins) and make sure its first step is sent.

    ``namespace`` scopes the idempotency key to its caller (an API token's, "billing"): the
    same key from two callers makes two jobs.

    Raises ``IdempotencyConflict`` when the key was used with another body. When the broker
    is the job store's Redis, a new job's first step is pushed by the script that records
    the job (``first_step_message``): both or neither. Otherwise the step is sent after the
    job is recorded, and a producer that died in between left it ``queued`` with nothing
    sent: the retried request (same idempotency key) sends it then, and if none comes, the
    beat task ``cancelflow.dispatch_stragglers`` does.
    """
    identity = REGISTRY[request.provider].reference.model_validate(request.subscription).identity()
    job_id = new_job_id()
    message = first_step_message(deps, celery, Next(Step.ELIGIBILITY, job_id, request.provider))
    created = await deps.store.create(
        request,
        identity=identity,
        namespace=namespace,
        job_id=job_id,
        first_step=(message.key, message.payload) if message is not None else None,
    )
    job = created.job
    if tracing.enabled:  # on the request's span
        tracing.set_attributes(
            {tracing.JOB_ID: job.id, tracing.PROVIDER: job.provider, "cancelflow.job": created.how}
        )
    if created.how == "created" and message is not None:
        # Pushed with the job's record: what follows a send (signals, the task-sent event).
        step_message_sent_by(celery, message)
        log.info("job.enqueued", job_id=job.id, provider=request.provider)
    else:
        await _send_first(deps, celery, request, created)
    if created.how == "joined" and request.callback_url is not None:
        if created.callback_added:
            log.info("job.joined.callback_added", job_id=job.id)
        else:
            log.warning("job.joined.callback_not_added", job_id=job.id, reason="too many")
    if created.how == "created":
        metrics.job_enqueued(request.provider)
    return created
