"""Prometheus metrics after real jobs: the worker's /metrics and the API's, as Prometheus reads
them (``text_string_to_metric_families``)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from cancelflow.dead_letters import KINDS
from messaging.config import queues
from producers.local import free_port, http_json
from sandboxes.payway import DEMO
from tests.fixtures.system import READ_TOKEN, StartSystem
from tests.support import System, payway_body

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def metered(start_system: StartSystem) -> tuple[System, int]:
    """A system of its own (its Redis DB, so the gauges are its alone) whose worker serves
    metrics on a free port."""
    port = free_port()
    system = start_system(
        isolated=True,
        CANCELFLOW_WORKER__METRICS_PORT=str(port),
        CANCELFLOW_WORKER__METRICS_HOST="127.0.0.1",
    )
    return system, port


@pytest.fixture(autouse=True)
def fresh_payway(metered: tuple[System, int]) -> Iterator[None]:
    system, _ = metered
    system.sandbox.reset("payway")
    system.sandbox.faults("payway")
    yield
    system.sandbox.faults("payway")


def scrape(url: str, token: str | None = None) -> Samples:
    req = urllib.request.Request(url)  # noqa: S310 - our own localhost URL
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` that has ``labels`` (and any others)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_counters_histograms_and_gauges_move_with_the_jobs(metered: tuple[System, int]) -> None:
    system, port = metered
    worker_url = f"http://127.0.0.1:{port}/metrics"
    api_url = f"{system.api_url}/metrics"
    receiver = f"http://localhost:{urlsplit(system.sandbox.url).port}/receiver"
    assert http_json("POST", f"{receiver}/_reset")[0] == 200
    worker_before, api_before = scrape(worker_url), scrape(api_url, system.token)

    # Two cancelled (one with a callback URL), one not eligible, one retried after a 5xx.
    jobs = [
        system.enqueue(payway_body(DEMO.end_of_period, callback_url=f"{receiver}/events"))["id"],
        system.enqueue(payway_body(DEMO.immediate))["id"],
        system.enqueue(payway_body(DEMO.account_not_found))["id"],
    ]
    finished = [system.wait(job_id) for job_id in jobs]
    system.sandbox.faults("payway", fail_once_rate=1.0)
    retried = system.wait(system.enqueue(payway_body(DEMO.autogiro))["id"], timeout_s=60)
    system.sandbox.faults("payway")
    assert [j["outcome"]["type"] for j in finished] == ["cancelled", "cancelled", "not_eligible"]
    assert retried["outcome"]["type"] == "cancelled"
    # A poison message: dead-lettered, and parked on the dead_letters queue.
    client = redis.Redis.from_url(system.redis_url)
    system.publish(
        "cancellations.payway",
        b"{not json",
        headers={"task": "cancelflow.eligibility", "id": "m1", "lang": "py"},
        content_type="application/json",
        content_encoding="utf-8",
        serializer=None,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (client.zcard("cf:dl:index") and system.parked()):
        time.sleep(0.1)

    worker, api = scrape(worker_url), scrape(api_url, system.token)
    # RabbitMQ's management API shows queue lengths as sampled (every 5 s by default).
    while (
        time.monotonic() < deadline and get(api, "cancelflow_queue_depth", queue="dead_letters") < 1
    ):
        time.sleep(0.5)
        api = scrape(api_url, system.token)

    def moved(name: str, **labels: str) -> float:
        """How much the worker's series of ``name`` with ``labels`` went up."""
        return total(worker, name, **labels) - total(worker_before, name, **labels)

    # Enqueued at the API, finished at the worker, by provider and outcome.
    enqueued = {"name": "cancelflow_jobs_enqueued_total", "provider": "payway"}
    assert total(api, **enqueued) - total(api_before, **enqueued) == 4
    ended = "cancelflow_jobs_finished_total"
    assert moved(ended, provider="payway", outcome="cancelled") == 3
    assert moved(ended, provider="payway", outcome="not_eligible") == 1
    # The 5xx: counted as a provider call by its status, and as a retry by its error type.
    calls = "cancelflow_provider_calls_total"
    assert moved(calls, provider="payway", result="503") >= 1
    assert moved(calls, provider="payway", result="200") >= 4
    assert moved("cancelflow_retries_total", provider="payway", error_type="ProviderUnavailable")
    # Histograms have observations, in seconds.
    for step, runs in (("eligibility", 4), ("confirm", 3), ("callback", 4)):
        assert moved("cancelflow_step_duration_seconds_count", step=step) >= runs, step
    latency = "cancelflow_provider_call_duration_seconds"
    observed = moved(f"{latency}_count", provider="payway")
    assert observed >= 5
    assert 0 < moved(f"{latency}_sum", provider="payway") < observed * 10
    assert get(worker, f"{latency}_bucket", provider="payway", method="GET", le="+Inf") > 0
    # Callbacks: delivered to the receiver, skipped for the jobs without a URL.
    assert moved("cancelflow_callback_deliveries_total", result="delivered") == 1
    assert moved("cancelflow_callback_deliveries_total", result="skipped") == 3

    # Gauges of shared state, read from Redis at the scrape: every queue, every kind.
    depth = {dict(ls)["queue"]: v for (n, ls), v in api.items() if n == "cancelflow_queue_depth"}
    assert set(depth) == {q.name for q in queues()}
    assert depth["dead_letters"] == 1  # the poison message, parked
    assert depth["cancellations.payway"] == 0
    dead = {dict(ls)["kind"]: v for (n, ls), v in api.items() if n == "cancelflow_dead_letters"}
    assert dead == {**dict.fromkeys(KINDS, 0.0), "poison": 1.0}
    assert get(api, "cancelflow_jobs_awaiting_decision") == 0
    assert ("cancelflow_jobs_awaiting_decision", frozenset()) in api
    # Only the API reads the shared state: a worker's scrape has no gauges of it.
    assert not any(n == "cancelflow_queue_depth" for n, _ in worker)


