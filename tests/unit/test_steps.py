"""The steps against fakeredis and the real Payway sandbox (in-process, over HTTP)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import fakeredis
import pytest
from aiohttp.test_utils import TestServer

from cancelflow import chain, delivery, errors, lifecycle, sweeps, wiring
from cancelflow.contract import CancellationRequest, OutcomeType, Status, Step
from cancelflow.errors import ProviderError, ProviderRateLimited, ProviderUnavailable
from cancelflow.providers import REGISTRY
from cancelflow.settings import Settings
from cancelflow.wiring import build_deps
from sandboxes import payway as payway_sandbox
from sandboxes.control import SANDBOX
from sandboxes.faults import FaultSettings
from sandboxes.server import PROVIDER_APPS, build_app
from tests.contract.providers import contract_for
from tests.contract.support import settings_for

Scenario = Callable[[wiring.Deps, Any], Awaitable[None]]


def run(scenario: Scenario) -> None:
    async def go() -> None:
        app = build_app()
        async with TestServer(app) as server, aiohttp.ClientSession() as session:
            settings = Settings(
                providers={
                    "payway": {
                        "base_url": str(server.make_url("/payway")),
                        "client_id": payway_sandbox.DEMO_CLIENT_ID,
                        "client_secret": payway_sandbox.DEMO_CLIENT_SECRET,
                    }
                }
            )
            deps = build_deps(settings, redis=fakeredis.FakeAsyncRedis(), session=session)
            await scenario(deps, app[PROVIDER_APPS]["payway"][payway_sandbox.PAYWAY_STATE])

    asyncio.run(go())


async def enqueue(deps: wiring.Deps, kind: str = "end_of_period") -> str:
    ref = getattr(payway_sandbox.DEMO, kind)
    req = CancellationRequest(
        provider="payway",
        subscription={
            "account_id": ref.account_id,
            "user_product_id": ref.user_product_id,
            "cancellation_reason_id": payway_sandbox.DEMO.reason_id,
        },
    )
    created = await deps.store.create(
        req, identity=REGISTRY["payway"].reference.model_validate(req.subscription).identity()
    )
    return created.job.id


def calls(state: Any) -> dict[str, int]:
    return dict(state.state()["calls"])


def test_the_chain_and_its_next_steps() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        job_id = await enqueue(deps)
        assert await chain.eligibility(deps, job_id) == lifecycle.Next(
            Step.CONFIRM, job_id, "payway"
        )
        assert (await deps.store.get(job_id)).status is Status.CONFIRMING
        nxt = await chain.confirm(deps, job_id, lease_s=30)
        assert nxt == lifecycle.Next(Step.CALLBACK, job_id, "payway", (lifecycle.EVENT_OUTCOME,))
        job = await deps.store.get(job_id)
        assert (
            job.status is Status.FINISHED
            and job.outcome
            and job.outcome.cancellation_type == "at_end_of_period"
        )

    run(scenario)


def test_a_redelivered_step_calls_no_provider_and_resends_what_follows() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        job_id = await enqueue(deps)
        await chain.eligibility(deps, job_id)
        before = calls(state)
        # The eligibility message delivered again (the worker died before acknowledging).
        assert await chain.eligibility(deps, job_id) == lifecycle.Next(
            Step.CONFIRM, job_id, "payway"
        )
        assert calls(state) == before
        await chain.confirm(deps, job_id, lease_s=30)
        before = calls(state)
        # Confirm delivered again after the job finished: no second cancel call.
        assert await chain.confirm(deps, job_id, lease_s=30) == lifecycle.Next(
            Step.CALLBACK, job_id, "payway", (lifecycle.EVENT_OUTCOME,)
        )
        assert calls(state) == before
        assert state.state()["effective_cancels"] == {
            payway_sandbox.DEMO.end_of_period.user_product_id: 1
        }

    run(scenario)


def test_two_deliveries_of_confirm_at_once_make_one_cancel_call() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        job_id = await enqueue(deps, "immediate")
        await chain.eligibility(deps, job_id)
        results = await asyncio.gather(
            *(chain.confirm(deps, job_id, lease_s=30) for _ in range(5)), return_exceptions=True
        )
        assert calls(state).get("cancel_subscription") == 1
        assert sum(isinstance(r, lifecycle.Next) and r.step is Step.CALLBACK for r in results) == 1
        # The others are told to come back once the lease is gone; then they find it done.
        busy = [r for r in results if isinstance(r, errors.StepBusy)]
        assert len(busy) == 4 and all(0 < b.retry_after <= 30 for b in busy)
        assert await chain.confirm(deps, job_id, lease_s=30) == lifecycle.Next(
            Step.CALLBACK, job_id, "payway", (lifecycle.EVENT_OUTCOME,)
        )

    run(scenario)


def test_not_eligible_finishes_at_eligibility() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        job_id = await enqueue(deps, "not_web_originated")
        assert (await chain.eligibility(deps, job_id)).step is Step.CALLBACK
        job = await deps.store.get(job_id)
        assert job.outcome and (job.outcome.type.value, job.outcome.reason) == (
            "not_eligible",
            "not_web_originated",
        )
        assert "cancel_subscription" not in calls(state)

    run(scenario)


def test_callback_without_url_is_recorded_as_skipped_once() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        job_id = await enqueue(deps, "already_cancelled")
        await chain.eligibility(deps, job_id)
        await delivery.callback(deps, job_id, lifecycle.EVENT_OUTCOME)
        await delivery.callback(deps, job_id, lifecycle.EVENT_OUTCOME)
        job = await deps.store.get(job_id)
        assert [c.result for c in job.callbacks] == ["skipped"]
        assert job.callbacks[0].event_type == "cancellation.succeeded"

    run(scenario)


def test_the_watchdog_resends_the_step_of_a_job_that_stopped_moving() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        moving = await enqueue(deps, "immediate")
        await deps.store.mark_dispatched(moving)
        stuck = await enqueue(deps, "autogiro")
        await deps.store.mark_dispatched(stuck)
        await chain.eligibility(deps, stuck)  # now confirming; its confirm message "lost"
        never_sent = await enqueue(deps, "end_of_period")  # the straggler sweep's case
        await asyncio.sleep(0.05)
        found = await sweeps.resume_stalled(deps, quiet_for_s=0.01)
        assert {n.job_id: n.step for n in found} == {stuck: Step.CONFIRM, moving: Step.ELIGIBILITY}
        assert never_sent not in {n.job_id for n in found}
        # Re-sent once, not again until it has been quiet that long again.
        assert await sweeps.resume_stalled(deps, quiet_for_s=10) == []
        # Finished, its result callback not yet sent: still watched...
        await chain.confirm(deps, stuck, lease_s=30)
        await asyncio.sleep(0.05)
        assert {
            n.args for n in await sweeps.resume_stalled(deps, quiet_for_s=0.01) if n.job_id == stuck
        } == {(lifecycle.EVENT_OUTCOME,)}
        # ...until the callback step is at its end: then the watchdog stops watching it.
        await delivery.callback(deps, stuck, lifecycle.EVENT_OUTCOME)
        assert stuck not in await deps.store.stalled(quiet_for_s=0)

    run(scenario)


def test_two_watchdog_sweeps_at_once_resend_each_job_once() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        stuck = []
        for kind in ("immediate", "autogiro", "end_of_period"):
            job_id = await enqueue(deps, kind)
            await deps.store.mark_dispatched(job_id)
            stuck.append(job_id)
        await asyncio.sleep(0.05)
        # Two beat runs overlapping (a backlog on the maintenance queue): a job one of them
        # claimed is not claimed by the other.
        assert sorted(await deps.store.stalled(quiet_for_s=0.01)) == sorted(stuck)
        assert await deps.store.stalled(quiet_for_s=0.01) == []
        await asyncio.sleep(0.05)
        a, b = await asyncio.gather(
            *(sweeps.resume_stalled(deps, quiet_for_s=0.01) for _ in range(2))
        )
        assert sorted(n.job_id for n in (*a, *b)) == sorted(stuck)

    run(scenario)


def test_a_dead_letter_is_written_with_the_move_and_only_once() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        job_id = await enqueue(deps)
        args: dict[str, Any] = {
            "step": Step.ELIGIBILITY,
            "error_type": "ProviderUnavailable",
            "error": "503",
            "traceback": None,
            "payload": {"args": [job_id]},
        }
        assert (await chain.dead_letter(deps, job_id, **args)).step is Step.CALLBACK
        # The same step delivered again after a crash: the job has moved, nothing more is written.
        assert (await chain.dead_letter(deps, job_id, **args)).step is Step.CALLBACK
        letters = await deps.dead_letters.list()
        assert [(dl.kind, dl.job_id, dl.step) for dl in letters] == [("job", job_id, "eligibility")]
        assert (await deps.store.get(job_id)).status is Status.DEAD_LETTERED

        # A job that finished meanwhile is not dead-lettered, and gets no entry.
        done = await enqueue(deps, "immediate")
        await chain.eligibility(deps, done)
        await chain.confirm(deps, done, lease_s=30)
        await chain.dead_letter(deps, done, **{**args, "step": Step.CONFIRM})
        assert (await deps.store.get(done)).status is Status.FINISHED
        assert len(await deps.dead_letters.list()) == 1

    run(scenario)


def test_confirm_releases_its_lease_when_it_finishes_or_fails() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        job_id = await enqueue(deps, "immediate")
        await chain.eligibility(deps, job_id)
        await chain.confirm(deps, job_id, lease_s=30)
        assert not await deps.store.redis.exists(f"cf:lease:{job_id}:confirm")

        failing = await enqueue(deps, "autogiro")
        await chain.eligibility(deps, failing)
        state.faults.replace(FaultSettings(error_rate=1))
        with pytest.raises(ProviderUnavailable):
            await chain.confirm(deps, failing, lease_s=30)
        assert not await deps.store.redis.exists(f"cf:lease:{failing}:confirm")
        # So the retry takes the lease at once and cancels.
        state.faults.replace(FaultSettings())
        assert (await chain.confirm(deps, failing, lease_s=30)).step is Step.CALLBACK

    run(scenario)


# --- confirm: reconcile before acting again -----------------------------------------------------


def run_on(key: str, scenario: Scenario) -> None:
    """``scenario`` with every provider on its sandbox; ``state`` is provider ``key``'s."""

    async def go() -> None:
        app = build_app()
        async with TestServer(app) as server, aiohttp.ClientSession() as session:
            root = str(server.make_url("")).rstrip("/")
            settings = Settings(providers={k: settings_for(k, root) for k in REGISTRY})
            deps = build_deps(settings, redis=fakeredis.FakeAsyncRedis(), session=session)
            await scenario(deps, app[PROVIDER_APPS][key][SANDBOX])

    asyncio.run(go())


