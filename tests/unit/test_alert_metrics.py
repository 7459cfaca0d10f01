"""The numbers alerts are made of: each provider's breaker and in-flight calls and the age of
each queue's oldest message (read from fakeredis as the guard and kombu leave them), the API's
requests by route template and status, and the build's labels."""

from __future__ import annotations

import asyncio
import json
import platform
import time
from collections.abc import Awaitable
from importlib.metadata import version
from typing import Any, cast

import aiohttp
import fakeredis
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from cancelflow import metrics
from cancelflow.dead_letters import KINDS
from cancelflow.guard import GuardLimits, ProviderGuard, breaker_state
from messaging.config import queues
from producers.api import request_metrics

QUEUE = "cancellations.payway"


def limits(**kw: Any) -> GuardLimits:
    base: dict[str, Any] = {
        "calls_per_second": None,
        "max_in_flight": None,
        "breaker_failures": 2,
        "breaker_cooldown_s": 0.3,
        "lease_s": 30.0,
        "max_wait_s": 5.0,
    }
    return GuardLimits(**(base | kw))


def gauges(snapshot: metrics.StoreSnapshot) -> dict[str, dict[str, float]]:
    """Each gauge family's samples, by their one label's value."""
    text = metrics.render(metrics.StoreGauges(snapshot)).decode()
    return {
        f.name: {next(iter(s.labels.values()), ""): s.value for s in f.samples}
        for f in text_string_to_metric_families(text)
    }


def envelope(**headers: Any) -> str:
    """A message as kombu's Redis transport stores it: a JSON envelope around the body."""
    return json.dumps({"body": "W10=", "content-type": "application/json", "headers": headers})


# --- circuit and in-flight ------------------------------------------------------------------


