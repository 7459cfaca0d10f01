"""The chain's steps as plain async functions: eligibility -> retention_offer -> confirm,
and how a job that cannot finish ends (``fail``, ``dead_letter``) and restarts (``replay``).
The result callback is ``cancelflow.delivery``; decisions on a retention offer are
``cancelflow.decisions``; the watchdog's sweeps are ``cancelflow.sweeps``.

Each step reads the job record, calls its provider through the adapter, moves the job
forward atomically (by a ``lifecycle.Event``) and says which step comes next. The Celery
tasks in ``worker.tasks`` are thin shells around these.

Redelivery rule: a step that finds its job already past it does no provider call and hands
back the step the job's status calls for (``lifecycle.resume``), so a message lost between
"moved the job" and "sent the next message" is re-sent; the steps downstream are safe to run
twice.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import replace
from datetime import timedelta
from typing import Any

import structlog

from cancelflow import lifecycle
from cancelflow.contract import (
    JobRecord,
    Outcome,
    OutcomeType,
    Status,
    Step,
    TimelineEntry,
    isoformat,
    utcnow,
)
from cancelflow.dead_letters import AlreadyReplayed, DeadLetter
from cancelflow.errors import CancelflowError, DecisionConflict, ProviderError, StepBusy
from cancelflow.lifecycle import EVENT_OFFER, EVENT_OUTCOME, Event, Next, resume
from cancelflow.logging import get_logger, redact
from cancelflow.providers import REGISTRY
from cancelflow.providers.base import Confirmation, Provider, SubscriptionRef
from cancelflow.store import Outgoing
from cancelflow.wiring import Deps

log = get_logger(__name__)


def reference(job: JobRecord) -> SubscriptionRef:
    """The job's subscription, as its provider's adapter takes it."""
    return REGISTRY[job.provider].reference.model_validate(job.subscription)


def entry(step: Step | str, event: str, attempt: int, **kw: Any) -> TimelineEntry:
    """A timeline entry of ``step``'s attempt ``attempt``, stamped now."""
    return TimelineEntry(at=isoformat(utcnow()), step=str(step), event=event, attempt=attempt, **kw)


# How the running step builds the message of the step it makes due (a worker sets it per
# task: ``worker.tasks``): the job store's move then pushes it in the same script, one round
# trip for both, and the record and the message are written together or not at all. None
# (the API, the sweeps, a broker that is not the job store's Redis): the caller sends the
# returned ``Next`` itself, after the move.
OUTBOX: ContextVar[Callable[[Next], Outgoing | None] | None] = ContextVar(
    "cancelflow_outbox", default=None
)


def _outgoing(nxt: Next) -> Outgoing | None:
    build = OUTBOX.get()
    return build(nxt) if build is not None else None


def _started(deps: Deps, step: Step, attempt: int) -> TimelineEntry:
    # Which process ran each attempt: what a crash interrupted, read off the timeline.
    holder = deps.store.holder
    return entry(step, "started", attempt, details={"worker": holder} if holder else {})


async def load(deps: Deps, job_id: str) -> JobRecord:
    """The job's record, its provider bound to the log context."""
    return bind(await deps.store.get(job_id))


def bind(job: JobRecord) -> JobRecord:
    structlog.contextvars.bind_contextvars(provider=job.provider)
    return job


def _provider(deps: Deps, job: JobRecord) -> Provider:
    try:
        return deps.providers[job.provider]
    except KeyError:
        raise CancelflowError(
            f"provider {job.provider!r} is not configured on this worker"
        ) from None


