"""The chain's steps as plain async functions:
eligibility -> retention_offer -> confirm -> callback.

Each step reads the job record, calls its provider through the adapter, moves the job
forward atomically and says which step comes next. The Celery tasks in ``worker.tasks`` are
thin shells around these.

Redelivery rule: a step that finds its job already past it does no provider call and hands
back the step the job's status calls for, so a message lost between "moved the job" and
"sent the next message" is re-sent; the steps downstream are safe to run twice.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import structlog

from cancelflow import callbacks, hooks
from cancelflow.contract import (
    CALLBACKS_QUEUE,
    CallbackAttempt,
    Decision,
    JobRecord,
    Outcome,
    OutcomeType,
    Status,
    Step,
    TimelineEntry,
    isoformat,
    provider_queue,
    utcnow,
)
from cancelflow.dead_letters import AlreadyReplayed, DeadLetter, DeadLetterStore
from cancelflow.errors import CancelflowError, JobNotFound, ProviderError
from cancelflow.logging import get_logger, redact
from cancelflow.providers import REGISTRY
from cancelflow.providers.base import Confirmation, Provider, SubscriptionRef
from cancelflow.settings import Settings
from cancelflow.store import TRANSITIONS, JobStore

log = get_logger(__name__)

EVENT_OUTCOME = "outcome"
EVENT_OFFER = "offer_presented"


@dataclass(frozen=True)
class Next:
    """What to run next for a job: a step, the job's provider (for routing) and extra args."""

    step: Step | None
    provider: str = ""
    args: tuple[str, ...] = ()
    # The dead letter this step wrote for the job, if it wrote one.
    dead_letter: str | None = None

    @classmethod
    def done(cls) -> Next:
        return cls(None)


@dataclass
class Deps:
    """What the steps need, built once per process (worker or API)."""

    settings: Settings
    store: JobStore
    dead_letters: DeadLetterStore
    providers: dict[str, Provider]
    session: aiohttp.ClientSession | None = None
    # Callbacks have their own session: its resolver refuses internal addresses.
    callback_session: aiohttp.ClientSession | None = None
    # In-process result hooks by provider ("*": every provider), see cancelflow.hooks.
    hooks: dict[str, list[hooks.Hook]] = field(default_factory=dict)
    # Jobs whose confirm this process is running now (see ``confirm``).
    confirming: set[str] = field(default_factory=set)