async def enqueue_on(deps: wiring.Deps, key: str) -> str:
    """A job for ``key``'s cancellable demo subscription, past eligibility (confirming)."""
    contract = contract_for(key)
    assert contract is not None
    req = CancellationRequest(provider=key, subscription=contract.success)
    identity = REGISTRY[key].reference.model_validate(req.subscription).identity()
    job_id = (await deps.store.create(req, identity=identity)).job.id
    assert (await chain.eligibility(deps, job_id)).step is Step.CONFIRM
    return job_id


async def failed_confirm(deps: wiring.Deps, job_id: str, attempt: int) -> ProviderError:
    """A confirm attempt that fails, recorded on the timeline as the worker records it."""
    with pytest.raises(ProviderError) as caught:
        await chain.confirm(deps, job_id, attempt=attempt, lease_s=30)
    await chain.note_retry(
        deps, job_id, step=Step.CONFIRM, attempt=attempt, error=caught.value.as_dict(), delay_s=1
    )
    return caught.value


def finished_entry(job: Any) -> Any:
    return next(e for e in job.timeline if e.event == "finished")


@pytest.mark.parametrize("key", sorted(REGISTRY))
def test_a_cancel_that_acted_and_lost_its_answer_ends_cancelled_without_a_second_cancel(
    key: str,
) -> None:
    async def scenario(deps: wiring.Deps, sandbox: Any) -> None:
        job_id = await enqueue_on(deps, key)
        reads = sum(sandbox.calls.values())  # calls so far: eligibility (and a token)
        sandbox.faults.replace(FaultSettings(lost_answer_rate=1))
        error = await failed_confirm(deps, job_id, 0)
        assert error.status == 502 and error.may_have_acted
        cancel_calls = dict(sandbox.calls)
        sandbox.faults.replace(FaultSettings())

        assert (await chain.confirm(deps, job_id, attempt=1, lease_s=30)).step is Step.CALLBACK
        job = await deps.store.get(job_id)
        assert job.outcome is not None
        assert job.outcome.type is OutcomeType.CANCELLED, job.outcome
        assert job.outcome.details["reconciled"] is True
        assert finished_entry(job).details == {"outcome": "cancelled", "reconciled": True}
        # The retry read the state once and sent no second cancel: one effect, one call more.
        contract = contract_for(key)
        assert contract is not None
        assert sandbox.state()["effective_cancels"] == {contract.cancel_key: 1}
        assert sum(sandbox.calls.values()) == sum(cancel_calls.values()) + 1
        assert reads < sum(cancel_calls.values())

    run_on(key, scenario)