async def eligibility(deps: Deps, job_id: str, *, attempt: int = 0) -> Next:
    """Ask the provider whether the subscription can be cancelled."""
    began = await deps.store.begin(
        job_id, Event.CHECK, entry=_started(deps, Step.ELIGIBILITY, attempt)
    )
    job = bind(began.job)
    if not began.applied:
        return resume(began.previous, job_id, job.provider)
    ref = reference(job)
    answer = await _provider(deps, job).check(ref, job)
    response = redact(answer.response)
    if answer.kind == "final":
        assert answer.outcome is not None
        return await finish(
            deps, job, answer.outcome, step=Step.ELIGIBILITY, attempt=attempt, response=response
        )
    if answer.kind == "offer":
        assert answer.offer is not None
        moved = await deps.store.record(
            job_id,
            entry(Step.ELIGIBILITY, "offer_received", attempt, response=response),
            expect=frozenset({Status.CHECKING}),
            offer=answer.offer,
        )
        return (
            Next(Step.RETENTION_OFFER, job_id, job.provider)
            if moved.applied
            else resume(moved.previous, job_id, job.provider)
        )
    nxt = Next(Step.CONFIRM, job_id, job.provider)
    push = _outgoing(nxt)
    moved = await deps.store.transition(
        job,
        Event.CONFIRM,
        entry=entry(
            Step.ELIGIBILITY, "eligible", attempt, status=Status.CONFIRMING, response=response
        ),
        push=push,
    )
    if not moved.applied:
        return resume(moved.previous, job_id, job.provider)
    return replace(nxt, sent=push)


async def retention_offer(deps: Deps, job_id: str, *, attempt: int = 0) -> Next:
    """Park the job until the customer decides; nothing holds a message while it waits."""
    job = await load(deps, job_id)
    deadline_s = deps.settings.provider(job.provider).decision_deadline_s
    if job.offer is None:
        raise CancelflowError(f"job {job_id} reached the retention step without an offer")
    due = utcnow() + timedelta(seconds=deadline_s)
    moved = await deps.store.transition(
        job,
        Event.PARK,
        entry=entry(
            Step.RETENTION_OFFER,
            "awaiting_decision",
            attempt,
            status=Status.AWAITING_DECISION,
            details={"deadline_s": deadline_s, "kind": job.offer.kind},
        ),
        # Indexed by the same script that parks the job: no crash leaves one without the other.
        deadline=due.timestamp(),
        # Kept on the offer too, in the same write: the record and offer_presented show it.
        offer=job.offer.model_copy(update={"decision_deadline": isoformat(due)}),
    )
    if not moved.applied and moved.previous is not Status.AWAITING_DECISION:
        return resume(moved.previous, job_id, job.provider)
    return Next(Step.CALLBACK, job_id, job.provider, (EVENT_OFFER,))


async def confirm(deps: Deps, job_id: str, *, attempt: int = 0, lease_s: float) -> Next:
    """Make the provider's cancel call, once: a lease keeps two deliveries from racing."""
    # Marked before the lease is asked for, so that two deliveries in this process cannot
    # both count as the only one.
    sole = job_id not in deps.confirming
    deps.confirming.add(job_id)
    try:
        began = await deps.store.begin(
            job_id,
            Event.CONFIRM_AGAIN,
            entry=_started(deps, Step.CONFIRM, attempt),
            lease_s=lease_s,
            # A lease under this process's name that no confirm of ours holds was left by
            # one that could not delete it (Redis away): taken again now, not after lease_s.
            sole=sole,
        )
        job = bind(began.job)
        if began.leased_for_ms is not None:
            # Another delivery is confirming, or died confirming and its lease has yet to
            # expire: come back when it has, and find the job finished or take over. Within
            # a worker lease at most: a holder that died is known dead by then (RabbitMQ
            # redelivers the moment the holder's connection drops, long before its confirm
            # lease would expire).
            log.info("step.confirm.leased_elsewhere", retry_in_ms=began.leased_for_ms)
            raise StepBusy(
                f"confirm of {job_id} is leased elsewhere",
                retry_after=min(max(began.leased_for_ms, 100) / 1000, deps.store.alive_s + 1),
            )
        if not began.applied:
            return resume(began.previous, job_id, job.provider)
        try:
            answer, details = await _reconcile_then_cancel(
                _provider(deps, job), reference(job), job
            )
        except BaseException:
            await deps.store.release_confirm_lease(job_id)
            raise
    finally:
        if sole:
            deps.confirming.discard(job_id)
    # The move to finished deletes the lease in the same round trip.
    return await finish(
        deps,
        job,
        answer.outcome,
        step=Step.CONFIRM,
        attempt=attempt,
        response=redact(answer.response),
        details=details,
        release_lease=True,
    )


