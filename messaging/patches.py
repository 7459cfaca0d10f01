"""Every override of a private Celery or kombu method, in one module.

Each class or function here replaces or depends on an upstream method that is not a public
API, written against the celery and kombu minor versions pinned in pyproject.toml
(``celery==5.7.*``, ``kombu==5.7.*``). ``UPSTREAM`` names each such method with the
SHA-256 of its source at those versions: ``tests/unit/test_patches.py`` fails when one
changes, so an upgrade is a reading of what changed under the copy, not a surprise in
production. Each override says why it exists and, where there is one, the upstream issue.

- ``Channel._create_client``: one Redis client per connection pool (kombu builds one per
  publish, ack and event batch). No upstream issue; measured by ``make bench``.
- ``SentEvents`` (``EventDispatcher.publish``, calling its ``_prepare_event`` and
  ``_publish``): Celery's ``task-sent`` events in batches, not one round trip per message.
- ``WorkerChannel._brpop_read`` / ``_get`` / ``basic_consume``: an item on a queue list that
  is not a kombu message is dead-lettered instead of stopping the worker
  (celery/kombu#2421 reports the same crash on SQS).
- ``QoS.ack``: acknowledgements written in batches on the consumer's hub (kombu's emulated
  acks cost their own round trips: celery/celery#1776).
- ``WorkerChannel.restore_worker``: follows ``QoS.restore_by_tag`` (and its
  ``_do_restore_message``) to give back a dead worker process's messages at once.
- ``StepRequest.send_event``: a step's task events true to the step for Flower.
- ``HubEventsRequest.send_event`` (every task's request, ``StepRequest``'s base): a task
  event sent from another thread (the pool's loop, a maintenance task's thread) is handed to
  the consumer's hub and published there. The worker's event dispatcher's connection is the
  hub's: Celery registers it for reads (``Events.start``, to consume broker heartbeats),
  so the hub's thread reads its frames. A publish from another thread with publisher
  confirms (``brokers.amqp``) waits for its ``basic.ack`` on that socket while the hub may
  read the ack first: the publisher then waits, holding the dispatcher's mutex, until the
  broker drops the connection, and the hub, blocked on that mutex at its next flush, sends
  no heartbeat on the consumer's connection either, which RabbitMQ closes ("missed
  heartbeats from client", measured under ``make chaos BROKER=amqp``). No upstream issue
  found; Celery's own threads pool shares the race.
- ``TaskEventsEvery`` (a consumer's ``on_send_event_buffered``, Celery's hook of its event
  dispatcher's task-group buffer): the worker's task events are published in one message
  ``TASK_EVENTS_DELAY_S`` after the first waits (or once Celery's buffer limit of 24 is
  reached), not at the hub's next tick: one message per hub tick was one publish (a Redis
  round trip, kombu's publish) per one or two events, about 4 per job.
- ``RetryingTask.event`` (``celery.events.state.Task.event``, installed by
  ``show_retries_until_they_run``): a retry shows as ``RETRY`` in Flower until it runs.
- ``LeanCode`` (``lean_tracebacks``, billiard's ``_Code``): the copy of a code object in a
  task's ``ExceptionInfo`` reads the code's positions when asked, instead of copying a tuple
  for each instruction of each frame's function (about 0.5 MB per retried step).
- ``run_celery_command``: ``Celery.start`` (and ``worker_main``), but returning the status
  Celery's command ended with: ``start`` runs click's main with standalone mode off and
  drops what it returns, so a worker stopped by an unrecoverable error exited 0.
- ``WorkerChannel.close``: a consumer's broken connection is collected, then closed
  (``Consumer.on_connection_error_after_connected``); ``collect`` detaches the transport from
  its connection first, and the close's restore of the unacknowledged messages then failed
  on ``transport.client`` being None, an ``AttributeError`` that stopped the worker
  (celery/kombu#582 and #970 report the same error at a shutdown).
- ``show_transports_as``: kombu's ``Connection.resolve_aliases`` (read by ``_info``) names
  our transports by the broker URL's scheme where a connection is shown.
- ``dispatch`` (``messaging.dispatch``) reads the cache ``kombu.common._maybe_declare``
  keeps of the queues declared on a connection, by the same key, and skips a declaration
  found there: kombu binds a copy of the queue and its exchange on every publish only to look.
- ``step_message``: the message Celery's ``send_task`` and kombu's Redis transport would
  write for a step, built here so that a producer on an event loop (the API) can ``LPUSH``
  it with its own asyncio client instead of blocking the loop on kombu's synchronous
  publish (a Redis round trip, and some 100 µs of kombu's and Celery's CPU per message:
  43% of the API's loop under the enqueue bench). No upstream issue: kombu has no asyncio
  Redis producer. ``tests/unit/test_step_message.py`` compares it, field by field, with what
  ``send_task`` writes.
- ``trace_args`` and ``with_decoded_body`` (``Request.execute_using_pool``'s tuple, and the
  tracers' reading of a body without content type as already decoded) and ``LoopPoolBase``
  (``ThreadsPool.on_apply``, ``_get_info``): the pool runs a step's coroutine on the event
  loop and applies time limits, which Celery's threads pool drops (celery/celery#9203).

The workers' transport (``WorkerTransport``): kombu decodes each list item (its JSON
envelope) inside the consumer loop; an item that is
not JSON raises there, stops the worker ("Unrecoverable error") and the item, already popped,
is lost. So does an envelope kombu cannot make a message of (``properties`` that is not an
object or has no ``delivery_tag``, headers that are not an object, an unknown body
encoding: ``kombu.transport.virtual.Message``) or whose delivery it cannot record as
unacknowledged (no exchange or routing key: ``kombu.transport.redis.QoS.append``). This
channel dead-letters such an item, parks it on the ``dead_letters`` list, and goes on.

Acknowledging a message removes it from Redis's unacked hash and index, in a round trip of
its own in kombu. Celery makes its acknowledgements (``acks_late``: after each task) on the
consumer's event loop (kombu's hub, the worker's main thread); there, removals here wait and
go in one pipeline: ``ACK_BATCH`` of them, or ``ACK_DELAY_S`` after the first. A worker
killed before writing a batch leaves those messages in the hash: Redis delivers them again
after the visibility timeout, and their steps find their jobs moved on (as after any crash
between a step's end and its acknowledgement). Closing the channel writes the batch.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import types
from dataclasses import dataclass
from queue import Empty  # what kombu.transport.redis raises (it imports it from here)
from typing import Any, ClassVar

import redis
from billiard import einfo as billiard_einfo
from celery import Celery, signals, states
from celery.concurrency.thread import TaskPool as ThreadsPool
from celery.events.dispatcher import EventDispatcher
from celery.events.state import State as CeleryState
from celery.events.state import Task as CeleryStateTask
from celery.worker.request import Request
from kombu import serialization

# kombu ships py.typed but leaves these (and its Channel's helpers) unannotated: hence the
# no-untyped-call ignores below.
from kombu.asynchronous import get_event_loop
from kombu.connection import Connection
from kombu.entity import Queue, maybe_delivery_mode
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from kombu.utils.uuid import uuid

from cancelflow.contract import DEAD_LETTER_QUEUE
from cancelflow.dead_letters import DeadLetter, DeadLetterStore, poison_payload
from cancelflow.logging import get_logger
from messaging.batch import Batch
from messaging.config import DEAD_LETTER_EXCHANGE

log = get_logger(__name__)

# "module:qualname" of every upstream method overridden, copied or unpacked here -> the
# SHA-256 of its source (``inspect.getsource``) in the pinned versions. Computed by
# ``source_hash``; ``tests/unit/test_patches.py`` compares.
UPSTREAM: dict[str, str] = {
    # Channel: one client per pool.
    "kombu.transport.redis:Channel._create_client": (
        "dae92bc4075dafb9b1a1ebd3f72cc7ed3e1bfe3ec1f840a1b1ccdfc6a67deb4d"
    ),
    # SentEvents: publish overridden, its private helpers called.
    "celery.events.dispatcher:EventDispatcher.publish": (
        "e7c0756afa3c16961203049d1d286aa0da30223417a2079f07b2f79970498caa"
    ),
    "celery.events.dispatcher:EventDispatcher._publish": (
        "70b7053ff73568e9db48f96298adf4793073226337269559705c40a05c394496"
    ),
    "celery.events.dispatcher:EventDispatcher._prepare_event": (
        "58ef45a12d13bcd86362e2648d07ad04e4832dc3d1fc0f1d20144c9644643872"
    ),
    # WorkerChannel: copies of the reads, the consumer's callback, the close, the restore.
    "kombu.transport.redis:Channel._brpop_read": (
        "c42518699709f2df90f55a048fe6346612ae5527e5c4a6819f2c0920dc62088f"
    ),
    "kombu.transport.redis:Channel._get": (
        "be26a9f1eb4cf8da2aa65f4815a1709bf80b4434b064d3d7146872d318ad506c"
    ),
    "kombu.transport.virtual.base:Channel.basic_consume": (
        "0fec962694938b61b8a6b82bfff9c3c8baeef2f2877d64adf30a8c6fdbfca2e6"
    ),
    "kombu.transport.redis:Channel.close": (
        "101e9b9cdad44b88185ecf6a18f07c2057f9768465cfa1e1a4a7fe16068a6bc2"
    ),
    # WorkerChannel.close: what detaches a transport before its default channel is closed
    # again (Consumer.on_connection_error_after_connected calls collect, then close), and
    # what the restore then needs of the transport's connection.
    "celery.worker.consumer.consumer:Consumer.on_connection_error_after_connected": (
        "4f84dbfff329d28f48fb7dffad999b194b4b12bc1e3b444161ec106efce91f64"
    ),
    "kombu.connection:Connection.collect": (
        "36d622aa0b69908a5a63ccc85f4dee11abefa0b84159c54f95e7ca8ee0d386cd"
    ),
    "kombu.connection:Connection._do_close_self": (
        "624b2e115799fe74d548fd65624d19497be18f596bda942ef0c98f1093cd1773"
    ),
    "kombu.connection:Connection._do_close_transport": (
        "3e87de68f6283cf7abf340ce913713bb87901b0e20b2b24b0f9eefc22114b9fd"
    ),
    "kombu.transport.virtual.base:Channel.close": (
        "26368e1cadfc4ff90dd7d17551e0307683ac5543e22480f985df8e7ac307e3d8"
    ),
    "kombu.transport.redis:Channel._connparams": (
        "e9a4295085a8fb905b44e81a935003affdc9e74298b779df4877ba575fbba196"
    ),
    # LeanCode: billiard's copy of a code object, and the frame's that makes it.
    "billiard.einfo:_Code.__init__": (
        "904cdd3ac1808fc0c6632df83e6b5736228a74eeb77b587d3c7b8f3e6ee99b3a"
    ),
    "billiard.einfo:_Code.__reduce__": (
        "a96e6784d580d8e8652f904f0e75e991741dccf2e1db016ef0097b83ebee66d1"
    ),
    "billiard.einfo:_Frame.__init__": (
        "71f2a5fedd4d37b68c42307c67dfa0aecbffbb1eeae118bb0bd87d3f1f8a422c"
    ),
    # run_celery_command: Celery.start, without dropping the command's status.
    "celery.app.base:Celery.start": (
        "09cc5173c50e27aa724991254d97693c36abd3a3677e67cb7a3d1b8bd73185d2"
    ),
    "kombu.transport.redis:Channel._do_restore_message": (
        "8b430df94e45b5b0183c97f12a3eff8c1bc23bb227d1ebc0f3963f528546968a"
    ),
    "kombu.transport.redis:QoS.restore_by_tag": (
        "58e161d81b6fe18d1fe73d53d13e6359271bcc249d0da58ee737c6775d51ceb8"
    ),
    # QoS: batched acknowledgements.
    "kombu.transport.redis:QoS.ack": (
        "1bc15a4ddf541af6aede3b76093919f847899f93dd8c1a2537ab7eaff1227207"
    ),
    # show_transports_as: the aliases kombu resolves where it shows a connection.
    "kombu.connection:Connection._info": (
        "d756812a39364a49dbe3738884663ebbb48cce97d1ab68a52964c273e6015335"
    ),
    "kombu.transport.redis:QoS.pipe_or_acquire": (
        "ad7f549d96c81107bef9e0faa7b6b0fb88f912249b6cf40f58abdd75c45d13ae"
    ),
    # StepRequest: a step's task events.
    "celery.worker.request:Request.send_event": (
        "75ec861e3f357ae91412caad613f8f124d2cb375b5a037b0fee263d5f4a81b90"
    ),
    # HubEventsRequest: the worker's event connection is read by the hub (Events.start), an
    # event of the task group is published by whichever thread fills the buffer
    # (EventDispatcher.send), and the hub takes callbacks from other threads (Hub.call_soon).
    "celery.worker.consumer.events:Events.start": (
        "5dafa048a5f8bb39a595d494dd039100ba5ec39951bb32d4a6a00b6e9e034abb"
    ),
    "celery.events.dispatcher:EventDispatcher.send": (
        "eb70b87b4c68ed01fe0f9a2c6dec095dff5ae07d0846e209b509b839c77ed5d4"
    ),
    "kombu.asynchronous.hub:Hub.call_soon": (
        "ec0433083ce8db41ad884ab8b096681e91af046b26efcd6ad86a2cdfdd0f235e"
    ),
    # TaskEventsEvery: the consumer's hook of its dispatcher's task-event buffer.
    "celery.worker.consumer.consumer:Consumer.on_send_event_buffered": (
        "0429cadc8bf9dc54afe6a47a9e277e9afb01a133c54ee54343608a968ccbcc16"
    ),
    # RetryingTask: how a monitor's state merges a task's events, which the worker sends for
    # a retry's message when it receives it (the strategy's task-received).
    "celery.events.state:Task.event": (
        "b71e67d0130471fc0e826420b4132652d9ed216500410dde422cc00aeff9ab14"
    ),
    "celery.worker.strategy:default": (
        "7d90575ada5eb1dc30982842b3fc836dbca2cf0b801594ad6d5e1b9e2836dd63"
    ),
    # trace_args and worker.pool: the tracer's arguments, how the threads pool applies a
    # task, and its info.
    "celery.worker.request:Request.execute_using_pool": (
        "7979562da58f42665a9c55be03aea994a302357c46cb174602e34f7df13b2df5"
    ),
    "celery.app.trace:fast_trace_task": (
        "52c76aab90e1656fb991002acb7faeed78b8b93c4d5d1d47957050cf66329a21"
    ),
    "celery.app.trace:trace_task_ret": (
        "edf3530c917cd4b69548b218963fa53d8f7787c2407909616fdaaa4684bffa7d"
    ),
    "celery.concurrency.base:apply_target": (
        "587f70580295464cd7494a2497d45105355790382525373b5cce1660930077c2"
    ),
    "celery.concurrency.thread:TaskPool.on_apply": (
        "5b5ead7fb32e4e6d862bca107be7d7f1e81f222fbcbfb200cf3e0af8283648a1"
    ),
    "celery.concurrency.thread:TaskPool._get_info": (
        "a6d082fa42de7fe34debad76df7fee73b206cd974d77e9762e51a97a150c3abe"
    ),
    # messaging.dispatch asks kombu's declared-entities cache (per connection, keyed by the
    # entity's hash) before publishing, as this function does before it declares.
    "kombu.common:_maybe_declare": (
        "f9fb7c32e38d56046a82450c218c5bd6c06ee8939492e488819daeb025afa7da"
    ),
    # step_message: what send_task (its options, routing and send_task_message) and kombu's
    # producer, virtual channel and Redis channel make of a message, mirrored.
    "celery.app.base:Celery.send_task": (
        "0627787058090b5600eb971bff3d85a2d9d0d999dcdf617dc282eeadd8ed2660"
    ),
    "celery.app.amqp:AMQP._create_task_sender": (
        "f648c9fd295989706df3d979d23ecc657f4fd23153d45f92385a498fe08e71e7"
    ),
    "kombu.messaging:Producer.publish": (
        "ae38a8777e3979954440c1235342696ae852566f9b52630a2babb8fffe18db3c"
    ),
    "kombu.messaging:Producer._publish": (
        "1af8fe01cf61f6601ae496dd9a6f1cfd58dcdd6c5ac0c011a5c2398d6625f001"
    ),
    "kombu.messaging:Producer._prepare": (
        "eb1be1b1f8c803853ea66866cf4a3eb4946feeaeda33b9359d37b3eabbb08dfe"
    ),
    "kombu.messaging:Producer._delivery_details": (
        "da8de719158b6b98ee38f3740eb1e4943974d20c8e81133a5b60b5e1fab7d1e2"
    ),
    "kombu.transport.virtual.base:Channel.prepare_message": (
        "40e1ae6d7753b6590685e3217774b095c3389cecbc9857b813aa9e22f12966ce"
    ),
    "kombu.transport.virtual.base:Channel.basic_publish": (
        "83825b6758712705af08769ac7ef483d8f1f3e2785078a2264ad5db2b9075cde"
    ),
    "kombu.transport.virtual.base:Channel._inplace_augment_message": (
        "3a07d99062fc58243e229a4d454609b9de6d947c52d150c631977168bc27d2f9"
    ),
    "kombu.transport.virtual.base:Channel.encode_body": (
        "6ace6ef7fb7c9b4a3d5f209b4a96265d21e2c1f17834a9df79da00119288c500"
    ),
    "kombu.transport.virtual.base:Channel._lookup": (
        "82b0e60149b5e17226ada848990793d0939a9fff87742595f0cb25a033903df7"
    ),
    "kombu.transport.redis:Channel._put": (
        "1c0cf9749576614c3c62223ac59372df418ed4274d791fcd8f7e5ad7994ce72c"
    ),
    "kombu.transport.redis:Channel._q_for_pri": (
        "f3997660680dd00f928898cadd7e2ea27dbb4d7d3d27c35c676dab7536389d8d"
    ),
}


def source_hash(qualified: str) -> str:
    """The SHA-256 of the source of ``module:qualname`` as installed."""
    import hashlib
    import importlib
    import inspect

    module_name, _, qualname = qualified.partition(":")
    found: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    return hashlib.sha256(inspect.getsource(found).encode()).hexdigest()


# --- producers and workers: one Redis client per pool -----------------------------------------


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with one client per connection pool.

    kombu builds a new ``redis.Redis`` for every publish, every batch of task events and
    every acknowledgement (``Channel.conn_or_acquire``), and building one copies redis-py's
    table of some 200 response callbacks: more CPU than the round trip it serves. A client
    is safe to share (each command takes a connection from the pool), so one is kept for as
    long as the channel keeps its pool (kombu replaces the pool after a connection error).
    """

    _client_for_pool: tuple[Any, Any] | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool
        kept = self._client_for_pool
        if kept is None or kept[0] is not pool:
            kept = self._client_for_pool = (pool, super()._create_client())  # type: ignore[no-untyped-call]
        return kept[1]


