"""Webhook endpoints: callback URLs registered once, each with its own ``whsec_`` secret, its
own rotation overlap and an event-type filter (docs/callbacks.md, "Webhook endpoints").

Kept in the job store's Redis: one hash per endpoint (``cf:endpoint:<id>``) and the set of
ids (``cf:endpoints``). Each field is written on its own (``HSET``), so a worker marking a
failure and an operator changing the filter never overwrite each other's change. Secrets
are stored (the worker signs with them) but never leave ``EndpointStore`` except through
``signing_secrets``, and the API answers them once, at creation and at rotation.
"""

from __future__ import annotations

import base64
import json
import re
import secrets as random_secrets
import uuid
from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from cancelflow.contract import isoformat, utcnow

PREFIX = "cf:endpoint:"
INDEX = "cf:endpoints"
ENDPOINT_ID_RE = re.compile(r"ep_[0-9a-f]{32}")
# At most this many endpoints: each job's every event is sent to each enabled one.
MAX_ENDPOINTS = 100
# The secret's random bytes: the middle of what ``whsec_`` secrets may hold (24 to 64).
SECRET_BYTES = 32


def new_secret() -> str:
    """A fresh ``whsec_`` secret (Standard Webhooks: base64 of random bytes)."""
    return "whsec_" + base64.b64encode(random_secrets.token_bytes(SECRET_BYTES)).decode()


def new_endpoint_id() -> str:
    return f"ep_{uuid.uuid4().hex}"


def key(endpoint_id: str) -> str:
    return PREFIX + endpoint_id


class WebhookEndpoint(BaseModel):
    """An endpoint as ``/v1/webhook-endpoints`` shows it: everything but its secrets."""

    model_config = ConfigDict(frozen=True)

    id: str
    url: str
    description: str = ""
    # Event types sent to it (``callbacks.EVENT_TYPES``); empty: every type.
    event_types: list[str] = Field(default_factory=list)
    enabled: bool = True
    # Why it is disabled (by an operator, a 410, or failing for days), and since when.
    disabled_reason: str | None = None
    disabled_at: str | None = None
    # How long the previous secret still signs after a rotation (by default).
    rotation_overlap_s: float
    # Until when the previous secret signs too (null: no rotation under way).
    previous_secret_expires_at: str | None = None
    # Since when every delivery to it has failed (null: the last one succeeded, or none yet).
    failing_since_at: str | None = None
    last_success_at: str | None = None
    last_failure_at: str | None = None
    created_at: str
    updated_at: str

    def wants(self, event_type: str) -> bool:
        """Whether events of ``event_type`` go to this endpoint (it is enabled, its filter
        names the type or is empty)."""
        return self.enabled and (not self.event_types or event_type in self.event_types)


# The hash's fields that are the model's (JSON-encoded), and the secrets (plain strings).
_SECRET = "secret"  # noqa: S105 (a field name, not a secret)
_PREVIOUS = "previous_secret"


def _encode(value: Any) -> str:
    return json.dumps(value)


def _decode(fields: dict[str, str]) -> WebhookEndpoint:
    return WebhookEndpoint.model_validate(
        {
            name: json.loads(value)
            for name, value in fields.items()
            if name in WebhookEndpoint.model_fields
        }
    )


# Field writes to an endpoint that may have just been deleted: only while its hash exists, so a
# write racing a delete never leaves a partial hash behind (one no model could read).
_SET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
# A failed delivery: its time, and the start of the failing streak if none is under way (a
# streak ends with a success, which writes failing_since_at null). Answers the streak's start,
# or false when the endpoint is gone.
_FAILED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'last_failure_at', ARGV[1])
local since = redis.call('HGET', KEYS[1], 'failing_since_at')
if (not since) or since == 'null' then
  redis.call('HSET', KEYS[1], 'failing_since_at', ARGV[1])
  return ARGV[1]
