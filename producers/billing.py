"""Billing events in, cancellations out: from a Redis Stream (``cancelflow billing-consumer``)
or from ``POST /v1/billing-events``.

Each event becomes one of:
  enqueued / joined  a job, created (or joined) through ``producers.submit`` with the
                     idempotency key ``billing:<event id>``: a redelivered event finds its job
  duplicate          the event id already made a job from a different request (the rules
                     changed between two deliveries): the first job stands
  ignored            no rule matches: counted by type in ``cf:billing:ignored``, the last
                     1,000 kept in ``cf:billing:ignored:recent``
  dead_lettered      a dead letter of kind ``billing_event``, one however often the event is
                     delivered: keyed by a hash of its bytes when they are not a billing event
                     (not UTF-8 or JSON, nested too deep, a lone surrogate, over
                     ``api.max_body_bytes``, the wrong shape: ``cancelflow.jsonsafe`` and
                     ``BillingEvent`` decide), by its id when the rule cannot make a valid
                     request of it

An entry is read once, by ``cancelflow.jsonsafe``: nothing in one entry can make the consumer
raise, recurse or loop, and what it cannot handle it dead-letters and acknowledges (an entry
that breaks the code anyway is dead-lettered as ``BillingEventCrashed``).

The stream is read as a consumer group, at least once: an entry is acknowledged (XACK) only
after its job is created and its first step sent. An entry left pending by a consumer that died
is claimed (XAUTOCLAIM) by another once idle for ``claim_idle_s``; one delivered
``max_deliveries`` times without success is dead-lettered rather than retried for ever. A read
answered ``NOGROUP`` (Redis restarted without its data, the stream deleted) recreates the group
from the stream's start: entries read twice find their jobs by idempotency key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from cancelflow import jsonsafe, tracing
from cancelflow.contract import isoformat, utcnow
from cancelflow.dead_letters import DeadLetter
from cancelflow.logging import get_logger
from cancelflow.settings import BillingSettings, Settings
from cancelflow.store import IdempotencyConflict
from cancelflow.wiring import Deps
from producers.billing_rules import MissingFields, Rule, Rules
from producers.problems import field_errors
from producers.schemas import BillingEvent, BillingOutcome, BillingResult, FieldError
from producers.submit import submit, validate_request

log = get_logger(__name__)

COUNTS_KEY = "cf:billing:counts"
IGNORED_KEY = "cf:billing:ignored"
RECENT_IGNORED_KEY = "cf:billing:ignored:recent"
RECENT_IGNORED_MAX = 1000
# The stream entry's field holding the event as JSON: XADD <stream> * event '{"id": …}'.
EVENT_FIELD = "event"
# How Redis answers a read when the group is gone: NOGROUP, or (to a read blocked on the
# stream when it was deleted, Redis 7) UNBLOCKED.
GROUP_LOST = ("NOGROUP", "UNBLOCKED")
# Failures that are not the entry's fault: it stays pending and is tried again.
TRANSIENT = (RedisError, OSError, BrokerError)

# Counts each (result, event) once however often the event is delivered.
_COUNT = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
  if ARGV[3] ~= '' then
    redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
    redis.call('LPUSH', KEYS[4], ARGV[4])
    redis.call('LTRIM', KEYS[4], 0, ARGV[5] - 1)
  end
  return 1
end
return 0
"""


# The idempotency namespace of billing events' jobs: no API token's keys share it (and API
# callers may not send ``billing:`` keys at all, see ``producers.submit``).
NAMESPACE = "billing"


def idempotency_key(event_id: str) -> str:
    """The job's idempotency key: one job per event id, however often it is delivered."""
    return f"billing:{event_id}"


def _sha(value: str | bytes) -> str:
    return hashlib.sha256(_bytes(value)).hexdigest()


def _bytes(value: str | bytes) -> bytes:
    # "surrogatepass": a str from a caller may hold a lone surrogate; hashing it must not fail.
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value


def event_limits(settings: Settings) -> jsonsafe.JsonLimits:
    """What an event may be, from the stream or over HTTP: the API's body and depth limits."""
    return jsonsafe.JsonLimits(
        max_bytes=settings.api.max_body_bytes, max_depth=settings.api.max_json_depth
    )