class Transport(kombu_redis.Transport):
    Channel = Channel


def run_celery_command(app: Any, argv: list[str]) -> int:
    """Run Celery's command line (``celery worker ...``) on ``app``, as ``app.start`` does,
    and answer the status it ended with."""
    from celery.bin.celery import celery

    celery.params[0].default = app
    try:
        status = celery.main(args=argv, standalone_mode=False)
    finally:
        celery.params[0].default = None
    return status if isinstance(status, int) else 0


# --- producers and workers: task-sent events in batches ----------------------------------------


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same channel, its pool the master's that the sentinels name (and re-name)."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


class SentEvents(EventDispatcher):  # type: ignore[misc]  # Celery is untyped
    """Celery's ``task-sent`` events (for Flower), published in batches.

    Celery publishes one event per message sent, right after it: one more Redis round trip
    per message, during which the sender (the API's event loop, a worker's) waits. Sent from
    an event loop, the events here wait in a buffer published as one message, a list of
    events (as Celery's workers send their own task events, and as Flower reads them), once
    ``limit`` are waiting or ``delay_s`` after the first. Sent from a thread without a loop
    (a maintenance task), an event is published at once. Events are monitoring: a batch
    that cannot be published is logged and dropped, never retried in the sender's way.
    """

    def __init__(self, app: Celery, *, limit: int = 100, delay_s: float = 0.05) -> None:
        super().__init__(app=app, connection=app.connection_for_write(), buffer_while_offline=False)
        self.delay_s = delay_s
        self._batch: Batch[Any] = Batch(limit)

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **kwargs: Any) -> Any:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if type != "task-sent" or loop is None:
            return super().publish(type, fields, producer, **kwargs)
        when = self._batch.add(self._prepare_event(type, fields))
        if when == "now":
            self.flush_sent()
        elif when == "later":
            loop.call_later(self.delay_s, self.flush_sent)
        return None

    def flush_sent(self) -> None:
        """Publish the events waiting (the API and the workers call it as they stop)."""
        batch = self._batch.take()
        if not batch:
            return
        try:
            with self.mutex:
                self._publish(batch, self.producer, "task.multi")
        except Exception as exc:  # monitoring only: never fail or block a send for it
            log.warning("events.sent.dropped", events=len(batch), error=type(exc).__name__)


