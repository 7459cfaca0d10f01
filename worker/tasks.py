"""The task shells. Each names its step; ``execute`` (a coroutine, run on the runtime's loop by
``worker.pool``) turns the message into ids, runs the step and, when it fails, carries out what
``cancelflow.retry.decide`` decides for the error (recording the retry, the wait or the dead
letter on the job); the task's body then carries that ``StepResult`` out with Celery
(``carry_out``): sends the next step, or retries, or gives the message back.

Importing this module reads no environment: ``register`` adds the tasks to an app built by
``worker.app.create_app``, and each task finds its Settings on its app.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any

import kombu.exceptions
import redis.exceptions
import structlog
from celery import Celery, Task
from celery.exceptions import Reject, SoftTimeLimitExceeded

from brokers import queues as broker_queues
from brokers.routing import queue_of
from cancelflow import chain, decisions, delivery, metrics, retry, sweeps, tracing
from cancelflow.broker_urls import broker_kind
from cancelflow.callbacks import CallbackRetryable
from cancelflow.contract import JOB_ID_RE, Step, isoformat, utcnow
from cancelflow.dead_letters import DeadLetter
from cancelflow.errors import (
    CallbackGiveUp,
    DecisionConflict,
    JobDeadLettered,
    JobNotFound,
    LeaseLost,
    ProviderError,
    ProviderTimeout,
)
from cancelflow.lifecycle import Next
from cancelflow.logging import get_logger
from cancelflow.wiring import Deps
from messaging.config import create_celery
from messaging.dispatch import (
    confirmed_publisher,
    dispatch,
    step_message_for,
    step_message_sent_by,
)
from messaging.patches import HubEventsRequest, StepMessage, StepRequest
from worker import pool
from worker.app import settings_of
from worker.runtime import Runtime, get_runtime

log = get_logger(__name__)

StepCall = Callable[..., Coroutine[Any, Any, Next]]


class Poison(Exception):
    """A message whose arguments are not what its task takes."""


def runtime_of(app: Celery) -> Runtime:
    """The process's runtime, built from the Settings of ``app`` on first use."""
    return get_runtime(settings_of(app))


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
    # The API request that started the job's chain (``dispatch``'s header), if any.
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
class StepResult:
    """What a step's run leaves for Celery to do (``carry_out``): send the next step, retry,
    or requeue; ``dead_lettered``: the step ended in the dead-letter store, its task fails
    with it. (How a job ended is its ``contract.Outcome``, in the job store.)"""

    summary: str  # the task's result: short, Celery writes its repr into task events
    next: Next | None = None
    retry_in_s: float | None = None
    cause: BaseException | None = None
    requeue: bool = False
    dead_lettered: JobDeadLettered | None = None
    # The API request that started the chain: the next step's message carries it on (Celery's
    # tracer has cleared the log context the step's run had bound by the time ``carry_out``
    # runs).
    request_id: str | None = None


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

    async def run_async(self, args: Any, kwargs: Any, request: Mapping[str, Any]) -> StepResult:
        """The step's whole work, on the runtime's loop: ``worker.pool`` awaits it there
        before Celery runs the task, whose body then only carries the result out. The move
        that makes the next step due pushes its message too (``chain.OUTBOX``), when the
        broker is the job store's Redis; on RabbitMQ the next step is sent from here, and
        confirmed, before the tracer runs (``_send_confirmed``)."""
        message = Delivery.of(self.name, request, args, kwargs)
        token = chain.OUTBOX.set(outbox(self.app, request))
        try:
            result = await execute(runtime_of(self.app), self.step, message)
        finally:
            chain.OUTBOX.reset(token)
        if tracing.enabled:
            tracing.set_attributes(
                {
                    tracing.RESULT: result.summary,
                    "cancelflow.retry_in_s": result.retry_in_s,
                    "cancelflow.requeued": result.requeue or None,
                }
            )
        result = replace(result, request_id=message.request_id)
        if _confirms(self.app) and result.next is not None and result.next.sent is None:
            result = await _send_confirmed(self.app, request, result)
        return result


def _parent_of(request: Mapping[str, Any]) -> tuple[str, str]:
    """The (parent id, root id) ``send_task`` in the task of ``request`` would give a step."""
    parent_id = str(request.get("id"))
    return parent_id, str(request.get("root_id") or parent_id)


# The marker of a next step RabbitMQ has confirmed (``Next.sent``): nothing is left to do.
CONFIRMED = "confirmed"
_confirming: dict[int, bool] = {}


def _confirms(app: Celery) -> bool:
    """Whether ``app``'s broker is RabbitMQ: its steps send the next from the publisher."""
    key = id(app)
    if key not in _confirming:
        _confirming[key] = broker_kind(app.conf.broker_url) == "amqp"
    return _confirming[key]


