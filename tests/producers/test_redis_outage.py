"""Redis outages, against redis-servers of the tests' own on free ports (stopped and started
again at will) and a peer that accepts connections and never answers (a "black hole").

The API answers 503 + Retry-After (problem+json) on every route while Redis is unreachable,
within its read timeout; the client rides out the outage; api and worker warn at start-up
when Redis keeps nothing on disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cancelflow.settings import Settings
from cancelflow.store import JobStore
from cancelflow.wiring import redis_client, redis_persistence
from cancelflow_client import CancelflowClient, ServerError
from producers.local import (
    ProcessGroup,
    cancelflow_command,
    free_port,
    http_ok,
    redis_answers,
    wait_until,
)
from sandboxes import payway
from tests.fixtures.system import API_TOKEN

pytestmark = pytest.mark.integration

NO_PERSISTENCE = ("--save", "", "--appendonly", "no")
READ_TIMEOUT_S = 3.0  # the least a 2 s XREADGROUP BLOCK allows
CONNECT_TIMEOUT_S = 1.0


@dataclass
class RedisServer:
    """A redis-server of this test's own on a free port; ``stop`` and ``start`` at will."""

    dir: Path
    args: tuple[str, ...] = NO_PERSISTENCE
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"), *self.args),
            ]
        )
        wait_until(lambda: redis_answers(self.url), timeout_s=10, what="redis-server")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    started: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(started)}", args or NO_PERSISTENCE)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A Redis URL whose peer accepts connections (the kernel's backlog does) and never
    answers: the read timeout is all that ends a command."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


@dataclass
class Api:
    url: str
    procs: ProcessGroup

    def log_lines(self, name: str = "api") -> list[dict[str, Any]]:
        text = (self.procs.log_dir / f"{name}.log").read_text()
        lines = []
        for line in text.splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines


def api_env(redis_url: str) -> dict[str, str]:
    return {
        "CANCELFLOW_REDIS_URL": redis_url,
        "CANCELFLOW_API_TOKENS": API_TOKEN,
        "CANCELFLOW_LOG_FORMAT": "json",
        "CANCELFLOW_WORKER__METRICS_PORT": "0",
        "CANCELFLOW_REDIS_CONNECT_TIMEOUT_S": str(CONNECT_TIMEOUT_S),
        "CANCELFLOW_REDIS_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
        "CANCELFLOW_PROVIDERS__PAYWAY__BASE_URL": "http://127.0.0.1:9/payway",
        "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_ID": payway.DEMO_CLIENT_ID,
        "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_SECRET": payway.DEMO_CLIENT_SECRET,
    }


@pytest.fixture
def start_api(tmp_path: Path) -> Iterator[Callable[[str], Api]]:
    groups: list[ProcessGroup] = []

    def start(redis_url: str) -> Api:
        procs = ProcessGroup(env=api_env(redis_url), log_dir=tmp_path / f"api-{len(groups)}")
        groups.append(procs)
        port = free_port()
        procs.start("api", cancelflow_command("api", "--port", str(port)))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{url}/healthz"), timeout_s=30, what="api")
        return Api(url, procs)

    yield start
    for procs in groups:
        procs.stop_all()