async def _reconcile_then_cancel(
    provider: Provider, ref: SubscriptionRef, job: JobRecord
) -> tuple[Confirmation, dict[str, Any] | None]:
    """The cancel call, after reading the subscription's state (the adapter's check) when an
    earlier attempt may have cancelled it already; the answer and the finish entry's details.

    The read is only made on that path: the timeline is already in hand (``begin`` answered
    it), so the happy path costs no extra provider call nor Redis round trip."""
    if not _an_earlier_attempt_may_have_acted(job):
        return await provider.confirm(ref, job), None
    state = await provider.check(ref, job)
    if state.outcome is not None and state.outcome.type is OutcomeType.ALREADY_CANCELLED:
        # Eligible before our earlier call, cancelled now: that call did it.
        log.info("step.confirm.reconciled", found=state.outcome.type.value)
        outcome = Outcome(
            type=OutcomeType.CANCELLED, details={**state.outcome.details, "reconciled": True}
        )
        return Confirmation(outcome=outcome, response=state.response), {"reconciled": True}
    # Still cancellable (eligible, or an offer the customer already turned down), or any
    # other reading: the cancel call's own answer decides, as on a first attempt.
    log.info("step.confirm.reconciled", found=state.kind)
    return await provider.confirm(ref, job), {"reconcile_read": state.kind}


# Confirm timeline events that end an attempt (after its "started" entry).
_ATTEMPT_ENDS = frozenset({"retry_scheduled", "waiting", "dead_lettered", "finished"})
# Those that end it on an error, which says whether the call may have acted.
_ERROR_ENDS = frozenset({"retry_scheduled", "dead_lettered"})


def _an_earlier_attempt_may_have_acted(job: JobRecord) -> bool:
    """Whether a confirm attempt before this one may have reached the provider: its recorded
    error says so (``may_have_acted``), or it recorded no end at all (a worker killed or
    Redis lost mid-call). Every earlier attempt counts, replays included: one that was
    refused before sending does not undo an earlier one that may have acted. The last
    timeline entry is this attempt's own "started"."""
    open_attempt = False
    for entry in job.timeline[:-1]:
        if entry.step != Step.CONFIRM.value:
            continue
        if entry.event == "started":
            if open_attempt:
                return True
            open_attempt = True
        elif entry.event in _ATTEMPT_ENDS and open_attempt:
            open_attempt = False
            # "waiting": our own limits stopped the call before it was sent.
            if entry.event in _ERROR_ENDS and _may_have_acted(entry.error):
                return True
    return open_attempt


def _may_have_acted(error: dict[str, Any] | None) -> bool:
    # ProviderError.as_dict() records the flag; an error without it (an unexpected exception,
    # a dead letter's summary, a record from before the flag) may have acted.
    return error is None or error.get("may_have_acted", True) is not False


async def finish(
    deps: Deps,
    job: JobRecord,
    outcome: Outcome,
    *,
    step: Step,
    attempt: int,
    response: Any = None,
    details: dict[str, Any] | None = None,
    release_lease: bool = False,
    **fields: Any,
) -> Next:
    """Record the job's final outcome (``release_lease``: giving back its confirm lease in
    the same write); the callback step follows (pushed with the move, see ``OUTBOX``)."""
    nxt = Next(Step.CALLBACK, job.id, job.provider, (EVENT_OUTCOME,), trace=job.traceparent)
    push = _outgoing(nxt)
    moved = await deps.store.transition(
        job,
        Event.FINISH,
        entry=entry(
            step,
            "finished",
            attempt,
            status=Status.FINISHED,
            response=response,
            details={"outcome": outcome.type.value, **(details or {})},
        ),
        identity=reference(job).identity(),
        release_lease=release_lease,
        push=push,
        outcome=outcome,
        **fields,
    )
    if not moved.applied:
        return resume(moved.previous, job.id, job.provider)
    log.info("job.finished", outcome=outcome.type.value)
    return replace(nxt, sent=push)


