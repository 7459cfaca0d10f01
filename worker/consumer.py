"""A Celery consumer that dead-letters poison messages instead of dropping them.

Celery's own consumer logs and discards a message it cannot decode, whose task it does not
know, or that is not a valid task message. Here each such message is recorded in the
dead-letter store (with its body and headers) and parked byte for byte on the kombu
``dead_letters`` queue (on Redis in the same transaction as the entry, which records it, so
purging the entry removes that copy: ``messaging.patches.parked_item``), then acknowledged
so the worker keeps consuming. On RabbitMQ, the
message is rejected instead, and its queue's dead-letter exchange parks it
(``brokers.amqp``).

Celery only recognises some invalid messages: a body that decodes to anything but
``[args, kwargs, embed]`` (``{"a": 1}``, ``[1]``, ``"s"``, ``null``), a missing ``id``, a
``timelimit`` that is not a pair, a task name that is a list, raise out of its strategy
(``celery.worker.strategy.default`` and the ``Request`` it builds) and stop the worker
("Unrecoverable error"), with the message back on the queue for the next worker to die on.
Each task's strategy is wrapped here by ``task_message_problem``, a check of what the
strategy, the ``Request`` and the pool take from a message, before Celery reads it: a
message that fails it is an invalid task message (``on_invalid_task``). The envelope itself
(properties, headers as kombu needs them) is checked earlier, by
``messaging.patches.WorkerChannel``.

On RabbitMQ a quorum queue counts the deliveries of a message never acknowledged (a worker
killed by it, each time) in its ``x-delivery-count`` header, and past the queue's delivery
limit (``CANCELFLOW_BROKER_DELIVERY_LIMIT``) dead-letters it: parked on ``dead_letters`` by
the dead-letter exchange, with no entry in the dead-letter store, and its job left
mid-chain for the watchdog to send again, and again. So the delivery RabbitMQ allows last
(``x-delivery-count`` at the limit) is not run: a step of a job is dead-lettered with its
job (``cancelflow.chain.dead_letter``: the job's status, its entry, a replay resumes it),
any other message gets a ``poison`` entry, then it is rejected without requeue and the
dead-letter exchange parks it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.utils.time import maybe_iso8601, maybe_make_aware, timezone
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.asynchronous.timer import to_timestamp
from kombu.messaging import Producer

from brokers.routing import queue_of
from cancelflow import chain
from cancelflow.contract import DEAD_LETTER_QUEUE, STEP_TASKS, Step
from cancelflow.dead_letters import DeadLetter, poison_payload
from cancelflow.errors import JobNotFound
from cancelflow.lifecycle import resume
from cancelflow.logging import get_logger
from messaging.config import DEAD_LETTER_EXCHANGE
from messaging.dispatch import dispatch
from messaging.patches import TaskEventsEvery, parked_item

log = get_logger(__name__)

# The error type of a message delivered past the queue's delivery limit.
DELIVERY_LIMIT_EXCEEDED = "DeliveryLimitExceeded"


class Strategies(dict[Any, Any]):
    """Celery looks a message's task name up here (``strategies[name]``): a name that is not
    a string (a list, a dict: unhashable) is an unknown task, not a TypeError out of the
    consumer."""

    def __getitem__(self, name: Any) -> Any:
        if not isinstance(name, str):
            raise KeyError(name)
        return super().__getitem__(name)


def task_message_problem(message: Any, task: Any) -> str | None:
    """Why ``message`` cannot be a request of ``task`` (None if it can): what Celery's
    strategy and ``Request`` and the worker's pool unpack from it, checked beforehand.

    Only protocol 2 is taken (Celery's since 4.0, what every producer and beat send).
    Reading ``message.payload`` decodes the body once, as Celery's strategy does right
    after (kombu caches it); a ``DecodeError`` or ``ContentDisallowed`` raised here goes to
    the consumer's own handlers, as from the strategy.
    """
    headers = message.headers
    if not isinstance(headers, dict) or not isinstance(headers.get("task"), str):
        return "not a protocol 2 task message (no task header)"
    if not isinstance(headers.get("id"), str):
        return f"task id is not a string: {headers.get('id')!r}"
    if not isinstance(headers.get("shadow"), str | None):
        return f"shadow is not a string: {headers['shadow']!r}"
    timelimit = headers.get("timelimit")
    if timelimit and not (
        isinstance(timelimit, list | tuple)
        and len(timelimit) == 2
        and all(_limit(t) for t in timelimit)
    ):
        return f"timelimit is not a pair of (soft, hard) seconds: {timelimit!r}"
    retries = headers.get("retries")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)):
        return f"retries is not an integer: {retries!r}"
    eta = headers.get("eta")
    if eta is not None:
        try:
            # As the strategy turns it into a timer's timestamp (it rejects the message,
            # without a dead letter, if that fails).
            to_timestamp(timezone.to_system(maybe_make_aware(maybe_iso8601(eta))))  # type: ignore[no-untyped-call]
        except (AttributeError, TypeError, ValueError, OverflowError) as exc:
            return f"invalid ETA value {eta!r}: {exc}"
    payload = message.payload
    if not (isinstance(payload, list | tuple) and len(payload) == 3):
        return f"body is not [args, kwargs, embed]: {_short(payload)}"
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        return f"args is not a list: {_short(args)}"
    if not isinstance(kwargs, dict):
        return f"kwargs is not an object: {_short(kwargs)}"
    if not isinstance(embed, dict | None):
        return f"embed is not an object: {_short(embed)}"
    check_arguments = getattr(task, "__header__", None)
    if getattr(task, "typing", False) and check_arguments is not None:
        # What Celery checks when sending (Task.apply_async); a worker would only find out
        # in the task, as a failure that drops the message.
        try:
            check_arguments(*args, **kwargs)
        except TypeError as exc:
            return f"arguments do not fit {task.name}: {exc}"
    return None


def _limit(value: Any) -> bool:
    return value is None or (
        isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def deliveries(message: Any) -> int:
    """How many times the broker delivered ``message`` before (a quorum queue's
    ``x-delivery-count``; 0 elsewhere)."""
    count = (getattr(message, "headers", None) or {}).get("x-delivery-count")
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def _checked(
    strategy: Callable[..., Any],
    task: Any,
    past_limit: Callable[[Any, Any], bool] | None = None,
) -> Callable[..., Any]:
    """``strategy``, after the message's checks: ``past_limit`` (True: it took the message)
    and ``task_message_problem``."""

    def checked_strategy(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        if past_limit is not None and past_limit(message, task):
            return None
        problem = task_message_problem(message, task)
        if problem is not None:
            raise InvalidTaskError(problem)  # the consumer calls on_invalid_task
        return strategy(message, body, *args, **kwargs)

    return checked_strategy


class Consumer(TaskEventsEvery, CeleryConsumer):  # type: ignore[misc]
    Strategies = Strategies

    def shutdown(self) -> None:
        # The task events still waiting for their batch (messaging.patches.TaskEventsEvery).
        try:
            self.flush_task_events()
        except Exception as exc:  # monitoring only: the shutdown goes on
            log.warning("events.task.dropped", error=type(exc).__name__)
        super().shutdown()

    def update_strategies(self) -> None:
        from worker.app import settings_of

        super().update_strategies()
        # Only RabbitMQ's quorum queues count deliveries (see the module).
        amqp = settings_of(self.app).broker_kind() == "amqp"
        past_limit = self._past_delivery_limit if amqp else None
        for name, task in self.app.tasks.items():
            self.strategies[name] = _checked(self.strategies[name], task, past_limit)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._dead_letter(message, "DecodeError", f"message body cannot be decoded: {exc}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, "UnknownMessage", "not a Celery task message")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task")
        self._dead_letter(message, "UnknownTask", f"no task named {name!r}: {exc}")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._dead_letter(message, type(exc).__name__, f"invalid task message: {exc}")

    def _dead_letter(self, message: Any, error_type: str, error: str) -> None:
        from worker.app import settings_of
        from worker.runtime import get_runtime

        delivery = getattr(message, "delivery_info", None) or {}
        queue = queue_of(delivery.get("routing_key"))
        raw = getattr(message, "body", None)
        dl = DeadLetter(
            kind="poison",
            queue=queue,
            error_type=error_type,
            error=error,
            payload=poison_payload(
                raw, getattr(message, "headers", None), getattr(message, "content_type", None)
            ),
        )
        # A RabbitMQ queue with a dead-letter exchange parks what it is told to reject.
        broker_parks = self._dead_letter_exchange(queue) is not None
        settings = settings_of(self.app)
        # On Redis, when the job store is the broker's Redis, the entry and the parked item
        # are written in one transaction, the entry recording the item so that deleting it
        # removes the item too (cancelflow.dead_letters). Elsewhere the entry is written and
        # then the message parked by kombu: deleting that entry leaves the parked copy.
        item = (
            parked_item(self.app, message)
            if not broker_parks and settings.broker_url in (None, settings.redis_url)
            else None
        )
        try:
            runtime = get_runtime(settings)
            park = (DEAD_LETTER_QUEUE, item) if item is not None else None
            runtime.run(runtime.deps.dead_letters.add(dl, park=park), timeout=30)
            if not broker_parks and item is None:
                self._park(message)
        except Exception:
            # Neither store nor broker took it: leave the message unacknowledged so it is
            # delivered again after the visibility timeout, rather than lose it.
            log.exception("message.dead_letter_failed", queue=queue, error_type=error_type)
            return
        log.error(
            "message.dead_lettered",
            queue=queue,
            error_type=error_type,
            error=error,
            dead_letter_id=dl.id,
        )
        if broker_parks:
            message.reject(requeue=False)
        else:
            message.ack()

    def _past_delivery_limit(self, message: Any, task: Any) -> bool:
        """On a message's last delivery (see the module): dead-letter it, reject it, True."""
        from worker.app import settings_of
        from worker.runtime import get_runtime

        count = deliveries(message)
        if count < settings_of(self.app).broker_delivery_limit:
            return False
        error = f"delivered {count + 1} times without an acknowledgement (the delivery limit)"
        step = next((s for s, name in STEP_TASKS.items() if name == task.name), None)
        payload = message.payload if step is not None else None
        args = payload[0] if isinstance(payload, list | tuple) and payload else None
        args = list(args) if isinstance(args, list | tuple) else []
        job_id = args[0] if args else None
        if step is None or step is Step.CALLBACK or not isinstance(job_id, str):
            # Not a step of a job mid-chain (a result callback's job has finished): a
            # poison entry, the message parked by the dead-letter exchange.
            self._dead_letter(message, DELIVERY_LIMIT_EXCEEDED, error)
            return True
        runtime = get_runtime(settings_of(self.app))
        queue = queue_of((getattr(message, "delivery_info", None) or {}).get("routing_key"))
        try:
            job = runtime.run(runtime.deps.store.get(job_id), timeout=30)
            if resume(job.status, job_id, job.provider).step is not step:
                # A stale copy: its job has moved on to another step (or ended).
                self._dead_letter(message, DELIVERY_LIMIT_EXCEEDED, f"{error}; {job_id} moved on")
                return True
            nxt = runtime.run(
                chain.dead_letter(
                    runtime.deps,
                    job_id,
                    step=step,
                    error_type=DELIVERY_LIMIT_EXCEEDED,
                    error=error,
                    traceback=None,
                    payload={"args": args},
                ),
                timeout=30,
            )
        except JobNotFound:
            self._dead_letter(message, DELIVERY_LIMIT_EXCEEDED, f"{error}; no job {job_id}")
            return True
        except Exception:
            # The store did not take it: parked all the same (the watchdog re-sends the step
            # of a job left mid-chain).
            log.exception("message.dead_letter_failed", queue=queue, job_id=job_id)
            message.reject(requeue=False)
            return True
        if nxt.dead_letter is not None:
            # The job's result callback, telling its caller it was dead-lettered.
            dispatch(self.app, nxt)
        log.error(
            "message.delivery_limit_exceeded",
            queue=queue,
            job_id=job_id,
            step=step.value,
            deliveries=count + 1,
            dead_letter_id=nxt.dead_letter,
        )
        message.reject(requeue=False)
        return True

    def _dead_letter_exchange(self, queue: str | None) -> str | None:
        for declared in self.app.conf.task_queues or ():
            if declared.name == queue:
                return (declared.queue_arguments or {}).get("x-dead-letter-exchange")
        return None

    def _park(self, message: Any) -> None:
        with self.app.producer_or_acquire() as producer:
            assert isinstance(producer, Producer)
            producer.publish(  # type: ignore[no-untyped-call]  # kombu leaves it unannotated
                message.body,
                exchange=DEAD_LETTER_EXCHANGE,
                routing_key=DEAD_LETTER_QUEUE,
                declare=[q for q in self.app.conf.task_queues if q.name == DEAD_LETTER_QUEUE],
                headers=dict(message.headers or {}),
                content_type=message.content_type or "application/octet-stream",
                content_encoding=message.content_encoding or "binary",
                serializer=None,
            )
