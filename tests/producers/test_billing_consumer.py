"""The billing consumer against a real Redis Stream: events mapped, ignored and dead-lettered as
the rules say; a consumer that dies between reading and acknowledging leaves its entries to
another; no event ever makes two jobs."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis

from cancelflow.settings import Settings
from cancelflow.store import JOBS_INDEX
from cancelflow.wiring import build_deps, redis_client
from messaging.config import create_celery
from producers.billing import COUNTS_KEY, IGNORED_KEY, BillingConsumer, BillingProcessor
from producers.billing_rules import load_rules
from producers.local import ProcessGroup, cancelflow_command, wait_until
from tests.producers.conftest import MakeSettings, providers


def hex24() -> str:
    return secrets.token_hex(12)


def pending(client: redis.Redis, stream: str, group: str) -> int:
    """The entries delivered to ``group`` and not acknowledged yet."""
    return int(cast("dict[str, Any]", client.xpending(stream, group))["pending"])


def consumers(client: redis.Redis, stream: str, group: str) -> list[dict[str, Any]]:
    return cast("list[dict[str, Any]]", client.xinfo_consumers(stream, group))


def payway_event(**data: Any) -> dict[str, Any]:
    return {
        "id": f"evt_{secrets.token_hex(8)}",
        "type": "payment.final_failure",
        "data": {"provider": "payway", "account_id": hex24(), "user_product_id": hex24(), **data},
    }


@dataclass
class Harness:
    settings: Settings
    processor: BillingProcessor

    def consumer(self, name: str, **conf: Any) -> BillingConsumer:
        billing = self.settings.billing.model_copy(update={"consumer": name, **conf})
        return BillingConsumer(self.processor, self.processor.deps.store.redis, billing)

    async def publish(self, *events: dict[str, Any] | str, field: str = "event") -> None:
        for event in events:
            body = event if isinstance(event, str) else json.dumps(event)
            await self.processor.deps.store.redis.xadd(self.settings.billing.stream, {field: body})

    async def jobs_by_event(self) -> dict[str, list[str]]:
        """Every job a billing event made, by event id (all jobs in the DB are read)."""
        store = self.processor.deps.store
        found: dict[str, list[str]] = defaultdict(list)
        for raw in await store.redis.zrange(JOBS_INDEX, 0, -1):
            job = await store.get(raw.decode())
            event = job.metadata.get("billing_event")
            if event:
                found[event["id"]].append(job.id)
        return found

    async def pending(self) -> int:
        info = await self.processor.deps.store.redis.xpending(
            self.settings.billing.stream, self.settings.billing.group
        )
        return int(info["pending"])


@asynccontextmanager
async def harness(make_settings: MakeSettings, **billing: Any) -> AsyncIterator[Harness]:
    settings = make_settings(**billing)
    assert settings.billing.rules_path is not None
    redis_ = redis_client(settings)
    deps = build_deps(settings, redis=redis_)
    rules = load_rules(settings.billing.rules_path, configured=settings.enabled_providers())
    h = Harness(settings, BillingProcessor(deps, create_celery(settings), rules))
    await h.consumer("setup").ensure_group()
    try:
        yield h
    finally:
        await redis_.aclose()


def _event_key(body: str) -> str:
    """A dead letter's event id, or its body when it has none."""
    try:
        return str(json.loads(body).get("id") or body)
    except ValueError:
        return body


async def drain(consumer: BillingConsumer) -> None:
    while await consumer.run_once(block=False):
        pass