def call(
    method: str, url: str, body: Any = None, *, token: str | None = API_TOKEN
) -> tuple[int, dict[str, str], Any]:
    """(status, headers in lower case, decoded JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - our own API
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            status, headers, payload = resp.status, resp.headers.items(), resp.read()
    except urllib.error.HTTPError as exc:
        status, headers, payload = exc.code, exc.headers.items(), exc.read()
    return status, {k.lower(): v for k, v in headers}, json.loads(payload) if payload else None


def cancellation() -> dict[str, Any]:
    return {
        "provider": "payway",
        "subscription": {
            "account_id": "5cb80481c0000000000000a1",
            "user_product_id": "5cb80481c0000000000000b1",
            "cancellation_reason_id": payway.DEMO.reason_id,
        },
        "idempotency_key": f"outage-{time.monotonic_ns()}",
    }


ROUTES = [
    ("GET", "/v1/cancellations"),
    ("POST", "/v1/cancellations"),
    ("GET", "/v1/cancellations/job_missing"),
    ("POST", "/v1/cancellations/job_missing/decision"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/dead-letters"),
    ("GET", "/v1/dead-letters/dl_missing"),
    ("POST", "/v1/dead-letters/dl_missing/replay"),
    ("DELETE", "/v1/dead-letters/dl_missing"),
    ("GET", "/v1/providers"),
    ("GET", "/metrics"),
    # (POST /v1/billing-events checks the signature first, before any Redis call: an
    # unsigned or unconfigured event is refused without Redis, see test_auth_and_namespaces.)
]


def body_for(method: str, path: str) -> Any:
    if path == "/v1/cancellations" and method == "POST":
        return cancellation()
    if path.endswith("/decision"):
        return {"decision": "reject"}
    return {} if method == "POST" else None


def assert_unavailable(status: int, headers: dict[str, str], body: Any, what: str) -> None:
    assert status == 503, (what, status, body)
    assert headers["content-type"].startswith("application/problem+json"), what
    assert headers["retry-after"].isdigit() and int(headers["retry-after"]) >= 1, what
    assert body["status"] == 503 and body["retry_after"] == int(headers["retry-after"]), what


def test_every_route_answers_503_with_retry_after_while_redis_is_down_and_recovers(
    redis_servers: Callable[..., RedisServer], start_api: Callable[[str], Api]
) -> None:
    redis = redis_servers()
    api = start_api(redis.url)
    status, _, ready = call("GET", f"{api.url}/readyz", token=None)
    assert status == 200 and ready["redis"] == "ok" and ready["persistence"] == "none", ready

    redis.stop()
    for method, path in ROUTES:
        status, headers, body = call(method, f"{api.url}{path}", body_for(method, path))
        assert_unavailable(status, headers, body, f"{method} {path}")
        assert "Redis is unreachable" in body["detail"]
    status, headers, body = call("GET", f"{api.url}/readyz", token=None)
    assert_unavailable(status, headers, body, "/readyz")
    assert body["title"] == "Not ready"
    assert (body["redis"], body["persistence"]) == ("unreachable", "unknown")
    assert call("GET", f"{api.url}/healthz", token=None)[0] == 200  # liveness: alive
    assert not [line for line in api.log_lines() if line.get("message") == "api.unexpected_error"]

    redis.start()  # the same port: the API reconnects by itself
    wait_until(lambda: http_ok(f"{api.url}/readyz"), timeout_s=20, what="api ready again")
    status, _, page = call("GET", f"{api.url}/v1/cancellations")
    assert status == 200 and page["items"] == []
    status, _, job = call("POST", f"{api.url}/v1/cancellations", cancellation())
    assert status == 202, job


def test_a_redis_that_never_answers_gets_503_within_the_read_timeout(
    black_hole: str, start_api: Callable[[str], Api]
) -> None:
    api = start_api(black_hole)
    for method, path in [("GET", "/v1/cancellations"), ("POST", "/v1/cancellations")]:
        started = time.monotonic()
        status, headers, body = call(method, f"{api.url}{path}", body_for(method, path))
        waited = time.monotonic() - started
        assert_unavailable(status, headers, body, f"{method} {path}")
        # An upper bound on a timeout, not a performance claim: without one it waits forever.
        assert waited < READ_TIMEOUT_S + 2.0, waited
    started = time.monotonic()
    status, headers, body = call("GET", f"{api.url}/readyz", token=None)
    assert_unavailable(status, headers, body, "/readyz")
    assert time.monotonic() - started < READ_TIMEOUT_S + 2.0
    assert "no answer in time" in body["detail"]


async def test_a_job_store_call_to_a_black_hole_times_out_after_the_read_timeout(
    black_hole: str,
) -> None:
    from redis.exceptions import TimeoutError as RedisTimeoutError

    settings = Settings(redis_url=black_hole, redis_connect_timeout_s=0.5, redis_read_timeout_s=1.0)
    redis = redis_client(settings)
    store = JobStore(redis, retention_s=60, idempotency_ttl_s=86400)
    started = time.monotonic()
    with pytest.raises(RedisTimeoutError):
        await store.get("job_x")
    # Once, not once per retry: timeouts are not retried (the wait is already spent).
    assert time.monotonic() - started < 1.0 + 1.0
    await redis.aclose()


def test_the_client_rides_out_an_outage_of_the_apis_redis(
    redis_servers: Callable[..., RedisServer], start_api: Callable[[str], Api]
) -> None:
    redis = redis_servers()
    api = start_api(redis.url)
    redis.stop()
    back = threading.Timer(4.0, redis.start)
    back.start()
    try:
        with CancelflowClient(api.url, API_TOKEN, retry_time_s=40) as client:
            page = client.list()  # 503s (Retry-After: 5) until Redis is back
            assert page.items == []
            request = cancellation()
            enqueued = client.enqueue(
                "payway", request["subscription"], idempotency_key=request["idempotency_key"]
            )
            assert enqueued.how == "created"
    finally:
        back.join()
    assert outage_lines(api), "the client never met the outage: the test proved nothing"


def cli_status(api: Api, job_id: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cancelflow_command("status", job_id, "--api-url", api.url),
        env={**os.environ, "CANCELFLOW_CLIENT__TOKEN": API_TOKEN, **env},
        capture_output=True,
        text=True,
        timeout=90,
    )


def outage_lines(api: Api) -> list[dict[str, Any]]:
    return [line for line in api.log_lines() if line.get("message") == "api.redis_unavailable"]


def test_the_cli_retries_503s_and_at_the_end_names_the_api(
    redis_servers: Callable[..., RedisServer], start_api: Callable[[str], Api]
) -> None:
    redis = redis_servers("--save", "", "--appendonly", "yes")  # the job outlives the restart
    api = start_api(redis.url)
    status, _, job = call("POST", f"{api.url}/v1/cancellations", cancellation())
    assert status == 202, job
    redis.stop()

    # Retry-After is 5 s: 12 s of retries make two or three attempts (each 503 comes after
    # the API's own reconnect attempts, faster or slower with the machine's load), then a
    # clear error naming the API and how many attempts were made.
    done = cli_status(api, job["id"], CANCELFLOW_CLIENT__RETRY_TIME_S="12")
    assert done.returncode == 1, done
    assert "503 Service unavailable" in done.stderr, done.stderr
    made = re.search(rf"from {re.escape(api.url)}, (\d+) attempts over", done.stderr)
    assert made is not None, done.stderr
    attempts = int(made.group(1))
    assert attempts in (2, 3), done.stderr
    assert len(outage_lines(api)) == attempts
    seen = attempts

    # Redis comes back once the CLI has met the outage (its first 503), however long the
    # command took to start: the default policy (up to 60 s) rides it out.
    def back_after_a_503() -> None:
        wait_until(lambda: len(outage_lines(api)) > seen, timeout_s=60, what="the CLI's 503")
        redis.start()

    back = threading.Thread(target=back_after_a_503)
    back.start()
    try:
        done = cli_status(api, job["id"])
    finally:
        back.join()
    assert done.returncode == 0, done
    assert job["id"] in done.stdout
    assert len(outage_lines(api)) > seen


def test_the_client_error_after_its_retries_names_the_api(
    redis_servers: Callable[..., RedisServer], start_api: Callable[[str], Api]
) -> None:
    redis = redis_servers()
    api = start_api(redis.url)
    redis.stop()
    with pytest.raises(ServerError) as err:
        CancelflowClient(api.url, API_TOKEN, retry_time_s=6, retries=3).get("job_x")
    assert err.value.status == 503
    assert f"from {api.url}, 2 attempts over" in str(err.value)


def persistence_warnings(api: Api, name: str) -> list[dict[str, Any]]:
    return [line for line in api.log_lines(name) if line.get("message") == "redis.persistence.none"]


def test_a_redis_that_keeps_nothing_on_disk_is_warned_of_at_start_up(
    redis_servers: Callable[..., RedisServer], start_api: Callable[[str], Api]
) -> None:
    ephemeral = redis_servers(*NO_PERSISTENCE)
    durable = redis_servers("--save", "", "--appendonly", "yes")

    warned = start_api(ephemeral.url)
    wait_until(lambda: persistence_warnings(warned, "api"), timeout_s=10, what="the warning")
    (line,) = persistence_warnings(warned, "api")
    assert line["level"] == "warning"
    for lost in ("job record", "queued message", "idempotency key"):
        assert lost in line["detail"]
    assert call("GET", f"{warned.url}/readyz", token=None)[2]["persistence"] == "none"

    # A worker says so too, once.
    warned.procs.start(
        "worker", cancelflow_command("worker", "-c", "2", "-n", f"w{free_port()}@%h")
    )
    wait_until(lambda: persistence_warnings(warned, "worker"), timeout_s=30, what="worker's")
    assert len(persistence_warnings(warned, "worker")) == 1

    quiet = start_api(durable.url)
    wait_until(
        lambda: any(line.get("message") == "redis.persistence" for line in quiet.log_lines()),
        timeout_s=10,
        what="the persistence line",
    )
    assert persistence_warnings(quiet, "api") == []
    assert call("GET", f"{quiet.url}/readyz", token=None)[2]["persistence"] == "aof"


async def test_persistence_is_unknown_when_config_is_disabled(
    redis_servers: Callable[..., RedisServer],
) -> None:
    managed = redis_servers(*NO_PERSISTENCE, "--rename-command", "CONFIG", "")
    rdb = redis_servers("--save", "3600 1", "--appendonly", "no")
    for server, expected in ((managed, "unknown"), (rdb, "rdb")):
        redis = redis_client(Settings(redis_url=server.url))
        assert await redis_persistence(redis) == expected
        await redis.aclose()
    await asyncio.sleep(0)


def test_the_billing_consumer_carries_on_after_its_redis_comes_back(
    redis_servers: Callable[..., RedisServer], rules_file: Path, tmp_path: Path
) -> None:
    import redis as sync_redis

    from cancelflow.store import JOBS_INDEX
    from tests.producers.conftest import providers

    server = redis_servers("--save", "", "--appendonly", "yes")  # the group outlives the restart
    env = {
        **api_env(server.url),
        "CANCELFLOW_BILLING__RULES_PATH": str(rules_file),
        **{
            f"CANCELFLOW_PROVIDERS__{key.upper()}__{name.upper()}": value
            for key, conf in providers().items()
            for name, value in conf.items()
        },
    }
    procs = ProcessGroup(env=env, log_dir=tmp_path / "billing")
    procs.start("billing", cancelflow_command("billing-consumer", "--consumer", "outage"))
    client = sync_redis.Redis.from_url(server.url, socket_timeout=5)

    def publish_and_wait(jobs: int) -> None:
        event = {
            "id": f"evt_{time.monotonic_ns()}",
            "type": "payment.final_failure",
            "data": {
                "provider": "payway",
                "account_id": "5cb80481c0000000000000a1",
                "user_product_id": f"{time.monotonic_ns():024x}"[-24:],
            },
        }
        client.xadd("cf:billing:events", {"event": json.dumps(event)})
        wait_until(lambda: client.zcard(JOBS_INDEX) == jobs, timeout_s=30, what=f"{jobs} jobs")

    try:
        wait_until(
            lambda: (
                b"billing.consumer.started" in (tmp_path / "billing" / "billing.log").read_bytes()
            ),
            timeout_s=30,
            what="the consumer",
        )
        publish_and_wait(1)
        # Let it finish that event (its task sent, its entry acknowledged) and block on the
        # next read: the outage then meets the read loop, not the event's handling.
        time.sleep(3.0)
        server.stop()
        # Longer than the client's own retries of a dropped connection (about 3 s): its
        # XREADGROUP fails, and the consumer waits the outage out.
        time.sleep(2 * READ_TIMEOUT_S)
        server.start()
        client = sync_redis.Redis.from_url(server.url, socket_timeout=5)
        publish_and_wait(2)
        assert procs.procs["billing"].poll() is None  # never gave up
    finally:
        procs.stop_all()
    log = (tmp_path / "billing" / "billing.log").read_text()
    assert "billing.consumer.redis_error" in log  # it did meet the outage
