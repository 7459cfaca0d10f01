"""Decisions on a retention offer: the customer's (accept or reject), or the deadline's
default action when none came (``expire_decision``, run by beat on ``due_decisions``)."""

from __future__ import annotations

from datetime import datetime

from cancelflow.chain import entry, finish, load
from cancelflow.contract import Decision, Outcome, OutcomeType, Status, Step
from cancelflow.errors import DecisionConflict, JobNotFound
from cancelflow.lifecycle import PARKED, Event, Next
from cancelflow.wiring import Deps


async def decide(deps: Deps, job_id: str, decision: Decision, *, by: str = "customer") -> Next:
    """Apply a customer's (or the deadline's) decision on a parked offer."""
    job = await load(deps, job_id)
    if job.status is not PARKED or job.offer is None:
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
            Event.CONFIRM,
            entry=entry(
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
        result = Next(Step.CONFIRM, job_id, job.provider, trace=job.traceparent)
    return result


async def abandon(deps: Deps, job_id: str) -> Next:
    """End a parked job without cancelling (the deadline's default action ``abandon``)."""
    job = await load(deps, job_id)
    if job.status is not PARKED:
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
        job = await load(deps, job_id)
    except JobNotFound:
        await deps.store.drop_deadline(job_id)
        raise DecisionConflict(f"job {job_id} no longer exists") from None
    if job.status is not PARKED:
        await deps.store.drop_deadline(job_id)
        raise DecisionConflict(f"job {job_id} is {job.status}, not awaiting a decision")
    if deps.settings.provider(job.provider).decision_default == "confirm":
        return await decide(deps, job_id, Decision(decision="reject"), by="deadline")
    return await abandon(deps, job_id)


async def due_decisions(deps: Deps, now: datetime, *, limit: int = 500) -> list[str]:
    """Jobs whose decision deadline has passed."""
    return await deps.store.due_decisions(before=now.timestamp(), limit=limit)
