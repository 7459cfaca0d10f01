"""The callback step with fake Redis and the sandbox receiver on a real port: every event
type, retries, the horizon, refusals, dead letters and their replay, hooks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import jsonschema_rs
import pytest

from cancelflow import callbacks, chain, decisions, delivery, lifecycle, retry
from cancelflow.contract import Decision, Outcome, OutcomeType, Step, utcnow
from cancelflow.hooks import Hook, HookRejected
from producers.signatures import verify_signature
from sandboxes.receiver import DEMO_CALLBACK_SECRET
from tests.callbacks.harness import SCHEMA, Harness, deliver_until_done, harness, results, settings
from tests.callbacks.secrets import OTHER_SECRET, ROTATED

VALIDATOR = jsonschema_rs.validator_for(SCHEMA)

Setup = Callable[[Harness], Awaitable[tuple[str, str]]]


def _finished(outcome: Outcome) -> Setup:
    async def setup(h: Harness) -> tuple[str, str]:
        return await h.finished(outcome), lifecycle.EVENT_OUTCOME

    return setup


async def _offer_presented(h: Harness) -> tuple[str, str]:
    return await h.offered(), lifecycle.EVENT_OFFER


async def _retained(h: Harness) -> tuple[str, str]:
    job_id = await h.offered()
    await decisions.decide(h.deps, job_id, Decision(decision="accept"))
    return job_id, lifecycle.EVENT_OUTCOME


async def _abandoned(h: Harness) -> tuple[str, str]:
    job_id = await h.offered()
    await decisions.abandon(h.deps, job_id)
    return job_id, lifecycle.EVENT_OUTCOME


async def _dead_lettered(h: Harness) -> tuple[str, str]:
    return await h.dead_lettered(), lifecycle.EVENT_OUTCOME


EVENTS: dict[str, tuple[Setup, str]] = {
    "cancelled": (
        _finished(Outcome(type=OutcomeType.CANCELLED, cancellation_type="immediate")),
        "cancellation.succeeded",
    ),
    "already_cancelled": (
        _finished(Outcome(type=OutcomeType.ALREADY_CANCELLED)),
        "cancellation.succeeded",
    ),
    "pending_provider_confirmation": (
        _finished(
            Outcome(type=OutcomeType.PENDING_PROVIDER_CONFIRMATION, details={"by": "app_store"})
        ),
        "cancellation.succeeded",
    ),
    "not_eligible": (
        _finished(Outcome(type=OutcomeType.NOT_ELIGIBLE, reason="not_web_originated")),
        "cancellation.not_eligible",
    ),
    "not_found": (_finished(Outcome(type=OutcomeType.NOT_FOUND)), "cancellation.not_found"),
    "failed": (
        _finished(Outcome(type=OutcomeType.FAILED, error={"type": "ProviderRejected"})),
        "cancellation.failed",
    ),
    "offer_presented": (_offer_presented, "cancellation.offer_presented"),
    "retained": (_retained, "cancellation.retained"),
    "abandoned": (_abandoned, "cancellation.abandoned"),
    "dead_lettered": (_dead_lettered, "cancellation.dead_lettered"),
}


def test_the_cases_cover_every_event_type() -> None:
    assert {etype for _, etype in EVENTS.values()} == set(callbacks.EVENT_TYPES)


@pytest.mark.parametrize("case", list(EVENTS))
def test_each_event_type_is_delivered_signed_and_matches_the_schema(case: str) -> None:
    setup, expected = EVENTS[case]

    async def scenario() -> None:
        async with harness() as h:
            job_id, event = await setup(h)
            assert await deliver_until_done(h, job_id, event) == []
            [request] = h.receiver.requests
            assert (request.verified, request.status, request.event_type) == (True, 200, expected)
            [body] = h.receiver.events.values()
            VALIDATOR.validate(body)
            job = await h.record(job_id)
            assert body["id"] == callbacks.event_id(job, expected)
            data = body["data"]
            assert (data["job_id"], data["provider"], data["subscription"]) == (
                job_id,
                "payway",
                job.subscription,
            )
            assert data["idempotency_key"] == job.idempotency_key
            [attempt] = job.callbacks
            assert (attempt.result, attempt.http_status, attempt.event_type) == (
                "delivered",
                200,
                expected,
            )
            assert attempt.latency_ms is not None and attempt.latency_ms >= 0

    asyncio.run(scenario())


def test_dead_lettered_event_says_why_and_metadata_is_passed_through() -> None:
    async def scenario() -> None:
        async with harness() as h:
            job_id = await h.dead_lettered(idempotency_key="order-7", metadata={"order": 7})
            await deliver_until_done(h, job_id)
            [body] = h.receiver.events.values()
            assert body["data"]["error"] == {
                "type": "ProviderUnavailable",
                "message": "gave up after 8 attempts",
            }
            assert body["data"]["metadata"] == {"order": 7}
            assert body["data"]["idempotency_key"] == "order-7"

    asyncio.run(scenario())


def test_every_retry_sends_the_same_bytes_signed_anew() -> None:
    async def scenario() -> None:
        async with harness() as h:
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            job = await h.record(job_id)
            first = callbacks.build_event(job, "cancellation.succeeded")
            await asyncio.sleep(0.01)
            again = callbacks.build_event(await h.record(job_id), "cancellation.succeeded")
            assert callbacks.encode(first) == callbacks.encode(again)

    asyncio.run(scenario())


def test_a_receiver_failing_twice_gets_exactly_one_recorded_success() -> None:
    async def scenario() -> None:
        async with harness() as h:
            h.configure(fail_next=2, status=503, retry_after_s=7)
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            errors = await deliver_until_done(h, job_id)
            assert [e.status for e in errors] == [503, 503]
            assert errors[0].retry_after == 7
            assert [r.status for r in h.receiver.requests] == [503, 503, 200]
            assert len(h.receiver.events) == 1
            job = await h.record(job_id)
            assert results(job) == ["failed", "failed", "delivered"]
            assert [c.attempt for c in job.callbacks] == [0, 1, 2]
            assert all(c.latency_ms is not None for c in job.callbacks)
            # A redelivered message finds the event delivered and sends nothing.
            await delivery.callback(h.deps, job_id, lifecycle.EVENT_OUTCOME, attempt=3)
            assert len(h.receiver.requests) == 3
            assert await h.dead_letters() == []

    asyncio.run(scenario())


@pytest.mark.parametrize("status", [429, 500, 502, 503, 408])
def test_retryable_answers(status: int) -> None:
    async def scenario() -> None:
        async with harness() as h:
            h.configure(fail_next=1, status=status)
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            assert [e.status for e in await deliver_until_done(h, job_id)] == [status]

    asyncio.run(scenario())


def test_connection_errors_and_timeouts_are_retried() -> None:
    async def scenario() -> None:
        async with harness(settings(timeout_s=0.2)) as h:
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            h.configure(down=True)
            with pytest.raises(callbacks.CallbackRetryable, match="connection failed"):
                await delivery.callback(h.deps, job_id, lifecycle.EVENT_OUTCOME)
            h.configure(delay_ms=1000)
            with pytest.raises(callbacks.CallbackRetryable, match="no answer within"):
                await delivery.callback(h.deps, job_id, lifecycle.EVENT_OUTCOME, attempt=1)
            h.configure()
            await delivery.callback(h.deps, job_id, lifecycle.EVENT_OUTCOME, attempt=2)
            assert results(await h.record(job_id)) == ["failed", "failed", "delivered"]

    asyncio.run(scenario())


@pytest.mark.parametrize("status", [410, 301])
def test_a_410_or_a_redirect_dead_letters_at_once_and_replays(status: int) -> None:
    async def scenario() -> None:
        async with harness() as h:
            h.configure(fail_next=1, status=status)
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            assert await deliver_until_done(h, job_id) == []
            assert results(await h.record(job_id)) == ["failed", "dead_lettered"]
            [dl] = await h.dead_letters()
            assert (dl.kind, dl.job_id, dl.error_type, dl.event) == (
                "callback",
                job_id,
                "CallbackRejected",
                "outcome@webhook",
            )
            assert dl.errors[0]["status"] == status
            # A retried message does not send a dead-lettered event again...
            await delivery.callback(h.deps, job_id, lifecycle.EVENT_OUTCOME, attempt=1)
            assert len(h.receiver.requests) == 1
            # ...an operator's replay does.
            nxt = await chain.replay(h.deps, dl.id)
            assert nxt.step is Step.CALLBACK
            await deliver_until_done(h, job_id, *nxt.args)
            assert results(await h.record(job_id)) == ["failed", "dead_lettered", "delivered"]
            assert len(h.receiver.events) == 1
            assert await h.dead_letters() == []

    asyncio.run(scenario())


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 503, 400, 401, 404])
def test_a_receiver_answering_a_retryable_status_for_a_while_gets_the_event(status: int) -> None:
    # A receiver answering 404 while it deploys: retried, with backoff, and delivered.
    async def scenario() -> None:
        async with harness() as h:
            h.configure(fail_next=3, status=status)
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            errors = await deliver_until_done(h, job_id)
            assert [e.status for e in errors] == [status] * 3
            assert all(e.delay_s is not None and e.delay_s >= 0 for e in errors)
            job = await h.record(job_id)
            assert results(job) == ["failed", "failed", "failed", "delivered"]
            failed = job.callbacks[:3]
            assert all(c.http_status == status and c.retry_at is not None for c in failed)
            # What the receiver said, kept on each attempt.
            assert all(c.response and "told to fail" in c.response for c in failed)
            assert job.callbacks[3].response is not None
            assert await h.dead_letters() == []

    asyncio.run(scenario())


@pytest.mark.parametrize("status", [400, 404])
def test_another_4xx_is_dead_lettered_once_its_short_window_has_passed(status: int) -> None:
    # The window is shortened here; ``tests/unit/test_callback_retry.py`` pins the default's
    # decision (the same ``retry.decide_callback``).
    async def scenario() -> None:
        async with harness(settings(client_error_window_s=0.3)) as h:
            h.configure(fail_next=1000, status=status)
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            for attempt in range(100):
                try:
                    await delivery.callback(
                        h.deps, job_id, lifecycle.EVENT_OUTCOME, attempt=attempt
                    )
                except callbacks.CallbackRetryable:
                    await asyncio.sleep(0.05)
                    continue
                break
            got = results(await h.record(job_id))
            assert got[-1] == "dead_lettered" and set(got[:-1]) == {"failed"} and len(got) >= 3
            [dl] = await h.dead_letters()
            assert dl.error_type == "CallbackRejected"
            assert "client-error window" in dl.error

    asyncio.run(scenario())


def test_a_retry_after_longer_than_a_countdown_is_waited_in_hops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A receiver asking for two hours: the step waits in countdowns of at most the broker's
    # cap, sending nothing, until the attempt's retry_at; only the clock is moved.
    async def scenario() -> None:
        async with harness() as h:
            cap = retry.callback_policy(h.deps.settings).cap_s
            h.configure(fail_next=1, status=503, retry_after_s=7200)
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            with pytest.raises(callbacks.CallbackRetryable) as first:
                await delivery.callback(h.deps, job_id, lifecycle.EVENT_OUTCOME)
            assert first.value.delay_s == 7200
            action = retry.decide(
                first.value,
                step=Step.CALLBACK,
                attempt=0,
                age_s=0,
                policy=retry.callback_policy(h.deps.settings),
            )
            assert isinstance(action, retry.Retry) and action.delay_s == cap
            [failed] = (await h.record(job_id)).callbacks
            assert failed.retry_at is not None
            due = datetime.fromisoformat(failed.retry_at)
            started = utcnow()
            for hop in (cap, 2 * cap):
                monkeypatch.setattr(
                    delivery, "utcnow", lambda hop=hop: started + timedelta(seconds=hop)
                )
                with pytest.raises(callbacks.CallbackNotDue) as wait:
                    await delivery.callback(h.deps, job_id, lifecycle.EVENT_OUTCOME, attempt=1)
                assert 0 < wait.value.retry_after <= 7200 - hop + 1
                waited = retry.decide(
                    wait.value,
                    step=Step.CALLBACK,
                    attempt=1,
                    age_s=0,
                    policy=retry.waits_only(h.deps.settings),
                )
                assert isinstance(waited, retry.Wait) and waited.delay_s <= cap
            assert len(h.receiver.requests) == 1  # nothing sent while waiting
            monkeypatch.setattr(delivery, "utcnow", lambda: due + timedelta(seconds=1))
            await delivery.callback(h.deps, job_id, lifecycle.EVENT_OUTCOME, attempt=2)
            assert results(await h.record(job_id)) == ["failed", "delivered"]
            assert len(h.receiver.requests) == 2

    asyncio.run(scenario())


def test_a_receiver_down_past_the_horizon_is_dead_lettered_and_a_replay_starts_anew() -> None:
    async def scenario() -> None:
        async with harness(settings(horizon_s=0.3)) as h:
            h.configure(down=True)
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            for attempt in range(100):
                try:
                    await delivery.callback(
                        h.deps, job_id, lifecycle.EVENT_OUTCOME, attempt=attempt
                    )
                except callbacks.CallbackRetryable:
                    await asyncio.sleep(0.05)
                    continue
                break
            job = await h.record(job_id)
            assert results(job)[-1] == "dead_lettered"
            assert set(results(job)[:-1]) == {"failed"}
            [dl] = await h.dead_letters()
            assert dl.error_type == "CallbackGiveUp" and "horizon" in dl.error
            assert len(dl.errors) == len(results(job)) - 1
            # The replay gets a horizon of its own: its first failure is retried.
            nxt = await chain.replay(h.deps, dl.id)
            with pytest.raises(callbacks.CallbackRetryable):
                await delivery.callback(h.deps, job_id, *nxt.args)
            h.configure()
            await deliver_until_done(h, job_id, *nxt.args)
            assert results(await h.record(job_id))[-2:] == ["failed", "delivered"]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/hooks",
        "http://192.168.0.10/hooks",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:8080/hooks",
        "http://127.0.0.2:8080/hooks",
        "http://[fd00::1]/hooks",
    ],
)
def test_an_unsafe_url_is_refused_dead_lettered_and_never_called(url: str) -> None:
    async def scenario() -> None:
        async with harness() as h:
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED), callback_url=url)
            assert await deliver_until_done(h, job_id) == []
            job = await h.record(job_id)
            assert results(job) == ["refused", "dead_lettered"]
            assert "allow-list" in (job.callbacks[0].error or "") or "https" in (
                job.callbacks[0].error or ""
            )
            [dl] = await h.dead_letters()
            assert dl.error_type == "UnsafeCallbackUrl"
            assert h.receiver.requests == []

    asyncio.run(scenario())


def test_http_is_refused_unless_allowed() -> None:
    async def scenario() -> None:
        async with harness(settings(allow_http=False)) as h:
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            await deliver_until_done(h, job_id)
            job = await h.record(job_id)
            assert results(job) == ["refused", "dead_lettered"]
            assert "https" in (job.callbacks[0].error or "")

    asyncio.run(scenario())


def test_the_receiver_is_refused_when_127_0_0_1_is_not_allow_listed() -> None:
    async def scenario() -> None:
        async with harness(settings(allowed_hosts=[])) as h:
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            await deliver_until_done(h, job_id)
            assert results(await h.record(job_id)) == ["refused", "dead_lettered"]
            assert h.receiver.requests == []

    asyncio.run(scenario())


def test_no_url_is_skipped_and_a_provider_url_is_the_default() -> None:
    async def scenario() -> None:
        async with harness() as h:
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED), callback_url=None)
            await deliver_until_done(h, job_id)
            assert results(await h.record(job_id)) == ["skipped"]
        async with harness() as h:
            h.deps.settings = settings(provider_url=h.url)
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED), callback_url=None)
            await deliver_until_done(h, job_id)
            job = await h.record(job_id)
            assert results(job) == ["delivered"] and job.callbacks[0].url == h.url

    asyncio.run(scenario())


def test_no_secret_is_refused_and_dead_lettered() -> None:
    async def scenario() -> None:
        async with harness(settings(secret=None)) as h:
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            await deliver_until_done(h, job_id)
            assert results(await h.record(job_id)) == ["refused", "dead_lettered"]
            [dl] = await h.dead_letters()
            assert dl.error_type == "CallbackMisconfigured"

    asyncio.run(scenario())


def test_while_rotating_both_secrets_sign_and_either_verifies() -> None:
    async def scenario() -> None:
        async with harness(settings(secret=ROTATED, previous=DEMO_CALLBACK_SECRET)) as h:
            for held in ([ROTATED], [DEMO_CALLBACK_SECRET]):
                h.configure(secrets=held)
                job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
                await deliver_until_done(h, job_id)
                assert h.receiver.requests[-1].verified
            h.configure(secrets=[OTHER_SECRET], fail_next=0)
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            with pytest.raises(callbacks.CallbackRetryable):
                await delivery.callback(h.deps, job_id, lifecycle.EVENT_OUTCOME)
            assert h.receiver.requests[-1].status == 400
            assert results(await h.record(job_id)) == ["failed"]

    asyncio.run(scenario())


def test_the_signature_covers_the_exact_body_sent() -> None:
    body = callbacks.encode({"id": "evt_1", "type": "cancellation.succeeded"})
    header = callbacks.sign(body, [ROTATED, OTHER_SECRET], timestamp=1_700_000_000)
    assert header.count("v1=") == 2
    assert verify_signature(body, header, [OTHER_SECRET], now=1_700_000_100) == 1_700_000_000


# --- hooks -----------------------------------------------------------------------------------


class Recorder:
    """A hook that records events, failing (or rejecting) as told."""

    def __init__(self, *, fail: int = 0, reject: bool = False, sleep_s: float = 0) -> None:
        self.fail, self.reject, self.sleep_s = fail, reject, sleep_s
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, event: dict[str, Any]) -> None:
        self.calls.append(event)
        if self.sleep_s:
            await asyncio.sleep(self.sleep_s)
        if self.reject:
            raise HookRejected("not for us")
        if len(self.calls) <= self.fail:
            raise RuntimeError("billing is down")


def _hooks(**recorders: Recorder) -> dict[str, list[Hook]]:
    return {"payway": [Hook("payway", name, fn) for name, fn in recorders.items()]}


def test_hooks_get_the_same_event_as_the_url() -> None:
    billing = Recorder()

    async def scenario() -> None:
        async with harness(hooks=_hooks(billing=billing)) as h:
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            await deliver_until_done(h, job_id)
            [sent] = h.receiver.events.values()
            assert billing.calls == [sent]
            job = await h.record(job_id)
            assert results(job, "webhook") == ["delivered"]
            assert results(job, "hook:billing") == ["delivered"]

    asyncio.run(scenario())


def test_a_failing_hook_is_retried_alone_and_the_url_gets_the_event_once() -> None:
    billing, audit = Recorder(fail=2), Recorder()

    async def scenario() -> None:
        async with harness(hooks=_hooks(billing=billing, audit=audit)) as h:
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            errors = await deliver_until_done(h, job_id)
            assert len(errors) == 2 and "billing is down" in str(errors[0])
            assert len(h.receiver.requests) == 1 and len(audit.calls) == 1
            assert len(billing.calls) == 3
            job = await h.record(job_id)
            assert results(job, "hook:billing") == ["failed", "failed", "delivered"]
            assert job.outcome is not None and job.outcome.type is OutcomeType.CANCELLED

    asyncio.run(scenario())


def test_a_rejecting_hook_is_dead_lettered_alone_and_replays_alone() -> None:
    billing = Recorder(reject=True)

    async def scenario() -> None:
        async with harness(hooks=_hooks(billing=billing)) as h:
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            assert await deliver_until_done(h, job_id) == []
            job = await h.record(job_id)
            assert results(job, "webhook") == ["delivered"]
            assert results(job, "hook:billing") == ["failed", "dead_lettered"]
            [dl] = await h.dead_letters()
            assert (dl.event, dl.error_type) == ("outcome@hook:billing", "CallbackRejected")
            billing.reject = False
            nxt = await chain.replay(h.deps, dl.id)
            await deliver_until_done(h, job_id, *nxt.args)
            job = await h.record(job_id)
            assert results(job, "hook:billing")[-1] == "delivered"
            assert len(h.receiver.requests) == 1  # the URL was not sent it again

    asyncio.run(scenario())


def test_a_slow_hook_times_out_and_does_not_hold_up_the_url() -> None:
    slow = Recorder(sleep_s=5)

    async def scenario() -> None:
        async with harness(settings(timeout_s=0.2), hooks=_hooks(slow=slow)) as h:
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            with pytest.raises(callbacks.CallbackRetryable, match="did not finish"):
                await delivery.callback(h.deps, job_id, lifecycle.EVENT_OUTCOME)
            job = await h.record(job_id)
            assert results(job, "webhook") == ["delivered"]
            assert results(job, "hook:slow") == ["failed"]

    asyncio.run(scenario())


def test_hooks_run_when_there_is_no_url() -> None:
    billing = Recorder()

    async def scenario() -> None:
        async with harness(hooks=_hooks(billing=billing)) as h:
            job_id = await h.finished(Outcome(type=OutcomeType.NOT_FOUND), callback_url=None)
            await deliver_until_done(h, job_id)
            assert [e["type"] for e in billing.calls] == ["cancellation.not_found"]

    asyncio.run(scenario())


def test_a_hook_no_longer_registered_is_dead_lettered_on_replay() -> None:
    async def scenario() -> None:
        async with harness() as h:
            job_id = await h.finished(Outcome(type=OutcomeType.CANCELLED))
            await delivery.callback(h.deps, job_id, "outcome@hook:gone")
            [dl] = await h.dead_letters()
            assert dl.error_type == "CallbackMisconfigured" and "hook:gone" in dl.error

    asyncio.run(scenario())