async def _send_confirmed(
    app: Celery, request: Mapping[str, Any], result: StepResult
) -> StepResult:
    """On RabbitMQ, the next step sent from the loop by the process's ``ConfirmedPublisher``
    (its confirm waited for with the other steps' sent meanwhile), before the current
    message is acknowledged, as ``dispatch`` in the tracer would (which stops the loop and
    every step in flight on it until RabbitMQ confirms). Not confirmed, the tracer's
    ``dispatch`` sends it as before (and requeues the message if it cannot)."""
    nxt = result.next
    assert nxt is not None
    parent = _parent_of(request)
    try:
        with structlog.contextvars.bound_contextvars(request_id=result.request_id):
            await confirmed_publisher(app).send(nxt, parent=parent)
    except kombu.exceptions.OperationalError as exc:
        log.warning("step.next.unconfirmed", job_id=nxt.job_id, error=str(exc))
        return result
    return replace(result, next=replace(nxt, sent=CONFIRMED))


# Per worker app: a producer's Celery app on the same settings (no task registered in it, so
# ``step_message_for`` builds what the API's ``send_task`` writes for a first step), or None
# when the broker is not the job store's Redis.
_message_apps: dict[int, Celery | None] = {}


def _message_app(app: Celery) -> Celery | None:
    key = id(app)
    if key not in _message_apps:
        settings = settings_of(app)
        messages = create_celery(settings, name="cancelflow-steps")
        _message_apps[key] = messages if messages.conf.broker_url == settings.redis_url else None
    return _message_apps[key]


def outbox(app: Celery, request: Mapping[str, Any]) -> Callable[[Next], StepMessage | None] | None:
    """How a step run from ``request`` builds its next step's message (``chain.OUTBOX``): the
    message ``send_task`` in the task would send, its parent and root ids the task's; None
    when the broker is not the job store's Redis (the tracer's ``dispatch`` sends it)."""
    messages = _message_app(app)
    if messages is None:
        return None
    parent = _parent_of(request)

    def build(nxt: Next) -> StepMessage | None:
        return step_message_for(messages, nxt, parent=parent)

    return build