class StepBusy(CancelflowError):
    """Another delivery of the same step holds its lease; run again after ``retry_after``."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DecisionConflict(CancelflowError):
    """A decision for a job that is not waiting for one."""


def resume(status: Status, provider: str) -> Next:
    """The step a job in ``status`` is waiting on (used when a step finds its job moved on)."""
    return {
        Status.QUEUED: Next(Step.ELIGIBILITY, provider),
        Status.CHECKING: Next(Step.ELIGIBILITY, provider),
        Status.CONFIRMING: Next(Step.CONFIRM, provider),
        Status.FINISHED: Next(Step.CALLBACK, provider, (EVENT_OUTCOME,)),
        Status.DEAD_LETTERED: Next(Step.CALLBACK, provider, (EVENT_OUTCOME,)),
    }.get(status, Next.done())


def reference(job: JobRecord) -> SubscriptionRef:
    return REGISTRY[job.provider].reference.model_validate(job.subscription)


def _entry(step: Step | str, event: str, attempt: int, **kw: Any) -> TimelineEntry:
    return TimelineEntry(at=isoformat(utcnow()), step=str(step), event=event, attempt=attempt, **kw)


def _started(deps: Deps, step: Step, attempt: int) -> TimelineEntry:
    # Which process ran each attempt: what a crash interrupted, read off the timeline.
    holder = deps.store.holder
    return _entry(step, "started", attempt, details={"worker": holder} if holder else {})


async def _load(deps: Deps, job_id: str) -> JobRecord:
    return _bind(await deps.store.get(job_id))


def _bind(job: JobRecord) -> JobRecord:
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
        job_id,
        to=Status.CHECKING,
        allowed=TRANSITIONS[Status.CHECKING],
        entry=_started(deps, Step.ELIGIBILITY, attempt),
    )
    job = _bind(began.job)
    if not began.applied:
        return resume(began.previous, job.provider)
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
            _entry(Step.ELIGIBILITY, "offer_received", attempt, response=response),
            expect=frozenset({Status.CHECKING}),
            offer=answer.offer,
        )
        return (
            Next(Step.RETENTION_OFFER, job.provider)
            if moved.applied
            else resume(moved.previous, job.provider)
        )
    moved = await deps.store.transition(
        job,
        Status.CONFIRMING,
        entry=_entry(
            Step.ELIGIBILITY, "eligible", attempt, status=Status.CONFIRMING, response=response
        ),
    )
    return (
        Next(Step.CONFIRM, job.provider) if moved.applied else resume(moved.previous, job.provider)
    )


async def retention_offer(deps: Deps, job_id: str, *, attempt: int = 0) -> Next:
    """Park the job until the customer decides; nothing holds a message while it waits."""
    job = await _load(deps, job_id)
    deadline_s = deps.settings.provider(job.provider).decision_deadline_s
    if job.offer is None:
        raise CancelflowError(f"job {job_id} reached the retention step without an offer")
    due = utcnow() + timedelta(seconds=deadline_s)
    moved = await deps.store.transition(
        job,
        Status.AWAITING_DECISION,
        entry=_entry(
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
        return resume(moved.previous, job.provider)
    return Next(Step.CALLBACK, job.provider, (EVENT_OFFER,))


async def decide(deps: Deps, job_id: str, decision: Decision, *, by: str = "customer") -> Next:
    """Apply a customer's (or the deadline's) decision on a parked offer."""
    job = await _load(deps, job_id)
    if job.status is not Status.AWAITING_DECISION or job.offer is None:
        raise DecisionConflict(f"job {job_id} is {job.status}, not awaiting a decision")
    entry_details = {"by": by, "decision": decision.decision}
    if decision.decision == "accept":
        outcome = Outcome(
            type=OutcomeType.RETAINED,
            offer_identifier=job.offer.offer_identifier,
            details=job.offer.details,
        )
        result = await finish(
            deps,
            job,
            outcome,
            step=Step.RETENTION_OFFER,
            attempt=0,
            details=entry_details,
            decision=decision,
        )
    else:
        moved = await deps.store.transition(
            job,
            Status.CONFIRMING,
            entry=_entry(
                Step.RETENTION_OFFER,
                "rejected",
                0,
                status=Status.CONFIRMING,
                details=entry_details,
            ),
            decision=decision,
        )
        if not moved.applied:
            raise DecisionConflict(f"job {job_id} is {moved.previous}, not awaiting a decision")
        result = Next(Step.CONFIRM, job.provider)
    return result


async def abandon(deps: Deps, job_id: str) -> Next:
    """End a parked job without cancelling (the deadline's default action ``abandon``)."""
    job = await _load(deps, job_id)
    if job.status is not Status.AWAITING_DECISION:
        raise DecisionConflict(f"job {job_id} is {job.status}, not awaiting a decision")
    result = await finish(
        deps,
        job,
        Outcome(type=OutcomeType.ABANDONED),
        step=Step.RETENTION_OFFER,
        attempt=0,
        details={"by": "deadline"},
    )
    return result


async def expire_decision(deps: Deps, job_id: str) -> Next:
    """The deadline passed without a decision: apply the provider's default action. A job
    that no longer waits (or no longer exists) loses its stale deadline: ``DecisionConflict``."""
    try:
        job = await _load(deps, job_id)
    except JobNotFound:
        await deps.store.drop_deadline(job_id)
        raise DecisionConflict(f"job {job_id} no longer exists") from None
    if job.status is not Status.AWAITING_DECISION:
        await deps.store.drop_deadline(job_id)
        raise DecisionConflict(f"job {job_id} is {job.status}, not awaiting a decision")
    if deps.settings.provider(job.provider).decision_default == "confirm":
        return await decide(deps, job_id, Decision(decision="reject"), by="deadline")
    return await abandon(deps, job_id)


async def stragglers(deps: Deps, *, older_than_s: float) -> list[Next]:
    """First steps of jobs their producer recorded but never confirmed sending."""
    out = []
    for job_id in await deps.store.undispatched(older_than_s=older_than_s):
        try:
            job = await deps.store.get(job_id)
        except JobNotFound:
            await deps.store.mark_dispatched(job_id)
            continue
        if job.status is Status.QUEUED:
            out.append(Next(Step.ELIGIBILITY, job.provider, (job_id,)))
        else:
            await deps.store.mark_dispatched(job_id)  # it ran: the mark was just not cleared
    return out


# Clocks of the hosts that send messages and move jobs may differ by this much.
CLOCK_SKEW_S = 5.0


async def resume_stalled(
    deps: Deps,
    *,
    quiet_for_s: float,
    oldest_waiting: Mapping[str, float] | None = None,
    give_up_waiting_s: float = float("inf"),
) -> list[Next]:
    """Steps to re-send for jobs that stopped moving before they settled (mid-chain, or
    ended with the result callback unsent): the watchdog behind every other guarantee (a
    message lost in a broker's gap, a bug). Safe to send twice: a step that finds its job
    moved on does nothing, and a callback already delivered is not delivered again.

    A job quiet for ``quiet_for_s`` past when it was expected to move is re-sent only when
    its message can no longer be waiting: no live process holds its step, and its queue is
    empty or holds only messages sent after the job last moved (``oldest_waiting``: queue ->
    the send time of its oldest waiting message, ``inf`` when empty, 0 when unknown; None:
    no queue to look at, re-send after ``quiet_for_s``).
    Redis's transport pops a message before it records it as unacknowledged, so a worker
    killed in between loses it: this finds such a job within ``quiet_for_s`` of the queue
    moving past it. A job quiet for ``give_up_waiting_s`` is re-sent whatever its queue holds."""
    out = []
    now = utcnow()
    for job_id in await deps.store.stalled(quiet_for_s=quiet_for_s):
        try:
            job = await deps.store.get(job_id)
        except JobNotFound:
            continue
        nxt = resume(job.status, job.provider)
        if nxt.step is None:
            await deps.store.settle(job_id)
            continue
        if job.status is Status.QUEUED and not await deps.store.dispatched(job_id):
            continue  # never sent: the straggler sweep's case
        quiet_s = (now - datetime.fromisoformat(job.updated_at)).total_seconds()
        if oldest_waiting is not None and quiet_s < give_up_waiting_s:
            if job.held_by and await deps.store.holder_alive(job.held_by):
                continue  # its step is running in a live process
            queue = CALLBACKS_QUEUE if nxt.step is Step.CALLBACK else provider_queue(job.provider)
            oldest = oldest_waiting.get(queue, 0.0)
            last_moved = datetime.fromisoformat(job.updated_at).timestamp()
            if oldest <= last_moved + CLOCK_SKEW_S:
                continue  # its message may still be waiting behind the others
        # (``stalled`` restarted its quiet time: the next sweep leaves it alone.)
        await deps.store.record(
            job_id,
            _entry(
                "watchdog",
                "resent",
                0,
                details={"step": nxt.step.value, "quiet_for_s": round(quiet_s, 1)},
            ),
        )
        log.warning("job.stalled.resent", job_id=job_id, step=nxt.step.value)
        out.append(Next(nxt.step, nxt.provider, (job_id, *nxt.args)))
    return out


async def due_decisions(deps: Deps, now: datetime, *, limit: int = 500) -> list[str]:
    """Jobs whose decision deadline has passed."""
    return await deps.store.due_decisions(before=now.timestamp(), limit=limit)


async def confirm(deps: Deps, job_id: str, *, attempt: int = 0, lease_s: float) -> Next:
    """Make the provider's cancel call, once: a lease keeps two deliveries from racing."""
    lease = f"cf:lease:{job_id}:confirm"
    # Marked before the lease is asked for, so that two deliveries in this process cannot
    # both count as the only one.
    sole = job_id not in deps.confirming
    deps.confirming.add(job_id)
    try:
        began = await deps.store.begin(
            job_id,
            to=None,
            allowed=frozenset({Status.CONFIRMING}),
            entry=_started(deps, Step.CONFIRM, attempt),
            lease=(lease, lease_s),
            # A lease under this process's name that no confirm of ours holds was left by
            # one that could not delete it (Redis away): taken again now, not after lease_s.
            sole=sole,
        )
        job = _bind(began.job)
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
            return resume(began.previous, job.provider)
        try:
            answer, details = await _reconcile_then_cancel(
                _provider(deps, job), reference(job), job
            )
        except BaseException:
            await deps.store.redis.delete(lease)
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
        release_lease=lease,
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
    release_lease: str | None = None,
    **fields: Any,
) -> Next:
    """Record the job's final outcome; the callback step follows."""
    moved = await deps.store.transition(
        job,
        Status.FINISHED,
        entry=_entry(
            step,
            "finished",
            attempt,
            status=Status.FINISHED,
            response=response,
            details={"outcome": outcome.type.value, **(details or {})},
        ),
        identity=reference(job).identity(),
        release_lease=release_lease,
        outcome=outcome,
        **fields,
    )
    if not moved.applied:
        return resume(moved.previous, job.provider)
    log.info("job.finished", outcome=outcome.type.value)
    return Next(Step.CALLBACK, job.provider, (EVENT_OUTCOME,))


