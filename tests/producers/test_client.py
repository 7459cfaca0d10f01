"""The Python client, sync and asyncio, against the live API (real worker, sandboxes)."""

from __future__ import annotations

import secrets
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cancelflow_client import (
    AsyncCancelflowClient,
    CancelflowClient,
    Conflict,
    Forbidden,
    JobRecord,
    NotFound,
    OutcomeType,
    RateLimited,
    Reason,
    Status,
    TransportError,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
)
from producers.local import free_port, http_json
from sandboxes.payway import DEMO
from tests.fixtures.system import READ_TOKEN
from tests.support import System

pytestmark = pytest.mark.integration


def sandbox_refs(system: System, provider: str, kind: str, count: int = 1) -> list[Any]:
    status, body = http_json(
        "POST",
        f"{system.sandbox.url}/{provider}/_sandbox/subscriptions",
        {"count": count, "kind": kind},
    )
    assert status == 200, body
    return body["references"]  # type: ignore[no-any-return]


def payway_subscription(system: System, kind: str = "end_of_period") -> dict[str, str]:
    return {**sandbox_refs(system, "payway", kind)[0], "cancellation_reason_id": DEMO.reason_id}


def test_sync_enqueue_wait_and_idempotency(system: System) -> None:
    with CancelflowClient(system.api_url, system.token) as client:
        subscription = payway_subscription(system)
        key = f"order-{secrets.token_hex(4)}"
        first = client.enqueue(
            "payway",
            subscription,
            reason=Reason(code="too_expensive"),
            idempotency_key=key,
            metadata={"customer": "c_1"},
        )
        assert first.how == "created"
        assert isinstance(first.job, JobRecord) and first.job.status is Status.QUEUED
        again = client.enqueue(
            "payway",
            subscription,
            reason=Reason(code="too_expensive"),
            idempotency_key=key,
            metadata={"customer": "c_1"},
        )
        assert (again.how, again.job.id) == ("existing", first.job.id)
        # draft-ietf-httpapi-idempotency-key-header: a key reused with another body is a 422.
        with pytest.raises(ValidationFailed) as reused:
            client.enqueue("payway", subscription, idempotency_key=key)
        assert reused.value.problem.type == "https://cancelflow.dev/problems/idempotency-key-reused"
        assert reused.value.problem.job_id == first.job.id

        done = client.wait(first.job.id, timeout=30)
        assert done.status is Status.FINISHED
        assert done.outcome is not None and done.outcome.type is OutcomeType.CANCELLED
        assert client.get(first.job.id) == done or client.get(first.job.id).id == done.id
        assert first.job.id in {j.id for j in client.list(provider="payway", limit=50).items}


def test_sync_typed_errors(system: System) -> None:
    with CancelflowClient(system.api_url, system.token) as client:
        with pytest.raises(ValidationFailed) as invalid:
            client.enqueue(
                "payway", {"account_id": "xyz", "user_product_id": DEMO.immediate.user_product_id}
            )
        assert set(invalid.value.fields) == {
            "subscription.account_id",
            "subscription.cancellation_reason_id",
        }
        with pytest.raises(ValidationFailed) as local:
            client.enqueue("", {})  # caught before sending
        assert "provider" in local.value.fields
        with pytest.raises(NotFound):
            client.get(f"job_{'0' * 32}")
        job = client.enqueue("payway", payway_subscription(system)).job
        with pytest.raises(Conflict):
            client.decide(job.id, "accept")
    with CancelflowClient(system.api_url, "not-a-token") as client, pytest.raises(Unauthorized):
        client.get(f"job_{'0' * 32}")
    with CancelflowClient(system.api_url, READ_TOKEN) as client, pytest.raises(Forbidden):
        client.enqueue("payway", payway_subscription(system))


def test_sync_rate_limited_carries_retry_after(limited_api: System) -> None:
    token = limited_api.token
    with (
        CancelflowClient(limited_api.api_url, token, retries=0) as client,
        pytest.raises(RateLimited) as caught,
    ):
        for _ in range(20):
            client.list(limit=1)
    assert 0 < caught.value.retry_after <= 1
    # With retries, the client waits Retry-After out instead.
    with CancelflowClient(limited_api.api_url, token, retries=3) as client:
        for _ in range(3):
            client.list(limit=1)


def test_wait_times_out_with_the_last_seen_job(system: System) -> None:
    system.sandbox.faults("azotte")
    with CancelflowClient(system.api_url, system.token) as client:
        order = sandbox_refs(system, "azotte", "offer")[0]
        job = client.enqueue("azotte", {"order_identifier": order}).job
        parked = client.wait(job.id, timeout=30, until={Status.AWAITING_DECISION})
        with pytest.raises(WaitTimeout) as caught:
            client.wait(job.id, timeout=0.3)
        assert caught.value.job.status is Status.AWAITING_DECISION
        decided = client.decide(parked.id, "accept")
        assert decided.status is Status.FINISHED and decided.outcome is not None
        assert decided.outcome.type is OutcomeType.RETAINED