# --- producers: a step's message built for an asyncio client ------------------------------------


@dataclass(frozen=True)
class StepMessage:
    """A task message as kombu's Redis transport writes it: ``payload`` to ``LPUSH`` on the
    list ``key``, and the ``task-sent`` event Celery publishes after it (None when the app
    sends none)."""

    task_id: str
    key: str
    payload: str
    sent_event: dict[str, Any] | None
    # What Celery's after-publish signals are given.
    name: str
    headers: dict[str, Any]
    body: tuple[Any, ...]


@dataclass(frozen=True)
class StepRoute:
    """What ``send_task`` would make of an app's settings for a task on a queue, read once:
    the queue, the delivery mode, the serializer, the body encoding (its codec, None for
    utf-8), whether a sent event goes with the message, the publish retry policy (given to
    the publish signals)."""

    queue: Queue
    delivery_mode: int
    serializer: str
    body_encoding: str
    codec: Any
    create_sent_event: bool
    retry_policy: dict[str, Any]


def step_message_route(app: Celery, name: str, queue: str) -> StepRoute | None:
    """How ``step_message`` builds ``name``'s message on ``queue``, or None where
    ``send_task`` would do what it does not copy: a task registered in this app (its own
    options), task routes, compression, another protocol or broker, kombu's global key
    prefix, a queue that expires. ``None``: send it with ``send_task``. (Nor does it copy a
    worker's task as parent, its root and parent ids: ``app.current_worker_task``, asked by
    the caller at each send.)"""
    conf = app.conf
    options = conf.broker_transport_options or {}
    entity: Queue | None = app.amqp.queues.get(queue)
    connection = app.connection_for_write()  # not connected: only its transport is read
    try:
        transport = connection.get_transport_cls()
    finally:
        connection.release()
    body_encoding = options.get("body_encoding", virtual.Channel.body_encoding)
    if (
        entity is None
        or getattr(entity, "expires", None) is not None
        or name in app._tasks
        or app.amqp.router.routes
        or conf.task_compression
        or conf.task_protocol != 2
        or conf.broker_write_url not in (None, conf.broker_url)
        or not issubclass(transport, kombu_redis.Transport)
        or options.get("global_keyprefix")
        or (
            body_encoding
            and body_encoding.lower() != "utf-8"
            and body_encoding not in virtual.Channel.codecs
        )
    ):
        return None
    return StepRoute(
        queue=entity,
        # send_task_message: the queue's exchange's mode, else the app's default; kombu's
        # Producer._delivery_details turns a name into its number.
        delivery_mode=maybe_delivery_mode(  # type: ignore[no-untyped-call]
            entity.exchange.delivery_mode or conf.task_default_delivery_mode
        ),
        serializer=conf.task_serializer,
        body_encoding=body_encoding,
        # The virtual channel's encode_body: utf-8 (or none) is left as it is.
        codec=(
            virtual.Channel.codecs[body_encoding]
            if body_encoding and body_encoding.lower() != "utf-8"
            else None
        ),
        create_sent_event=bool(conf.task_send_sent_event),
        retry_policy=dict(conf.task_publish_retry_policy),
    )