def run_step(task: StepTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A step task's body: carry out what ``run_async`` came to, running it first if no pool
    did (another pool than ``worker.pool``, or a task called eagerly)."""
    result = pool.prepared(task.request.id)
    if result is None:
        request = {
            "id": task.request.id,
            "retries": task.request.retries,
            "delivery_info": task.request.delivery_info,
            "request_id": getattr(task.request, "request_id", None),
        }
        result = runtime_of(task.app).run(task.run_async(args, kwargs, request))
    return carry_out(task, result)


async def execute(rt: Runtime, step: Step, delivery: Delivery) -> StepResult:
    """Run one step; when Redis is unreachable mid-step, ask for the message to be requeued.

    Celery drops a failed acks_late message (it rejects it without requeue), so an error
    escaping here would lose the job. Steps are safe to run again (they resume from the job
    record), so the message is requeued; if even that fails, it stays unacknowledged in
    Redis and comes back after the visibility timeout.
    """
    started = time.perf_counter()
    try:
        return await _execute(rt, step, delivery)
    except INFRASTRUCTURE_ERRORS as exc:
        log.error("step.redis_unreachable", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(1.0)  # no hot loop while Redis comes back
        return StepResult("requeued: redis unreachable", cause=exc, requeue=True)
    finally:
        # Every run, whatever its end.
        metrics.step_ran(step.value, time.perf_counter() - started)


async def _execute(rt: Runtime, step: Step, delivery: Delivery) -> StepResult:
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
        return await after_failure(rt.deps, step, job_id, extra, error, exc)
    except INFRASTRUCTURE_ERRORS:
        raise
    except Exception as exc:  # what happens next is the error's to decide (retry.decide)
        return await after_failure(rt.deps, step, job_id, extra, exc, exc)
    return _then(nxt)


def _then(nxt: Next, dead: JobDeadLettered | None = None) -> StepResult:
    if nxt.step is None:
        return StepResult(f"{nxt.job_id} done", dead_lettered=dead)
    return StepResult(f"{nxt.job_id} next: {nxt.step.value}", next=nxt, dead_lettered=dead)


def carry_out(task: Task, result: StepResult) -> str:
    """Do with Celery what the step's run asked: send its next step, retry it, requeue it;
    a step that dead-lettered fails, after its next step (the result callback) was sent.

    A failure is acknowledged: acks_late without ``acks_on_failure_or_timeout``, Celery
    rejects the message without requeue (``Request.on_failure``), which kombu's Redis QoS
    takes as removing it from the unacknowledged hash, once; nothing delivers it again."""
    if result.requeue:
        raise Reject(result.summary, requeue=True) from result.cause
    if result.retry_in_s is not None:
        raise task.retry(countdown=result.retry_in_s, exc=result.cause, max_retries=None)
    nxt = result.next
    if nxt is not None:
        try:
            if nxt.sent is CONFIRMED:
                pass  # sent, and confirmed by RabbitMQ (``_send_confirmed``)
            elif nxt.sent is not None:
                # Pushed by the step's own move: Celery's after-publish signals and the
                # task-sent event are what is left of the send.
                step_message_sent_by(task.app, nxt.sent)
            else:
                with structlog.contextvars.bound_contextvars(request_id=result.request_id):
                    dispatch(task.app, nxt)
        except INFRASTRUCTURE_ERRORS as exc:
            # Celery's tracer cleared the log context the step's run had bound.
            log.error(
                "step.redis_unreachable",
                job_id=nxt.job_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            raise Reject(f"redis unreachable: {exc}", requeue=True) from exc
    if result.dead_lettered is not None:
        raise result.dead_lettered
    return result.summary


async def after_failure(
    deps: Deps,
    step: Step,
    job_id: str,
    extra: tuple[str, ...],
    error: Exception,
    cause: BaseException,
) -> StepResult:
    """Carry out on the job what ``retry.decide`` decides for ``error``: note the wait or
    the retry, or dead-letter the job (or callback target), or fail the job."""
    settings = deps.settings
    provider, attempt, age_s = "", 0, 0.0
    policy = retry.waits_only(settings)
    if retry.needs_history(error):
        job = await deps.store.get(job_id)
        provider, attempt = job.provider, retry.attempts(job, step)
        policy = retry.step_policy(settings, step, job.provider)
        age_s = (
            error.window_age_s
            if isinstance(error, CallbackRetryable)
            else retry.age_s(job, utcnow())
        )
    action = retry.decide(error, step=step, attempt=attempt, age_s=age_s, policy=policy)
    details = (
        error.as_dict()
        if isinstance(error, ProviderError)
        else {"type": type(error).__name__, "message": str(error)}
    )
    if isinstance(action, (retry.Wait, retry.Retry)):
        _drop_tracebacks(cause)
    if isinstance(action, retry.Wait):
        if not action.recorded:  # another delivery holds the step's lease
            return StepResult(f"{job_id} busy", retry_in_s=action.delay_s, cause=cause)
        await chain.note_wait(deps, job_id, step=step, reason=details, delay_s=action.delay_s)
        log.warning("step.waiting", reason=details["type"], delay_s=round(action.delay_s, 3))
        metrics.retry_scheduled(provider, details["type"])
        return StepResult(f"{job_id} waiting", retry_in_s=action.delay_s, cause=cause)
    if isinstance(action, retry.Retry):
        await chain.note_retry(
            deps, job_id, step=step, attempt=attempt, error=details, delay_s=action.delay_s
        )
        log.warning(
            "step.retry_scheduled", attempt=attempt, delay_s=round(action.delay_s, 3), error=details
        )
        metrics.retry_scheduled(provider, details["type"])
        return StepResult(f"{job_id} retrying", retry_in_s=action.delay_s, cause=cause)
    if isinstance(action, retry.Fail):
        assert isinstance(error, ProviderError)
        return _then(await chain.fail(deps, job_id, error, step=step, attempt=attempt))
    if isinstance(error, CallbackGiveUp):
        dl_id = await delivery.dead_letter_callback(
            deps, job_id, extra[0], error=action.reason, traceback=_format(cause)
        )
        return StepResult(
            f"{job_id} dead-lettered: callback",
            dead_lettered=JobDeadLettered(dl_id, action.error_type),
        )
    if not retry.needs_history(error):
        log.exception("step.unexpected_error")
    nxt = await chain.dead_letter(
        deps,
        job_id,
        step=step,
        error_type=action.error_type,
        error=action.reason,
        traceback=_format(cause),
        payload={"args": [job_id, *extra]},
    )
    dead_lettered = JobDeadLettered(nxt.dead_letter, action.error_type) if nxt.dead_letter else None
    return _then(nxt, dead_lettered)


def _drop_tracebacks(exc: BaseException) -> None:
    """Let go of the frames of an error a step only waits or retries on: Celery keeps the
    error (its ``Retry``'s ``exc``, shown as a repr) until the retried message runs, and its
    traceback kept every local of the failed step (the job record, the HTTP exchange)
    alive with it, a few hundred KB a retry waiting its countdown."""
    seen: set[int] = set()
    found: BaseException | None = exc
    while found is not None and id(found) not in seen:
        seen.add(id(found))
        found.__traceback__ = None
        found = found.__cause__ or found.__context__


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


async def _dead_letter_poison(rt: Runtime, delivery: Delivery, exc: Exception) -> StepResult:
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
    return StepResult(
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


async def _confirm(deps: Deps, job_id: str, *, attempt: int) -> Next:
    lease = deps.settings.limits().task_time_limit_s
    return await chain.confirm(deps, job_id, attempt=attempt, lease_s=lease)


STEP_CALLS: dict[Step, StepCall] = {
    Step.ELIGIBILITY: chain.eligibility,
    Step.RETENTION_OFFER: chain.retention_offer,
    Step.CONFIRM: _confirm,
    Step.CALLBACK: delivery.callback,
}


def eligibility(self: StepTask, *args: Any, **kwargs: Any) -> str:
    """Ask the provider whether the subscription can be cancelled."""
    return run_step(self, args, kwargs)


def retention_offer(self: StepTask, *args: Any, **kwargs: Any) -> str:
    """Park the job on the provider's retention offer until the customer decides."""
    return run_step(self, args, kwargs)


def confirm(self: StepTask, *args: Any, **kwargs: Any) -> str:
    """Make the provider's cancel call."""
    return run_step(self, args, kwargs)


def callback(self: StepTask, *args: Any, **kwargs: Any) -> str:
    """Deliver the job's signed result callback."""
    return run_step(self, args, kwargs)


def expire_decisions(self: Task) -> dict[str, int]:
    """Apply each provider's default action to parked jobs past their decision deadline."""
    rt = runtime_of(self.app)
    due = pool.run_limited(rt, decisions.due_decisions(rt.deps, utcnow()))
    applied = 0
    for job_id in due:
        try:
            nxt = pool.run_limited(rt, decisions.expire_decision(rt.deps, job_id))
        except DecisionConflict:
            continue
        applied += 1
        dispatch(self.app, nxt)
    return {"due": len(due), "applied": applied}


def dispatch_stragglers(self: Task) -> dict[str, int]:
    """Send the first step of jobs whose producer died between recording and sending them."""
    rt = runtime_of(self.app)
    found = pool.run_limited(rt, sweeps.stragglers(rt.deps, older_than_s=STRAGGLER_AGE_S))
    for nxt in found:
        dispatch(self.app, nxt)
        pool.run_limited(rt, rt.deps.store.mark_dispatched(nxt.job_id))
        log.warning("job.first_step.resent", job_id=nxt.job_id)
    return {"resent": len(found)}


# A producer sends the first step within milliseconds of recording the job; a minute
# without it means the producer died in between.
STRAGGLER_AGE_S = 60.0


def resume_stalled(self: Task) -> dict[str, int]:
    """Re-send the pending step of jobs that stopped moving mid-chain."""
    rt = runtime_of(self.app)
    limits = rt.settings.limits()
    found = pool.run_limited(
        rt,
        sweeps.resume_stalled(
            rt.deps,
            quiet_for_s=rt.settings.worker.stalled_after_s,
            oldest_waiting=oldest_waiting(self.app),
            # Longer than any legitimate silence: a countdown, a run, and a redelivery.
            give_up_waiting_s=(
                limits.max_countdown_s + limits.task_time_limit_s + limits.visibility_timeout_s
            ),
            steps_run_at_most_s=limits.task_time_limit_s,
        ),
    )
    for nxt in found:
        dispatch(self.app, nxt)
    return {"resent": len(found)}


def oldest_waiting(celery_app: Any) -> dict[str, float]:
    """Per queue, when its oldest waiting message was sent (``dispatch``'s ``sent_at``
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


# The step tasks: (name, step, body). Names and queues are the contract with producers and
# with the messages already queued: they never change.
STEP_TASK_BODIES: tuple[tuple[str, Step, Callable[..., str]], ...] = (
    ("cancelflow.eligibility", Step.ELIGIBILITY, eligibility),
    ("cancelflow.retention_offer", Step.RETENTION_OFFER, retention_offer),
    ("cancelflow.confirm", Step.CONFIRM, confirm),
    ("cancelflow.callback", Step.CALLBACK, callback),
)
MAINTENANCE_TASK_BODIES: tuple[tuple[str, Callable[..., dict[str, int]]], ...] = (
    ("cancelflow.expire_decisions", expire_decisions),
    ("cancelflow.dispatch_stragglers", dispatch_stragglers),
    ("cancelflow.resume_stalled", resume_stalled),
)


def register(app: Celery) -> None:
    """Add every task to ``app`` (``worker.app.create_app`` does). Options Celery does not
    know (``step``) become attributes of the task's class."""
    for name, step, body in STEP_TASK_BODIES:
        app.task(name=name, base=StepTask, bind=True, step=step)(body)
    for name, sweep in MAINTENANCE_TASK_BODIES:
        # Their task events are published by the hub too (messaging.patches).
        app.task(name=name, bind=True, ignore_result=True, Request=HubEventsRequest)(sweep)