async def test_async_client_end_to_end(system: System) -> None:
    async with AsyncCancelflowClient(system.api_url, system.token) as client:
        order = sandbox_refs(system, "azotte", "offer")[0]
        first = await client.enqueue(
            "azotte", {"order_identifier": order}, idempotency_key=f"k-{order}"
        )
        again = await client.enqueue(
            "azotte", {"order_identifier": order}, idempotency_key=f"k-{order}"
        )
        assert again.job.id == first.job.id and again.how == "existing"
        await client.wait(first.job.id, timeout=30, until={Status.AWAITING_DECISION})
        decided = await client.decide(first.job.id, "reject", survey={"why": "price"})
        assert decided.decision is not None and decided.decision.decision == "reject"
        done = await client.wait(first.job.id, timeout=30)
        assert done.outcome is not None and done.outcome.type is OutcomeType.CANCELLED
        with pytest.raises(ValidationFailed) as invalid:
            await client.enqueue("azotte", {"order_identifier": ""})
        assert invalid.value.fields == ["subscription.order_identifier"]
        with pytest.raises(NotFound):
            await client.get("job_nope")
        ids = [j.id async for j in client.iter_jobs(provider="azotte", limit=2)]
        assert first.job.id in ids and len(ids) == len(set(ids))
        stats = await client.stats(since_s=600)
        assert stats.jobs["azotte"]["finished"] >= 1


# --- retries: a proxy that loses answers -------------------------------------------------------


class LossyProxy(ThreadingHTTPServer):
    """Forwards requests to the API; loses the answers of the first ``lose`` POSTs (after the
    API acted on them) and answers the first ``unavailable`` GETs 503 itself."""

    daemon_threads = True

    def __init__(self, target: str, *, lose: int = 0, unavailable: int = 0) -> None:
        super().__init__(("127.0.0.1", free_port()), _ProxyHandler)
        self.target = target
        self.lose = lose
        self.unavailable = unavailable
        self.seen: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    server: LossyProxy

    def log_message(self, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        with self.server.lock:
            self.server.seen.append(self.command)
            unavailable = self.command == "GET" and self.server.unavailable > 0
            self.server.unavailable -= unavailable
        if unavailable:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        request = urllib.request.Request(  # noqa: S310 - our own API's URL
            self.server.target + self.path,
            data=body,
            method=self.command,
            headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
                status, headers, payload = resp.status, resp.headers.items(), resp.read()
        except urllib.error.HTTPError as exc:
            status, headers, payload = exc.code, exc.headers.items(), exc.read()
        with self.server.lock:
            lose = self.command == "POST" and self.server.lose > 0
            self.server.lose -= lose
        if lose:
            self.close_connection = True  # the API acted; the caller never hears of it
            return
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in (
                "content-length",
                "connection",
                "transfer-encoding",
                "date",
                "server",
            ):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = _forward
    do_POST = _forward


@pytest.fixture
def proxy(system: System) -> Iterator[LossyProxy]:
    server = LossyProxy(system.api_url)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _jobs_with_key(system: System, key: str, provider: str) -> list[str]:
    status, page = system.get(f"/v1/cancellations?provider={provider}&limit=200")
    assert status == 200
    return [item["id"] for item in page["items"] if item["idempotency_key"] == key]


def test_a_retried_enqueue_whose_answer_was_lost_makes_one_job(
    system: System, proxy: LossyProxy
) -> None:
    proxy.lose = 2
    with CancelflowClient(proxy.url, system.token, backoff_s=0.01) as client:
        enqueued = client.enqueue("payway", payway_subscription(system))
    assert proxy.seen.count("POST") == 3
    assert enqueued.how == "existing"  # the first attempt made it; the retries found it
    assert enqueued.job.idempotency_key is not None
    assert _jobs_with_key(system, enqueued.job.idempotency_key, "payway") == [enqueued.job.id]


async def test_async_retries_lost_answers_and_503s(system: System, proxy: LossyProxy) -> None:
    proxy.lose, proxy.unavailable = 1, 2
    async with AsyncCancelflowClient(proxy.url, system.token, backoff_s=0.01) as client:
        order = sandbox_refs(system, "azotte", "processed")[0]
        enqueued = await client.enqueue("azotte", {"order_identifier": order})
        assert enqueued.how == "existing"
        job = await client.get(enqueued.job.id)  # two 503s first, then the answer
        assert job.id == enqueued.job.id
    assert proxy.seen.count("GET") == 3
    assert enqueued.job.idempotency_key is not None
    assert _jobs_with_key(system, enqueued.job.idempotency_key, "azotte") == [enqueued.job.id]


def test_no_api_is_a_transport_error_after_the_retries() -> None:
    client = CancelflowClient(f"http://127.0.0.1:{free_port()}", "t", retries=2, backoff_s=0.01)
    with pytest.raises(TransportError):
        client.get("job_x")