def step_message(
    app: Celery,
    name: str,
    args: list[Any],
    *,
    route: StepRoute,
    headers: dict[str, Any],
    argsrepr: str,
    kwargsrepr: str,
    parent_id: str | None = None,
    root_id: str | None = None,
) -> StepMessage:
    """The message ``app.send_task(name, args=args, queue=route.queue.name, headers=headers,
    argsrepr=argsrepr, kwargsrepr=kwargsrepr, ignore_result=True)`` would have kombu's Redis
    channel ``LPUSH``, for a route ``step_message_route`` gave; Celery's before-publish
    signal sent as it sends it. Mirrors ``Celery.send_task`` (reply_to, the root id), its
    ``send_task_message`` (headers merged, the options left over as properties, the anonymous
    exchange, the delivery mode, the sent event's routing), kombu's ``Producer.publish``
    (serialization) and the virtual and Redis channels' ``basic_publish`` / ``_put`` (body
    encoding, delivery tag and info, priority, the list). ``parent_id`` and ``root_id``:
    what ``send_task`` takes from a worker's running task (a worker building the next step's
    message on its loop, before Celery runs the task: ``app.current_worker_task`` is unset)."""
    task_id = uuid()
    queue = route.queue
    # As send_task: Celery's own builder of the protocol-2 headers, properties and body.
    msg_headers, properties, body, sent_event = app.amqp.create_task_message(
        task_id,
        name,
        args,
        None,
        reply_to=app.thread_oid,
        create_sent_event=route.create_sent_event,
        ignore_result=True,
        argsrepr=argsrepr,
        kwargsrepr=kwargsrepr,
        parent_id=parent_id,
        root_id=root_id,
    )
    msg_headers.update(headers)
    # send_task_message: options it does not name become properties (so argsrepr and
    # kwargsrepr are both headers and properties, as send_task writes them).
    properties.update(argsrepr=argsrepr, kwargsrepr=kwargsrepr)
    # A direct exchange and a named queue: the anonymous exchange, the queue as routing key,
    # which kombu's virtual channel takes as the destination list (``Channel._lookup``).
    exchange, routing_key = "", queue.name
    if signals.before_task_publish.receivers:
        signals.before_task_publish.send(
            sender=name,
            body=body,
            exchange=exchange,
            routing_key=routing_key,
            declare=[queue],
            headers=msg_headers,
            properties=properties,
            retry_policy=dict(route.retry_policy),
        )
    properties["delivery_mode"] = route.delivery_mode
    content_type, content_encoding, data = serialization.dumps(  # type: ignore[no-untyped-call]
        body, serializer=route.serializer
    )
    if route.codec is not None:
        data = route.codec.encode(data)
    properties["delivery_info"] = {"exchange": exchange, "routing_key": routing_key}
    properties["priority"] = 0
    properties["body_encoding"] = route.body_encoding
    properties["delivery_tag"] = uuid()
    message = {
        "body": data,
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": msg_headers,
        "properties": properties,
    }
    if sent_event is not None:
        sent_event.update(queue=queue.name, exchange=exchange, routing_key=routing_key)
    # Priority 0: the queue's own list (kombu's ``_q_for_pri``).
    payload = dumps(message)  # type: ignore[no-untyped-call]
    return StepMessage(task_id, routing_key, payload, sent_event, name, msg_headers, body)