end
return since
"""


def _text(raw: dict[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }


class EndpointStore:
    """The endpoints, in the job store's Redis."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._set_if_exists = redis.register_script(_SET_IF_EXISTS)
        self._failed = redis.register_script(_FAILED)

    async def _set(self, endpoint_id: str, mapping: dict[str, str]) -> bool:
        """Write the fields if the endpoint exists; whether it did."""
        args = [part for item in mapping.items() for part in item]
        return bool(await self._set_if_exists(keys=[key(endpoint_id)], args=args))

    async def _fields(self, endpoint_id: str) -> dict[str, str] | None:
        raw = await cast("Awaitable[dict[Any, Any]]", self.redis.hgetall(key(endpoint_id)))
        return _text(raw) if raw else None

    async def create(
        self,
        *,
        url: str,
        description: str,
        event_types: list[str],
        rotation_overlap_s: float,
        enabled: bool = True,
    ) -> tuple[WebhookEndpoint, str]:
        """A new endpoint and its secret (the only time it is returned)."""
        now = isoformat(utcnow())
        endpoint = WebhookEndpoint(
            id=new_endpoint_id(),
            url=url,
            description=description,
            event_types=event_types,
            enabled=enabled,
            rotation_overlap_s=rotation_overlap_s,
            created_at=now,
            updated_at=now,
        )
        secret = new_secret()
        mapping = {name: _encode(v) for name, v in endpoint.model_dump(mode="json").items()}
        mapping[_SECRET] = secret
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key(endpoint.id), mapping=mapping)
            pipe.sadd(INDEX, endpoint.id)
            await pipe.execute()
        return endpoint, secret

    async def count(self) -> int:
        return int(await cast("Awaitable[int]", self.redis.scard(INDEX)))

    async def get(self, endpoint_id: str) -> WebhookEndpoint | None:
        fields = await self._fields(endpoint_id)
        return None if fields is None else _decode(fields)

    async def all(self) -> list[WebhookEndpoint]:
        """Every endpoint, oldest first (two round trips, however many there are)."""
        ids = sorted(
            (i.decode() if isinstance(i, bytes) else i)
            for i in await cast("Awaitable[set[Any]]", self.redis.smembers(INDEX))
        )
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for endpoint_id in ids:
                pipe.hgetall(key(endpoint_id))
            raws = await pipe.execute()
        found = [_decode(_text(raw)) for raw in raws if raw]
        return sorted(found, key=lambda e: (e.created_at, e.id))

    async def update(self, endpoint_id: str, **changes: Any) -> WebhookEndpoint | None:
        """Set the given model fields (``url``, ``description``, ``event_types``, ``enabled``,
        ``rotation_overlap_s``…); re-enabling clears why it was disabled and its failures."""
        now = isoformat(utcnow())
        if changes.get("enabled") is True:
            changes |= {"disabled_reason": None, "disabled_at": None, "failing_since_at": None}
        elif changes.get("enabled") is False:
            changes.setdefault("disabled_reason", "disabled by an operator")
            changes["disabled_at"] = now
        mapping = {name: _encode(v) for name, v in {**changes, "updated_at": now}.items()}
        if not await self._set(endpoint_id, mapping):
            return None
        return await self.get(endpoint_id)

    async def rotate(
        self, endpoint_id: str, *, overlap_s: float | None = None
    ) -> tuple[WebhookEndpoint, str] | None:
        """A new secret for the endpoint; the current one keeps signing too for ``overlap_s``
        (the endpoint's ``rotation_overlap_s`` by default). Returns the endpoint and its new
        secret (the only time it is returned)."""
        fields = await self._fields(endpoint_id)
        if fields is None:
            return None
        endpoint = _decode(fields)
        overlap = endpoint.rotation_overlap_s if overlap_s is None else overlap_s
        now = utcnow()
        secret = new_secret()
        expires = isoformat(now + timedelta(seconds=overlap)) if overlap > 0 else None
        written = await self._set(
            endpoint_id,
            {
                _SECRET: secret,
                _PREVIOUS: fields[_SECRET],
                "previous_secret_expires_at": _encode(expires),
                "updated_at": _encode(isoformat(now)),
            },
        )
        updated = await self.get(endpoint_id) if written else None
        return None if updated is None else (updated, secret)

    async def delete(self, endpoint_id: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key(endpoint_id))
            pipe.srem(INDEX, endpoint_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def signing_secrets(self, endpoint_id: str, *, now: datetime) -> list[str]:
        """The secrets a delivery to the endpoint is signed with now: its secret, and while a
        rotation's overlap lasts, the previous one too (Standard Webhooks: one ``v1,``
        signature per secret, space-separated, so a receiver holding either verifies)."""
        fields = await self._fields(endpoint_id)
        if fields is None:
            return []
        found = [fields[_SECRET]]
        endpoint = _decode(fields)
        expires = endpoint.previous_secret_expires_at
        if _PREVIOUS in fields and expires and now < datetime.fromisoformat(expires):
            found.append(fields[_PREVIOUS])
        return found

    async def delivered(self, endpoint_id: str) -> None:
        """A delivery to the endpoint succeeded: it is not failing."""
        now = _encode(isoformat(utcnow()))
        await self._set(endpoint_id, {"last_success_at": now, "failing_since_at": _encode(None)})

    async def failed(self, endpoint_id: str, *, at: datetime) -> datetime | None:
        """A delivery to the endpoint failed at ``at``: since when it has been failing (the
        first failure after its last success), or None if it is gone."""
        since = await self._failed(keys=[key(endpoint_id)], args=[_encode(isoformat(at))])
        if not since:
            return None
        text = since.decode() if isinstance(since, bytes) else str(since)
        return datetime.fromisoformat(json.loads(text))
