"""kombu's Redis transport, made to survive an unreadable item on a queue list.

kombu decodes each list item (its JSON envelope) inside the consumer loop; an item that is
not JSON raises there, stops the worker ("Unrecoverable error") and the item, already popped,
is lost. This channel dead-letters such an item, parks it on the ``dead_letters`` list, and
goes on. Follows ``kombu.transport.redis.Channel._brpop_read`` / ``_get`` of kombu 5.x.
Built on ``cancelflow.messaging.Channel`` (one Redis client per pool, not one per publish).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from cancelflow import messaging
from cancelflow.contract import DEAD_LETTER_QUEUE
from cancelflow.dead_letters import DeadLetter, DeadLetterStore, poison_payload
from cancelflow.logging import get_logger

log = get_logger(__name__)


class Channel(messaging.Channel):
    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            envelope = self._decode_or_dead_letter(item, dest)
            if envelope is not None:
                self.connection._deliver(envelope, dest)
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _get(self, queue: str) -> Any:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    envelope = self._decode_or_dead_letter(item, queue)
                    if envelope is None:
                        continue
                    return envelope
            raise kombu_redis.Empty()

    def _decode_or_dead_letter(self, item: bytes, queue: str) -> Any:
        try:
            envelope = loads(bytes_to_str(item))
            if isinstance(envelope, dict) and "properties" in envelope:
                return envelope
            error = "list item is JSON but not a kombu message envelope"
        except Exception as exc:  # noqa: BLE001 - whatever the item is, it must not stop us
            error = f"list item is not a kombu message: {type(exc).__name__}: {exc}"
        dl = DeadLetter(kind="poison", queue=queue, error_type="UnreadableEnvelope", error=error,
                        payload=poison_payload(item, None, None))
        with self.conn_or_acquire() as client:
            DeadLetterStore.add_sync(client, dl)
            client.lpush(DEAD_LETTER_QUEUE, item)
        log.error("message.dead_lettered", queue=queue, error_type=dl.error_type, dead_letter_id=dl.id)
        return None


class Transport(messaging.Transport):
    Channel = Channel
