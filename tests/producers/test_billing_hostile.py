"""Hostile billing stream entries against a real Redis: each is dead-lettered once, by its bytes,
and acknowledged, and the consumer goes on with the next; a lost consumer group (the stream
deleted, Redis restarted without its data) is made again and consuming goes on."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.typing import EncodableT, FieldT

from cancelflow.dead_letters import DeadLetter
from cancelflow.settings import Settings
from cancelflow.store import JOBS_INDEX
from cancelflow.wiring import build_deps, redis_client
from messaging.config import create_celery
from producers.billing import RECENT_IGNORED_KEY, BillingConsumer, BillingProcessor
from producers.billing_rules import load_rules
from producers.local import ProcessGroup, cancelflow_command, wait_until
from tests.producers.conftest import MakeSettings, providers
from tests.producers.test_billing_consumer import Harness, harness, payway_event


def deep(levels: int) -> bytes:
    """A billing event whose data is nested ``levels`` deep."""
    inner = "[" * levels + "]" * levels
    event_id = f"evt_deep_{secrets.token_hex(4)}"
    return f'{{"id": "{event_id}", "type": "x", "data": {{"v": {inner}}}}}'.encode()


def hostile_entries() -> dict[str, dict[FieldT, EncodableT]]:
    """Every kind of entry the consumer cannot handle, by name; each made unique."""
    n = secrets.token_hex(6)

    def event(body: bytes) -> dict[FieldT, EncodableT]:
        return {b"event": body}

    surrogate = {**payway_event(), "id": f"e-\ud800-{n}"}  # json.dumps escapes it as \ud800
    return {
        "nested 5,000 deep": event(b"[" * 5000 + b"]" * 5000 + n.encode()),
        "an event nested 5,000 deep": event(deep(5000)),
        "a lone surrogate in its id": event(json.dumps(surrogate).encode()),
        "a lone surrogate as UTF-8 bytes": event(
            b'{"id": "e-\xed\xa0\x80-' + n.encode() + b'", "type": "x"}'
        ),
        "a lone surrogate in a key": event(
            b'{"id": "e", "type": "x", "data": {"\\udc00%s": 1}}' % n.encode()
        ),
        "not JSON": event(b"{not json " + n.encode()),
        "NaN": event(b'{"id": "e-%s", "type": "x", "data": {"v": NaN}}' % n.encode()),
        "huge": event(json.dumps({**payway_event(), "pad": "x" * 100_000, "n": n}).encode()),
        "the wrong field types": event(json.dumps({"id": 5, "type": [n], "data": "x"}).encode()),
        "no id": event(json.dumps({"type": "payment.final_failure", "n": n}).encode()),
        "not an object": event(json.dumps([n]).encode()),
        "UTF-16": event(json.dumps({"id": n, "type": "x"}).encode("utf-16")),
        "no event field": {b"body": n.encode()},
        "binary field names and values": {b"\xff\xfe" + n.encode(): b"\x00\x81\xc3"},
        "a binary event": event(b"\x80\x81\xfe\xff" + n.encode()),
    }


async def letters_by_entry(h: Harness) -> dict[str, list[DeadLetter]]:
    """This stream's billing dead letters, by the entry id they were made from."""
    found: dict[str, list[DeadLetter]] = {}
    for dl in await h.processor.deps.dead_letters.list(limit=100_000):
        source = dl.payload.get("source", {}) if isinstance(dl.payload, dict) else {}
        if dl.kind == "billing_event" and source.get("stream") == h.settings.billing.stream:
            found.setdefault(source["entry_id"], []).append(dl)
    return found


async def publish_fields(h: Harness, fields: dict[FieldT, EncodableT]) -> str:
    entry_id = await h.processor.deps.store.redis.xadd(h.settings.billing.stream, fields)
    return str(entry_id.decode())