async def test_events_are_mapped_ignored_and_dead_lettered_as_the_rules_say(
    make_settings: MakeSettings,
) -> None:
    async with harness(make_settings) as h:
        redis_ = h.processor.deps.store.redis
        ignored_before = int(
            await cast("Awaitable[bytes | None]", redis_.hget(IGNORED_KEY, "invoice.paid")) or 0
        )
        mapped = payway_event()
        chargeback = {**payway_event(), "type": "chargeback.lost"}
        closed: dict[str, Any] = {
            "id": f"evt_{hex24()}",
            "type": "account.closed",
            "data": {"provider": "azotte", "order_id": f"ord-{hex24()}"},
        }
        ignored = {"id": f"evt_{hex24()}", "type": "invoice.paid", "data": {"provider": "payway"}}
        other_provider = {**payway_event(), "data": {"provider": "somebody-else"}}
        missing = payway_event()
        del missing["data"]["user_product_id"]
        invalid = payway_event(account_id="not-a-mongo-id")
        await h.publish(
            mapped, chargeback, closed, ignored, other_provider, missing, invalid, "{not json"
        )
        await h.publish("{}", field="body")  # no "event" field
        await drain(h.consumer("c1"))

        assert await h.pending() == 0
        jobs = await h.jobs_by_event()
        assert {
            e: len(ids)
            for e, ids in jobs.items()
            if e in {mapped["id"], chargeback["id"], closed["id"]}
        } == {
            mapped["id"]: 1,
            chargeback["id"]: 1,
            closed["id"]: 1,
        }
        for gone in (ignored, other_provider, missing, invalid):
            assert gone["id"] not in jobs
        job = await h.processor.deps.store.get(jobs[mapped["id"]][0])
        assert job.provider == "payway"
        assert job.idempotency_key == f"billing:{mapped['id']}"
        assert job.subscription["account_id"] == mapped["data"]["account_id"]
        assert job.reason is not None and job.reason.code == "payment.final_failure"
        assert job.metadata["billing_event"] == {
            "id": mapped["id"],
            "type": "payment.final_failure",
            "rule": "payway-final-failure",
        }
        azotte = await h.processor.deps.store.get(jobs[closed["id"]][0])
        assert azotte.subscription == {
            "order_identifier": closed["data"]["order_id"],
            "cancelation_method": "Immediate",
        }

        assert (
            int(
                await cast("Awaitable[bytes | None]", redis_.hget(IGNORED_KEY, "invoice.paid")) or 0
            )
            == ignored_before + 1
        )
        letters = [
            d
            for d in await h.processor.deps.dead_letters.list(limit=1000)
            if d.kind == "billing_event"
        ]
        by_event = {_event_key(d.payload["event"]): d for d in letters}
        assert {e["field"] for e in by_event[missing["id"]].errors} == {
            "event.data.user_product_id"
        }
        assert {e["field"] for e in by_event[invalid["id"]].errors} == {"subscription.account_id"}
        assert by_event[invalid["id"]].provider == "payway"
        assert by_event["{not json"].error_type == "BillingEventUnreadable"
        assert any(
            d.errors[0]["field"] == "event"
            for d in letters
            if d.error_type == "BillingEventUnreadable"
        )

        # Delivered again (same ids): no second job, no second count, no second dead letter.
        counts_before = await cast("Awaitable[dict[bytes, bytes]]", redis_.hgetall(COUNTS_KEY))
        await h.publish(mapped, ignored, invalid, closed)
        await drain(h.consumer("c1"))
        again = await h.jobs_by_event()
        assert (
            again[mapped["id"]] == jobs[mapped["id"]] and again[closed["id"]] == jobs[closed["id"]]
        )
        assert (
            await cast("Awaitable[dict[bytes, bytes]]", redis_.hgetall(COUNTS_KEY)) == counts_before
        )
        assert len(
            [
                d
                for d in await h.processor.deps.dead_letters.list(limit=1000)
                if d.kind == "billing_event"
            ]
        ) == len(letters)


async def test_a_consumer_that_dies_before_acknowledging_leaves_its_entries_to_another(
    make_settings: MakeSettings,
) -> None:
    async with harness(make_settings, batch_size=100) as h:
        events = [payway_event() for _ in range(40)]
        await h.publish(*events)
        doomed = h.consumer("doomed")
        read = await doomed.read_new(block=False)
        read_at = time.monotonic()
        assert len(read) == 40
        # It made the jobs of half of them, then died before any XACK.
        first = {
            e["id"]: (await doomed.handle(entry)).job_id
            for e, entry in zip(events[:20], read[:20], strict=True)
        }
        del doomed
        assert await h.pending() == 40

        # Idle for longer than the entries have been so far (handling half of them takes a
        # while on a loaded machine), and no longer.
        idle_s = time.monotonic() - read_at + 1.0
        heir = h.consumer("heir", claim_idle_s=idle_s)
        assert await heir.run_once(block=False) == 0  # not idle long enough to be claimed yet
        await asyncio.sleep(idle_s + 0.1)
        assert await heir.run_once(block=False) == 40
        assert await h.pending() == 0
        jobs = await h.jobs_by_event()
        assert all(len(jobs[e["id"]]) == 1 for e in events), jobs
        assert all(jobs[event_id] == [job_id] for event_id, job_id in first.items())
        # The dead consumer's name, back again, finds nothing left to do.
        assert await h.consumer("doomed").read_own_pending() == []


