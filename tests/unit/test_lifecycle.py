"""The lifecycle's table: each event's target and sources are the moves the store allowed
before the table existed (keyed by destination then), and resuming follows the status."""

from __future__ import annotations

from cancelflow import lifecycle
from cancelflow.contract import Status, Step
from cancelflow.lifecycle import Event, Next

Q, C, A, F = Status.QUEUED, Status.CHECKING, Status.AWAITING_DECISION, Status.CONFIRMING
DONE, DEAD = Status.FINISHED, Status.DEAD_LETTERED


def test_each_event_moves_from_where_it_always_could_to_one_status() -> None:
    assert {e: (set(lifecycle.sources(e)), lifecycle.target(e)) for e in Event} == {
        Event.CHECK: ({Q, C}, C),
        Event.PARK: ({C}, A),
        Event.CONFIRM: ({C, A, F}, F),
        Event.CONFIRM_AGAIN: ({F}, F),
        Event.FINISH: ({C, A, F}, DONE),
        Event.DEAD_LETTER: ({Q, C, A, F}, DEAD),
        Event.REPLAY: ({DEAD}, Q),
        Event.REPLAY_AT_CONFIRM: ({DEAD}, F),
    }


def test_only_a_replay_leaves_a_final_status_and_nothing_enters_queued_otherwise() -> None:
    for (source, event), to in lifecycle.EDGES.items():
        if source in lifecycle.FINAL:
            assert event in (Event.REPLAY, Event.REPLAY_AT_CONFIRM)
        if to is Q:
            assert event is Event.REPLAY


def test_a_job_resumes_at_the_step_its_status_waits_on() -> None:
    job = "job_" + "0" * 32
    assert lifecycle.resume(Q, job, "payway") == Next(Step.ELIGIBILITY, job, "payway")
    assert lifecycle.resume(C, job, "payway") == Next(Step.ELIGIBILITY, job, "payway")
    assert lifecycle.resume(F, job, "payway") == Next(Step.CONFIRM, job, "payway")
    for final in (DONE, DEAD):
        assert lifecycle.resume(final, job, "payway") == Next(
            Step.CALLBACK, job, "payway", (lifecycle.EVENT_OUTCOME,)
        )
    # A parked job waits on a decision, not on a step.
    assert lifecycle.resume(lifecycle.PARKED, job, "payway") == Next.done(job)