def test_the_api_metrics_need_a_token_a_read_only_one_will_do(metered: tuple[System, int]) -> None:
    system, _ = metered
    with pytest.raises(urllib.error.HTTPError) as refused:
        scrape(f"{system.api_url}/metrics")
    assert refused.value.code == 401
    samples = scrape(f"{system.api_url}/metrics", READ_TOKEN)
    assert total(samples, "cancelflow_queue_depth", queue="maintenance") == 0


def test_the_api_counts_its_requests_by_route_template_and_shows_breakers_and_build(
    metered: tuple[System, int],
) -> None:
    system, _ = metered
    api_url = f"{system.api_url}/metrics"
    before = scrape(api_url, system.token)
    job_id = system.enqueue(payway_body(DEMO.end_of_period))["id"]
    system.wait(job_id)
    assert system.get(f"/v1/cancellations/{job_id}")[0] == 200
    assert system.get(f"/v1/cancellations/job_{'0' * 32}")[0] == 404
    assert http_json("GET", f"{system.api_url}/v1/cancellations/{job_id}")[0] == 401
    after = scrape(api_url, system.token)

    route = "/v1/cancellations/{job_id}"
    name = "cancelflow_api_requests_total"

    def moved(**labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved(method="GET", route=route, status="200") >= 1  # system.wait polls it too
    assert moved(method="GET", route=route, status="404") == 1
    # errors_and_auth's own answers are counted: the metrics middleware is outside it.
    assert moved(method="GET", route=route, status="401") == 1
    assert (
        moved(method="POST", route="/v1/cancellations", status="202")
        + moved(method="POST", route="/v1/cancellations", status="201")
        == 1
    )
    routes = {dict(ls)["route"] for (n, ls), _ in after.items() if n == name}
    assert not any(job_id in r for r in routes), routes
    # Every configured provider's breaker (closed here) and in-flight calls, read from Redis.
    circuit = {
        dict(ls)["provider"]: v
        for (n, ls), v in after.items()
        if n == "cancelflow_provider_circuit_state"
    }
    assert circuit and set(circuit) == system.env_providers() and set(circuit.values()) == {0}
    assert get(after, "cancelflow_provider_in_flight", provider="payway") == 0
    # The payway queue is drained: its oldest message is 0 s old.
    age = "cancelflow_queue_oldest_message_age_seconds"
    assert get(after, age, queue="cancellations.payway") == 0
    assert (
        "cancelflow_queue_oldest_message_age_seconds",
        frozenset({("queue", "cancellations.payway")}),
    ) in after
    builds = [ls for (n, ls), v in after.items() if n == "cancelflow_build_info" and v == 1]
    assert len(builds) == 1 and {k for k, _ in builds[0]} == {"version", "python", "celery"}