def parked_item(app: Celery, message: Any) -> bytes | None:
    """The item kombu's Redis channel would ``LPUSH`` on the ``dead_letters`` list to park
    ``message`` (a poison message the consumer got), as ``worker.consumer.Consumer._park``'s
    publish writes it: the same body bytes, headers, content type and encoding, through the
    dead-letter exchange. Mirrors kombu's ``Producer.publish`` of a bytes body without
    serializer, the virtual channel's ``prepare_message`` and ``basic_publish`` (body encoding,
    delivery tag and info) and the Redis ``_put`` (priority 0: the queue's own list). None
    where it would not be that (not a Redis broker, another write URL, kombu's global key
    prefix, a body encoding that is not a codec such as base64): park it with kombu then."""
    conf = app.conf
    options = conf.broker_transport_options or {}
    connection = app.connection_for_write()  # not connected: only its transport is read
    try:
        transport = connection.get_transport_cls()
    finally:
        connection.release()
    body_encoding = options.get("body_encoding", virtual.Channel.body_encoding)
    body = message.body
    if isinstance(body, str):
        body = body.encode("utf-8")
    if (
        not issubclass(transport, kombu_redis.Transport)
        or conf.broker_write_url not in (None, conf.broker_url)
        or options.get("global_keyprefix")
        or body_encoding not in virtual.Channel.codecs  # utf-8 or none: not for any bytes
        or not isinstance(body, bytes | bytearray)
    ):
        return None
    data = virtual.Channel.codecs[body_encoding].encode(bytes(body))  # type: ignore[no-untyped-call]
    properties = {
        "delivery_mode": maybe_delivery_mode(DEAD_LETTER_EXCHANGE.delivery_mode),  # type: ignore[no-untyped-call]
        "delivery_info": {"exchange": DEAD_LETTER_EXCHANGE.name, "routing_key": DEAD_LETTER_QUEUE},
        "priority": 0,
        "body_encoding": body_encoding,
        "delivery_tag": uuid(),
    }
    envelope = {
        "body": data,
        "content-encoding": message.content_encoding or "binary",
        "content-type": message.content_type or "application/octet-stream",
        "headers": dict(message.headers or {}),
        "properties": properties,
    }
    return str(dumps(envelope)).encode("utf-8")  # type: ignore[no-untyped-call]


