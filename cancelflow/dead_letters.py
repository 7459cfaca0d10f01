"""The dead-letter store: jobs, callbacks and messages that could not finish, kept until purged.

Keys: ``cf:dl:{id}`` (the entry as JSON), ``cf:dl:index`` (ids by time) and
``cf:dl:kind:{kind}`` (ids by kind, so counting them is one ``SCARD``: the
``cancelflow_dead_letters`` gauge). Nothing here expires: an operator lists, shows, replays or
purges.

A poison message written on Redis is also parked byte for byte on the broker's
``dead_letters`` list. Such an entry records where (``DeadLetter.parked``), and the exact item
is kept at ``cf:dl:parked:{id}``: the entry, its index entries, that key and the list item
are written in one transaction (``add(..., park=...)``), and deleting the entry removes that
one item (``LREM`` count 1) in the same script, so purging every poison entry empties the
list. Entries written before (no ``parked``) leave their parked copy on delete, as before.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from cancelflow.contract import DEAD_LETTER_QUEUE, isoformat, utcnow
from cancelflow.errors import CancelflowError

INDEX = "cf:dl:index"
# "billing_event": a billing event that could not become a job (see producers/billing.py).
Kind = Literal["job", "callback", "poison", "billing_event"]
KINDS: tuple[str, ...] = get_args(Kind)
# Set once the kind sets hold every entry (entries older than the sets are added by
# ``index_kinds``).
KINDS_INDEXED = "cf:dl:kinds-indexed"


def key(dl_id: str) -> str:
    """The key of one entry (its JSON)."""
    return f"cf:dl:{dl_id}"


def kind_key(kind: str) -> str:
    """The set of the ids of one kind's entries (ids are ``dl_…``: no clash with ``key``)."""
    return f"cf:dl:kind:{kind}"


def parked_key(dl_id: str) -> str:
    """The key holding the exact list item a poison entry parked (``cf:dl:parked:dl_…``: no
    clash with ``key``, whose ids start with ``dl_``)."""
    return f"cf:dl:parked:{dl_id}"


class Parked(BaseModel):
    """Where a poison message's raw item was parked: one item of the broker list
    ``queue_key``, whose bytes are kept at ``key`` (the entry's ``parked_key``)."""

    # Answered whole: the OpenAPI document marks every field required (it always is sent).
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    queue_key: str = DEAD_LETTER_QUEUE
    key: str


class DeadLetter(BaseModel):
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    id: str = Field(default_factory=lambda: f"dl_{uuid.uuid4().hex}")
    kind: Kind
    job_id: str | None = None
    provider: str | None = None
    step: str | None = None
    queue: str | None = None
    error_type: str
    error: str
    # Every attempt's error, oldest first, and the last traceback.
    errors: list[dict[str, Any]] = Field(default_factory=list)
    traceback: str | None = None
    # What arrived: the task's arguments, or a poison message's body and headers.
    payload: Any = None
    # For callbacks: which event to deliver again on replay.
    event: str | None = None
    created_at: str = Field(default_factory=lambda: isoformat(utcnow()))
    # A poison message parked on the broker's list with the entry (see the module).
    parked: Parked | None = None


class DeadLetterFilter(BaseModel):
    provider: str | None = None
    kind: Kind | None = None
    error_type: str | None = None
    older_than: datetime | None = None
    newer_than: datetime | None = None

    def matches(self, dl: DeadLetter) -> bool:
        return (
            (self.provider is None or dl.provider == self.provider)
            and (self.kind is None or dl.kind == self.kind)
            and (self.error_type is None or dl.error_type == self.error_type)
        )


# One page of ``index_kinds``: the kind is read from the entry's JSON as pydantic writes it
# (compact, ``id`` then ``kind`` first, so the first match is the entry's own field).
_INDEX_KINDS = """
local n = 0
for _, id in ipairs(ARGV) do
  local raw = redis.call('GET', 'cf:dl:' .. id)
  local kind = raw and string.match(raw, '"kind":"([%w_]+)"')
  if kind then
    redis.call('SADD', 'cf:dl:kind:' .. kind, id)
    n = n + 1
  end
end
return n
"""


# An operator's replay takes the entry out in one step: of two replays at once, only the one
# that removed it gets it back (and delivers); the other finds nothing.
_CLAIM = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 3, #KEYS do redis.call('SREM', KEYS[i], ARGV[1]) end
return raw
"""


# Delete an entry, its index entries and, if it parked a message, that one list item (the
# exact bytes kept at KEYS[3]): of a purge and a delete at once, only the one that found the
# entry removes the item. An entry without ``parked`` (older ones) leaves the list as it is.
# Returns {deleted (0/1), parked items removed (0/1)}.
_DELETE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return {0, 0} end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 5, #KEYS do redis.call('SREM', KEYS[i], ARGV[1]) end
local removed = 0
local ok, entry = pcall(cjson.decode, raw)
local parked = ok and type(entry) == 'table' and entry['parked']
if type(parked) == 'table' and parked['key'] == KEYS[3] and parked['queue_key'] == KEYS[4] then
  local item = redis.call('GET', KEYS[3])
  if item then removed = redis.call('LREM', KEYS[4], 1, item) end
end
redis.call('DEL', KEYS[3])
return {1, removed}
"""


class AlreadyReplayed(CancelflowError):
    """The dead letter is gone: another replay took it (or it was purged)."""

    def __init__(self, dl_id: str) -> None:
        super().__init__(f"dead letter {dl_id} already replayed (or purged)")
        self.dl_id = dl_id


class DeadLetterStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._index_kinds = redis.register_script(_INDEX_KINDS)
        self._claim = redis.register_script(_CLAIM)
        self._delete = redis.register_script(_DELETE)

    async def add(self, dl: DeadLetter, *, park: tuple[str, bytes] | None = None) -> DeadLetter:
        """Write the entry; with ``park`` (a broker list and an item), also push the item on
        that list, recorded in the entry so deleting it removes the item, all in one
        transaction. The job store must then be the broker's Redis."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for command, args in _add_commands(dl, park):
                getattr(pipe, command)(*args)
            await pipe.execute()
        return dl

    @staticmethod
    def add_sync(
        client: SyncRedis, dl: DeadLetter, *, park: tuple[str, bytes] | None = None
    ) -> DeadLetter:
        """``add`` for synchronous callers (the broker transport has no event loop)."""
        with client.pipeline(transaction=True) as pipe:
            for command, args in _add_commands(dl, park):
                getattr(pipe, command)(*args)
            pipe.execute()
        return dl

    async def get(self, dl_id: str) -> DeadLetter | None:
        raw = await self.redis.get(key(dl_id))
        return DeadLetter.model_validate_json(raw) if raw else None

    async def list(
        self, flt: DeadLetterFilter | None = None, *, limit: int = 100
    ) -> list[DeadLetter]:
        """Newest first, filtered by provider, kind, error type and age."""
        flt = flt or DeadLetterFilter()
        high = flt.older_than.timestamp() if flt.older_than else "+inf"
        low = flt.newer_than.timestamp() if flt.newer_than else "-inf"
        found: list[DeadLetter] = []
        offset, page = 0, 500
        while len(found) < limit:
            ids = await self.redis.zrevrangebyscore(INDEX, high, low, start=offset, num=page)
            if not ids:
                break
            offset += len(ids)
            names = [key(i.decode() if isinstance(i, bytes) else i) for i in ids]
            raws = await self.redis.mget(names)
            for raw in raws:
                if raw is None:
                    continue
                dl = DeadLetter.model_validate_json(raw)
                if flt.matches(dl):
                    found.append(dl)
                    if len(found) >= limit:
                        break
        return found

    async def delete(self, dl_id: str) -> bool:
        """Delete the entry (and its parked item, see the module); False when it was gone."""
        deleted, _removed = await self._delete(
            # The kind is in the entry; removing the id from every kind's set saves reading it.
            keys=[
                key(dl_id),
                INDEX,
                parked_key(dl_id),
                DEAD_LETTER_QUEUE,  # where every entry parks (``Parked.queue_key``)
                *(kind_key(kind) for kind in KINDS),
            ],
            args=[dl_id],
        )
        return bool(deleted)

    async def claim(self, dl_id: str) -> DeadLetter | None:
        """Take the entry out of the store (atomically) and return it; None when it is gone,
        so of two callers at once exactly one gets it."""
        raw = await self._claim(
            keys=[key(dl_id), INDEX, *(kind_key(kind) for kind in KINDS)], args=[dl_id]
        )
        return DeadLetter.model_validate_json(raw) if raw else None

    async def purge(self, flt: DeadLetterFilter | None = None) -> int:
        """Delete every entry the filter matches; returns how many."""
        count = 0
        while batch := await self.list(flt, limit=500):
            for dl in batch:
                count += await self.delete(dl.id)
        return count

    async def count(self) -> int:
        return int(await self.redis.zcard(INDEX))

    async def index_kinds(self) -> int:
        """Add the entries written before the kind sets existed to them, once per Redis;
        returns how many entries were indexed (0 when already done). Safe to run
        concurrently and again: adding an id to a set twice changes nothing, and an entry
        deleted meanwhile is not added (each page is one script)."""
        if await self.redis.exists(KINDS_INDEXED):
            return 0
        # ZSCAN returns every entry present from start to end, whatever is added or deleted
        # meanwhile (entries added meanwhile are in their kind's set already).
        indexed, batch = 0, []
        async for dl_id, _score in self.redis.zscan_iter(INDEX, count=500):
            batch.append(dl_id)
            if len(batch) == 500:
                indexed += int(await self._index_kinds(args=batch))
                batch = []
        if batch:
            indexed += int(await self._index_kinds(args=batch))
        await self.redis.set(KINDS_INDEXED, "1")
        return indexed


def _add_commands(
    dl: DeadLetter, park: tuple[str, bytes] | None
) -> list[tuple[str, tuple[Any, ...]]]:
    """The writes of ``add``: the entry and its indexes, and the parked item if any."""
    commands: list[tuple[str, tuple[Any, ...]]] = []
    if park is not None:
        queue_key, item = park
        dl.parked = Parked(queue_key=queue_key, key=parked_key(dl.id))
        commands += [("set", (parked_key(dl.id), item)), ("lpush", (queue_key, item))]
    return [
        ("set", (key(dl.id), dl.model_dump_json())),
        ("zadd", (INDEX, {dl.id: utcnow().timestamp()})),
        ("sadd", (kind_key(dl.kind), dl.id)),
        *commands,
    ]


def poison_payload(
    body: Any, headers: dict[str, Any] | None, content_type: str | None
) -> dict[str, Any]:
    """A message's body as JSON-safe data: text when it decodes, else its repr."""
    if isinstance(body, bytes | bytearray):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            body = repr(bytes(body))
    try:
        json.dumps(body)
    except (TypeError, ValueError):
        body = repr(body)
    return {
        "body": body,
        "headers": {k: str(v) for k, v in (headers or {}).items()},
        "content_type": content_type,
    }
