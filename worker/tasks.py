"""The task shells. Each names its step; ``execute`` (a coroutine, run on the runtime's loop by
``worker.pool``) turns the message into ids, runs the step and decides by the error's type
whether to retry or dead-letter; the task's body then settles that ``Outcome`` with Celery:
sends the next step, or retries, or gives the message back."""

from __future__ import annotations

import asyncio
import random
import time
import traceback
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import kombu.exceptions
import redis.exceptions
import structlog
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.worker.request import Request

from brokers import queues as broker_queues
from brokers.routing import queue_of
from cancelflow import metrics, steps
from cancelflow.broker_urls import broker_kind
from cancelflow.callbacks import CallbackRetryable
from cancelflow.contract import JOB_ID_RE, Step, isoformat, utcnow
from cancelflow.dead_letters import DeadLetter
from cancelflow.errors import (
    CircuitOpen,
    JobDeadLettered,
    JobNotFound,
    LeaseLost,
    ProviderAuthError,
    ProviderError,
    ProviderTimeout,
)
from cancelflow.guard import ProviderThrottled
from cancelflow.logging import get_logger
from cancelflow.messaging import send_step
from cancelflow.retry import RetryPolicy
from worker import pool
from worker.app import app, settings
from worker.runtime import Runtime, get_runtime

log = get_logger(__name__)

StepCall = Callable[..., Coroutine[Any, Any, steps.Next]]


class Poison(Exception):
    """A message whose arguments are not what its task takes."""


def _runtime() -> Runtime:
    return get_runtime(settings)


def _parse(
    step: Step, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, tuple[str, ...]]:
    want = 2 if step is Step.CALLBACK else 1
    if kwargs or len(args) != want or not all(isinstance(a, str) for a in args):
        raise Poison(
            f"{step.value} takes {want} string argument(s), got args={args!r} kwargs={kwargs!r}"
        )
    if not JOB_ID_RE.match(args[0]):
        raise Poison(f"not a job id: {args[0]!r}")
    return args[0], tuple(args[1:])


# Redis (job store and broker) unreachable: not the job's fault, and nothing to record it in.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
    # This process's heartbeat is stale: it may not call providers until Redis is back.
    LeaseLost,
)


@dataclass(frozen=True)
class Delivery:
    """The parts of a step's message its run needs (Celery's request, as plain values)."""

    task_id: str
    task_name: str
    retries: int
    queue: str | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    # The API request that started the job's chain (``send_step``'s header), if any.
    request_id: str | None = None

    @classmethod
    def of(cls, task_name: str, request: Mapping[str, Any], args: Any, kwargs: Any) -> Delivery:
        delivery = request.get("delivery_info") or {}
        return cls(
            task_id=str(request.get("id")),
            task_name=task_name,
            retries=int(request.get("retries") or 0),
            queue=queue_of(delivery.get("routing_key")),
            args=tuple(args or ()),
            kwargs=dict(kwargs or {}),
            request_id=rid if isinstance(rid := request.get("request_id"), str) else None,
        )


@dataclass(frozen=True)
class Outcome:
    """What a step's run leaves for Celery to do: send the next step, retry, or requeue;
    ``dead_lettered``: the step ended in the dead-letter store, its task fails with it."""

    summary: str  # the task's result: short, Celery writes its repr into task events
    job_id: str = ""
    next: steps.Next | None = None
    retry_in_s: float | None = None
    cause: BaseException | None = None
    requeue: bool = False
    dead_lettered: JobDeadLettered | None = None
    # The API request that started the chain: the next step's message carries it on (Celery's
    # tracer has cleared the log context the step's run had bound by the time ``settle`` runs).
    request_id: str | None = None


