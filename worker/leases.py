"""Worker heartbeats: a dead worker's messages go back on their queues within a lease.

Redis gives a message back only after the visibility timeout (an hour by default): kombu
keeps every delivered, unacknowledged message in one hash and restores those older than the
timeout, because it cannot tell a dead worker's message from one a live worker still holds
(a step under way, a retry waiting on its countdown). Here each worker process keeps its
unacknowledged messages in a hash of its own (``unacked_keys``) and beats every
``heartbeat_s`` in a sorted set of the job store (``cf:workers``, scored by Redis's clock).
Every worker sweeps that set: a process silent for ``lease_s`` is dead, and the first sweep
to claim it puts everything it held back on its queues at once, as RabbitMQ does when a
consumer's connection drops. The job store reads the same heartbeats: a confirm lease held by
a dead process is taken over (``cancelflow.store``).

A process cut off from Redis looks dead too, and its messages run elsewhere while it may
still be working on them. Two things keep that safe: steps resume from the job record (a
second delivery finds its job moved on), and a process sends no provider request while its
own last beat is ``2 * heartbeat_s`` old or more (``fresh``), so a request it sent ends
before its lease can be taken over (``load_settings`` checks that the timeouts fit).

On RabbitMQ a process cut off from Redis still holds its broker connection, and RabbitMQ goes
on handing it messages that it cannot run (each waits on the job store, then goes back to its
queue, one delivery count spent). So while its beats fail, such a process stops consuming its
task queues (``basic.cancel``, on the consumer's hub), and consumes again after the first beat
Redis takes. On Redis the broker is the job store: a process that cannot beat cannot take a
message either.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

import redis
from kombu.asynchronous import get_event_loop

from cancelflow.logging import get_logger
from cancelflow.redis_clients import sync_client
from cancelflow.settings import Settings, WorkerSettings
from cancelflow.store import WORKERS

log = get_logger(__name__)

# This process's name in the heartbeats, and in its unacknowledged-messages keys.
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

# A beat, by Redis's clock (hosts' clocks may disagree; the server's is the one all compare).
_BEAT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] + t[2] / 1000000, ARGV[1])
return t[1]
"""

# Processes silent for ARGV[1] seconds, each claimed by one sweep (a key that lapses after a
# lease, so that a sweeper dying while it restores leaves the claim to the next sweep). The
# dead process keeps its stale score meanwhile: its confirm leases can be taken over at once.
_CLAIM_DEAD = """
local now = tonumber(redis.call('TIME')[1])
local cutoff = now - tonumber(ARGV[1])
local claimed = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', 0, 20)) do
  if redis.call('SET', KEYS[1] .. ':claim:' .. id, ARGV[2], 'NX', 'EX', ARGV[1]) then
    claimed[#claimed + 1] = id
  end
end
return {cutoff, claimed}
"""

# Forget a restored process, unless it came back and beat since the claim.
_FORGET = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then redis.call('ZREM', KEYS[1], ARGV[1]) end
redis.call('DEL', KEYS[1] .. ':claim:' .. ARGV[1])
return 0
"""


def unacked_keys(worker_id: str) -> dict[str, str]:
    """kombu's transport options that give a worker process its own unacknowledged keys."""
    return {
        "unacked_key": f"unacked:{worker_id}",
        "unacked_index_key": f"unacked_index:{worker_id}",
        "unacked_mutex_key": f"unacked_mutex:{worker_id}",
    }