@dataclass(frozen=True)
class Rejected:
    """Bytes that are not a billing event: ``BillingEventUnreadable`` (not bounded JSON) or
    ``BillingEventInvalid`` (JSON of the wrong shape)."""

    error_type: str
    errors: list[FieldError]
    event_id: str | None = None


class BillingProcessor:
    """Turns one billing event into a job, an ignored record or a dead letter."""

    def __init__(self, deps: Deps, celery: Celery, rules: Rules) -> None:
        self.deps = deps
        self.celery = celery
        self.rules = rules
        self.limits = event_limits(deps.settings)
        self._count = deps.store.redis.register_script(_COUNT)

    def parse(self, raw: bytes | str) -> BillingEvent | Rejected:
        """The event in ``raw``, or why it is not one; never raises on what ``raw`` holds."""
        try:
            obj = jsonsafe.loads(raw, self.limits)
        except jsonsafe.JsonRejected as exc:
            return Rejected(
                "BillingEventUnreadable", [FieldError(field="(body)", message=str(exc))]
            )
        try:
            return BillingEvent.model_validate(obj)
        except ValidationError as exc:
            found = obj.get("id") if isinstance(obj, dict) else None
            return Rejected(
                "BillingEventInvalid",
                [FieldError(**e) for e in field_errors(exc)],
                event_id=found if isinstance(found, str) and 0 < len(found) <= 200 else None,
            )

    async def process(self, raw: bytes | str, *, source: dict[str, Any]) -> BillingResult:
        """Handle one event as received (JSON text); ``source`` says where it came from."""
        parsed = self.parse(raw)
        if isinstance(parsed, Rejected):
            return await self.dead_letter(
                parsed.event_id,
                raw,
                source,
                parsed.errors,
                error_type=parsed.error_type,
                by_body=True,
            )
        return await self.process_event(parsed, raw=raw, source=source)

    async def process_event(
        self, event: BillingEvent, *, raw: bytes | str, source: dict[str, Any]
    ) -> BillingResult:
        data = event.model_dump(mode="json")
        rule = self.rules.match(data)
        if rule is None:
            await self._counted("ignored", event.id, event_type=event.type)
            log.info("billing.event.ignored", event_id=event.id, event_type=event.type)
            return BillingResult(event_id=event.id, event_type=event.type, result="ignored")
        try:
            body = rule.request_body(data)
        except MissingFields as exc:
            errors = [
                FieldError(
                    field=f"event.{path}",
                    message=f"missing: rule {rule.name!r} quotes it in {where}",
                )
                for where, path in exc.missing
            ]
            return await self.dead_letter(
                event.id, raw, source, errors, rule=rule, event_type=event.type
            )
        body["idempotency_key"] = idempotency_key(event.id)
        body["metadata"] = {
            **body["metadata"],
            "billing_event": {"id": event.id, "type": event.type, "rule": rule.name},
        }
        checked = validate_request(body, self.deps.settings)
        if isinstance(checked, list):
            errors = [FieldError(**e) for e in checked]
            return await self.dead_letter(
                event.id, raw, source, errors, rule=rule, event_type=event.type
            )
        try:
            created = await submit(self.deps, self.celery, checked, namespace=NAMESPACE)
        except IdempotencyConflict as exc:
            log.warning(
                "billing.event.duplicate", event_id=event.id, job_id=exc.job_id, rule=rule.name
            )
            await self._counted("duplicate", event.id)
            return BillingResult(
                event_id=event.id,
                event_type=event.type,
                result="duplicate",
                rule=rule.name,
                job_id=exc.job_id,
            )
        result: BillingOutcome = "joined" if created.how == "joined" else "enqueued"
        await self._counted(result, event.id)
        log.info(
            "billing.event.enqueued",
            event_id=event.id,
            event_type=event.type,
            rule=rule.name,
            job_id=created.job.id,
            how=created.how,
        )
        return BillingResult(
            event_id=event.id,
            event_type=event.type,
            result=result,
            rule=rule.name,
            job_id=created.job.id,
        )

    async def dead_letter_undeliverable(
        self, raw: bytes | str, source: dict[str, Any], *, deliveries: int
    ) -> BillingResult:
        """An entry that failed ``deliveries`` times (the job store unreachable, a bug); its
        bytes are not parsed again (the parsing may be what fails)."""
        error = FieldError(field="(entry)", message=f"not processed after {deliveries} deliveries")
        return await self.dead_letter(
            None, raw, source, [error], error_type="BillingEventUndeliverable", by_body=True
        )

    async def dead_letter(
        self,
        event_id: str | None,
        raw: bytes | str,
        source: dict[str, Any],
        errors: list[FieldError],
        *,
        rule: Rule | None = None,
        event_type: str | None = None,
        error_type: str = "BillingEventUnmapped",
        by_body: bool = False,
        shown: str | None = None,
    ) -> BillingResult:
        """Keep the event as a dead letter: one per event id, or per body (``by_body``, or no
        id): a redelivery overwrites it. ``shown``: the text to keep instead of ``raw``."""
        identity = f"body:{_sha(raw)}" if by_body or not event_id else f"id:{event_id}"
        dl_id = f"dl_{_sha('billing:' + identity)[:32]}"
        message = "; ".join(f"{e.field}: {e.message}" for e in errors)
        payload: dict[str, Any] = {
            "event": shown if shown is not None else _shown(raw, self.limits.max_bytes),
            "source": source,
            "rule": rule.name if rule else None,
        }
        if len(_bytes(raw)) > self.limits.max_bytes:
            payload.update(event_bytes=len(_bytes(raw)), event_sha256=_sha(raw), truncated=True)
        await self.deps.dead_letters.add(
            DeadLetter(
                id=dl_id,
                kind="billing_event",
                provider=rule.cancel.provider if rule else None,
                step="billing",
                error_type=error_type,
                error=message,
                errors=[e.model_dump() for e in errors],
                payload=payload,
            )
        )
        await self._counted("dead_lettered", identity)
        log.warning(
            "billing.event.dead_lettered",
            event_id=event_id,
            dead_letter_id=dl_id,
            error_type=error_type,
            error=message,
        )
        return BillingResult(
            event_id=event_id,
            event_type=event_type,
            result="dead_lettered",
            rule=rule.name if rule else None,
            dead_letter_id=dl_id,
            errors=errors,
        )

    async def _counted(self, result: str, identity: str, *, event_type: str = "") -> None:
        recent = (
            json.dumps({"id": identity, "type": event_type, "at": isoformat(utcnow())})
            if event_type
            else ""
        )
        await self._count(
            keys=[
                f"cf:billing:seen:{result}:{_sha(identity)}",
                COUNTS_KEY,
                IGNORED_KEY,
                RECENT_IGNORED_KEY,
            ],
            args=[
                result,
                self.deps.settings.idempotency_ttl_s,
                event_type,
                recent,
                RECENT_IGNORED_MAX,
            ],
        )