def test_the_first_confirm_makes_one_call_and_no_read() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        job_id = await enqueue(deps)
        await chain.eligibility(deps, job_id)
        await chain.confirm(deps, job_id, lease_s=30)
        assert calls(state) == {
            "access_token": 1,
            "can_cancel_subscription": 1,
            "cancel_subscription": 1,
        }
        job = await deps.store.get(job_id)
        assert finished_entry(job).details == {"outcome": "cancelled"}

    run(scenario)


def test_a_retry_after_an_error_that_cannot_have_acted_makes_no_read() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        job_id = await enqueue(deps)
        await chain.eligibility(deps, job_id)
        state.faults.replace(FaultSettings(rate_limit_rate=1))
        error = await failed_confirm(deps, job_id, 0)
        assert isinstance(error, ProviderRateLimited) and not error.may_have_acted
        state.faults.replace(FaultSettings())
        await chain.confirm(deps, job_id, attempt=1, lease_s=30)
        assert calls(state)["can_cancel_subscription"] == 1  # eligibility's only
        assert calls(state)["cancel_subscription"] == 2
        job = await deps.store.get(job_id)
        assert job.outcome is not None and job.outcome.type is OutcomeType.CANCELLED
        assert "reconciled" not in job.outcome.details

    run(scenario)