def step_message_sent(message: StepMessage) -> None:
    """What ``send_task_message`` does once the message is on Redis, but the sent event:
    Celery's after-publish signals."""
    if not signals.after_task_publish.receivers and not signals.task_sent.receivers:
        return
    signals.after_task_publish.send(
        sender=message.name,
        body=message.body,
        headers=message.headers,
        exchange="",
        routing_key=message.key,
    )
    if signals.task_sent.receivers:  # deprecated in Celery, sent as send_task_message does
        args, kwargs, _ = message.body
        signals.task_sent.send(
            sender=message.name,
            task_id=message.task_id,
            task=message.name,
            args=args,
            kwargs=kwargs,
            eta=None,
            taskset=None,
        )


# --- workers: poison-proof reads, batched acknowledgements, a dead worker's messages -----------


ACK_BATCH = 100
ACK_DELAY_S = 0.02


# kombu leaves QoS and Channel unannotated: hence the no-untyped-call ignores below.
class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._acks: Batch[str] = Batch(ACK_BATCH)

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


class WorkerChannel(Channel):
    """The workers' channel: poison-proof reads, batched acknowledgements, and the
    restore of a dead worker's messages (``worker.leases``); see the module."""

    QoS = QoS
    # The job store's Redis, where dead-letter entries go, when the broker is another Redis
    # (``worker.app.create_app`` sets it; one worker app per process). None: the broker's
    # Redis is the job store.
    job_store: ClassVar[redis.Redis | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        # The kombu Connection this channel's transport serves (see ``close``).
        self._owner = self.connection.client

    def close(self) -> None:
        """kombu's close, which gives the unacknowledged messages back (``restore_unacked``),
        also when the transport was detached from its connection first.

        A consumer whose connection broke calls ``Connection.collect`` and then
        ``Connection.close`` (``Consumer.on_connection_error_after_connected``). ``collect``
        closes the default channel (a close that fails midway on the broken socket, its
        ``BRPOP`` under way, is ignored as a connection error) and then detaches the transport
        (``transport.client = None``) without forgetting the channel; ``close`` closes it
        again, and the restore builds a connection pool from ``transport.client``: an
        ``AttributeError`` that stopped the worker at a Sentinel failover (seen under
        ``tests/integration/test_sentinel_failover.py``), its heartbeats with it, and its jobs
        waited. The detached transport is given its connection back for the close."""
        qos = self.__dict__.get("_qos")  # only if the channel ever made one
        if qos is not None:
            qos.flush_acks()
        transport = self.connection
        detached = transport is not None and transport.client is None and not self.closed
        if detached:
            transport.client = self._owner
        try:
            super().close()  # type: ignore[no-untyped-call]
        finally:
            if detached:
                transport.client = None

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
        store = self.job_store
        if store is None:
            with self.conn_or_acquire() as client:
                # The entry, the item on the list and the record of it, in one transaction: a
                # purge of the entry removes that item (cancelflow.dead_letters).
                DeadLetterStore.add_sync(client, dl, park=(DEAD_LETTER_QUEUE, item))
        else:
            # The entry in the job store, then the item parked on the broker's list; the
            # entry does not record it (a purge, in the job store, could not remove it), as
            # worker.consumer parks on a broker that is not the job store.
            DeadLetterStore.add_sync(store, dl)
            with self.conn_or_acquire() as client:
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


class WorkerTransport(Transport):
    Channel = WorkerChannel


class WorkerSentinelChannel(WorkerChannel, SentinelChannel):
    """The workers' channel on a Redis reached through Sentinel."""


class WorkerSentinelTransport(SentinelTransport):
    Channel = WorkerSentinelChannel


def show_transports_as(scheme: str, *transports: str) -> None:
    """Name ``transports`` (class paths) ``scheme`` wherever kombu shows a connection as a URL
    (Celery's banner; Flower's Broker page, which picks its client by that URL's scheme,
    flower/utils/broker.py, and said "'redis' broker is not supported" for
    "messaging.patches:WorkerTransport://..."). Only the shown URL changes: kombu's
    ``Connection.clone`` and every connection made use the class itself
    (``_info(resolve=False)``)."""
    Connection.resolve_aliases.update(dict.fromkeys(transports, scheme))


# --- workers: a step's task events, and the pool ------------------------------------------------


class HubEventsRequest(Request):  # type: ignore[misc]  # Celery is untyped
    """Celery's request, whose task events are published by the consumer's hub thread.

    The pool sends a task's ``task-started`` (``on_accepted``), ``task-succeeded``,
    ``task-retried`` and ``task-failed`` events from the thread that ran it: the runtime's
    loop for a step, an executor thread for a maintenance task. The worker's event
    dispatcher publishes from the caller's thread once its buffer is full, on a connection
    the hub reads (see the module): with publisher confirms, the hub can take the ack the
    publisher waits for, and both threads stop until the broker drops the connection. Handed
    to the hub (as Celery hands it acknowledgements, ``Consumer.call_soon_ack``), every
    publish and read of that connection is on one thread. Sent from the hub's own thread,
    or with no hub (a test's eager run), an event is sent at once.
    """

    def send_event(self, type: str, **fields: Any) -> None:
        hub = get_event_loop()
        if hub is None or threading.current_thread() is threading.main_thread():
            super().send_event(type, **fields)
            return
        hub.call_soon(functools.partial(super().send_event, type, **fields))  # type: ignore[no-untyped-call]


# How long a worker's first waiting task event may wait for others before they are published
# together (Flower shows a task's state at most this much later).
TASK_EVENTS_DELAY_S = 0.05


class TaskEventsEvery:
    """A Celery consumer whose task events go out in batches: ``TASK_EVENTS_DELAY_S`` after
    the first of them waits, or as soon as the dispatcher's buffer is full (Celery's
    ``buffer_limit``, 24 events), rather than at the hub's next tick (``Consumer.
    on_send_event_buffered``'s ``call_soon``), which published a message per one or two
    events. Events are monitoring: late by at most the delay, never lost to it (a consumer
    that stops flushes them first, ``flush_task_events``)."""

    hub: Any
    event_dispatcher: Any
    _task_events_due: bool = False

    def on_send_event_buffered(self) -> None:
        hub = self.hub
        if hub is None or self._task_events_due:
            return
        if threading.current_thread() is not threading.main_thread():
            # Not the hub's thread (HubEventsRequest hands task events to it): its timers
            # are the hub's own.
            hub.call_soon(self.on_send_event_buffered)
            return
        self._task_events_due = True
        hub.call_later(TASK_EVENTS_DELAY_S, self.flush_task_events)

    def flush_task_events(self) -> None:
        """Publish the task events waiting (also as the consumer stops)."""
        self._task_events_due = False
        if self.event_dispatcher:
            self.event_dispatcher.flush()


class StepRequest(HubEventsRequest):
    """Celery's request of a step, with the task events Flower reads made true to the step.

    Its events are sent by the hub (``HubEventsRequest``); what a step's events say is
    adjusted here, and only here:

    - ``runtime``: the tracer times only the task's body, which carries out a step's result
      in a millisecond; the step's work ran before it, on the loop (``worker.pool``). The
      runtime sent is from the pool's start of the step (``on_accepted``'s time,
      ``time_start``, which Celery keeps as an epoch time) to its end.
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


class RetryingTask(CeleryStateTask):  # type: ignore[misc]  # Celery is untyped
    """A task in a monitor's state (Flower's), shown ``RETRY`` until its retried run starts.

    A retry (``Task.retry`` with a countdown) sends its message at once, with its
    ``task-sent``, and a worker receives it at once (Redis has no delayed delivery: the
    consumer holds an eta message in memory until it is due) and sends ``task-received``.
    Celery's state lets any event replace ``RETRY`` (``Task.event`` leaves RETRY out of its
    out-of-order merge), so Flower showed ``PENDING`` then ``RECEIVED`` for the whole
    countdown. Here a ``task-sent`` or ``task-received`` while the task is ``RETRY`` brings
    its fields (the retry's number, its eta) but not its state: ``task-started`` ends the
    ``RETRY`` when the retried run starts, then success or failure as before. An event older
    than the retry (the first run's ``task-sent``, which the API publishes in a batch up to
    50 ms later, so it may come after a fast retry) only fills the fields not known yet.
    """

    def event(
        self,
        type_: str,
        timestamp: float | None = None,
        local_received: float | None = None,
        fields: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.state == states.RETRY and type_ in ("sent", "received"):
            # As Celery's event() does first: note when (``self.sent``, ``self.received``).
            setattr(self, type_, timestamp)
            older = timestamp is not None and self.timestamp and timestamp < self.timestamp
            for key, value in (fields or {}).items():
                if key not in ("state", "timestamp") and not (
                    older and getattr(self, key, None) is not None
                ):
                    setattr(self, key, value)
            return
        super().event(type_, timestamp, local_received, fields, **kwargs)


def show_retries_until_they_run() -> None:
    """Every monitor's state in this process (Flower's, which imports ``worker.app``) keeps
    a task ``RETRY`` until its retried run starts (``RetryingTask``)."""
    CeleryState.Task = RetryingTask


# --- workers: tracebacks copied without every instruction's position ---------------------


class LeanCode(billiard_einfo._Code):  # type: ignore[misc]  # billiard is untyped
    """billiard's copy of a code object in a task's ``ExceptionInfo`` (Celery makes one for
    every retry and failure, ``celery.app.trace``), which reads the code's positions only
    when asked for them.

    billiard's ``_Code`` copies ``list(code.co_positions())``: a tuple for each instruction of
    each frame's function, some 4,000 for a retried step (Celery's ``trace_task`` alone has
    2,341), about 0.5 MB built and dropped per retry. Formatting a traceback reads one
    position a frame; only a pickled copy (sent to another process) needs them all, and gets
    them (``__reduce__``). Holding the code object costs nothing: its function holds it too."""

    def __init__(self, code: types.CodeType) -> None:  # billiard's, but the positions
        self.co_filename = code.co_filename
        self.co_name = code.co_name
        self.co_argcount = code.co_argcount
        self.co_cellvars = ()
        self.co_firstlineno = code.co_firstlineno
        self.co_flags = code.co_flags
        self.co_freevars = ()
        self.co_code = b""
        self.co_lnotab = b""
        self.co_names = code.co_names
        self.co_nlocals = code.co_nlocals
        self.co_stacksize = code.co_stacksize
        self.co_varnames = ()
        self.co_qualname = code.co_qualname
        self._code = code

    @property
    def co_positions(self) -> Any:
        return self._code.co_positions

    def __reduce__(self) -> Any:
        state = dict(self.__dict__)
        state["_co_positions"] = list(state.pop("_code").co_positions())
        return billiard_einfo._Code.__new__, (billiard_einfo._Code,), state


def lean_tracebacks() -> None:
    """The tracebacks of this process's task errors copy code objects as ``LeanCode``."""
    billiard_einfo._Frame.Code = LeanCode


def trace_args(args: tuple[Any, ...]) -> tuple[str, Any, Any, str | None, str | None]:
    """The task id, request, body, content type and encoding out of the arguments Celery's
    request gives its pool for the tracer (``Request.execute_using_pool``: task name, task
    id, request, body, content type, content encoding)."""
    _, task_id, request, body, content_type, content_encoding = args
    return task_id, request, body, content_type, content_encoding


def with_decoded_body(args: tuple[Any, ...], body: Any) -> tuple[Any, ...]:
    """The tracer's arguments (``trace_args``) with the body the pool already decoded and no
    content type, which ``fast_trace_task`` takes as the decoded ``(args, kwargs, embed)``
    rather than decoding the message's bytes a second time."""
    name, task_id, request, _body, _content_type, _content_encoding = args
    return (name, task_id, request, body, None, None)


class LoopPoolBase(ThreadsPool):  # type: ignore[misc]  # Celery is untyped
    """Celery's threads pool, with what ``worker.pool.TaskPool`` adds to its private
    ``_get_info`` (the steps on the loop, for ``celery inspect stats`` and Flower)."""

    def on_loop_count(self) -> int:
        raise NotImplementedError

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info["on-loop"] = self.on_loop_count()
        return info
