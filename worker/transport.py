"""kombu's Redis transport, made to survive an unreadable item on a queue list.

kombu decodes each list item (its JSON envelope) inside the consumer loop; an item that is
not JSON raises there, stops the worker ("Unrecoverable error") and the item, already popped,
is lost. This channel dead-letters such an item, parks it on the ``dead_letters`` list, and
goes on. Follows ``kombu.transport.redis.Channel._brpop_read`` / ``_get`` of kombu 5.x.
Built on ``cancelflow.messaging.Channel`` (one Redis client per pool, not one per publish).
"""

from __future__ import annotations

from queue import Empty  # what kombu.transport.redis raises (it imports it from here)
from typing import Any

# kombu ships py.typed but leaves these (and its Channel's helpers) unannotated: hence the
# no-untyped-call ignores below.
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
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]  # type: ignore[no-untyped-call]
            self._queue_cycle.rotate(dest)
            envelope = self._decode_or_dead_letter(item, dest)
            if envelope is not None:
                self.connection._deliver(envelope, dest)
            return True
        finally:
            # As kombu does, though it declares _in_poll a bool.
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    # kombu's own Redis channel drops the base class's timeout parameter too.
    def _get(self, queue: str) -> Any:  # type: ignore[override]
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))  # type: ignore[no-untyped-call]
                if item:
                    envelope = self._decode_or_dead_letter(item, queue)
                    if envelope is None:
                        continue
                    return envelope
            raise Empty()

    def _decode_or_dead_letter(self, item: bytes, queue: str) -> Any:
        try:
            envelope = loads(bytes_to_str(item))  # type: ignore[no-untyped-call]
            if isinstance(envelope, dict) and "properties" in envelope:
                return envelope
            error = "list item is JSON but not a kombu message envelope"
        except Exception as exc:  # whatever the item is, it must not stop us
            error = f"list item is not a kombu message: {type(exc).__name__}: {exc}"
        dl = DeadLetter(
            kind="poison",
            queue=queue,
            error_type="UnreadableEnvelope",
            error=error,
            payload=poison_payload(item, None, None),
        )
        with self.conn_or_acquire() as client:
            DeadLetterStore.add_sync(client, dl)
            client.lpush(DEAD_LETTER_QUEUE, item)
        log.error(
            "message.dead_lettered", queue=queue, error_type=dl.error_type, dead_letter_id=dl.id
        )
        return None


class Transport(messaging.Transport):
    Channel = Channel