async def fail(deps: Deps, job_id: str, error: ProviderError, *, step: Step, attempt: int) -> Next:
    """A permanent provider error: the job ends ``failed`` with the error, no retry."""
    job = await _load(deps, job_id)
    return await finish(
        deps,
        job,
        Outcome(type=OutcomeType.FAILED, error=error.as_dict()),
        step=step,
        attempt=attempt,
    )


def attempts(job: JobRecord, step: Step) -> int:
    """Failed attempts of ``step`` so far; a replay starts the count afresh."""
    count = 0
    for entry in job.timeline:
        if entry.event == "replayed":
            count = 0
        elif entry.step == step.value and entry.event == "retry_scheduled":
            count += 1
    return count


async def note_wait(
    deps: Deps, job_id: str, *, step: Step, reason: dict[str, Any], delay_s: float
) -> None:
    """Record that a step waits on our own limits for the provider (no attempt spent)."""
    await deps.store.record(
        job_id,
        _entry(step, "waiting", 0, error=reason, details={"delay_s": round(delay_s, 3)}),
        due_in_s=delay_s,
    )


async def note_retry(
    deps: Deps, job_id: str, *, step: Step, attempt: int, error: dict[str, Any], delay_s: float
) -> None:
    """Record on the timeline that a step will run again after ``delay_s``."""
    await deps.store.record(
        job_id,
        _entry(
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
    job = await _load(deps, job_id)
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
        Status.DEAD_LETTERED,
        entry=_entry(
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
        return resume(moved.previous, job.provider)
    log.error("job.dead_lettered", error_type=error_type, error=error, dead_letter_id=dl.id)
    return Next(Step.CALLBACK, job.provider, (EVENT_OUTCOME,), dead_letter=dl.id)


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
        return Next(Step.CALLBACK, job.provider, (dl.event or EVENT_OUTCOME,))
    to = Status.CONFIRMING if dl.step == Step.CONFIRM.value else Status.QUEUED
    try:
        moved = await deps.store.replay(
            job.id,
            to,
            _entry(dl.step or "replay", "replayed", 0, status=to, details={"dead_letter": dl_id}),
        )
    except Exception:
        # The job did not move: the entry goes back for the operator to replay again.
        await deps.dead_letters.add(dl)
        raise
    if not moved.applied:
        return Next.done()
    return Next(Step.CONFIRM if to is Status.CONFIRMING else Step.ELIGIBILITY, job.provider)


class CallbackGiveUp(CancelflowError):
    """A callback was refused for good or its retry horizon has passed."""


# A job's callback targets: its callback URL ("webhook"), the callback URL of each request
# that joined it in flight ("url:<url>", from the job's ``extra_callbacks``), and each of its
# provider's hooks ("hook:<name>", see cancelflow.hooks). Attempts are recorded per target
# (an attempt's ``url`` tells its target), so each retries and dead-letters alone.
WEBHOOK = "webhook"
URL_TARGET_PREFIX = "url:"
# A target with an attempt that ended so is never sent the event again.
_DONE = frozenset({"delivered", "skipped"})


def _extra_urls(deps: Deps, job: JobRecord) -> list[str]:
    """The joiners' callback URLs that are targets of their own: not the job's own URL,
    which is sent the event as "webhook" already."""
    own = _webhook_url(deps, job)
    return [url for url in dict.fromkeys(job.extra_callbacks) if url != own]


def _target(attempt: CallbackAttempt, extras: list[str]) -> str:
    url = attempt.url or ""
    if url.startswith(hooks.TARGET_PREFIX):
        return url
    return URL_TARGET_PREFIX + url if url in extras else WEBHOOK


def _target_url(deps: Deps, job: JobRecord, target: str) -> str | None:
    """Where ``target`` is sent (a hook's own name for a hook)."""
    if target == WEBHOOK:
        return _webhook_url(deps, job)
    return target.removeprefix(URL_TARGET_PREFIX)


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
    job = await _load(deps, job_id)
    etype = callbacks.event_type(job, kind)
    if etype is None:
        return Next.done()
    body = callbacks.build_event(job, etype)
    if only:
        targets = [only]
    else:
        provider_hooks = hooks.for_provider(deps.hooks, job.provider)
        targets = [
            WEBHOOK,
            *(URL_TARGET_PREFIX + url for url in _extra_urls(deps, job)),
            *(h.target for h in provider_hooks),
        ]
    pending = [t for t in targets if _pending(deps, job, body["id"], t, replay=bool(only))]
    settles = kind == EVENT_OUTCOME and not only
    # One target (the common case): its delivery settles the job in the same round trip.
    settle_with = settles and len(pending) == 1
    if len(pending) == 1:
        results = [await _deliver(deps, job, kind, body, pending[0], attempt, settle=settle_with)]
    else:
        # Concurrently: a slow or failing target never holds up another.
        results = await asyncio.gather(
            *(_deliver(deps, job, kind, body, t, attempt, settle=settle_with) for t in pending)
        )
    retry = [r for r in results if isinstance(r, callbacks.CallbackRetryable)]
    if retry:
        raise max(retry, key=lambda exc: exc.retry_after or 0.0)
    if settles and SETTLED not in results:
        await deps.store.settle(job_id)
    return Next.done()


# What ``_deliver`` answers when its delivery settled the job.
SETTLED = "settled"


async def _deliver(
    deps: Deps,
    job: JobRecord,
    kind: str,
    body: dict[str, Any],
    target: str,
    attempt: int,
    *,
    settle: bool = False,
) -> callbacks.CallbackRetryable | str | None:
    """One attempt at one target, recorded on the job: the error to retry on, if any, or
    ``SETTLED`` when ``settle`` is set and the delivery settled the job with its record."""
    eid, etype = body["id"], body["type"]
    url = _target_url(deps, job, target)
    fields = {"target": target, "event_type": etype, "event_id": eid}

    async def note(
        result: str, elapsed_s: float | None = None, *, settles: bool = False, **kw: Any
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
                **kw,
            ),
            settle=settles,
        )

    async def give_up(error_type: str, error: str) -> None:
        await dead_letter_callback(
            deps, job.id, f"{kind}@{target}", error=error, traceback=None, error_type=error_type
        )

    try:
        if target.startswith(hooks.TARGET_PREFIX):
            status, elapsed = None, await _run_hook(deps, job, target, body)
        elif url is None:
            await note("skipped", error="no callback URL for the job or its provider")
            return None
        else:
            status, elapsed = await _post(deps, job, url, body)
    except (callbacks.UnsafeCallbackUrl, callbacks.CallbackMisconfigured) as exc:
        await note("refused", error=str(exc))
        await give_up(type(exc).__name__, str(exc))
        return None
    except callbacks.CallbackRejected as exc:
        await note("failed", exc.elapsed_s, http_status=exc.status, error=str(exc))
        await give_up(type(exc).__name__, str(exc))
        return None
    except callbacks.CallbackRetryable as exc:
        await note("failed", exc.elapsed_s, http_status=exc.status, error=str(exc))
        window = _since_dead_letter(_history(deps, job, eid, target))
        first = datetime.fromisoformat(window[0].at) if window else utcnow()
        horizon = deps.settings.callbacks.horizon_s
        if (utcnow() - first).total_seconds() >= horizon:
            await give_up("CallbackGiveUp", f"no delivery within the {horizon:g}s horizon: {exc}")
            return None
        log.warning("callback.failed", http_status=exc.status, error=str(exc), **fields)
        return exc
    await note("delivered", elapsed, settles=settle, http_status=status)
    log.info("callback.delivered", http_status=status, **fields)
    return SETTLED if settle else None


async def _post(deps: Deps, job: JobRecord, url: str, body: dict[str, Any]) -> tuple[int, float]:
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
    return await callbacks.deliver(
        deps.callback_session, url, body, secrets=secrets, timeout_s=cb.timeout_s
    )


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
    job = await _load(deps, job_id)
    kind, _, target = event.partition("@")
    target = target or WEBHOOK
    etype = callbacks.event_type(job, kind) or kind
    eid = callbacks.event_id(job, etype)
    url = _target_url(deps, job, target)
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