async def fail(deps: Deps, job_id: str, error: ProviderError, *, step: Step, attempt: int) -> Next:
    """A permanent provider error: the job ends ``failed`` with the error, no retry."""
    job = await load(deps, job_id)
    return await finish(
        deps,
        job,
        Outcome(type=OutcomeType.FAILED, error=error.as_dict()),
        step=step,
        attempt=attempt,
    )


async def note_wait(
    deps: Deps, job_id: str, *, step: Step, reason: dict[str, Any], delay_s: float
) -> None:
    """Record that a step waits on our own limits for the provider (no attempt spent)."""
    await deps.store.record(
        job_id,
        entry(step, "waiting", 0, error=reason, details={"delay_s": round(delay_s, 3)}),
        due_in_s=delay_s,
    )


async def note_retry(
    deps: Deps, job_id: str, *, step: Step, attempt: int, error: dict[str, Any], delay_s: float
) -> None:
    """Record on the timeline that a step will run again after ``delay_s``."""
    await deps.store.record(
        job_id,
        entry(
            step, "retry_scheduled", attempt, error=error, details={"delay_s": round(delay_s, 3)}
        ),
        due_in_s=delay_s,
    )


async def dead_letter(
    deps: Deps,
    job_id: str,
    *,
    step: Step,
    error_type: str,
    error: str,
    traceback: str | None,
    payload: Any,
) -> Next:
    """Move a job that cannot finish to the dead-letter store, with every attempt's error."""
    job = await load(deps, job_id)
    errors = [e.error for e in job.timeline if e.error is not None and e.step == step]
    dl = DeadLetter(
        kind="job",
        job_id=job_id,
        provider=job.provider,
        step=step.value,
        queue=None,
        error_type=error_type,
        error=error,
        errors=[*errors, {"type": error_type, "message": error}],
        traceback=traceback,
        payload=payload,
    )
    # The entry is written with the move (one script): a crash leaves both or neither.
    moved = await deps.store.transition(
        job,
        Event.DEAD_LETTER,
        entry=entry(
            step,
            "dead_lettered",
            len(errors),
            status=Status.DEAD_LETTERED,
            error={"type": error_type, "message": error},
        ),
        identity=reference(job).identity(),
        dead_letter=dl,
    )
    if not moved.applied:
        log.warning("job.dead_letter.skipped", status=moved.previous.value)
        return resume(moved.previous, job_id, job.provider)
    log.error("job.dead_lettered", error_type=error_type, error=error, dead_letter_id=dl.id)
    return Next(Step.CALLBACK, job_id, job.provider, (EVENT_OUTCOME,), dead_letter=dl.id)


async def replay(deps: Deps, dl_id: str) -> Next:
    """Replay a dead letter from the step it failed at, keeping the job id. The entry is
    claimed (taken out atomically) first: of two replays at once only one goes on, the other
    raises ``AlreadyReplayed``, whatever the entry's kind."""
    dl = await deps.dead_letters.get(dl_id)
    if dl is None:
        raise AlreadyReplayed(dl_id)
    if dl.kind == "poison" or dl.job_id is None:
        raise DecisionConflict("a poison message has no job to replay; purge it once inspected")
    job = await deps.store.get(dl.job_id)
    if await deps.dead_letters.claim(dl_id) is None:
        raise AlreadyReplayed(dl_id)
    if dl.kind == "callback":
        return Next(
            Step.CALLBACK, job.id, job.provider, (dl.event or EVENT_OUTCOME,), trace=job.traceparent
        )
    event = Event.REPLAY_AT_CONFIRM if dl.step == Step.CONFIRM.value else Event.REPLAY
    to = lifecycle.target(event)
    try:
        moved = await deps.store.replay(
            job.id,
            event,
            entry(dl.step or "replay", "replayed", 0, status=to, details={"dead_letter": dl_id}),
        )
    except Exception:
        # The job did not move: the entry goes back for the operator to replay again.
        await deps.dead_letters.add(dl)
        raise
    if not moved.applied:
        return Next.done(job.id)
    step = Step.CONFIRM if to is Status.CONFIRMING else Step.ELIGIBILITY
    return Next(step, job.id, job.provider, trace=job.traceparent)