async def until(check: Callable[[], Awaitable[bool]], *, what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_the_running_consumer_dead_letters_each_hostile_entry_once_and_goes_on(
    make_settings: MakeSettings,
) -> None:
    async with harness(make_settings) as h:
        consumer = h.consumer("hostile")
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))
        try:
            entries = hostile_entries()
            ids = {name: await publish_fields(h, fields) for name, fields in entries.items()}
            good = payway_event()
            await h.publish(good)

            async def good_done() -> bool:
                return good["id"] in await h.jobs_by_event()

            await until(good_done, what="the good entry after the hostile ones")
            await until(lambda: _none_pending(h), what="every entry acknowledged")
            assert not task.done(), task  # still consuming
            letters = await letters_by_entry(h)
            for name, entry_id in ids.items():
                assert len(letters.get(entry_id, [])) == 1, (name, letters.get(entry_id))
            reasons = {name: letters[ids[name]][0].errors[0]["message"] for name in ids}
            assert "nested more than" in reasons["nested 5,000 deep"]
            assert "lone surrogate" in reasons["a lone surrogate in its id"]
            assert "not UTF-8" in reasons["a lone surrogate as UTF-8 bytes"]
            assert "over" in reasons["huge"]
            assert letters[ids["huge"]][0].payload["truncated"] is True
            assert letters[ids["the wrong field types"]][0].error_type == "BillingEventInvalid"
            # A second, identical entry makes no second dead letter: it is keyed by its bytes.
            again = await publish_fields(h, entries["a lone surrogate in its id"])
            await until(lambda: _none_pending(h), what="the repeat acknowledged")
            after = await letters_by_entry(h)
            assert ids["a lone surrogate in its id"] not in after  # the same letter, overwritten
            assert len(after[again]) == 1
            assert after[again][0].id == letters[ids["a lone surrogate in its id"]][0].id
            assert not task.done()
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)  # re-raises anything the consumer died of


async def _none_pending(h: Harness) -> bool:
    return await h.pending() == 0


async def test_an_entry_that_breaks_the_code_is_dead_lettered_not_retried(
    make_settings: MakeSettings,
) -> None:
    """An exception no check foresaw (here: rules that raise) costs one dead letter."""
    async with harness(make_settings) as h:

        class Broken(BillingProcessor):
            async def process(self, raw: bytes | str, *, source: dict[str, Any]) -> Any:
                if b"boom" in (raw if isinstance(raw, bytes) else raw.encode()):
                    raise RecursionError("maximum recursion depth exceeded")
                return await super().process(raw, source=source)

        p = h.processor
        broken = Broken(p.deps, p.celery, p.rules)
        consumer = BillingConsumer(broken, p.deps.store.redis, h.settings.billing)
        boom = await publish_fields(h, {b"event": b'{"boom": 1}'})
        good = payway_event()
        await h.publish(good)
        while await consumer.run_once(block=False):
            pass
        assert await h.pending() == 0
        assert good["id"] in await h.jobs_by_event()
        [letter] = (await letters_by_entry(h))[boom]
        assert letter.error_type == "BillingEventCrashed"


# --- property-based ------------------------------------------------------------------------

field_bytes = st.binary(max_size=64) | st.sampled_from([b"event", b"id", b""])
entries_strategy = st.lists(
    st.dictionaries(field_bytes, st.binary(max_size=256), min_size=1, max_size=4),
    min_size=1,
    max_size=8,
)
# Text with lone surrogates among ordinary characters (hypothesis leaves them out by default).
texts = st.text(
    alphabet=st.characters(codec=None, categories=("Cs", "L", "N", "P", "Zs")), max_size=20
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=10,
)
events_strategy = st.lists(
    st.fixed_dictionaries({"id": texts, "type": texts | json_values, "data": json_values}),
    min_size=1,
    max_size=6,
    unique_by=json.dumps,  # equal bodies share one dead letter: see the test above
)
fixture_ok = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@fixture_ok
@given(entries=entries_strategy)
def test_any_binary_entry_is_dead_lettered_once_and_acknowledged(
    make_settings: MakeSettings, entries: list[dict[FieldT, EncodableT]]
) -> None:
    async def run() -> None:
        async with harness(make_settings) as h:
            ids = [await publish_fields(h, fields) for fields in entries]
            good = payway_event()
            await h.publish(good)
            consumer = h.consumer("prop")
            while await consumer.run_once(block=False):
                pass
            assert await h.pending() == 0
            assert good["id"] in await h.jobs_by_event()
            letters = await letters_by_entry(h)
            # A dead letter is keyed by the entry's event, else by all its fields: entries
            # with equal keys share one (the last delivered names itself in it).
            distinct = {
                e.get(b"event", repr(sorted(e.items()))): i
                for i, e in zip(ids, entries, strict=True)
            }
            for entry_id in distinct.values():
                assert len(letters.get(entry_id, [])) == 1, (entry_id, entries)

    asyncio.run(run())


