"""The sweeps beat runs over the job store: first steps no producer confirmed sending
(``stragglers``), and the watchdog that re-sends the step of a job that stopped moving
(``resume_stalled``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime

from cancelflow.chain import entry
from cancelflow.contract import CALLBACKS_QUEUE, Status, Step, provider_queue, utcnow
from cancelflow.errors import JobNotFound
from cancelflow.lifecycle import Next, resume
from cancelflow.logging import get_logger
from cancelflow.wiring import Deps

log = get_logger(__name__)


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
            out.append(Next(Step.ELIGIBILITY, job_id, job.provider, trace=job.traceparent))
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
    steps_run_at_most_s: float = float("inf"),
) -> list[Next]:
    """Steps to re-send for jobs still watched that stopped moving (mid-chain, or ended
    with the result callback unsent): the watchdog behind every other guarantee (a
    message lost in a broker's gap, a bug). Safe to send twice: a step that finds its job
    moved on does nothing, and a callback already delivered is not delivered again.

    A job quiet for ``quiet_for_s`` past when it was expected to move is re-sent only when
    its message can no longer be waiting: no live process holds its step, and its queue is
    empty or holds only messages sent after the job last moved (``oldest_waiting``: queue ->
    the send time of its oldest waiting message, ``inf`` when empty, 0 when unknown; None:
    no queue to look at, re-send after ``quiet_for_s``).
    Redis's transport pops a message before it records it as unacknowledged, so a worker
    killed in between loses it: this finds such a job within ``quiet_for_s`` of the queue
    moving past it. A job quiet for ``give_up_waiting_s`` is re-sent whatever its queue holds.

    A live process's hold on a step counts for ``steps_run_at_most_s`` (the hard time limit):
    a step whose last write was lost with Redis, and whose message could not be given back,
    leaves a hold that no step is behind."""
    out = []
    now = utcnow()
    for job_id in await deps.store.stalled(quiet_for_s=quiet_for_s):
        try:
            job = await deps.store.get(job_id)
        except JobNotFound:
            continue
        nxt = resume(job.status, job_id, job.provider)
        if nxt.step is None:
            await deps.store.unwatch(job_id)
            continue
        if job.status is Status.QUEUED and not await deps.store.dispatched(job_id):
            continue  # never sent: the straggler sweep's case
        quiet_s = (now - datetime.fromisoformat(job.updated_at)).total_seconds()
        if oldest_waiting is not None and quiet_s < give_up_waiting_s:
            if job.held_by and await deps.store.holds_step(
                job_id, job.held_by, for_at_most_s=steps_run_at_most_s + CLOCK_SKEW_S
            ):
                continue  # its step is running in a live process
            queue = CALLBACKS_QUEUE if nxt.step is Step.CALLBACK else provider_queue(job.provider)
            oldest = oldest_waiting.get(queue, 0.0)
            last_moved = datetime.fromisoformat(job.updated_at).timestamp()
            if oldest <= last_moved + CLOCK_SKEW_S:
                continue  # its message may still be waiting behind the others
        # (``stalled`` restarted its quiet time: the next sweep leaves it alone.)
        await deps.store.record(
            job_id,
            entry(
                "watchdog",
                "resent",
                0,
                details={"step": nxt.step.value, "quiet_for_s": round(quiet_s, 1)},
            ),
        )
        log.warning("job.stalled.resent", job_id=job_id, step=nxt.step.value)
        out.append(replace(nxt, trace=job.traceparent))
    return out
