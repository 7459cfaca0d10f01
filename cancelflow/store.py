"""The job store in Redis: one record per job, transitions atomic and only forward.

Keys (all under ``cf:``):
  job:{id}            hash: status, request, outcome, offer, decision, timestamps
  job:{id}:timeline   list of JSON timeline entries
  job:{id}:callbacks  list of JSON callback attempts
  idem:{sha256(namespace NUL key)}  "job_id|fingerprint" of the request that first used the
                      key in its namespace (an API token's, or a producer's: "billing")
  idem:{sha256(key)}  the same, written before keys had namespaces (read only, see ``create``)
  inflight:{provider}:{sha256(identity)}  the job currently cancelling that subscription
  lease:{id}:confirm  the confirm step's lease: the worker process calling the provider
  jobs                sorted set of job ids by creation time (for listing)
  stats:{hour}        hash "provider|status" -> jobs created in that hour (epoch s // 3600)
                      now in that status, and "provider|outcome:<type>" -> those of them
                      that finished so: ``/v1/stats`` reads these, never the jobs
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast

import structlog
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from cancelflow import lifecycle, tracing
from cancelflow.contract import (
    CallbackAttempt,
    CancellationRequest,
    JobRecord,
    Outcome,
    Status,
    TimelineEntry,
    isoformat,
    new_job_id,
    utcnow,
)
from cancelflow.dead_letters import INDEX as DL_INDEX
from cancelflow.dead_letters import DeadLetter, kind_key
from cancelflow.dead_letters import key as dead_letter_key
from cancelflow.errors import CancelflowError, JobNotFound
from cancelflow.logging import get_logger

log = get_logger(__name__)

PREFIX = "cf:"
JOBS_INDEX = f"{PREFIX}jobs"
# Jobs still watched (queued, mid-chain, or ended with the result callback pending), by
# the time they last moved.
ACTIVE = f"{PREFIX}active"
# Jobs recorded whose first step no producer has confirmed sending, by creation time.
UNDISPATCHED = f"{PREFIX}undispatched"
# Parked jobs by their decision deadline (epoch s), kept by the script that moves the job.
AWAITING = f"{PREFIX}awaiting"
# Worker processes by their last heartbeat (epoch s): a lease held by a process that stopped
# beating is taken over (see worker.leases, which keeps it).
WORKERS = f"{PREFIX}workers"
# A subscription's in-flight marker is released when its job ends; this is only a safety net.
# It must outlive a parked job: ``load_settings`` refuses a provider's decision deadline
# longer than the TTL less ``INFLIGHT_SPARE_S`` (the time a job may take to park: retries,
# countdowns, the decision sweep's interval).
INFLIGHT_TTL_S = 14 * 24 * 3600
INFLIGHT_SPARE_S = 24 * 3600

# ``/v1/stats`` counts jobs by the hour they were created in, each hour's counts one hash kept
# by the scripts that create and move jobs (O(1) per move): a window of any size reads at most
# ``STATS_WINDOW_S / STATS_BUCKET_S + 1`` hashes, however many jobs it holds. A job counts in
# its creation hour under its current status; an hour's hash expires once no window reaches it.
STATS_BUCKET_S = 3600
STATS_WINDOW_S = 31 * 24 * 3600
STATS_PREFIX = f"{PREFIX}stats:"

# The idempotency namespace of a caller that names none (tools, tests): not an API token's,
# not a producer's.
DEFAULT_NAMESPACE = "default"
# A joined job keeps at most this many joiners' callback URLs (``extra_callbacks``).
MAX_EXTRA_CALLBACKS = 16

# Keys and arguments are named below, in the order ``JobStore.create`` passes them.
# A pre-namespace key counts only for the same body: with another body it is taken for
# another caller's key in the old shared namespace, not for a conflict.
_CREATE = """
local job, timeline, idem, inflight = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local jobs, undispatched, active, legacy_idem = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
-- The first step's queue and message ('' for none: the producer sends it after, and the job
-- is marked undispatched until it confirms).
local first_queue = KEYS[9]
local job_id, fingerprint, idem_ttl, inflight_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, entry, job_prefix, callback_url = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local max_extra_callbacks, first_message = tonumber(ARGV[9]), ARGV[10]
local FIRST_FIELD = 11

-- The same idempotency key: the same job (same body), or a conflict (another body).
if idem ~= '' then
  local v = redis.call('GET', idem)
  local legacy = false
  if not v and legacy_idem ~= '' then
    v = redis.call('GET', legacy_idem)
    legacy = true
  end
  if v then
    local sep = string.find(v, '|', 1, true)
    local id = string.sub(v, 1, sep - 1)
    if string.sub(v, sep + 1) == fingerprint then return {'existing', id, '0'} end
    if not legacy then return {'conflict', id, '0'} end
  end