def _shown(raw: bytes | str, limit: int) -> str:
    """The event as text for the dead letter: at most ``limit`` bytes of it, any byte that is
    not UTF-8 (or a lone surrogate) escaped, so it always serialises."""
    return _bytes(raw)[:limit].decode("utf-8", "backslashreplace")


Entry = tuple[str, dict[bytes, bytes]]


def _s(value: Any) -> str:
    # Entry and stream ids are ASCII; anything else is escaped rather than refused.
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def entry_bytes(fields: dict[bytes, bytes]) -> bytes:
    """An entry's fields as one byte string, each length-prefixed: equal for the same entry
    delivered twice, different for any two different entries."""
    return b"".join(b"%d:%s%d:%s" % (len(k), k, len(v), v) for k, v in fields.items())


class BillingConsumer:
    """One member of the stream's consumer group."""

    def __init__(self, processor: BillingProcessor, redis: Redis, conf: BillingSettings) -> None:
        self.processor = processor
        self.redis = redis
        self.conf = conf
        self.name = conf.consumer
        self._last_claim = 0.0

    async def ensure_group(self) -> None:
        """Create the stream and the group if missing; a new group starts at the beginning."""
        try:
            await self.redis.xgroup_create(self.conf.stream, self.conf.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_new(self, *, block: bool = True) -> list[Entry]:
        """Entries never delivered to any consumer; they are pending for this one from now."""
        return await self._read(">", block_ms=int(self.conf.block_s * 1000) if block else None)

    async def read_own_pending(self) -> list[Entry]:
        """Entries delivered to this consumer name and not acknowledged (a restart, an error)."""
        return await self._read("0", block_ms=None)

    async def claim(self) -> list[Entry]:
        """Take over entries other consumers left pending for ``claim_idle_s`` (they died)."""
        self._last_claim = time.monotonic()
        claimed: list[Entry] = []
        start = "0-0"
        while len(claimed) < self.conf.batch_size:
            reply = await self.redis.xautoclaim(
                self.conf.stream,
                self.conf.group,
                self.name,
                min_idle_time=int(self.conf.claim_idle_s * 1000),
                start_id=start,
                count=self.conf.batch_size - len(claimed),
            )
            start, entries = _s(reply[0]), reply[1]
            claimed += [(_s(eid), fields) for eid, fields in entries if fields is not None]
            if start == "0-0":
                break
        if claimed:
            log.info("billing.entries.claimed", count=len(claimed), consumer=self.name)
        return claimed

    async def handle(self, entry: Entry, *, deliveries: int = 1) -> BillingResult:
        """Process one entry without acknowledging it."""
        entry_id, fields = entry
        source = {"stream": self.conf.stream, "entry_id": entry_id, "consumer": self.name}
        raw = fields.get(EVENT_FIELD.encode())
        if deliveries > self.conf.max_deliveries:
            return await self.processor.dead_letter_undeliverable(
                _entry_raw(fields), source, deliveries=deliveries
            )
        if raw is None:
            return await self.processor.dead_letter(
                None,
                entry_bytes(fields),
                source,
                [
                    FieldError(
                        field=EVENT_FIELD, message=f"the stream entry has no {EVENT_FIELD!r} field"
                    )
                ],
                error_type="BillingEventUnreadable",
                by_body=True,
                shown=_shown_fields(fields, self.processor.limits.max_bytes),
            )
        if not tracing.enabled:
            return await self.processor.process(raw, source=source)
        # The event's span: the job it makes is traced under it, continuing the entry's own
        # ``traceparent`` field when the billing system wrote one (docs/tracing.md).
        given = fields.get(tracing.TRACEPARENT.encode())
        attributes = {
            "messaging.system": "redis",
            "messaging.operation.type": "process",
            "messaging.destination.name": self.conf.stream,
            "messaging.message.id": entry_id,
        }
        with tracing.span(
            "billing.event",
            kind="consumer",
            attributes=attributes,
            parent={tracing.TRACEPARENT: given.decode(errors="replace")} if given else None,
        ):
            return await self.processor.process(raw, source=source)

    async def ack(self, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            await self.redis.xack(self.conf.stream, self.conf.group, *entry_ids)

    async def process(self, entries: list[Entry], *, recheck: bool) -> int:
        """Handle and acknowledge entries; one that fails stays pending. ``recheck``: look up
        delivery counts (entries claimed or re-read may have failed before)."""
        deliveries = await self._deliveries([e[0] for e in entries]) if recheck else {}

        async def one(entry: Entry) -> bool:
            try:
                try:
                    await self.handle(entry, deliveries=deliveries.get(entry[0], 1))
                except TRANSIENT:
                    raise
                except Exception as exc:
                    await self.crashed(entry, exc)
                await self.ack([entry[0]])
            except TRANSIENT as exc:
                log.error(
                    "billing.entry.failed", entry_id=entry[0], error=f"{type(exc).__name__}: {exc}"
                )
                return False
            return True

        done = await asyncio.gather(*(one(e) for e in entries))
        return sum(done)

    async def crashed(self, entry: Entry, exc: Exception) -> None:
        """An entry that broke the code (a bug, or a case no check foresaw): dead-lettered by
        its bytes, so it is neither retried for ever nor able to stop the consumer."""
        entry_id, fields = entry
        raw = _entry_raw(fields)
        log.exception("billing.entry.crashed", entry_id=entry_id, error=type(exc).__name__)
        source = {"stream": self.conf.stream, "entry_id": entry_id, "consumer": self.name}
        error = FieldError(field="(entry)", message=f"processing raised {type(exc).__name__}")
        try:
            await self.processor.dead_letter(
                None, raw, source, [error], error_type="BillingEventCrashed", by_body=True
            )
        except TRANSIENT:
            raise
        except Exception:
            # Not even a dead letter could be made of it: say so, and let the stream go on.
            log.exception("billing.entry.dropped", entry_id=entry_id, sha256=_sha(raw))

    async def run_once(self, *, block: bool = True) -> int:
        """One round: claim from dead consumers when due, retry own pending, read new."""
        handled = 0
        if time.monotonic() - self._last_claim >= self.conf.claim_idle_s / 2:
            handled += await self.process(await self.claim(), recheck=True)
        own = await self.read_own_pending()
        if own:
            ok = await self.process(own, recheck=True)
            handled += ok
            if ok < len(own):
                await asyncio.sleep(1.0)  # they failed again: do not spin on them
                return handled
        handled += await self.process(await self.read_new(block=block), recheck=False)
        return handled

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; Redis outages are waited out, a lost group is made
        again."""
        log.info(
            "billing.consumer.started",
            stream=self.conf.stream,
            group=self.conf.group,
            consumer=self.name,
            rules=self.processor.rules.source,
        )
        group_ok, failing = False, False
        while not stop.is_set():
            try:
                if not group_ok:
                    await self.ensure_group()
                    group_ok = True
                await self.run_once()
                if failing:
                    log.info("billing.consumer.redis_recovered", consumer=self.name)
                    failing = False
            except ResponseError as exc:
                if not str(exc).startswith(GROUP_LOST):
                    failing = await self._failed(exc, failing)
                    continue
                # Redis restarted without its data, or the stream or group was deleted.
                log.warning(
                    "billing.consumer.group_missing",
                    stream=self.conf.stream,
                    group=self.conf.group,
                    action="recreating it",
                )
                group_ok = False
            except TRANSIENT as exc:
                failing = await self._failed(exc, failing)
        log.info("billing.consumer.stopped", consumer=self.name)

    async def _failed(self, exc: Exception, failing: bool) -> bool:
        # Once per outage, not once a second for as long as it lasts.
        if not failing:
            log.error("billing.consumer.redis_error", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(1.0)
        return True

    async def _read(self, start: str, *, block_ms: int | None) -> list[Entry]:
        reply = await self.redis.xreadgroup(
            self.conf.group,
            self.name,
            {self.conf.stream: start},
            count=self.conf.batch_size,
            block=block_ms,
        )
        entries: list[Entry] = []
        deleted: list[str] = []
        for _stream, items in reply or []:
            for eid, fields in items:
                if fields:
                    entries.append((_s(eid), fields))
                else:
                    deleted.append(_s(eid))
        # Re-reading pending entries lists those deleted from the stream without fields:
        # there is nothing left to process.
        await self.ack(deleted)
        return entries

    async def _deliveries(self, entry_ids: list[str]) -> dict[str, int]:
        if not entry_ids:
            return {}
        ordered = sorted(entry_ids, key=lambda e: tuple(int(p) for p in e.split("-")))
        pending = await self.redis.xpending_range(
            self.conf.stream,
            self.conf.group,
            min=ordered[0],
            max=ordered[-1],
            count=len(ordered) + 100,
            consumername=self.name,
        )
        return {_s(p["message_id"]): int(p["times_delivered"]) for p in pending}


def _entry_raw(fields: dict[bytes, bytes]) -> bytes:
    """The bytes a dead letter of this entry is keyed by: its event, else all its fields."""
    raw = fields.get(EVENT_FIELD.encode())
    return raw if raw is not None else entry_bytes(fields)


def _shown_fields(fields: dict[bytes, bytes], limit: int) -> str:
    """The fields of an entry with no event, as JSON text for the dead letter."""
    shown = json.dumps({_s(k): _s(v) for k, v in fields.items()})
    return shown if len(shown) <= limit else shown[:limit]
