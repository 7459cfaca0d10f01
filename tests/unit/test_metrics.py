"""The metrics: what the hooks record, the gauges read from Redis, the worker's endpoint."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Awaitable
from typing import Any, cast

import fakeredis
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from cancelflow import lifecycle, metrics
from cancelflow.contract import CallbackAttempt, CancellationRequest, Outcome, OutcomeType
from cancelflow.dead_letters import INDEX, KINDS, DeadLetter, DeadLetterStore, kind_key
from cancelflow.settings import WorkerSettings
from cancelflow.store import AWAITING, JobStore
from messaging.config import queues
from worker import metrics_server


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def dead_letter(kind: str) -> DeadLetter:
    return DeadLetter(kind=kind, error_type="Boom", error="boom")


def test_every_series_name_follows_the_conventions() -> None:
    names = metrics.sample_names()
    assert "cancelflow_jobs_finished_total" in names
    step = "cancelflow_step_duration_seconds"
    assert {f"{step}_bucket", f"{step}_count", f"{step}_sum"} <= names
    for name in names:
        assert name.startswith("cancelflow_"), name
        assert not name.endswith("_created"), name  # turned off: a series nobody queries


def test_provider_calls_are_counted_and_timed() -> None:
    call = {"provider": "payway", "method": "GET"}
    before = value("cancelflow_provider_calls_total", **call, result="503")
    count = value("cancelflow_provider_call_duration_seconds_count", **call)
    metrics.observe_provider_call("payway", "GET", "503", 0.2)
    assert value("cancelflow_provider_calls_total", **call, result="503") == before + 1
    assert value("cancelflow_provider_call_duration_seconds_count", **call) == count + 1


def test_the_store_reports_a_job_ending_once_and_callback_attempts(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    ended: list[tuple[str, str]] = []
    attempts: list[str] = []

    class Observer:
        def job_ended(self, provider: str, outcome: str) -> None:
            ended.append((provider, outcome))

        def callback_attempted(self, result: str) -> None:
            attempts.append(result)

    async def go() -> None:
        store = JobStore(fake_redis, retention_s=3600, idempotency_ttl_s=86400, observer=Observer())
        req = CancellationRequest(provider="payway", subscription={"account_id": "a" * 24})
        job = (await store.create(req, identity="sub-1")).job
        outcome = Outcome(type=OutcomeType.CANCELLED)
        assert (await store.transition(job, lifecycle.Event.CHECK)).applied
        assert (await store.transition(job, lifecycle.Event.FINISH, outcome=outcome)).applied
        # A redelivered step finds the job finished: nothing moves, nothing is reported.
        assert not (await store.transition(job, lifecycle.Event.FINISH, outcome=outcome)).applied
        other = (await store.create(req, identity="sub-2")).job
        assert (await store.transition(other, lifecycle.Event.DEAD_LETTER)).applied
        await store.add_callback_attempt(
            job.id,
            CallbackAttempt(
                at="2026-01-01T00:00:00Z",
                event_id="e",
                event_type="t",
                url=None,
                attempt=0,
                result="delivered",
            ),
        )

    run(go())
    assert ended == [("payway", "cancelled"), ("payway", "dead_lettered")]
    assert attempts == ["delivered"]


def test_job_metrics_count_what_the_store_reports() -> None:
    finished = value("cancelflow_jobs_finished_total", provider="azotte", outcome="retained")
    delivered = value("cancelflow_callback_deliveries_total", result="failed")
    metrics.JOB_METRICS.job_ended("azotte", "retained")
    metrics.JOB_METRICS.callback_attempted("failed")
    # The record that ends a target's attempts is not an attempt.
    metrics.JOB_METRICS.callback_attempted("dead_lettered")
    assert value("cancelflow_jobs_finished_total", provider="azotte", outcome="retained") == (
        finished + 1
    )
    assert value("cancelflow_callback_deliveries_total", result="failed") == delivered + 1
    assert value("cancelflow_callback_deliveries_total", result="dead_lettered") == 0


def test_dead_letters_are_counted_by_kind_as_they_come_and_go(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async def go() -> None:
        store = DeadLetterStore(fake_redis)
        jobs = [await store.add(dead_letter("job")) for _ in range(3)]
        await store.add(dead_letter("poison"))
        assert await store.delete(jobs[0].id)
        assert not await store.delete(jobs[0].id)
        snapshot = await metrics.read_store(fake_redis)
        assert snapshot.dead_letters == {"job": 2, "callback": 0, "poison": 1, "billing_event": 0}
        await store.purge()
        snapshot = await metrics.read_store(fake_redis)
        assert set(snapshot.dead_letters.values()) == {0}

    run(go())


def test_dead_letters_older_than_the_kind_sets_are_indexed_once(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async def go() -> None:
        store = DeadLetterStore(fake_redis)
        old = [dead_letter(kind) for kind in ("job", "billing_event", "job")]
        for dl in old:  # as the store wrote them before it kept the kind sets
            await fake_redis.set(f"cf:dl:{dl.id}", dl.model_dump_json())
            await fake_redis.zadd(INDEX, {dl.id: 1.0})
        await fake_redis.zadd(INDEX, {"dl_gone": 1.0})  # an index entry without its entry
        await store.add(dead_letter("callback"))
        assert await store.index_kinds() == 4
        assert await store.index_kinds() == 0  # done once per Redis
        counts = {k: await cast("Awaitable[int]", fake_redis.scard(kind_key(k))) for k in KINDS}
        assert counts == {"job": 2, "callback": 1, "poison": 0, "billing_event": 1}

    run(go())


def test_store_gauges_read_every_queue_dead_letters_and_decisions_at_scrape_time(
    fake_redis: fakeredis.FakeAsyncRedis,
) -> None:
    async def go() -> metrics.StoreSnapshot:
        await cast("Awaitable[int]", fake_redis.rpush("cancellations.payway", "m1", "m2"))
        await cast("Awaitable[int]", fake_redis.rpush("callbacks", "m3"))
        await fake_redis.zadd(AWAITING, {"job_a": 1.0, "job_b": 2.0})
        await DeadLetterStore(fake_redis).add(dead_letter("callback"))
        return await metrics.read_store(fake_redis)

    snapshot = run(go())
    found = families(metrics.render(metrics.StoreGauges(snapshot)).decode())
    depth = {s.labels["queue"]: s.value for s in found["cancelflow_queue_depth"].samples}
    assert set(depth) == {q.name for q in queues()}
    assert depth["cancellations.payway"] == 2 and depth["callbacks"] == 1
    assert depth["maintenance"] == 0
    dead = {s.labels["kind"]: s.value for s in found["cancelflow_dead_letters"].samples}
    assert dead == {"job": 0, "callback": 1, "poison": 0, "billing_event": 0}
    (awaiting,) = found["cancelflow_jobs_awaiting_decision"].samples
    assert awaiting.value == 2
    # The process's own metrics are there too.
    assert "cancelflow_jobs_enqueued" in found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_worker_endpoint_serves_metrics_and_survives_a_taken_port() -> None:
    port = free_port()
    conf = WorkerSettings(metrics_port=port, metrics_host="127.0.0.1")
    server = metrics_server.start(conf)
    try:
        assert server is not None and server.port == port
        assert metrics_server.start(conf) is server  # once per process
        metrics.step_ran("confirm", 0.3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            found = families(resp.read().decode())
        assert "cancelflow_step_duration_seconds" in found
    finally:
        metrics_server.stop()
    # A second worker on the host: the port is taken, the worker runs on without metrics.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = WorkerSettings(metrics_port=taken.getsockname()[1], metrics_host="127.0.0.1")
        assert metrics_server.start(busy) is None
    assert metrics_server.start(WorkerSettings(metrics_port=0)) is None
