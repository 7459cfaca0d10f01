"""Helpers for tests that drive the real system over HTTP."""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from kombu.exceptions import ChannelError

from cancelflow.contract import DEAD_LETTER_QUEUE, FINAL_STATUSES
from cancelflow.settings import Settings
from messaging.config import create_celery
from producers.local import ProcessGroup, http_json
from sandboxes.payway import DEMO, PaywayRef
from tests.rabbitmq import Management


@dataclass
class Sandbox:
    url: str

    def reset(self, key: str) -> None:
        status, _ = http_json("POST", f"{self.url}/{key}/_sandbox/reset")
        assert status == 200, status

    def faults(self, key: str, **faults: Any) -> None:
        status, body = http_json("PUT", f"{self.url}/{key}/_sandbox/faults", faults)
        assert status == 200, body

    def state(self, key: str) -> dict[str, Any]:
        status, body = http_json("GET", f"{self.url}/{key}/_sandbox/state")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def expire_tokens(self, key: str) -> None:
        status, body = http_json("POST", f"{self.url}/{key}/_sandbox/expire-tokens")
        assert status == 200, body


@dataclass
class System:
    """A running Cancelflow: API and workers as subprocesses, sandboxes, one Redis DB."""

    api_url: str
    token: str
    sandbox: Sandbox
    redis_url: str
    procs: ProcessGroup
    env: dict[str, str] = field(default_factory=dict)
    # ``redis`` or ``amqp``, and the broker's URL (the job store's when it is Redis).
    broker: str = "redis"
    broker_url: str = ""

    def settings(self) -> Settings:
        """Settings naming this system's job store and broker (for a Celery app of the test's)."""
        return Settings(
            redis_url=self.redis_url,
            broker_url=self.env.get("CANCELFLOW_BROKER_URL"),
            broker_management_url=self.env.get("CANCELFLOW_BROKER_MANAGEMENT_URL"),
        )

    def publish(self, queue: str, body: bytes, **options: Any) -> None:
        """Publish ``body`` as it is on ``queue`` of this system's broker (a poison message)."""
        app = create_celery(self.settings())
        declared = next(q for q in app.conf.task_queues if q.name == queue)
        try:
            with app.producer_or_acquire() as producer:
                producer.publish(
                    body,
                    exchange=declared.exchange,
                    routing_key=queue,
                    declare=[declared],
                    **options,
                )
        finally:
            app.close()

    def parked(self) -> int:
        """Messages on the broker's dead_letters queue (a passive declare, on either broker)."""
        app = create_celery(self.settings())
        try:
            with app.connection_for_read() as conn:
                try:
                    found = conn.default_channel.queue_declare(DEAD_LETTER_QUEUE, passive=True)
                except ChannelError:  # no such queue (on Redis: no list yet): nothing parked
                    return 0
                return int(found.message_count)
        finally:
            app.close()

    def amqp_queue(self, name: str) -> dict[str, Any]:
        """A RabbitMQ queue as its management API shows it (counts sampled every 5 s)."""
        url = urlsplit(self.env["CANCELFLOW_BROKER_MANAGEMENT_URL"])
        vhost = urlsplit(self.broker_url).path.lstrip("/")
        management = Management(
            url._replace(netloc=url.netloc.rpartition("@")[2]).geturl(),
            unquote(url.username or ""),
            unquote(url.password or ""),
        )
        return management.call("GET", f"queues/{vhost}/{quote(name, safe='')}")  # type: ignore[no-any-return]

    def env_providers(self) -> set[str]:
        """Keys of the providers this system is configured with."""
        return {
            k.split("__")[1].lower()
            for k in self.env
            if k.startswith("CANCELFLOW_PROVIDERS__") and k.endswith("__BASE_URL")
        }

    def sandbox_post(self, path: str, body: Any = None) -> tuple[int, Any]:
        return http_json("POST", f"{self.sandbox.url}{path}", body)

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return http_json("POST", f"{self.api_url}{path}", body, token=self.token, **kw)

    def get(self, path: str) -> tuple[int, Any]:
        return http_json("GET", f"{self.api_url}{path}", token=self.token)

    def job(self, job_id: str) -> dict[str, Any]:
        status, job = self.get(f"/v1/cancellations/{job_id}")
        assert status == 200, job
        return job  # type: ignore[no-any-return]

    def enqueue(self, body: dict[str, Any]) -> dict[str, Any]:
        status, job = self.post("/v1/cancellations", body)
        assert status == 202, job
        return job  # type: ignore[no-any-return]

    def wait(
        self, job_id: str, *, timeout_s: float = 30, until: set[str] | None = None
    ) -> dict[str, Any]:
        """Poll the job until it reaches a final status (or one of ``until``)."""
        wanted = until or {s.value for s in FINAL_STATUSES}
        deadline = time.monotonic() + timeout_s
        job: Any = None
        while time.monotonic() < deadline:
            status, job = self.get(f"/v1/cancellations/{job_id}")
            assert status == 200, job
            if job["status"] in wanted and (until or not _callback_pending(job)):
                return job  # type: ignore[no-any-return]
            time.sleep(0.05)
        raise AssertionError(
            f"job {job_id} still {job and job['status']} after {timeout_s}s:\n"
            f"{json.dumps(job, indent=1)}\n"
            f"--- worker log lines of this job ---\n{self.log_lines(job_id)}"
        )

    def log_lines(self, needle: str) -> str:
        """Every line of every process log of this system that mentions ``needle``."""
        out = []
        for path in sorted(self.procs.log_dir.glob("*.log")):
            out += [
                f"{path.stem}: {line}"
                for line in path.read_text(errors="replace").splitlines()
                if needle in line
            ]
        return "\n".join(out[-80:])


def _callback_pending(job: dict[str, Any]) -> bool:
    # A finished job's result callback is recorded shortly after; wait for it too.
    return not job.get("callbacks")


def payway_body(ref: PaywayRef, **extra: Any) -> dict[str, Any]:
    """A cancellation request for one of the Payway sandbox's demo subscriptions."""
    return {
        "provider": "payway",
        "subscription": {
            "account_id": ref.account_id,
            "user_product_id": ref.user_product_id,
            "cancellation_reason_id": DEMO.reason_id,
        },
        **extra,
    }


def default_sigint() -> None:
    """A ``preexec_fn`` for a process a test sends Ctrl-C (SIGINT): it starts with SIGINT at
    its default, as a terminal's foreground job does. A suite started in the background
    (``cmd &`` from a script, nohup) inherits SIGINT ignored, and a process that starts with it
    ignored (Python's KeyboardInterrupt, bash's trap) never sees the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