@fixture_ok
@given(events=events_strategy)
def test_any_event_is_handled_once_whatever_its_text(
    make_settings: MakeSettings, events: list[dict[str, Any]]
) -> None:
    """Ids, types and data of any text (lone surrogates included): each event is ignored or
    dead-lettered (never both, never twice), acknowledged, and the consumer goes on."""

    async def run() -> None:
        async with harness(make_settings) as h:
            redis_ = h.processor.deps.store.redis
            ids = []
            for event in events:
                ids.append(await publish_fields(h, {b"event": json.dumps(event).encode()}))
            good = payway_event()
            await h.publish(good)
            consumer = h.consumer("prop")
            while await consumer.run_once(block=False):
                pass
            assert await h.pending() == 0
            assert good["id"] in await h.jobs_by_event()
            letters = await letters_by_entry(h)
            recent = [
                json.loads(r)["id"]
                for r in await cast(
                    "Awaitable[list[bytes]]", redis_.lrange(RECENT_IGNORED_KEY, 0, -1)
                )
            ]
            for entry_id, event in zip(ids, events, strict=True):
                lettered = len(letters.get(entry_id, []))
                surrogate = any(
                    0xD800 <= ord(c) <= 0xDFFF for c in json.dumps(event, ensure_ascii=False)
                )
                valid = (
                    not surrogate
                    and event["id"]
                    and isinstance(event["type"], str)
                    and event["type"]
                    and isinstance(event["data"], dict)
                )
                if not valid:
                    assert lettered == 1, (event, letters.get(entry_id))
                else:
                    # A valid event no rule matches: ignored (counted once per id), not stored.
                    assert lettered == 0, event
                    assert event["id"] in recent, event

    asyncio.run(run())


# --- the group lost -------------------------------------------------------------------------


async def test_a_deleted_stream_and_group_are_made_again_and_consuming_goes_on(
    make_settings: MakeSettings,
) -> None:
    async with harness(make_settings) as h:
        redis_ = h.processor.deps.store.redis
        stop = asyncio.Event()
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(h.consumer("survivor").run(stop))
            try:
                first = payway_event()
                await h.publish(first)

                async def made(event: dict[str, Any]) -> bool:
                    return event["id"] in await h.jobs_by_event()

                await until(lambda: made(first), what="the first event")
                await redis_.delete(h.settings.billing.stream)  # the group goes with it
                after = payway_event()
                await h.publish(after)  # XADD makes the stream again, without the group
                await until(lambda: made(after), what="the event after the group was lost")
                await until(lambda: _none_pending(h), what="it acknowledged")
                assert not task.done()
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)
        events = [e["event"] for e in logs]
        assert events.count("billing.consumer.group_missing") == 1, events
        assert "billing.consumer.redis_error" not in events, [e for e in logs if "error" in e]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OwnRedis:
    """A redis-server of one test's own, without persistence, that the test may restart."""

    binary: str
    directory: Path
    port: int = field(default_factory=_free_port)
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
                *("--logfile", str(self.directory / "redis.log")),
            ]
        )
        self.running.append(proc)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_until(lambda: _answers(client), timeout_s=10, what="the test's redis-server")
        return proc


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (make test installs it)")
    server = OwnRedis(binary, tmp_path)
    yield server
    for proc in server.running:
        proc.kill()
        proc.wait(5)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


