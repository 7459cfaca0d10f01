"""The worker's app is built by a factory from a Settings, and its task shells are importable
and testable without the environment: what a step's failure becomes (``after_failure``, over
``retry.decide``) and what Celery is then asked to do (``carry_out``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from celery.exceptions import Reject, Retry

from cancelflow import errors, lifecycle
from cancelflow.callbacks import CallbackNotDue, CallbackRetryable
from cancelflow.contract import (
    STEP_TASKS,
    CancellationRequest,
    OutcomeType,
    Status,
    Step,
    provider_queue,
)
from cancelflow.dead_letters import DeadLetterFilter
from cancelflow.errors import JobDeadLettered
from cancelflow.settings import Settings
from cancelflow.wiring import Deps, build_deps
from worker import tasks
from worker.app import create_app, settings_of

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings(
    providers={
        "payway": {
            "base_url": "http://127.0.0.1:9/payway",
            "client_id": "id",
            "client_secret": "secret",
            "callback_secret": "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3",
        }
    }
)


def test_importing_the_worker_reads_no_environment() -> None:
    # A setting that would stop load_settings: importing the shells and the app module, and
    # building an app from a Settings, never reads it; only ``worker.app.app`` does.
    probe = (
        "import os\n"
        "from cancelflow.settings import Settings\n"
        "settings = Settings()\n"
        "os.environ['CANCELFLOW_WORKER__CONCURRENCY'] = 'not-a-number'\n"
        "import worker.tasks, worker.app\n"
        "app = worker.app.create_app(settings)\n"
        "assert 'cancelflow.eligibility' in app.tasks\n"
        "assert 'app' not in vars(worker.app)\n"
        "try:\n"
        "    worker.app.app\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANCELFLOW_")}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "CANCELFLOW_WORKER__CONCURRENCY" in done.stdout


def test_the_factory_registers_every_task_under_its_stable_name() -> None:
    app = create_app(SETTINGS)
    assert settings_of(app) is SETTINGS
    names = {name for name in app.tasks if name.startswith("cancelflow.")}
    assert names == {
        *STEP_TASKS.values(),
        "cancelflow.expire_decisions",
        "cancelflow.dispatch_stragglers",
        "cancelflow.resume_stalled",
    }
    for step, name in STEP_TASKS.items():
        task = app.tasks[name]
        assert task.step is step and task.acks_late and task.reject_on_worker_lost
    # Two apps from two Settings keep their own (a test's app is not the process's).
    other = create_app(Settings())
    assert settings_of(other) is not settings_of(app)
    assert other.tasks["cancelflow.confirm"] is not app.tasks["cancelflow.confirm"]


async def job_of(deps: Deps, *events: lifecycle.Event) -> str:
    created = await deps.store.create(
        CancellationRequest(
            provider="payway",
            subscription={
                "account_id": "a" * 24,
                "user_product_id": "b" * 24,
                "cancellation_reason_id": "c" * 24,
            },
        ),
        identity="sub-1",
    )
    for event in events:
        await deps.store.transition(created.job, event)
    return created.job.id


def deps_of() -> Deps:
    return build_deps(SETTINGS, redis=fakeredis.FakeAsyncRedis())


def unavailable() -> errors.ProviderError:
    return errors.ProviderUnavailable("502 from the provider", provider="payway", status=502)


async def test_a_retried_error_keeps_no_frames_of_the_failed_step() -> None:
    """Celery holds the error of a retry until the retried message runs: without its
    traceback (and its causes'), the failed step's locals are not held with it."""
    deps = deps_of()
    job_id = await job_of(deps, lifecycle.Event.CHECK, lifecycle.Event.CONFIRM)
    try:
        try:
            raise OSError("connection reset")
        except OSError as low:
            raise unavailable() from low
    except errors.ProviderError as caught:
        error = caught
    assert error.__traceback__ is not None and error.__cause__ is not None
    result = await tasks.after_failure(deps, Step.CONFIRM, job_id, (), error, error)
    assert result.retry_in_s is not None and result.cause is error
    assert error.__traceback__ is None
    assert error.__cause__.__traceback__ is None


async def test_a_transient_error_is_retried_and_noted_on_the_job() -> None:
    deps = deps_of()
    job_id = await job_of(deps, lifecycle.Event.CHECK, lifecycle.Event.CONFIRM)
    error = unavailable()
    result = await tasks.after_failure(deps, Step.CONFIRM, job_id, (), error, error)
    assert (
        result.retry_in_s is not None
        and 0 <= result.retry_in_s <= SETTINGS.limits().max_countdown_s
    )
    assert result.cause is error and result.next is None
    job = await deps.store.get(job_id)
    assert [e.event for e in job.timeline][-1] == "retry_scheduled"
    assert job.status is Status.CONFIRMING


async def test_our_own_limits_make_the_job_wait_and_a_held_lease_is_not_noted() -> None:
    deps = deps_of()
    job_id = await job_of(deps, lifecycle.Event.CHECK, lifecycle.Event.CONFIRM)
    circuit = errors.CircuitOpen("open", provider="payway", retry_after=3.0)
    waiting = await tasks.after_failure(deps, Step.CONFIRM, job_id, (), circuit, circuit)
    assert waiting.retry_in_s is not None and 3.0 <= waiting.retry_in_s <= 4.0
    busy = errors.StepBusy("leased elsewhere", retry_after=2.0)
    again = await tasks.after_failure(deps, Step.CONFIRM, job_id, (), busy, busy)
    assert again.retry_in_s is not None and 2.0 <= again.retry_in_s <= 2.5
    events = [e.event for e in (await deps.store.get(job_id)).timeline]
    assert events.count("waiting") == 1 and events[-1] == "waiting"


async def test_a_permanent_refusal_fails_the_job_and_its_callback_follows() -> None:
    deps = deps_of()
    job_id = await job_of(deps, lifecycle.Event.CHECK, lifecycle.Event.CONFIRM)
    error = errors.ProviderRejected("400: no such product", provider="payway", status=400)
    result = await tasks.after_failure(deps, Step.CONFIRM, job_id, (), error, error)
    assert result.next == lifecycle.Next(
        Step.CALLBACK, job_id, "payway", (lifecycle.EVENT_OUTCOME,)
    )
    job = await deps.store.get(job_id)
    assert job.status is Status.FINISHED
    assert job.outcome is not None and job.outcome.type is OutcomeType.FAILED


@pytest.mark.parametrize(
    "error",
    [
        errors.ProviderAuthError("401 after a fresh token", provider="payway", status=401),
        KeyError("a surprise"),
    ],
    ids=["bad credentials", "a surprise"],
)
async def test_what_cannot_finish_is_dead_lettered_and_the_task_fails_with_it(
    error: Exception,
) -> None:
    deps = deps_of()
    job_id = await job_of(deps, lifecycle.Event.CHECK, lifecycle.Event.CONFIRM)
    result = await tasks.after_failure(deps, Step.CONFIRM, job_id, (), error, error)
    assert result.dead_lettered is not None
    assert result.dead_lettered.error_type == type(error).__name__
    assert result.next is not None and result.next.step is Step.CALLBACK
    job = await deps.store.get(job_id)
    assert job.status is Status.DEAD_LETTERED
    [letter] = await deps.dead_letters.list(DeadLetterFilter(), limit=10)
    assert letter.id == result.dead_lettered.dead_letter_id and letter.kind == "job"


async def test_a_callback_past_its_horizon_is_dead_lettered_as_a_callback() -> None:
    deps = deps_of()
    job_id = await job_of(deps, lifecycle.Event.CHECK)
    await deps.store.transition(
        await deps.store.get(job_id), lifecycle.Event.FINISH, identity="sub-1"
    )
    refused = errors.CallbackGiveUp("410 Gone")
    result = await tasks.after_failure(deps, Step.CALLBACK, job_id, ("outcome",), refused, refused)
    assert result.dead_lettered is not None and result.next is None
    [letter] = await deps.dead_letters.list(DeadLetterFilter(), limit=10)
    assert letter.kind == "callback" and letter.event == "outcome@webhook"
    # A retryable callback error within its horizon is retried.
    late = CallbackRetryable("503", status=503)
    again = await tasks.after_failure(deps, Step.CALLBACK, job_id, ("outcome",), late, late)
    assert again.retry_in_s is not None
    # Targets waiting for a Retry-After beyond one countdown: the step waits in hops, each a
    # countdown the broker can hold, noted on the job so the watchdog leaves it alone.
    cap = SETTINGS.limits().max_countdown_s
    later = CallbackNotDue("not due", retry_after=7200.0)
    hop = await tasks.after_failure(deps, Step.CALLBACK, job_id, ("outcome",), later, later)
    assert hop.retry_in_s == cap and hop.dead_lettered is None
    job = await deps.store.get(job_id)
    assert job.timeline[-1].event == "waiting" and job.timeline[-1].step == "callback"


def test_carry_out_asks_celery_for_what_the_step_came_to() -> None:
    app = create_app(SETTINGS)
    # kombu's in-memory transport: the retry's and the next step's messages go nowhere real.
    app.conf.broker_url = "memory://"
    app.conf.broker_transport = "memory"
    task: Any = app.tasks["cancelflow.confirm"]
    task.push_request(id="task-1", retries=0, called_directly=False, delivery_info={})
    try:
        with pytest.raises(Reject) as rejected:
            tasks.carry_out(task, tasks.StepResult("requeued", requeue=True))
        assert rejected.value.requeue
        with pytest.raises(Retry):
            tasks.carry_out(task, tasks.StepResult("retrying", retry_in_s=5.0))
        dead = JobDeadLettered("dl_1", "ProviderAuthError")
        nxt = lifecycle.Next(Step.CALLBACK, "job_" + "0" * 32, "payway", ("outcome",))
        with pytest.raises(JobDeadLettered):
            tasks.carry_out(task, tasks.StepResult("dead", next=nxt, dead_lettered=dead))
        sent = lifecycle.Next(Step.CONFIRM, "job_" + "1" * 32, "payway")
        assert tasks.carry_out(task, tasks.StepResult("next: confirm", next=sent)) == (
            "next: confirm"
        )
        with app.connection_for_read() as conn:
            queue = conn.SimpleQueue(provider_queue("payway"))
            message = queue.get(timeout=1)
            assert message.headers["task"] == "cancelflow.confirm"
            assert message.headers["job_id"] == sent.job_id
            message.ack()
            queue.close()
    finally:
        task.pop_request()


def test_a_ready_worker_collects_garbage_less_often() -> None:
    import gc

    from celery import signals

    from worker.app import GC_THRESHOLDS, tune_gc

    # Connected for the app's worker, at worker_ready.
    uid = f"cancelflow-{id(create_app(SETTINGS))}-worker_ready-collect_less"
    assert any(uid in str(key) for key, _ in signals.worker_ready.receivers)
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