def test_a_read_that_finds_it_still_cancellable_cancels() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        job_id = await enqueue(deps, "immediate")
        await chain.eligibility(deps, job_id)
        # A 503 may have acted but did not: the read says can_cancel=true, the cancel follows.
        state.faults.replace(FaultSettings(error_rate=1))
        assert (await failed_confirm(deps, job_id, 0)).may_have_acted
        state.faults.replace(FaultSettings())
        await chain.confirm(deps, job_id, attempt=1, lease_s=30)
        assert calls(state)["can_cancel_subscription"] == 2
        assert calls(state)["cancel_subscription"] == 2
        job = await deps.store.get(job_id)
        assert job.outcome is not None and job.outcome.type is OutcomeType.CANCELLED
        assert job.outcome.cancellation_type == "immediate"
        assert finished_entry(job).details == {"outcome": "cancelled", "reconcile_read": "eligible"}

    run(scenario)


def test_an_attempt_that_recorded_no_end_is_reconciled() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        job_id = await enqueue(deps, "autogiro")
        await chain.eligibility(deps, job_id)
        # The cancel acts, then the worker dies before recording anything (no retry entry).
        state.faults.replace(FaultSettings(lost_answer_rate=1))
        with pytest.raises(ProviderUnavailable):
            await chain.confirm(deps, job_id, lease_s=30)
        state.faults.replace(FaultSettings())
        await chain.confirm(deps, job_id, attempt=1, lease_s=30)
        job = await deps.store.get(job_id)
        assert job.outcome is not None and job.outcome.details.get("reconciled") is True
        assert calls(state)["cancel_subscription"] == 1

    run(scenario)


def test_an_earlier_lost_answer_still_counts_after_an_attempt_that_did_not_act() -> None:
    async def scenario(deps: wiring.Deps, state: Any) -> None:
        job_id = await enqueue(deps, "end_of_period_with_credit")
        await chain.eligibility(deps, job_id)
        state.faults.replace(FaultSettings(lost_answer_rate=1))
        assert (await failed_confirm(deps, job_id, 0)).may_have_acted
        # The next attempt's read is rate limited: that attempt acted on nothing...
        state.faults.replace(FaultSettings(rate_limit_rate=1))
        assert not (await failed_confirm(deps, job_id, 1)).may_have_acted
        # ...and the first one's cancel may still have happened: read again, then end.
        state.faults.replace(FaultSettings())
        await chain.confirm(deps, job_id, attempt=2, lease_s=30)
        job = await deps.store.get(job_id)
        assert job.outcome is not None and job.outcome.type is OutcomeType.CANCELLED
        assert job.outcome.details.get("reconciled") is True
        assert calls(state)["cancel_subscription"] == 1
        assert len(state.state()["credit_invoices"]) == 1

    run(scenario)