async def test_after_a_redis_restart_without_data_it_reconnects_and_makes_the_group_again(
    own_redis: OwnRedis, rules_file: Path
) -> None:
    server = own_redis.start()
    settings = Settings(
        redis_url=own_redis.url,
        providers=providers(),
        billing={"rules_path": rules_file, "claim_idle_s": 0.3, "block_s": 0.1},
    )
    redis_ = redis_client(settings)
    deps = build_deps(settings, redis=redis_)
    rules = load_rules(rules_file, configured=settings.enabled_providers())
    h = Harness(settings, BillingProcessor(deps, create_celery(settings), rules))
    stop = asyncio.Event()
    task = asyncio.create_task(h.consumer("restarted").run(stop))
    try:
        first = payway_event()
        await h.publish(first)

        async def has(event_id: str) -> bool:
            return event_id in await h.jobs_by_event()

        await until(lambda: has(first["id"]), what="the first event")
        server.kill()
        server.wait(5)
        await asyncio.sleep(1.5)  # the consumer meets the outage
        own_redis.start()  # back, empty: no stream, no group
        after = payway_event()
        await until(lambda: _publish_ok(h, after), what="publishing after the restart")
        await until(lambda: has(after["id"]), what="the event after the restart", timeout_s=30)
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await redis_.aclose()


async def _publish_ok(h: Harness, event: dict[str, Any]) -> bool:
    try:
        await h.publish(event)
    except redis.RedisError:
        return False
    return True


# --- the command ----------------------------------------------------------------------------


def test_the_command_survives_hostile_entries_and_restarts_clean(
    make_settings: MakeSettings, rules_file: Path, log_dir: Path
) -> None:
    """``cancelflow billing-consumer`` over the entries that used to stop it on every start:
    it acknowledges them all, processes the good entry after them and is still running."""
    settings = make_settings()
    stream, group = settings.billing.stream, settings.billing.group
    client = redis.Redis.from_url(settings.redis_url)
    for fields in hostile_entries().values():
        client.xadd(stream, fields)
    good = payway_event()
    client.xadd(stream, {"event": json.dumps(good)})
    conf = providers()
    env = {
        "CANCELFLOW_REDIS_URL": settings.redis_url,
        "CANCELFLOW_LOG_FORMAT": "json",
        "CANCELFLOW_BILLING__STREAM": stream,
        "CANCELFLOW_BILLING__RULES_PATH": str(rules_file),
        "CANCELFLOW_PROVIDERS__PAYWAY__BASE_URL": conf["payway"]["base_url"],
        "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_ID": conf["payway"]["client_id"],
        "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_SECRET": conf["payway"]["client_secret"],
        "CANCELFLOW_PROVIDERS__AZOTTE__BASE_URL": conf["azotte"]["base_url"],
        "CANCELFLOW_PROVIDERS__AZOTTE__API_KEY": conf["azotte"]["api_key"],
        "CANCELFLOW_PROVIDERS__AZOTTE__TENANT": conf["azotte"]["tenant"],
    }
    procs = ProcessGroup(env=env, log_dir=log_dir / f"hostile-{stream.rsplit(':', 1)[-1]}")
    try:
        proc = procs.start("c", cancelflow_command("billing-consumer", "--consumer", "c"))

        def good_done() -> bool:
            for raw in cast("list[bytes]", client.zrange(JOBS_INDEX, 0, -1)):
                job = cast("bytes | None", client.hget(f"cf:job:{raw.decode()}", "request"))
                request = json.loads(job or "{}")
                if request.get("metadata", {}).get("billing_event", {}).get("id") == good["id"]:
                    return True
            return False

        wait_until(good_done, timeout_s=30, what="the good entry after the hostile ones")
        wait_until(
            lambda: cast("dict[str, Any]", client.xpending(stream, group))["pending"] == 0,
            timeout_s=10,
            what="acks",
        )
        assert proc.poll() is None, procs.log_tail("c")
    finally:
        procs.stop_all()