class StepRequest(Request):  # type: ignore[misc]  # Celery is untyped
    """Celery's request of a step, with the task events Flower reads made true to the step.

    The only override of Celery's worker internals for monitoring (``Request.send_event``,
    Celery 5.x), so every adjustment of a step's events is here:

    - ``runtime``: the tracer times only the task's body, which settles an outcome in a
      millisecond; the step's work ran before it, on the loop (``worker.pool``). The runtime
      sent is from the pool's start of the step (``on_accepted``'s time, ``time_start``,
      which Celery keeps as an epoch time) to its end.
    - a success after retries clears the retried run's ``exception`` and ``traceback``:
      an event's fields replace the task's in Flower (``celery.events.state.Task.event``),
      and a success brings neither, so the last retry's error stayed next to it.
    """

    def send_event(self, type: str, **fields: Any) -> None:
        if type == "task-succeeded":
            started = self.time_start
            if started is not None:
                fields["runtime"] = time.time() - started
            if self.request_dict.get("retries"):
                fields.update(exception=None, traceback=None)
        super().send_event(type, **fields)


class StepTask(Task):  # type: ignore[misc]
    Request = StepRequest
    # A dead-lettered step is an expected failure: Celery logs it in one line, no traceback
    # (the dead letter has it).
    throws = (JobDeadLettered,)
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    # No Celery cap: the RetryPolicy (for callbacks, the horizon) decides when to stop.
    # retry(max_retries=None) means "the task's default", which Celery sets to 3.
    max_retries = None
    # Arguments are checked by the shell, so a malformed message is dead-lettered, not
    # failed by Celery's own arity check.
    typing = False
    step: Step  # set per task, by the decorator

    async def run_async(self, args: Any, kwargs: Any, request: Mapping[str, Any]) -> Outcome:
        """The step's whole work, on the runtime's loop: ``worker.pool`` awaits it there
        before Celery runs the task, whose body then only settles the outcome."""
        delivery = Delivery.of(self.name, request, args, kwargs)
        outcome = await execute(self.step, delivery)
        return replace(outcome, request_id=delivery.request_id)