def test_circuit_state_follows_the_breaker_through_open_half_open_and_closed(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async def go() -> None:
        guard = ProviderGuard(fake_redis, "payway", limits())

        async def state() -> int:
            snapshot = await metrics.read_store(fake_redis, providers=["payway", "azotte"])
            # The gauge says what GET /v1/providers says.
            shown = (await breaker_state(fake_redis, "payway"))["circuit"]
            number = snapshot.circuit_state["payway"]
            assert {"closed": 0, "half_open": 1, "open": 2}[shown] == number
            assert snapshot.circuit_state["azotte"] == metrics.CIRCUIT_CLOSED
            return number

        assert await state() == metrics.CIRCUIT_CLOSED  # never called: no hash at all
        for _ in range(2):
            await guard.release(await guard.admit(), "failure")
        assert await state() == metrics.CIRCUIT_OPEN
        await asyncio.sleep(0.4)  # the cool-down
        assert await state() == metrics.CIRCUIT_HALF_OPEN
        await guard.release(await guard.admit(), "success")
        assert await state() == metrics.CIRCUIT_CLOSED

    asyncio.run(go())


def test_circuit_state_of_a_hash_against_the_clock() -> None:
    now = 1_000_000.0
    assert metrics.circuit_state([None, None, None], now_ms=now) == metrics.CIRCUIT_CLOSED
    assert metrics.circuit_state([b"1000500", b"1", b"1"], now_ms=now) == metrics.CIRCUIT_OPEN
    assert metrics.circuit_state([b"999000", b"1", b"1"], now_ms=now) == metrics.CIRCUIT_HALF_OPEN
    # Failures before it ever opened are not half-open: the breaker has not tripped.
    assert metrics.circuit_state([None, b"1", None], now_ms=now) == metrics.CIRCUIT_CLOSED
    assert metrics.circuit_state([b"999000", b"0", b"3"], now_ms=now) == metrics.CIRCUIT_CLOSED


def test_in_flight_counts_live_slots_and_not_expired_leases(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async def go() -> None:
        guard = ProviderGuard(fake_redis, "azotte", limits(max_in_flight=5))
        held = [await guard.admit() for _ in range(3)]
        # A slot a dead process left behind, its lease over.
        await fake_redis.zadd("cf:if:azotte", {"dead": time.time() * 1000 - 1})
        snapshot = await metrics.read_store(fake_redis, providers=["azotte"])
        assert snapshot.in_flight == {"azotte": 3}
        await guard.release(held[0], "success")
        snapshot = await metrics.read_store(fake_redis, providers=["azotte"])
        assert snapshot.in_flight == {"azotte": 2}
        assert gauges(snapshot)[metrics.IN_FLIGHT] == {"azotte": 2}
        assert gauges(snapshot)[metrics.CIRCUIT_STATE] == {"azotte": 0}

    asyncio.run(go())


# --- the oldest waiting message -------------------------------------------------------------


def test_oldest_message_age_reads_the_right_end_of_each_queue(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    now = 1_800_000_000.0

    async def go() -> metrics.StoreSnapshot:
        # kombu LPUSHes: the first message sent ends up at the right, where BRPOP takes it.
        await cast("Awaitable[int]", fake_redis.lpush(QUEUE, envelope(sent_at=now - 90.5)))
        await cast("Awaitable[int]", fake_redis.lpush(QUEUE, envelope(sent_at=now - 2)))
        # A message without sent_at (not sent by dispatch): its age is unknown.
        await cast("Awaitable[int]", fake_redis.lpush("maintenance", envelope(job_id="x")))
        await cast("Awaitable[int]", fake_redis.lpush("callbacks", envelope(sent_at=now + 5)))
        return await metrics.read_store(fake_redis, now=now)

    snapshot = asyncio.run(go())
    ages = gauges(snapshot)[metrics.QUEUE_OLDEST_AGE]
    assert ages[QUEUE] == pytest.approx(90.5)
    assert "maintenance" not in ages  # unknown: no series, rather than a made-up 0
    assert ages["callbacks"] == 0  # a sender's clock ahead of ours: never negative
    empty = {q.name for q in queues()} - {QUEUE, "maintenance", "callbacks"}
    assert empty and all(ages[name] == 0 for name in empty)
    assert snapshot.queue_depth[QUEUE] == 2


@pytest.mark.parametrize(
    "message",
    [
        b"not json",
        b"[1, 2]",
        b'"a string"',
        json.dumps({"headers": None}),
        json.dumps({"headers": {"sent_at": "yesterday"}}),
        json.dumps({"headers": {"sent_at": True}}),
        '{"headers": {"sent_at": NaN}}',
        json.dumps({"body": "x"}),
    ],
)
def test_a_message_whose_send_time_cannot_be_read_is_unknown(message: bytes | str) -> None:
    assert metrics.sent_at_of(message) == 0.0


def test_the_send_time_of_an_envelope() -> None:
    assert metrics.sent_at_of(envelope(sent_at=1700000000.25, job_id="j")) == 1700000000.25
    assert metrics.sent_at_of(envelope(sent_at=1700000000).encode()) == 1700000000.0


def test_the_read_is_one_pipeline_of_a_fixed_size(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    """However long the queues, the scrape sends one batch: two commands a queue, one a dead
    letter kind, one for decisions and two a provider."""
    sent: list[int] = []
    real = fake_redis.pipeline

    def counting(*args: Any, **kwargs: Any) -> Any:
        pipe = real(*args, **kwargs)
        execute = pipe.execute

        async def counted(*a: Any, **kw: Any) -> Any:
            sent.append(len(pipe.command_stack))
            return await execute(*a, **kw)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    async def go() -> None:
        for i in range(200):
            await cast("Awaitable[int]", fake_redis.lpush(QUEUE, envelope(sent_at=i)))
        fake_redis.pipeline = counting  # type: ignore[method-assign]
        await metrics.read_store(fake_redis, providers=["payway", "azotte"])

    asyncio.run(go())
    assert sent == [2 * len(queues()) + len(KINDS) + 1 + 2 * 2]


# --- the API's requests ---------------------------------------------------------------------


def requests(method: str, route: str, status: str) -> float:
    labels = {"method": method, "route": route, "status": status}
    return REGISTRY.get_sample_value("cancelflow_api_requests_total", labels) or 0.0


def test_api_requests_are_counted_by_route_template_and_status() -> None:
    async def job(request: web.Request) -> web.Response:
        if request.match_info["job_id"] == "job_gone":
            raise web.HTTPNotFound()
        return web.json_response({"id": request.match_info["job_id"]})

    async def go() -> None:
        app = web.Application(middlewares=[request_metrics])
        app.router.add_get("/v1/cancellations/{job_id}", job)
        async with TestServer(app) as server, aiohttp.ClientSession() as session:
            for path in ("/v1/cancellations/job_a", "/v1/cancellations/job_b"):
                async with session.get(server.make_url(path)) as resp:
                    assert resp.status == 200
            async with session.get(server.make_url("/v1/cancellations/job_gone")) as resp:
                assert resp.status == 404
            async with session.get(server.make_url("/no/such/path/job_c")) as resp:
                assert resp.status == 404
            async with session.request("PROPFIND", server.make_url("/v1/cancellations/a")) as resp:
                assert resp.status == 405

    template = "/v1/cancellations/{job_id}"
    ok, gone = requests("GET", template, "200"), requests("GET", template, "404")
    unmatched = requests("GET", "unmatched", "404")
    not_allowed = requests("other", "unmatched", "405")
    timed = REGISTRY.get_sample_value(
        "cancelflow_api_request_duration_seconds_count", {"method": "GET", "route": template}
    )
    asyncio.run(go())
    assert requests("GET", template, "200") == ok + 2
    assert requests("GET", template, "404") == gone + 1
    assert requests("GET", "unmatched", "404") == unmatched + 1
    assert requests("other", "unmatched", "405") == not_allowed + 1
    assert (
        REGISTRY.get_sample_value(
            "cancelflow_api_request_duration_seconds_count", {"method": "GET", "route": template}
        )
        == (timed or 0) + 3
    )
    routes = {
        s.labels["route"]
        for f in REGISTRY.collect()
        if f.name == "cancelflow_api_requests"
        for s in f.samples
    }
    assert not any("job_a" in r or "job_c" in r for r in routes), routes


# --- the build ------------------------------------------------------------------------------


def test_build_info_names_this_build() -> None:
    labels = {
        "version": version("cancelflow"),
        "python": platform.python_version(),
        "celery": version("celery"),
    }
    assert REGISTRY.get_sample_value("cancelflow_build_info", labels) == 1
    assert "cancelflow_build_info" in metrics.sample_names()
    text = metrics.render().decode()
    (family,) = [
        f for f in text_string_to_metric_families(text) if f.name == "cancelflow_build_info"
    ]
    assert [s.value for s in family.samples] == [1]