end
-- A job already cancelling the subscription: the request joins it, with its callback URL.
local joined_id = redis.call('GET', inflight)
if joined_id then
  if idem ~= '' then
    redis.call('SET', idem, joined_id .. '|' .. fingerprint, 'EX', idem_ttl)
  end
  local added = '0'
  if callback_url ~= '' then
    local joined = job_prefix .. joined_id
    local raw = redis.call('HGET', joined, 'extra_callbacks')
    local urls = {}
    if raw then urls = cjson.decode(raw) end
    local known = false
    for _, u in ipairs(urls) do if u == callback_url then known = true end end
    if known then
      added = '1'
    elseif #urls < max_extra_callbacks then
      urls[#urls + 1] = callback_url
      redis.call('HSET', joined, 'extra_callbacks', cjson.encode(urls))
      added = '1'
    end
  end
  return {'joined', joined_id, added}
end
-- A new job: its record, its first timeline entry, its marker, its indexes, and its first
-- step's message (or the mark that it is still to be sent).
local fields = {}
for i = FIRST_FIELD, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', job, unpack(fields))
redis.call('RPUSH', timeline, entry)
redis.call('SET', inflight, job_id, 'EX', inflight_ttl)
if idem ~= '' then
  redis.call('SET', idem, job_id .. '|' .. fingerprint, 'EX', idem_ttl)
end
redis.call('ZADD', jobs, now, job_id)
if first_queue ~= '' then
  redis.call('LPUSH', first_queue, first_message)
else
  redis.call('ZADD', undispatched, now, job_id)
end
redis.call('ZADD', active, now, job_id)
return {'created', job_id, '0'}
"""

# Every move of a job is this one script, so each step costs as few round trips as it can.
# It is written in parts, by purpose, joined in this order into one script; keys and
# arguments are named in the first, in the order ``JobStore._run`` passes them.
# Answers {verdict, previous status, lease ms left, [hash, timeline, callbacks]}; verdict is
# 'ok', 'rejected' (not in an allowed status), 'leased' (the lease is held by a live
# process) or 'missing'.
_MOVE_NAMES = """
local job, timeline, inflight, callbacks = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local active, lease_key, dl_key, dl_index, dl_kind = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local workers, awaiting = KEYS[10], KEYS[11]
-- The broker's list the job's next step is pushed on when the move applies ('' for none).
local next_queue = KEYS[12]
-- The status to move to ('' for none) and the statuses it may move from (cancelflow.lifecycle;
-- '' for any).
local to, allowed, now_iso, entry, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local job_id, now, lease, with_record = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local dl_id, dl_json = ARGV[10], ARGV[11]
-- The worker process making this move ('' for none), whether it takes the step ('1': a
-- step's start; '2': one that runs no other delivery of it, so a lease under its own name
-- is a leftover of a delivery that could not give it back), how many seconds a process may
-- go without a heartbeat and still count as alive (by Redis's clock, as the heartbeats),
-- the decision deadline.
local holder, holds, alive_s, deadline = ARGV[12], ARGV[13], tonumber(ARGV[14]), ARGV[15]
-- When the job is next expected to move (epoch s): now, or when a countdown is due.
local expected = ARGV[16]
-- The status of a job parked on a decision (cancelflow.lifecycle.PARKED).
local parked = ARGV[17]
-- The next step's message (the broker's Redis is the job store's): pushed with the move,
-- so the record and the message are written together or not at all.
local next_message = ARGV[18]
local FIRST_FIELD = 19

if lease == 'release' then redis.call('DEL', lease_key) end
local cur = redis.call('HGET', job, 'status')
if not cur then return {'missing', '', 0} end
local function answer(verdict, left)
  if with_record ~= '1' then return {verdict, cur, left} end
  return {verdict, cur, left, redis.call('HGETALL', job),
          redis.call('LRANGE', timeline, 0, -1), redis.call('LRANGE', callbacks, 0, -1)}
end
"""

# Whether the job may move from where it is.
_MOVE_ALLOWED = """
if allowed ~= '' then
  local ok = false
  for s in string.gmatch(allowed, '%S+') do
    if s == cur then ok = true break end
  end
  if not ok then return answer('rejected', 0) end
end
"""

# A lease names the process holding it. One whose process stopped beating (see
# worker.leases) is taken over at once: its holder died mid-call.
_MOVE_LEASE = """
if lease ~= '' and lease ~= 'release' then
  local mine = holder ~= '' and holder or '1'
  if not redis.call('SET', lease_key, mine, 'NX', 'PX', lease) then
    local by = redis.call('GET', lease_key)
    local beat = by and redis.call('ZSCORE', workers, by)
    local alive = beat and tonumber(beat) >= tonumber(redis.call('TIME')[1]) - alive_s
    local leftover = by == holder and holds == '2'
    if holder == '' or (by == holder and not leftover) or (by ~= holder and alive) then
      return answer('leased', redis.call('PTTL', lease_key))
    end
    redis.call('SET', lease_key, mine, 'PX', lease)
  end
end
local status = cur
if to ~= '' then status = to end
"""

# The job's count moves from its old status to its new one, in the stats hash of the hour it
# was created in (named in the job, see ``_COUNT_CREATED``; a job older than the hash, or
# older than the counts, is in none). Standalone Redis only, like every key here.
_MOVE_COUNT = """
if status ~= cur then
  local counted = redis.call('HMGET', job, 'stats_key', 'provider')
  local stats, provider = counted[1], counted[2]
  if stats and provider and redis.call('EXISTS', stats) == 1 then
    redis.call('HINCRBY', stats, provider .. '|' .. cur, -1)
    redis.call('HINCRBY', stats, provider .. '|' .. status, 1)
    -- How a job ended counts once, as its outcome is written (a job finishes once: its moves
    -- only go forward), as "provider|outcome:<type>".
    for i = FIRST_FIELD, #ARGV - 1, 2 do
      if ARGV[i] == 'outcome' then
        local kind = string.match(ARGV[i + 1], '"type":"([%w_]+)"')
        if kind then redis.call('HINCRBY', stats, provider .. '|outcome:' .. kind, 1) end
      end
    end
  end
end
"""

# The record itself, and which process runs the job's step now: set by a step's start,
# cleared by its next write.
_MOVE_WRITE = """
local args = {'status', status, 'updated_at', now_iso}
for i = FIRST_FIELD, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('HSET', job, unpack(args))
if holds ~= '' then
  redis.call('HSET', job, 'held_by', holder, 'held_since', now_iso)
else
  redis.call('HDEL', job, 'held_by', 'held_since')
end
if entry ~= '' then redis.call('RPUSH', timeline, entry) end
if inflight ~= '' and redis.call('GET', inflight) == job_id then redis.call('DEL', inflight) end
"""

# Jobs still watched, by when they are next expected to move: the watchdog's index (see
# ``stalled``). A parked job waits on purpose; an ended one stays until its result callback
# is at its end. The decision deadlines' index moves with the job, in this same script.
_MOVE_INDEX = """
if status == parked then
  redis.call('ZREM', active, job_id)
  if cur ~= parked then redis.call('ZADD', awaiting, deadline, job_id) end
else
  redis.call('ZADD', active, expected, job_id)
  if cur == parked then redis.call('ZREM', awaiting, job_id) end
end
"""

# The job's dead letter is written with the move, so no crash can leave one without the
# other; a final job's keys expire after the retention (or a replayed one's never).
_MOVE_KEEP = """
if dl_key ~= '' then
  redis.call('SET', dl_key, dl_json)
  redis.call('ZADD', dl_index, now, dl_id)
  redis.call('SADD', dl_kind, dl_id)
end
if ttl > 0 then
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', timeline, ttl)
  redis.call('EXPIRE', callbacks, ttl)
elseif ttl < 0 then
  redis.call('PERSIST', job)
  redis.call('PERSIST', timeline)
  redis.call('PERSIST', callbacks)
end
if next_message ~= '' then redis.call('LPUSH', next_queue, next_message) end
return answer('ok', 0)
"""

_TRANSITION = "".join(
    (_MOVE_NAMES, _MOVE_ALLOWED, _MOVE_LEASE, _MOVE_COUNT, _MOVE_WRITE, _MOVE_INDEX, _MOVE_KEEP)
)


# One round trip for a callback attempt: appended, the record touched, and the attempts kept
# as long as the record itself (a finished job's record expires after the retention). A job
# that is gone (expired, or never was) gets nothing: writing would leave a partial record that
# never expires. Answers the record's TTL, -2 (as TTL answers) when there is no record.
_ADD_CALLBACK = """
local job, callbacks, active = KEYS[1], KEYS[2], KEYS[3]
-- The attempt, its time, and the job's id when the watchdog stops watching it ('' if not).
local attempt, at, unwatch = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', job) == 0 then return -2 end
redis.call('RPUSH', callbacks, attempt)
redis.call('HSET', job, 'updated_at', at)
local ttl = redis.call('TTL', job)
if ttl > 0 then redis.call('EXPIRE', callbacks, ttl) end
if unwatch ~= '' then redis.call('ZREM', active, unwatch) end
return ttl
"""

# Runs right after ``_CREATE`` in the same MULTI: the job counts as queued in its creation
# hour's stats hash, and names that hash for the moves to come. Only a job ``_CREATE`` made
# exists under this new id (a repeated or joined request made none), so only it is counted.
_COUNT_CREATED = """
local job, stats = KEYS[1], KEYS[2]
local field, expire_at = ARGV[1], ARGV[2]
if redis.call('EXISTS', job) == 0 then return 0 end
redis.call('HSET', job, 'stats_key', stats)
redis.call('HINCRBY', stats, field, 1)
redis.call('EXPIREAT', stats, expire_at)
return 1
"""

# The watchdog's claim: jobs quiet since the cutoff, each marked as moved now in the same
# script, so two sweeps running at once never both pick (and re-send) the same job.
_CLAIM_STALLED = """
local active = KEYS[1]
local cutoff, now, limit = ARGV[1], ARGV[2], ARGV[3]
local ids = redis.call('ZRANGEBYSCORE', active, '-inf', cutoff, 'LIMIT', 0, limit)
for _, id in ipairs(ids) do redis.call('ZADD', active, 'XX', now, id) end
return ids
"""


# A deadline entry whose job is gone or no longer parked (written by an older version, which
# indexed apart from the move) is dropped; one whose job is still parked is kept.
_DROP_DEADLINE = """
local job, awaiting = KEYS[1], KEYS[2]
local job_id, parked = ARGV[1], ARGV[2]
if redis.call('HGET', job, 'status') ~= parked then
  return redis.call('ZREM', awaiting, job_id)
end
return 0
"""


class IdempotencyConflict(CancelflowError):
    """The idempotency key was used before with a different request body."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"idempotency key already used by job {job_id} with a different body")
        self.job_id = job_id


@dataclass(frozen=True)
class Created:
    job: JobRecord
    # "created", "existing" (same idempotency key and body), or "joined" (a job was already
    # cancelling that subscription).
    how: str
    # Joined with a callback URL: whether the job will deliver its events there too (False
    # when the job already keeps ``MAX_EXTRA_CALLBACKS`` of them).
    callback_added: bool = False


@dataclass(frozen=True)
class Transition:
    applied: bool
    previous: Status


class Outgoing(Protocol):
    """A broker message as the broker's Redis list holds it: ``payload`` to ``LPUSH`` on
    ``key`` (``messaging.patches.StepMessage`` is one)."""

    @property
    def key(self) -> str: ...

    @property
    def payload(self) -> str: ...


@dataclass(frozen=True)
class Began:
    """A step's start: whether the job moved, and the record as it is after the move."""

    applied: bool
    previous: Status
    job: JobRecord
    # Milliseconds left on the lease another delivery holds (``begin(lease=...)``), or None.
    leased_for_ms: int | None = None


class JobObserver(Protocol):
    """Told what the store records, after it is recorded; metrics plug in here
    (``cancelflow.metrics.JobMetrics``). Called on the caller's event loop: must not block."""

    def job_ended(self, provider: str, outcome: str) -> None:
        """A job reached ``finished`` (``outcome``: its outcome's type) or ``dead_lettered``
        (``outcome``: "dead_lettered")."""

    def callback_attempted(self, result: str) -> None:
        """A callback attempt was recorded on a job, with its result."""


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def confirm_lease_key(job_id: str) -> str:
    """The confirm step's lease of a job: held by the worker process calling the provider."""
    return f"{PREFIX}lease:{job_id}:confirm"


def inflight_key(provider: str, identity: str) -> str:
    return f"{PREFIX}inflight:{provider}:{_sha(identity)}"


def stats_key(hour: int) -> str:
    """The stats hash of the jobs created in ``hour`` (epoch s // ``STATS_BUCKET_S``)."""
    return f"{STATS_PREFIX}{hour}"


def stats_hour(epoch_s: float) -> int:
    return int(epoch_s // STATS_BUCKET_S)


def _dump(model: Any) -> str:
    # pydantic's own JSON (compact, as json.dumps with tight separators wrote it), without
    # the round through Python dicts.
    return str(model.model_dump_json())


class JobStore:
    """Reads and moves job records. Every write is one atomic script or pipeline."""

    def __init__(
        self,
        redis: Redis,
        *,
        retention_s: int,
        idempotency_ttl_s: int,
        observer: JobObserver | None = None,
        holder: str = "",
        alive_s: float = 30.0,
    ) -> None:
        self.redis = redis
        # The worker process this store moves jobs for ('' outside workers), and how long a
        # process may go without a heartbeat and still hold its leases.
        self.holder = holder
        self._alive_s = alive_s
        self._retention = retention_s
        self._idem_ttl = idempotency_ttl_s
        self._observer = observer
        self._create = redis.register_script(_CREATE)
        self._transition = redis.register_script(_TRANSITION)
        self._add_callback = redis.register_script(_ADD_CALLBACK)
        self._claim_stalled = redis.register_script(_CLAIM_STALLED)
        self._drop_deadline = redis.register_script(_DROP_DEADLINE)
        self._marks: list[str] = []
        self._marking: asyncio.Task[None] | None = None

    async def create(
        self,
        request: CancellationRequest,
        *,
        identity: str,
        namespace: str = DEFAULT_NAMESPACE,
        job_id: str | None = None,
        first_step: tuple[str, str] | None = None,
    ) -> Created:
        """Record a new queued job, or return the job the request joins or repeats.

        The idempotency key is the caller's own within ``namespace`` (an API token's, or
        "billing"): two callers' keys never meet. Keys recorded before namespaces existed
        (``idem:{sha256(key)}``) are still found for the same body until they expire (the
        idempotency TTL), so a retry across the upgrade makes no second job; with another
        body they are ignored. A request that joins an in-flight job adds its callback URL
        to the job's ``extra_callbacks``, in the same script.

        ``job_id``: the new job's id (made here if None). ``first_step``: the list key and
        payload of its first step's message on the broker, the job store's Redis: ``LPUSH``ed
        by the same script when, and only when, the job is new, so the record and its first
        message exist together or not at all. Without it the job is marked undispatched
        (``UNDISPATCHED``) until its producer confirms sending (``mark_dispatched``)."""
        job_id = job_id if job_id is not None else new_job_id()
        first_queue, first_message = first_step if first_step is not None else ("", "")
        now = utcnow()
        at = isoformat(now)
        # The API request that enqueued it (bound by the API's request_context), to find
        # its log lines from the job.
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        entry_json = _dump(
            TimelineEntry(
                at=at,
                step="enqueue",
                event="queued",
                status=Status.QUEUED,
                details={"request_id": request_id} if request_id is not None else {},
            )
        )
        key = request.idempotency_key
        idem = f"{PREFIX}idem:{_sha(namespace + chr(0) + key)}" if key else ""
        legacy = f"{PREFIX}idem:{_sha(key)}" if key else ""
        fields = {
            "id": job_id,
            "provider": request.provider,
            "status": Status.QUEUED.value,
            "request": _dump(request),
            "created_at": at,
            "updated_at": at,
        }
        if (traceparent := tracing.current_traceparent()) is not None:
            fields["traceparent"] = traceparent
        hour = stats_hour(now.timestamp())
        how, found, added = await self._create_counted(
            keys=[
                job_key(job_id),
                f"{job_key(job_id)}:timeline",
                idem,
                inflight_key(request.provider, identity),
                JOBS_INDEX,
                UNDISPATCHED,
                ACTIVE,
                legacy,
                first_queue,
            ],
            args=[
                job_id,
                request.fingerprint(),
                self._idem_ttl,
                INFLIGHT_TTL_S,
                now.timestamp(),
                entry_json,
                job_key(""),
                str(request.callback_url) if request.callback_url else "",
                MAX_EXTRA_CALLBACKS,
                first_message,
                *[item for pair in fields.items() for item in pair],
            ],
            count=(
                [job_key(job_id), stats_key(hour)],
                [
                    f"{request.provider}|{Status.QUEUED.value}",
                    (hour + 1) * STATS_BUCKET_S + STATS_WINDOW_S,
                ],
            ),
        )
        how, found = _s(how), _s(found)
        if how == "conflict":
            raise IdempotencyConflict(found)
        if how == "created":
            # Exactly what the script wrote: no round trip to read it back.
            return Created(job=_record(fields, [entry_json], []), how=how)
        return Created(job=await self.get(found), how=how, callback_added=_s(added) == "1")

    async def _create_counted(
        self, *, keys: list[str], args: list[Any], count: tuple[list[str], list[Any]]
    ) -> tuple[Any, Any, Any]:
        """``_CREATE``, then ``_COUNT_CREATED``, in one MULTI: one round trip, and the job is
        never without its count. Sent as EVALSHA and EVAL, not as registered scripts: on a
        pipeline those cost a SCRIPT EXISTS round trip first. A NOSCRIPT (Redis restarted)
        means ``_CREATE`` did not run, and the count found no job: loaded, it runs again."""
        count_keys, count_args = count
        for _ in range(2):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.evalsha(self._create.sha, len(keys), *keys, *args)
                pipe.eval(_COUNT_CREATED, len(count_keys), *count_keys, *count_args)
                created, counted = await pipe.execute(raise_on_error=False)
            if not isinstance(created, NoScriptError):
                break
            self._create.sha = await self.redis.script_load(_CREATE)
        for answer in (created, counted):
            if isinstance(answer, Exception):
                raise answer
        return created[0], created[1], created[2]

    async def get(self, job_id: str) -> JobRecord:
        """The whole record; ``JobNotFound`` if there is none (or it expired)."""
        key = job_key(job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(key)
            pipe.lrange(f"{key}:timeline", 0, -1)
            pipe.lrange(f"{key}:callbacks", 0, -1)
            raw, timeline, callbacks = await pipe.execute()
        if not raw:
            raise JobNotFound(job_id)
        return _record({_s(k): _s(v) for k, v in raw.items()}, timeline, callbacks)

    @property
    def alive_s(self) -> float:
        """How long a worker process may go without a heartbeat and still hold its leases."""
        return self._alive_s

    async def holds_step(self, job_id: str, worker_id: str, *, for_at_most_s: float) -> bool:
        """Whether the worker process ``worker_id`` still runs the step of ``job_id`` it
        began: it beat within its lease (by Redis's clock), and took the step less than
        ``for_at_most_s`` ago. A step runs no longer than its hard time limit, so an older
        hold was left by a step whose last write never happened (Redis went away under it,
        and its message could not be given back): a live process does not run it any more."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zscore(WORKERS, worker_id)
            pipe.hget(job_key(job_id), "held_since")
            pipe.time()
            beat, since, (now, _) = await pipe.execute()
        if beat is None or float(beat) < now - self._alive_s:
            return False
        if since is None:
            return True
        return float(now) - datetime.fromisoformat(_s(since)).timestamp() < for_at_most_s

    async def stalled(self, *, quiet_for_s: float, limit: int = 500) -> list[str]:
        """Claim the jobs mid-chain that were expected to move ``quiet_for_s`` ago and did not
        (their message may be lost): each one's quiet time restarts, so a concurrent sweep
        does not pick it too."""
        now = utcnow().timestamp()
        raw = await self._claim_stalled(keys=[ACTIVE], args=[now - quiet_for_s, now, limit])
        return [_s(r) for r in raw]

    async def due_decisions(self, *, before: float, limit: int = 500) -> list[str]:
        """Parked jobs whose decision deadline is before ``before`` (epoch s)."""
        raw = await self.redis.zrangebyscore(AWAITING, "-inf", before, 0, limit)
        return [_s(r) for r in raw]

    async def drop_deadline(self, job_id: str) -> bool:
        """Forget the deadline of a job that no longer waits for a decision (or no longer
        exists); True if an entry was dropped."""
        return bool(
            await self._drop_deadline(
                keys=[job_key(job_id), AWAITING], args=[job_id, lifecycle.PARKED.value]
            )
        )

    async def unwatch(self, job_id: str) -> None:
        """The job ended and its result callback reached its end: the watchdog stops
        watching it."""
        await self.redis.zrem(ACTIVE, job_id)

    async def release_confirm_lease(self, job_id: str) -> None:
        """Give back the confirm lease of a confirm that ends without moving the job."""
        await self.redis.delete(confirm_lease_key(job_id))

    async def mark_dispatched(self, job_id: str) -> None:
        """The job's first step is on the broker."""
        await self.redis.zrem(UNDISPATCHED, job_id)

    def mark_dispatched_soon(self, job_id: str) -> None:
        """``mark_dispatched`` for a producer's hot path: the marks of every job sent while
        one round trip is under way go in the next one (one ``ZREM`` for many jobs). A mark
        lost to a crash or a Redis error only lets the straggler sweep re-send the step of a
        job still queued a minute later, which a step that finds its job moved on ignores."""
        self._marks.append(job_id)
        if self._marking is None or self._marking.done():
            self._marking = asyncio.get_running_loop().create_task(self._flush_marks())

    async def flush_marks(self) -> None:
        """Wait for the marks not yet written (a producer shutting down)."""
        if self._marking is not None:
            await self._marking

    async def _flush_marks(self) -> None:
        await asyncio.sleep(0)  # the other requests of this loop turn add theirs first
        while self._marks:
            batch, self._marks = self._marks, []
            try:
                await self.redis.zrem(UNDISPATCHED, *batch)
            except RedisError as exc:
                log.warning("job.dispatch_marks.failed", jobs=len(batch), error=str(exc))

    async def dispatched(self, job_id: str) -> bool:
        return await self.redis.zscore(UNDISPATCHED, job_id) is None

    async def undispatched(self, *, older_than_s: float, limit: int = 1000) -> list[str]:
        """Jobs recorded more than ``older_than_s`` ago whose first step was never confirmed
        sent (their producer died in between)."""
        cutoff = utcnow().timestamp() - older_than_s
        raw = await self.redis.zrangebyscore(UNDISPATCHED, "-inf", cutoff, 0, limit)
        return [_s(r) for r in raw]

    async def status(self, job_id: str) -> Status:
        # redis-py types each command for the sync and the async client at once.
        raw = await cast(
            "Awaitable[bytes | str | None]", self.redis.hget(job_key(job_id), "status")
        )
        if raw is None:
            raise JobNotFound(job_id)
        return Status(_s(raw))

    async def begin(
        self,
        job_id: str,
        event: lifecycle.Event,
        *,
        entry: TimelineEntry,
        lease_s: float | None = None,
        sole: bool = False,
    ) -> Began:
        """A step's first write and its read in one round trip: move the job by ``event``
        (or only note ``entry``, when the event keeps its status) if the job is where the
        event moves from, taking the confirm lease for ``lease_s`` seconds if given, and
        answer with the record as it stands after. ``sole``: this process runs no other
        delivery of the step, so a lease it holds itself is taken again (left by a delivery
        that could not release it, Redis being away)."""
        to = lifecycle.target(event)
        result, previous, left, job = await self._run(
            job_id,
            to=to.value,
            allowed=lifecycle.sources(event),
            entry=entry,
            release="",
            ttl=0,
            fields={},
            lease=(confirm_lease_key(job_id), str(int(lease_s * 1000))) if lease_s else None,
            with_record=True,
            holds="sole" if sole else "yes",
        )
        assert job is not None
        return Began(
            applied=result == "ok",
            previous=previous,
            job=job,
            leased_for_ms=max(left, 1) if result == "leased" else None,
        )

    async def transition(
        self,
        job: JobRecord,
        event: lifecycle.Event,
        *,
        entry: TimelineEntry | None = None,
        identity: str | None = None,
        release_lease: bool = False,
        dead_letter: DeadLetter | None = None,
        deadline: float | None = None,
        push: Outgoing | None = None,
        **fields: Any,
    ) -> Transition:
        """Move the job by ``event`` if the job is in a status the event moves from.

        ``release_lease``: the job's confirm lease is deleted in the same round trip,
        whatever the answer. ``dead_letter``: the job's entry in the dead-letter store,
        written only if the job moves (with it, atomically). ``deadline``: for a move to
        ``lifecycle.PARKED``, when the decision is due (epoch s), indexed with the move.
        ``push``: the next step's message, ``LPUSH``ed on the broker's list (the broker is
        this Redis) only if the job moves, in the same script: never a record without its
        message nor a message before its record."""
        to = lifecycle.target(event)
        result, previous, _, _ = await self._run(
            job.id,
            to=to.value,
            allowed=lifecycle.sources(event),
            entry=entry,
            # A final status frees the subscription for a new job and starts the retention.
            release=inflight_key(job.provider, identity) if identity and _ends(to) else "",
            ttl=self._retention if to is Status.FINISHED else 0,
            fields=fields,
            lease=(confirm_lease_key(job.id), "release") if release_lease else None,
            dead_letter=dead_letter,
            deadline=deadline,
            push=push,
        )
        moved = Transition(applied=result == "ok", previous=previous)
        # Only the delivery that moved the job reports it: a redelivered step does not.
        if moved.applied and _ends(to) and self._observer is not None:
            outcome = fields.get("outcome")
            ended = outcome.type.value if isinstance(outcome, Outcome) else to.value
            self._observer.job_ended(job.provider, ended)
        return moved

    async def record(
        self,
        job_id: str,
        entry: TimelineEntry,
        *,
        expect: frozenset[Status] | None = None,
        due_in_s: float = 0.0,
        **fields: Any,
    ) -> Transition:
        """Append a timeline entry (and set fields) without moving the job, only while it is
        in ``expect`` (any status when ``expect`` is None). ``due_in_s``: the job's next step
        waits this long on purpose (a countdown): the watchdog leaves it alone until then."""
        result, previous, _, _ = await self._run(
            job_id,
            to="",
            allowed=expect or frozenset(),
            entry=entry,
            release="",
            ttl=0,
            fields=fields,
            due_in_s=due_in_s,
        )
        return Transition(applied=result == "ok", previous=previous)

    async def replay(self, job_id: str, event: lifecycle.Event, entry: TimelineEntry) -> Transition:
        """An operator's replay: a dead-lettered job goes back to where ``event`` (a replay)
        leads, keeping its id."""
        if event not in (lifecycle.Event.REPLAY, lifecycle.Event.REPLAY_AT_CONFIRM):
            raise ValueError(f"{event} is not a replay")
        result, previous, _, _ = await self._run(
            job_id,
            to=lifecycle.target(event).value,
            allowed=lifecycle.sources(event),
            entry=entry,
            release="",
            ttl=0,
            fields={},
        )
        return Transition(applied=result == "ok", previous=previous)

    async def add_callback_attempt(
        self, job_id: str, attempt: CallbackAttempt, *, unwatch: bool = False
    ) -> None:
        """Record a callback attempt; ``unwatch``: the job's result callback is at its end,
        so the watchdog stops watching it (``unwatch``), in the same round trip.
        ``JobNotFound`` (and nothing written) when the job is gone."""
        ttl = await self._add_callback(
            keys=[job_key(job_id), f"{job_key(job_id)}:callbacks", ACTIVE],
            args=[_dump(attempt), attempt.at, job_id if unwatch else ""],
        )
        if int(ttl) == -2:
            raise JobNotFound(job_id)
        if self._observer is not None:
            self._observer.callback_attempted(attempt.result)

    async def _run(
        self,
        job_id: str,
        *,
        to: str,
        allowed: frozenset[Status],
        entry: TimelineEntry | None,
        release: str,
        ttl: int,
        fields: dict[str, Any],
        lease: tuple[str, str] | None = None,
        with_record: bool = False,
        dead_letter: DeadLetter | None = None,
        holds: str = "",
        deadline: float | None = None,
        due_in_s: float = 0.0,
        push: Outgoing | None = None,
    ) -> tuple[str, Status, int, JobRecord | None]:
        key = job_key(job_id)
        flat: list[str] = []
        for name, value in fields.items():
            flat += [name, value if isinstance(value, str) else _dump(value)]
        dl_keys = (
            [dead_letter_key(dead_letter.id), DL_INDEX, kind_key(dead_letter.kind)]
            if dead_letter is not None
            else ["", "", ""]
        )
        answer = await self._transition(
            keys=[
                key,
                f"{key}:timeline",
                release,
                f"{key}:callbacks",
                ACTIVE,
                lease[0] if lease else "",
                *dl_keys,
                WORKERS,
                AWAITING,
                push.key if push is not None else "",
            ],
            args=[
                to,
                " ".join(sorted(s.value for s in allowed)),
                isoformat(now := utcnow()),
                _dump(entry) if entry is not None else "",
                ttl,
                job_id,
                now.timestamp(),
                lease[1] if lease else "",
                "1" if with_record else "",
                dead_letter.id if dead_letter is not None else "",
                dead_letter.model_dump_json() if dead_letter is not None else "",
                self.holder,
                {"": "", "yes": "1", "sole": "2"}[holds],
                self._alive_s,
                deadline if deadline is not None else now.timestamp(),
                now.timestamp() + due_in_s,
                lifecycle.PARKED.value,
                push.payload if push is not None else "",
                *flat,
            ],
        )
        result, previous = _s(answer[0]), _s(answer[1])
        if result == "missing":
            raise JobNotFound(job_id)
        job = None
        if with_record:
            raw, timeline, callbacks = answer[3:6]
            fields_of = {_s(raw[i]): _s(raw[i + 1]) for i in range(0, len(raw), 2)}
            job = _record(fields_of, timeline, callbacks)
        return result, Status(previous), int(answer[2]), job


def _record(h: dict[str, str], timeline: list[Any], callbacks: list[Any]) -> JobRecord:
    """A job record from its hash fields and its timeline and callbacks lists (JSON items)."""
    request = json.loads(h["request"])
    return JobRecord(
        id=h["id"],
        provider=h["provider"],
        subscription=request["subscription"],
        reason=request.get("reason"),
        callback_url=request.get("callback_url"),
        idempotency_key=request.get("idempotency_key"),
        metadata=request.get("metadata") or {},
        status=Status(h["status"]),
        outcome=json.loads(h["outcome"]) if h.get("outcome") else None,
        offer=json.loads(h["offer"]) if h.get("offer") else None,
        decision=json.loads(h["decision"]) if h.get("decision") else None,
        timeline=[json.loads(e) for e in timeline],
        callbacks=[json.loads(c) for c in callbacks],
        extra_callbacks=json.loads(h.get("extra_callbacks") or "[]"),
        created_at=h["created_at"],
        updated_at=h["updated_at"],
        held_by=h.get("held_by"),
        traceparent=h.get("traceparent"),
    )


def _ends(status: Status) -> bool:
    return status in lifecycle.FINAL


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
