"""A Celery consumer that dead-letters poison messages instead of dropping them.

Celery's own consumer logs and discards a message it cannot decode, whose task it does not
know, or that is not a valid task message. Here each such message is recorded in the
dead-letter store (with its body and headers) and parked byte for byte on the kombu
``dead_letters`` queue, then acknowledged so the worker keeps consuming.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.messaging import Producer

from cancelflow.contract import DEAD_LETTER_QUEUE
from cancelflow.dead_letters import DeadLetter, poison_payload
from cancelflow.logging import get_logger
from cancelflow.messaging import DEAD_LETTER_EXCHANGE

log = get_logger(__name__)


class Consumer(CeleryConsumer):  # type: ignore[misc]
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
        from worker.app import settings
        from worker.runtime import get_runtime

        delivery = getattr(message, "delivery_info", None) or {}
        queue = delivery.get("routing_key")
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
        try:
            runtime = get_runtime(settings)
            runtime.run(runtime.deps.dead_letters.add(dl), timeout=30)
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
        message.ack()

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
