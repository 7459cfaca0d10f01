"""A job's lifecycle in one place: its statuses, the moves between them, the final ones, and
the step a job in each status waits on. The job store's scripts take their allowed moves from
here (``JobStore.transition``), and a step that finds its job moved on resumes from here.

    queued ──check──► checking ──park──► awaiting_decision
    checking, awaiting_decision ──confirm──► confirming (confirm_again: its step starts)
    checking, awaiting_decision, confirming ──finish──► finished
    queued, checking, awaiting_decision, confirming ──dead_letter──► dead_lettered
    dead_lettered ──replay──► queued, or ──replay_at_confirm──► confirming

Nothing moves a job backwards but an operator's replay of a dead letter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cancelflow.contract import FINAL_STATUSES, Status, Step

__all__ = [
    "EDGES",
    "FINAL",
    "PARKED",
    "Event",
    "Next",
    "resume",
    "sources",
    "target",
]


class Event(StrEnum):
    """What moves a job: each event leads to one status, from the statuses its edges name."""

    CHECK = "check"  # the eligibility step starts (again, when redelivered)
    PARK = "park"  # the provider made a retention offer: wait for the customer
    CONFIRM = "confirm"  # eligible, or the customer turned the offer down
    CONFIRM_AGAIN = "confirm_again"  # a confirm step starts (the job stays confirming)
    FINISH = "finish"  # the job has its outcome
    DEAD_LETTER = "dead_letter"  # the job cannot finish: the dead-letter store has it
    REPLAY = "replay"  # an operator replays a dead letter from the first step
    REPLAY_AT_CONFIRM = "replay_at_confirm"  # ... or from the confirm step it failed at


Q, C, A, F = Status.QUEUED, Status.CHECKING, Status.AWAITING_DECISION, Status.CONFIRMING
DONE, DEAD = Status.FINISHED, Status.DEAD_LETTERED

# (from, event) -> to: every move a job may make.
EDGES: dict[tuple[Status, Event], Status] = {
    (Q, Event.CHECK): C,
    (C, Event.CHECK): C,
    (C, Event.PARK): A,
    (C, Event.CONFIRM): F,
    (A, Event.CONFIRM): F,
    (F, Event.CONFIRM): F,
    (F, Event.CONFIRM_AGAIN): F,
    (C, Event.FINISH): DONE,
    (A, Event.FINISH): DONE,
    (F, Event.FINISH): DONE,
    (Q, Event.DEAD_LETTER): DEAD,
    (C, Event.DEAD_LETTER): DEAD,
    (A, Event.DEAD_LETTER): DEAD,
    (F, Event.DEAD_LETTER): DEAD,
    (DEAD, Event.REPLAY): Q,
    (DEAD, Event.REPLAY_AT_CONFIRM): F,
}

# A job in a final status makes no move of its own (its result callback may still be sent).
FINAL = FINAL_STATUSES
# Waiting on a decision: no message is held for it; beat applies its deadline.
PARKED = Status.AWAITING_DECISION

_TARGET: dict[Event, Status] = {}
_SOURCES: dict[Event, frozenset[Status]] = {}
for (_from, _event), _to in EDGES.items():
    if _TARGET.setdefault(_event, _to) is not _to:
        raise AssertionError(f"event {_event} leads to two statuses")
    _SOURCES[_event] = _SOURCES.get(_event, frozenset()) | {_from}


def target(event: Event) -> Status:
    """The status ``event`` moves a job to."""
    return _TARGET[event]


def sources(event: Event) -> frozenset[Status]:
    """The statuses a job may be in for ``event`` to move it."""
    return _SOURCES[event]


@dataclass(frozen=True)
class Next:
    """What to run next for a job: a step (None: nothing), the job, its provider (for
    routing), the step's arguments after the job id, and the dead letter this step wrote for
    the job, if it wrote one."""

    step: Step | None
    job_id: str = ""
    provider: str = ""
    args: tuple[str, ...] = ()
    dead_letter: str | None = None
    # The job's trace context (its record's ``traceparent``): the parent of the step's span
    # when it is sent from outside any span (a sweep, a decision's deadline).
    trace: str | None = None
    # The step's message, when the move that made it due pushed it too (``chain.OUTBOX``):
    # what follows a send (signals, the task-sent event) is all that is left to do.
    sent: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def done(cls, job_id: str = "") -> Next:
        return cls(None, job_id)


# The result callback's events: the job's outcome, or the retention offer it was made.
EVENT_OUTCOME = "outcome"
EVENT_OFFER = "offer_presented"

# status -> the step a job in it waits on, with that step's arguments after the job id. A
# parked job waits on a decision, not on a step.
_RESUME: dict[Status, tuple[Step, tuple[str, ...]]] = {
    Q: (Step.ELIGIBILITY, ()),
    C: (Step.ELIGIBILITY, ()),
    F: (Step.CONFIRM, ()),
    DONE: (Step.CALLBACK, (EVENT_OUTCOME,)),
    DEAD: (Step.CALLBACK, (EVENT_OUTCOME,)),
}


def resume(status: Status, job_id: str, provider: str) -> Next:
    """The step a job in ``status`` is waiting on (a step that finds its job moved on sends
    it, and so does the watchdog)."""
    found = _RESUME.get(status)
    if found is None:
        return Next.done(job_id)
    step, args = found
    return Next(step, job_id, provider, args)