def run_step(task: StepTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A step task's body: settle what ``run_async`` came to, running it first if no pool
    did (another pool than ``worker.pool``, or a task called eagerly)."""
    outcome = pool.prepared(task.request.id)
    if outcome is None:
        request = {
            "id": task.request.id,
            "retries": task.request.retries,
            "delivery_info": task.request.delivery_info,
            "request_id": getattr(task.request, "request_id", None),
        }
        outcome = _runtime().run(task.run_async(args, kwargs, request))
    return settle(task, outcome)


async def execute(step: Step, delivery: Delivery) -> Outcome:
    """Run one step; when Redis is unreachable mid-step, ask for the message to be requeued.

    Celery drops a failed acks_late message (it rejects it without requeue), so an error
    escaping here would lose the job. Steps are safe to run again (they resume from the job
    record), so the message is requeued; if even that fails, it stays unacknowledged in
    Redis and comes back after the visibility timeout.
    """
    started = time.perf_counter()
    try:
        return await _execute(step, delivery)
    except INFRASTRUCTURE_ERRORS as exc:
        log.error("step.redis_unreachable", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(1.0)  # no hot loop while Redis comes back
        return Outcome("requeued: redis unreachable", cause=exc, requeue=True)
    finally:
        # Every run, whatever its end.
        metrics.step_ran(step.value, time.perf_counter() - started)


async def _execute(step: Step, delivery: Delivery) -> Outcome:
    rt = _runtime()
    call = STEP_CALLS[step]
    structlog.contextvars.bind_contextvars(task_id=delivery.task_id, step=step.value)
    try:
        job_id, extra = _parse(step, delivery.args, delivery.kwargs)
    except Poison as exc:
        return await _dead_letter_poison(rt, delivery, exc)
    structlog.contextvars.bind_contextvars(job_id=job_id, request_id=delivery.request_id)
    try:
        # Past the soft limit the step is cancelled, with time left before the hard limit
        # (worker.pool) to record the retry.
        async with pool.soft_time_limit():
            nxt = await call(rt.deps, job_id, *extra, attempt=delivery.retries)
    except JobNotFound as exc:
        return await _dead_letter_poison(rt, delivery, exc)
    except SoftTimeLimitExceeded as exc:
        error = ProviderTimeout("step ran past its soft time limit", provider="")
        return await _retry_or_give_up(rt, step, job_id, error, exc, extra)
    except (ProviderError, CallbackRetryable) as exc:
        return await _retry_or_give_up(rt, step, job_id, exc, exc, extra)
    except steps.StepBusy as exc:
        delay = min(exc.retry_after + random.uniform(0, 0.5), rt.settings.limits().max_countdown_s)
        return Outcome(f"{job_id} busy", retry_in_s=delay, cause=exc)
    except steps.CallbackGiveUp as exc:
        dl_id = await steps.dead_letter_callback(
            rt.deps, job_id, extra[0], error=str(exc), traceback=traceback.format_exc()
        )
        dead = JobDeadLettered(dl_id, type(exc).__name__)
        return Outcome(f"{job_id} dead-lettered: callback", dead_lettered=dead)
    except INFRASTRUCTURE_ERRORS:
        raise
    except Exception as exc:  # any surprise goes to the dead-letter store
        log.exception("step.unexpected_error")
        return await _dead_letter_job(
            rt,
            job_id,
            step=step,
            error_type=type(exc).__name__,
            error=str(exc),
            traceback=traceback.format_exc(),
            payload={"args": list(delivery.args)},
        )
    return _then(job_id, nxt)


def _then(job_id: str, nxt: steps.Next, dead: JobDeadLettered | None = None) -> Outcome:
    if nxt.step is None:
        return Outcome(f"{job_id} done", dead_lettered=dead)
    return Outcome(f"{job_id} next: {nxt.step.value}", job_id=job_id, next=nxt, dead_lettered=dead)


async def _dead_letter_job(
    rt: Runtime, job_id: str, *, step: Step, error_type: str, **details: Any
) -> Outcome:
    """``steps.dead_letter``, and what the task does then: send the result callback and fail
    with the dead letter's id (no failure if the job had moved on and was not dead-lettered)."""
    nxt = await steps.dead_letter(rt.deps, job_id, step=step, error_type=error_type, **details)
    dead = JobDeadLettered(nxt.dead_letter, error_type) if nxt.dead_letter else None
    return _then(job_id, nxt, dead)


def settle(task: Task, outcome: Outcome) -> str:
    """Do with Celery what the step's run asked: send its next step, retry it, requeue it;
    a step that dead-lettered fails, after its next step (the result callback) was sent.

    A failure is acknowledged: acks_late without ``acks_on_failure_or_timeout``, Celery
    rejects the message without requeue (``Request.on_failure``), which kombu's Redis QoS
    takes as removing it from the unacknowledged hash, once; nothing delivers it again."""
    if outcome.requeue:
        raise Reject(outcome.summary, requeue=True) from outcome.cause
    if outcome.retry_in_s is not None:
        raise task.retry(countdown=outcome.retry_in_s, exc=outcome.cause, max_retries=None)
    nxt = outcome.next
    if nxt is not None:
        assert nxt.step is not None
        try:
            with structlog.contextvars.bound_contextvars(request_id=outcome.request_id):
                send_step(app, nxt.step, outcome.job_id, nxt.provider, *nxt.args)
        except INFRASTRUCTURE_ERRORS as exc:
            # Celery's tracer cleared the log context the step's run had bound.
            log.error(
                "step.redis_unreachable",
                job_id=outcome.job_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            raise Reject(f"redis unreachable: {exc}", requeue=True) from exc
    if outcome.dead_lettered is not None:
        raise outcome.dead_lettered
    return outcome.summary


async def _retry_or_give_up(
    rt: Runtime,
    step: Step,
    job_id: str,
    error: Exception,
    cause: BaseException,
    extra: tuple[str, ...],
) -> Outcome:
    """Retry a transient failure with backoff, or end the job as the error's type says."""
    retryable = getattr(error, "retryable", isinstance(error, CallbackRetryable))
    job = await rt.deps.store.get(job_id)
    # Attempts are the failures recorded for this step (not Celery's retry count, which
    # also counts waits on our own limits and knows nothing of a replay).
    attempt = steps.attempts(job, step)
    details = (
        error.as_dict()
        if isinstance(error, ProviderError)
        else {"type": type(error).__name__, "message": str(error)}
    )
    limits = rt.settings.limits()
    if isinstance(error, CircuitOpen | ProviderThrottled):
        # Our own protection of the provider: the job waits, no attempt is spent.
        delay = min(limits.max_countdown_s, (error.retry_after or 1.0) + random.uniform(0, 1))
        await steps.note_wait(rt.deps, job_id, step=step, reason=details, delay_s=delay)
        log.warning("step.waiting", reason=details["type"], delay_s=round(delay, 3))
        metrics.retry_scheduled(job.provider, details["type"])
        return Outcome(f"{job_id} waiting", retry_in_s=delay, cause=cause)
    if step is Step.CALLBACK:
        policy = _callback_policy(rt)
    else:
        conf = rt.settings.provider(job.provider)
        policy = RetryPolicy(
            base_s=conf.retry_base_s,
            max_attempts=conf.max_attempts,
            max_age_s=conf.max_age_s,
            cap_s=limits.max_countdown_s,
        )
    if retryable:
        age = (utcnow() - datetime.fromisoformat(job.created_at)).total_seconds()
        why_not = policy.exhausted(attempt, age_s=age) if step is not Step.CALLBACK else None
        if why_not is None:
            delay = policy.delay(attempt, retry_after=getattr(error, "retry_after", None))
            await steps.note_retry(
                rt.deps, job_id, step=step, attempt=attempt, error=details, delay_s=delay
            )
            log.warning(
                "step.retry_scheduled", attempt=attempt, delay_s=round(delay, 3), error=details
            )
            metrics.retry_scheduled(job.provider, details["type"])
            return Outcome(f"{job_id} retrying", retry_in_s=delay, cause=cause)
        reason = f"{why_not}; last error: {details.get('message')}"
        return await _dead_letter_job(
            rt,
            job_id,
            step=step,
            error_type=details["type"],
            error=reason,
            traceback=_format(cause),
            payload={"args": [job_id, *extra]},
        )
    elif isinstance(error, ProviderAuthError):
        # Credentials are an operator's to fix; the job can be replayed after.
        return await _dead_letter_job(
            rt,
            job_id,
            step=step,
            error_type=details["type"],
            error=str(error),
            traceback=_format(cause),
            payload={"args": [job_id, *extra]},
        )
    else:
        assert isinstance(error, ProviderError)
        nxt = await steps.fail(rt.deps, job_id, error, step=step, attempt=attempt)
    return _then(job_id, nxt)


def _callback_policy(rt: Runtime) -> RetryPolicy:
    # The horizon (not a count) ends callback retries: see steps.callback.
    return RetryPolicy(
        base_s=2.0,
        max_attempts=10**6,
        max_age_s=float("inf"),
        cap_s=min(3600.0, rt.settings.limits().max_countdown_s),
    )


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


async def _dead_letter_poison(rt: Runtime, delivery: Delivery, exc: Exception) -> Outcome:
    dl = DeadLetter(
        kind="poison",
        step=delivery.task_name,
        queue=delivery.queue,
        error_type=type(exc).__name__,
        error=str(exc),
        payload={
            "task": delivery.task_name,
            "args": _safe(list(delivery.args)),
            "kwargs": _safe(delivery.kwargs),
        },
        created_at=isoformat(utcnow()),
    )
    await rt.deps.dead_letters.add(dl)
    log.error(
        "message.dead_lettered", task=delivery.task_name, error=str(exc), dead_letter_id=dl.id
    )
    return Outcome(
        "dead-lettered: poison", dead_lettered=JobDeadLettered(dl.id, type(exc).__name__)
    )


def _safe(value: Any) -> Any:
    try:
        import json

        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


# --- the chain -------------------------------------------------------------------------------


async def _confirm(deps: steps.Deps, job_id: str, *, attempt: int) -> steps.Next:
    lease = deps.settings.limits().task_time_limit_s
    return await steps.confirm(deps, job_id, attempt=attempt, lease_s=lease)


STEP_CALLS: dict[Step, StepCall] = {
    Step.ELIGIBILITY: steps.eligibility,
    Step.RETENTION_OFFER: steps.retention_offer,
    Step.CONFIRM: _confirm,
    Step.CALLBACK: steps.callback,
}


# Celery is untyped: its task decorator hides each task's signature from mypy. Options it
# does not know (step) become attributes of the task's class.
@app.task(name="cancelflow.eligibility", base=StepTask, bind=True, step=Step.ELIGIBILITY)  # type: ignore[untyped-decorator]
def eligibility(self: StepTask, *args: Any, **kwargs: Any) -> str:
    """Ask the provider whether the subscription can be cancelled."""
    return run_step(self, args, kwargs)


@app.task(name="cancelflow.retention_offer", base=StepTask, bind=True, step=Step.RETENTION_OFFER)  # type: ignore[untyped-decorator]
def retention_offer(self: StepTask, *args: Any, **kwargs: Any) -> str:
    """Park the job on the provider's retention offer until the customer decides."""
    return run_step(self, args, kwargs)


@app.task(name="cancelflow.confirm", base=StepTask, bind=True, step=Step.CONFIRM)  # type: ignore[untyped-decorator]
def confirm(self: StepTask, *args: Any, **kwargs: Any) -> str:
    """Make the provider's cancel call."""
    return run_step(self, args, kwargs)


@app.task(name="cancelflow.callback", base=StepTask, bind=True, step=Step.CALLBACK)  # type: ignore[untyped-decorator]
def callback(self: StepTask, *args: Any, **kwargs: Any) -> str:
    """Deliver the job's signed result callback."""
    return run_step(self, args, kwargs)


@app.task(name="cancelflow.expire_decisions", bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
def expire_decisions(self: Task) -> dict[str, int]:
    """Apply each provider's default action to parked jobs past their decision deadline."""
    rt = _runtime()
    due = pool.run_limited(rt, steps.due_decisions(rt.deps, utcnow()))
    applied = 0
    for job_id in due:
        try:
            nxt = pool.run_limited(rt, steps.expire_decision(rt.deps, job_id))
        except steps.DecisionConflict:
            continue
        applied += 1
        if nxt.step is not None:
            send_step(app, nxt.step, job_id, nxt.provider, *nxt.args)
    return {"due": len(due), "applied": applied}


@app.task(name="cancelflow.dispatch_stragglers", bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
def dispatch_stragglers(self: Task) -> dict[str, int]:
    """Send the first step of jobs whose producer died between recording and sending them."""
    rt = _runtime()
    found = pool.run_limited(rt, steps.stragglers(rt.deps, older_than_s=STRAGGLER_AGE_S))
    for nxt in found:
        job_id = nxt.args[0]
        assert nxt.step is not None
        send_step(app, nxt.step, job_id, nxt.provider)
        pool.run_limited(rt, rt.deps.store.mark_dispatched(job_id))
        log.warning("job.first_step.resent", job_id=job_id)
    return {"resent": len(found)}


# A producer sends the first step within milliseconds of recording the job; a minute
# without it means the producer died in between.
STRAGGLER_AGE_S = 60.0


@app.task(name="cancelflow.resume_stalled", bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
def resume_stalled(self: Task) -> dict[str, int]:
    """Re-send the pending step of jobs that stopped moving mid-chain."""
    rt = _runtime()
    limits = rt.settings.limits()
    found = pool.run_limited(
        rt,
        steps.resume_stalled(
            rt.deps,
            quiet_for_s=rt.settings.worker.stalled_after_s,
            oldest_waiting=oldest_waiting(app),
            # Longer than any legitimate silence: a countdown, a run, and a redelivery.
            give_up_waiting_s=(
                limits.max_countdown_s + limits.task_time_limit_s + limits.visibility_timeout_s
            ),
        ),
    )
    for nxt in found:
        assert nxt.step is not None
        send_step(app, nxt.step, nxt.args[0], nxt.provider, *nxt.args[1:])
    return {"resent": len(found)}


def oldest_waiting(celery_app: Any) -> dict[str, float]:
    """Per queue, when its oldest waiting message was sent (``send_step``'s ``sent_at``
    header): ``inf`` when the queue is empty, 0 when unknown (not ours, or unreadable)."""
    names = [q.name for q in celery_app.conf.task_queues]
    if broker_kind(celery_app.conf.broker_url) == "amqp":
        return broker_queues.oldest_waiting(celery_app.conf.broker_url, names)
    with celery_app.connection_for_read() as conn:
        client = conn.default_channel.client
        with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.lindex(name, -1)  # kombu pushes on the left and pops on the right
            heads = pipe.execute()
    return {name: _sent_at(head) for name, head in zip(names, heads, strict=True)}


def _sent_at(head: bytes | None) -> float:
    return float("inf") if head is None else metrics.sent_at_of(head)
