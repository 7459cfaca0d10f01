"""kombu's Redis transport, made to survive an unreadable item on a queue list, and to
acknowledge in batches.

kombu decodes each list item (its JSON envelope) inside the consumer loop; an item that is
not JSON raises there, stops the worker ("Unrecoverable error") and the item, already popped,
is lost. So does an envelope kombu cannot make a message of (``properties`` that is not an
object or has no ``delivery_tag``, headers that are not an object, an unknown body
encoding: ``kombu.transport.virtual.Message``) or whose delivery it cannot record as
unacknowledged (no exchange or routing key: ``kombu.transport.redis.QoS.append``). This
channel dead-letters such an item, parks it on the ``dead_letters`` list, and goes on.
Follows ``kombu.transport.redis.Channel._brpop_read`` / ``_get`` and
``kombu.transport.virtual.Channel.basic_consume`` of kombu 5.x.
Built on ``cancelflow.messaging.Channel`` (one Redis client per pool, not one per publish).

Acknowledging a message removes it from Redis's unacked hash and index, in a round trip of
its own in kombu. Celery makes its acknowledgements (``acks_late``: after each task) on the
consumer's event loop (kombu's hub, the worker's main thread); there, removals here wait and
go in one pipeline: ``ACK_BATCH`` of them, or ``ACK_DELAY_S`` after the first. A worker
killed before writing a batch leaves those messages in the hash: Redis delivers them again
after the visibility timeout, and their steps find their jobs moved on (as after any crash
between a step's end and its acknowledgement). Closing the channel writes the batch.
"""

from __future__ import annotations

import threading
from queue import Empty  # what kombu.transport.redis raises (it imports it from here)
from typing import Any

# kombu ships py.typed but leaves these (and its Channel's helpers) unannotated: hence the
# no-untyped-call ignores below.
from kombu.asynchronous import get_event_loop
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from cancelflow import messaging
from cancelflow.contract import DEAD_LETTER_QUEUE
from cancelflow.dead_letters import DeadLetter, DeadLetterStore, poison_payload
from cancelflow.logging import get_logger

log = get_logger(__name__)

ACK_BATCH = 100
ACK_DELAY_S = 0.02


# kombu leaves QoS and Channel unannotated: hence the no-untyped-call ignores below.
class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._acks: messaging.Batch[str] = messaging.Batch(ACK_BATCH)

    def ack(self, delivery_tag: str) -> None:
        hub = get_event_loop()
        if hub is None or threading.current_thread() is not threading.main_thread():
            super().ack(delivery_tag)  # type: ignore[no-untyped-call]  # at once, as kombu
            return
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]  # bookkeeping only
        when = self._acks.add(delivery_tag)
        if when == "now":
            self.flush_acks()
        elif when == "later":
            hub.call_later(ACK_DELAY_S, self.flush_acks)  # type: ignore[no-untyped-call]

    def flush_acks(self) -> None:
        """Write the waiting acknowledgements in one pipeline."""
        tags = self._acks.take()
        if not tags:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        except Exception as exc:  # as kombu's own ack failing: redelivered after the timeout
            log.warning("message.ack_failed", messages=len(tags), error=type(exc).__name__)


class Channel(messaging.Channel):
    QoS = QoS

    def close(self) -> None:
        qos = self.__dict__.get("_qos")  # only if the channel ever made one
        if qos is not None:
            qos.flush_acks()
        super().close()  # type: ignore[no-untyped-call]

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

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> None:
        super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)  # type: ignore[no-untyped-call]

        # kombu's own callback, with the envelope checked before it stops the worker.
        def _callback(raw_message: Any) -> Any:
            try:
                message = self.Message(raw_message, channel=self)  # type: ignore[no-untyped-call]
                _check_delivery(message)
            except Exception as exc:  # whatever the envelope holds, it must not stop us
                error = f"envelope is not a kombu message: {type(exc).__name__}: {exc}"
                self._dead_letter(dumps(raw_message).encode(), queue, error)  # type: ignore[no-untyped-call]
                return None
            if not no_ack:
                self.qos.append(message, message.delivery_tag)
            return callback(message)

        self.connection._callbacks[queue] = _callback

    def _decode_or_dead_letter(self, item: bytes, queue: str) -> Any:
        try:
            envelope = loads(bytes_to_str(item))  # type: ignore[no-untyped-call]
            if isinstance(envelope, dict) and "properties" in envelope:
                return envelope
            error = "list item is JSON but not a kombu message envelope"
        except Exception as exc:  # whatever the item is, it must not stop us
            error = f"list item is not a kombu message: {type(exc).__name__}: {exc}"
        self._dead_letter(item, queue, error)
        return None

    def _dead_letter(self, item: bytes, queue: str, error: str) -> None:
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

    def restore_worker(self, unacked_key: str, unacked_index_key: str, **_: Any) -> int:
        """Put every message a dead worker process held (its own unacknowledged hash, see
        ``worker.leases``) back on its queue; how many. Each one moves in a transaction of
        its own, as kombu's ``QoS.restore_by_tag`` moves one, so a crash midway loses none
        and a message is never both restored and left in the hash."""
        restored = 0
        with self.conn_or_acquire() as client:
            for tag in client.hkeys(unacked_key):

                def move(pipe: Any, tag: Any = tag) -> None:
                    raw = pipe.hget(unacked_key, tag)
                    pipe.multi()
                    pipe.zrem(unacked_index_key, tag)
                    pipe.hdel(unacked_key, tag)
                    if raw:
                        message, exchange, routing_key = loads(bytes_to_str(raw))  # type: ignore[no-untyped-call]
                        self._do_restore_message(message, exchange, routing_key, pipe)  # type: ignore[no-untyped-call]

                client.transaction(move, unacked_key)
                restored += 1
            client.delete(unacked_index_key)
        return restored


def _check_delivery(message: Any) -> None:
    """Raise if the Redis QoS cannot record ``message`` as unacknowledged: it keeps the
    delivery tag as a hash field and the exchange and routing key to restore it with."""
    if not isinstance(message.delivery_tag, str) or not message.delivery_tag:
        raise TypeError(f"delivery_tag is not a string: {message.delivery_tag!r}")
    delivery = message.delivery_info
    if not isinstance(delivery, dict) or not all(
        isinstance(delivery.get(key), str) for key in ("exchange", "routing_key")
    ):
        raise TypeError(f"delivery_info has no exchange and routing key: {delivery!r}")
    if not isinstance(message.headers, dict):
        raise TypeError(f"headers is not an object: {message.headers!r}")


class Transport(messaging.Transport):
    Channel = Channel


class SentinelChannel(Channel, messaging.SentinelChannel):
    """This channel on a Redis reached through Sentinel."""


class SentinelTransport(messaging.SentinelTransport):
    Channel = SentinelChannel
