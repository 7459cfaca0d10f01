"""Flower against the workers' broker: a job's tasks are found by its id, with operator-readable
names, through Flower's HTTP API (what an operator's search box does)."""

from __future__ import annotations

import base64
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from cancelflow.contract import STEP_TASKS, Step, provider_queue
from producers.local import ProcessGroup, cancelflow_command, free_port, http_json, wait_until
from sandboxes.payway import DEMO
from tests.fixtures.system import StartSystem
from tests.support import System

pytestmark = pytest.mark.integration

USER, PASSWORD = "operator", "flower-test"


@dataclass
class Flower:
    url: str
    worker: str  # the system's (first) worker's name

    def request(self, method: str, path: str, **query: str) -> tuple[int, Any]:
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        url = f"{self.url}{path}?{urllib.parse.urlencode(query)}"
        return http_json(method, url, headers={"Authorization": f"Basic {auth}"})

    def get(self, path: str, **query: str) -> Any:
        status, body = self.request("GET", path, **query)
        assert status == 200, body
        return body

    def hears(self, worker: str) -> bool:
        """Flower has received events from ``worker`` (its heartbeats)."""
        return any(w.get("hostname") == worker for w in self.get("/workers", json="1")["data"])

    def tasks_of(self, job_id: str) -> dict[str, dict[str, Any]]:
        # Task args are [job_id, ...]: Flower's search finds every task of the job.
        return self.get("/api/tasks", search=f"args:{job_id}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def flower(system: System, log_dir: Path) -> Iterator[Flower]:
    """``celery -A worker.app flower`` on the system's broker, as `make flower` runs it."""
    with run_flower(system, log_dir / "flower") as found:
        yield found


@contextmanager
def run_flower(system: System, log_dir: Path) -> Iterator[Flower]:
    port = free_port()
    procs = ProcessGroup(
        env={**system.env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}, log_dir=log_dir
    )
    # As an operator runs it: the broker, and on RabbitMQ its management API, from settings.
    procs.start("flower", cancelflow_command("flower", "--address=127.0.0.1", f"--port={port}"))
    # The fixture names its worker worker-<API port>@<this host>.
    worker = f"worker-{urllib.parse.urlsplit(system.api_url).port}@{socket.gethostname()}"
    flower = Flower(f"http://127.0.0.1:{port}", worker)
    try:
        wait_until(lambda: _answers(flower), timeout_s=30, what="flower")
        # Flower keeps only the events it receives: a job sent before it listens is not seen.
        wait_until(lambda: flower.hears(worker), timeout_s=30, what=f"flower to hear from {worker}")
        yield flower
    finally:
        procs.stop_all()


def _answers(flower: Flower) -> bool:
    try:
        return bool(flower.get("/healthcheck") == "OK")
    except (AssertionError, OSError):
        return False


def test_a_jobs_tasks_are_found_in_flower_by_job_id(system: System, flower: Flower) -> None:
    system.sandbox.reset("payway")
    ref = DEMO.immediate
    job = system.wait(
        system.enqueue(
            {
                "provider": "payway",
                "subscription": {
                    "account_id": ref.account_id,
                    "user_product_id": ref.user_product_id,
                    "cancellation_reason_id": DEMO.reason_id,
                },
            }
        )["id"]
    )
    assert job["outcome"]["type"] == "cancelled"

    wanted = {STEP_TASKS[Step.ELIGIBILITY], STEP_TASKS[Step.CONFIRM]}
    found: dict[str, dict[str, Any]] = {}

    def all_succeeded() -> bool:
        nonlocal found
        found = flower.tasks_of(job["id"])
        # A step's sent event (its queue) is published with others, in a batch, up to 50 ms
        # after the step was sent: the step may have run by then.
        done = {
            t["name"] for t in found.values() if t["state"] == "SUCCESS" and t.get("routing_key")
        }
        return wanted <= done

    wait_until(all_succeeded, timeout_s=15, what=f"flower to show {sorted(wanted)} of {job['id']}")
    for task in found.values():
        assert task["name"].startswith("cancelflow."), task
        assert job["id"] in task["args"]
        assert task["worker"], "the worker that ran it"
        assert (
            task["routing_key"] == "cancellations.payway"
            or task["name"] == STEP_TASKS[Step.CALLBACK]
        )
    system.sandbox.reset("payway")


# --- Flower tells the truth: failures, retries, runtimes, pool controls, queues ----------------

STEP_ELIGIBILITY = STEP_TASKS[Step.ELIGIBILITY]


@pytest.fixture(scope="module")
def observed(start_system: StartSystem, log_dir: Path) -> Iterator[tuple[System, Flower]]:
    """A system of its own (its own Redis DB: its queues and unacknowledged messages are its
    jobs' alone), where a step gives up after two attempts, watched by its own Flower."""
    system = start_system(
        isolated=True,
        concurrency=4,
        CANCELFLOW_PROVIDERS__PAYWAY__MAX_ATTEMPTS="2",
    )
    with run_flower(system, log_dir / "flower-observed") as flower:
        yield system, flower


def _subscriptions(system: System, count: int) -> list[dict[str, Any]]:
    status, created = http_json(
        "POST",
        f"{system.sandbox.url}/payway/_sandbox/subscriptions",
        {"count": count, "kind": "immediate"},
    )
    assert status == 200, created
    return [{**ref, "cancellation_reason_id": DEMO.reason_id} for ref in created["references"]]


def _enqueue(system: System) -> str:
    (sub,) = _subscriptions(system, 1)
    return str(system.enqueue({"provider": "payway", "subscription": sub})["id"])


def _task_of(
    flower: Flower, job_id: str, name: str, until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The job's task ``name`` as Flower shows it, once ``until`` holds for it."""
    found: dict[str, Any] = {}

    def seen() -> bool:
        nonlocal found
        tasks = [t for t in flower.tasks_of(job_id).values() if t["name"] == name]
        found = tasks[0] if tasks else {}
        return bool(tasks) and until(found)

    wait_until(seen, timeout_s=30, what=f"flower's {name} of {job_id} (last seen: {found})")
    return found


def test_a_dead_lettered_step_fails_with_its_dead_letter_id_and_is_acknowledged(
    observed: tuple[System, Flower],
) -> None:
    system, flower = observed
    system.sandbox.faults("payway", error_rate=1.0)  # 503 to every call
    try:
        job_id = _enqueue(system)
        job = system.wait(job_id)
    finally:
        system.sandbox.faults("payway")
    assert job["status"] == "dead_lettered", job

    task = _task_of(flower, job_id, STEP_ELIGIBILITY, lambda t: t["state"] == "FAILURE")
    status, letters = system.get("/v1/dead-letters?provider=payway")
    assert status == 200, letters
    (letter,) = [dl for dl in letters["items"] if dl["job_id"] == job_id]
    assert task["exception"] == f"JobDeadLettered('{letter['id']}', 'ProviderUnavailable')", task
    # The result callback was sent before the step failed, and ran.
    _task_of(flower, job_id, STEP_TASKS[Step.CALLBACK], lambda t: t["state"] == "SUCCESS")

    # Acknowledged once, not requeued: no copy of the step's message is left anywhere in
    # the broker (queues, any worker's unacknowledged hash), and it does not come back.
    client = redis.Redis.from_url(system.redis_url)
    try:

        def broker_holds_it() -> bool:
            if system.broker == "amqp":
                # Ready or delivered and unacknowledged, as RabbitMQ counts them (no count
                # yet: not sampled since the queue was declared).
                count = system.amqp_queue(provider_queue("payway")).get("messages")
                return count is None or int(count) > 0
            held = [
                raw
                for key in client.scan_iter("unacked:*")
                if client.type(key) == b"hash"
                for raw in cast("list[bytes]", client.hvals(key))
            ]
            held += cast("list[bytes]", client.lrange(provider_queue("payway"), 0, -1))
            return any(task["uuid"].encode() in raw for raw in held)

        # RabbitMQ's management API samples its counts every 5 s.
        sampled = 0 if system.broker == "redis" else 10
        wait_until(lambda: not broker_holds_it(), timeout_s=5 + sampled, what="the step's ack")
        time.sleep(1.0)
        assert not broker_holds_it()
    finally:
        client.close()
    timeline = system.job(job_id)["timeline"]
    assert [e["event"] for e in timeline].count("dead_lettered") == 1, timeline
    assert flower.tasks_of(job_id)[task["uuid"]]["state"] == "FAILURE"


# Redis's: the worker receives a retry's message at once and holds it for its countdown, so
# Flower has the retry's number and eta within a moment. RabbitMQ holds the countdown itself
# (native delayed delivery): Flower shows the step RETRY at once, but its number and eta only
# once the worker receives it, when it is due (on the RabbitMQ leg this test saw the retry
# only as it ran, with the faults still on).
@pytest.mark.redis_broker
def test_a_retried_step_shows_its_retry_then_a_clean_success(
    observed: tuple[System, Flower],
) -> None:
    system, flower = observed
    # Rate-limited with a Retry-After of 5 s: the step's retry waits at least that long, its
    # message received by the worker at once and held until then.
    system.sandbox.faults("payway", rate_limit_rate=1.0, retry_after_s=5)
    try:
        job_id = _enqueue(system)
        # Once the worker holds the retry's message (its task-received: the retry's number).
        waiting = _task_of(
            flower, job_id, STEP_ELIGIBILITY, lambda t: bool(t.get("retried")) and t["retries"]
        )
    finally:
        system.sandbox.faults("payway")
    # Flower records the retry, why, when it is due and which retry it is, with the name
    # and args of the task; and it stays RETRY for the whole countdown: the retry's
    # task-sent and task-received do not replace it (messaging.patches.RetryingTask).
    assert waiting["state"] == "RETRY", waiting
    assert "ProviderRateLimited" in waiting["exception"], waiting
    assert waiting["traceback"], waiting
    assert waiting["eta"] and waiting["retries"] == 1, waiting
    assert waiting["args"] and job_id in waiting["args"], waiting
    states: list[str] = []

    def left_retry() -> bool:
        (task,) = [t for t in flower.tasks_of(job_id).values() if t["uuid"] == waiting["uuid"]]
        states.append(task["state"])
        return bool(task["state"] != "RETRY")

    wait_until(left_retry, timeout_s=30, interval_s=0.2, what="the retried run to start")
    # RETRY over many looks, until the retried run started: never PENDING or RECEIVED.
    assert states.count("RETRY") >= 3 and states[-1] in {"STARTED", "SUCCESS"}, states
    job = system.wait(job_id)
    assert job["outcome"]["type"] == "cancelled", job

    done = _task_of(flower, job_id, STEP_ELIGIBILITY, lambda t: t["state"] == "SUCCESS")
    assert done["retried"] and done["retries"] == 1, done
    # The retry's error is not shown next to the success.
    assert done["exception"] is None and done["traceback"] is None, done


def test_a_steps_runtime_includes_its_provider_calls(observed: tuple[System, Flower]) -> None:
    system, flower = observed
    system.sandbox.faults("payway", latency_ms=600)
    try:
        job_id = _enqueue(system)
        job = system.wait(job_id)
    finally:
        system.sandbox.faults("payway")
    assert job["outcome"]["type"] == "cancelled", job
    for step in (Step.ELIGIBILITY, Step.CONFIRM):
        task = _task_of(flower, job_id, STEP_TASKS[step], lambda t: t["state"] == "SUCCESS")
        assert task["runtime"] >= 0.5, task


def _pool(flower: Flower) -> tuple[int, int]:
    """The worker's concurrency and its consumer's prefetch, as Flower reads them now."""
    info = flower.get("/api/workers", refresh="1", workername=flower.worker)[flower.worker]
    return info["stats"]["pool"]["max-concurrency"], info["stats"]["prefetch_count"]


def test_flowers_pool_controls_change_how_many_steps_run_at_once(
    observed: tuple[System, Flower],
) -> None:
    _, flower = observed
    # The prefetch is the concurrency, plus one for each retry waiting on its countdown.
    concurrency, prefetch = _pool(flower)
    assert concurrency == 4 and prefetch >= 4

    def pool_is(expected: tuple[int, int]) -> Callable[[], bool]:
        return lambda: _pool(flower) == expected

    status, body = flower.request("POST", f"/api/worker/pool/grow/{flower.worker}", n="3")
    assert status == 200, body
    wait_until(pool_is((7, prefetch + 3)), timeout_s=10, what="the pool to grow")
    status, body = flower.request("POST", f"/api/worker/pool/shrink/{flower.worker}", n="2")
    assert status == 200, body
    wait_until(pool_is((5, prefetch + 1)), timeout_s=10, what="the pool to shrink")

    # Not below one step at once: refused, with why.
    status, body = flower.request("POST", f"/api/worker/pool/shrink/{flower.worker}", n="5")
    assert status == 403, body
    assert "must keep at least one" in body, body
    assert _pool(flower) == (5, prefetch + 1)
    status, body = flower.request("POST", f"/api/worker/pool/shrink/{flower.worker}", n="1")
    assert status == 200, body
    wait_until(pool_is((4, prefetch)), timeout_s=10, what="the pool to shrink back")


def test_flowers_broker_page_lists_every_queue_with_its_length(
    observed: tuple[System, Flower],
) -> None:
    system, flower = observed
    queue = provider_queue("payway")
    # Slow answers, and more jobs than the worker takes at once (4): the rest wait queued.
    system.sandbox.faults("payway", latency_ms=1500)
    lengths: dict[str, int] = {}
    try:
        jobs = [
            system.enqueue({"provider": "payway", "subscription": sub})["id"]
            for sub in _subscriptions(system, 10)
        ]

        def queued() -> bool:
            nonlocal lengths
            found = flower.get("/api/queues/length")["active_queues"]
            lengths = {q["name"]: q["messages"] for q in found}
            return lengths.get(queue, 0) > 0

        wait_until(queued, timeout_s=10, what=f"flower to show {queue}'s messages ({lengths})")
        status, page = flower.request("GET", "/broker")
    finally:
        system.sandbox.faults("payway")
    # Redis's length is what waits; RabbitMQ's (its management API) counts delivered ones too.
    assert lengths[queue] <= (10 - 4 if system.broker == "redis" else 10), lengths
    # Every queue the worker consumes, each with its length.
    assert {provider_queue(key) for key in system.env_providers()} | {
        "callbacks",
        "maintenance",
    } <= set(lengths), lengths
    assert status == 200, page
    assert queue in page and "not supported" not in page, page
    for job_id in jobs:
        system.wait(job_id)