class Leases(threading.Thread):
    """Beats for this process and restores the messages of dead ones (one thread)."""

    def __init__(self, app: Any, settings: Settings, worker_id: str = WORKER_ID) -> None:
        super().__init__(name="cancelflow-leases", daemon=True)
        self.app = app
        self.conf: WorkerSettings = settings.worker
        self.worker_id = worker_id
        # Only Redis needs its dead workers' messages put back (brokers.amqp).
        self.restores = settings.broker_kind() == "redis"
        timeout = max(1.0, self.conf.heartbeat_s)
        self._redis = sync_client(
            settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._beat = self._redis.register_script(_BEAT)
        self._claim = self._redis.register_script(_CLAIM_DEAD)
        self._forget = self._redis.register_script(_FORGET)
        # Not ``_stop``: threading.Thread has a method of that name, which join() calls.
        self._stopping = threading.Event()
        self._pid = os.getpid()  # a forked child (an embedded beat) must not unregister us
        self._last_beat = 0.0  # monotonic time of the last beat Redis took
        # RabbitMQ: the worker's consumer (``attach``), and whether its task queues are held.
        self.holds = settings.broker_kind() == "amqp"
        self._consumer: Any = None
        self.held = False

    def attach(self, consumer: Any) -> None:
        """The worker's Celery consumer, whose task queues a failing beat holds."""
        self._consumer = consumer

    def fresh(self) -> bool:
        """Whether this process may send a provider request: its last beat is recent."""
        return time.monotonic() - self._last_beat < 2 * self.conf.heartbeat_s

    def beat(self) -> None:
        sent = time.monotonic()
        self._beat(keys=[WORKERS], args=[self.worker_id])
        self._last_beat = sent

    def start(self) -> None:
        """Beat once (before the worker consumes anything), then keep beating."""
        try:
            self.beat()
        except redis.RedisError as exc:
            log.warning("worker.heartbeat.failed", error=f"{type(exc).__name__}: {exc}")
        super().start()

    def run(self) -> None:
        while not self._stopping.wait(self.conf.heartbeat_s):
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("worker.heartbeat.failed", error=f"{type(exc).__name__}: {exc}")
                self._hold(True)
                continue
            self._hold(False)
            try:
                self.sweep()
            except Exception as exc:  # the next sweep tries again; beats must go on
                log.warning("worker.sweep.failed", error=f"{type(exc).__name__}: {exc}")

    def _hold(self, cut_off: bool) -> None:
        """Stop (``cut_off``) or resume taking messages from RabbitMQ, on the consumer's hub
        (the one thread that uses its channel)."""
        consumer = self._consumer
        if not self.holds or consumer is None or cut_off == self.held:
            return
        hub = get_event_loop()
        if hub is None:
            return
        self.held = cut_off

        def apply() -> None:
            tasks = getattr(consumer, "task_consumer", None)
            if tasks is None:  # between connections: the next one consumes, the next beat holds
                return
            try:
                if cut_off:
                    tasks.cancel()
                else:
                    tasks.consume()
            except Exception as exc:  # the connection is going: its successor consumes anew
                log.warning("worker.consuming.hold_failed", error=f"{type(exc).__name__}: {exc}")
                return
            log.warning(
                "worker.consuming.held" if cut_off else "worker.consuming.resumed",
                reason="the job store does not answer" if cut_off else "beats again",
            )

        hub.call_soon(apply)  # type: ignore[no-untyped-call]

    def sweep(self) -> int:
        """Put the messages of every dead process back on their queues; how many."""
        cutoff, dead = self._claim(keys=[WORKERS], args=[int(self.conf.lease_s), self.worker_id])
        restored = 0
        for raw in dead:
            worker_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            if worker_id == self.worker_id:
                continue  # our own beats lapsed (Redis was away): we are alive
            count = 0
            if self.restores:  # RabbitMQ gave them back as the connection dropped
                with self.app.connection_for_write() as conn:
                    count = conn.default_channel.restore_worker(**unacked_keys(worker_id))
            self._forget(keys=[WORKERS], args=[worker_id, cutoff])
            restored += count
            log.warning("worker.dead.restored", dead_worker=worker_id, messages=count)
        return restored

    def stop(self) -> None:
        """Stop beating. A warm shutdown gave back its messages (kombu restores what is
        unacknowledged as the channel closes); if any are left, others restore them."""
        self._stopping.set()
        if os.getpid() != self._pid:
            return
        if self.is_alive():
            self.join(timeout=self.conf.heartbeat_s + 1)
        try:
            if not self._redis.exists(unacked_keys(self.worker_id)["unacked_key"]):
                self._redis.zrem(WORKERS, self.worker_id)
        except redis.RedisError as exc:
            log.warning("worker.heartbeat.unregister_failed", error=type(exc).__name__)
        self._redis.close()


_leases: Leases | None = None


def start(app: Any, settings: Settings) -> Leases:
    """Start this process's heartbeats (once)."""
    global _leases
    if _leases is None:
        _leases = Leases(app, settings)
        _leases.start()
    return _leases


def attach(consumer: Any) -> None:
    """Give this process's heartbeats the worker's consumer (``Leases.attach``)."""
    if _leases is not None:
        _leases.attach(consumer)


def fresh() -> bool:
    """Whether this process may send a provider request (True outside a running worker)."""
    return _leases is None or _leases.fresh()


def stop() -> None:
    global _leases
    if _leases is not None:
        _leases.stop()
        _leases = None