async def test_an_entry_that_keeps_failing_is_dead_lettered_after_max_deliveries(
    make_settings: MakeSettings,
) -> None:
    async with harness(make_settings, max_deliveries=2) as h:
        event = payway_event()
        await h.publish(event)
        first = h.consumer("flaky")
        assert len(await first.read_new(block=False)) == 1  # read, never handled: as if it crashed
        again = await first.read_own_pending()  # delivery 2
        assert len(again) == 1
        # Delivery 3 is over the limit: dead-lettered instead of handled, and acknowledged.
        assert await first.run_once(block=False) == 1
        assert await h.pending() == 0
        assert event["id"] not in await h.jobs_by_event()
        letters = await h.processor.deps.dead_letters.list(limit=1000)
        assert any(
            d.error_type == "BillingEventUndeliverable" and event["id"] in d.payload["event"]
            for d in letters
        )


def test_the_command_killed_mid_batch_loses_nothing_and_doubles_nothing(
    make_settings: MakeSettings, rules_file: Path, log_dir: Path
) -> None:
    """``cancelflow billing-consumer`` SIGKILLed while entries are pending: a second consumer
    claims them after the idle timeout; every event has exactly one job."""
    settings = make_settings()
    stream = settings.billing.stream
    client = redis.Redis.from_url(settings.redis_url)
    client.xgroup_create(stream, settings.billing.group, id="0", mkstream=True)
    events = [payway_event() for _ in range(300)]
    for event in events:
        client.xadd(stream, {"event": json.dumps(event)})
    conf = providers()
    env = {
        "CANCELFLOW_REDIS_URL": settings.redis_url,
        "CANCELFLOW_LOG_FORMAT": "json",
        "CANCELFLOW_BILLING__STREAM": stream,
        "CANCELFLOW_BILLING__RULES_PATH": str(rules_file),
        "CANCELFLOW_BILLING__CLAIM_IDLE_S": "1",
        "CANCELFLOW_BILLING__BATCH_SIZE": "300",
        "CANCELFLOW_PROVIDERS__PAYWAY__BASE_URL": conf["payway"]["base_url"],
        "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_ID": conf["payway"]["client_id"],
        "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_SECRET": conf["payway"]["client_secret"],
        "CANCELFLOW_PROVIDERS__AZOTTE__BASE_URL": conf["azotte"]["base_url"],
        "CANCELFLOW_PROVIDERS__AZOTTE__API_KEY": conf["azotte"]["api_key"],
        "CANCELFLOW_PROVIDERS__AZOTTE__TENANT": conf["azotte"]["tenant"],
    }
    procs = ProcessGroup(env=env, log_dir=log_dir / f"billing-{stream.rsplit(':', 1)[-1]}")
    group = settings.billing.group
    try:
        first = procs.start("first", cancelflow_command("billing-consumer", "--consumer", "first"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not pending(client, stream, group):
            time.sleep(0.002)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(5)
        left = int(pending(client, stream, group))
        assert left > 0, procs.log_tail("first")

        procs.start("second", cancelflow_command("billing-consumer", "--consumer", "second"))
        wait_until(lambda: pending(client, stream, group) == 0, timeout_s=30, what="the claim")
        wait_until(
            lambda: len(consumers(client, stream, group)) >= 2, timeout_s=5, what="consumers"
        )
    finally:
        procs.stop_all()
    jobs: dict[str, list[str]] = defaultdict(list)
    for raw in cast("list[bytes]", client.zrange(JOBS_INDEX, 0, -1)):
        request = cast("bytes | None", client.hget(f"cf:job:{raw.decode()}", "request"))
        if request:
            billing_event = json.loads(request)["metadata"].get("billing_event")
            if billing_event:
                jobs[billing_event["id"]].append(raw.decode())
    assert all(len(jobs[e["id"]]) == 1 for e in events), {
        e["id"]: jobs.get(e["id"]) for e in events if len(jobs.get(e["id"], [])) != 1
    }
    claimed = {c["name"].decode(): c for c in consumers(client, stream, group)}
    assert claimed["first"]["pending"] == 0
