"""RabbitMQ's delivery limit, at the default (20): a step's message delivered that many times
without an acknowledgement (a worker killed by it, each time) is not run once more nor
requeued forever. Its job is dead-lettered in the store (replayable), and the message is
parked byte for byte on ``dead_letters`` through the queue's dead-letter exchange."""

from __future__ import annotations

import time

import pytest
from kombu.connection import Connection

from cancelflow.contract import DEAD_LETTER_QUEUE, provider_queue
from cancelflow.settings import Settings
from messaging.config import create_celery
from tests.fixtures.system import StartSystem
from tests.integration.test_crash_safety import payway_jobs, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.amqp_broker]

LIMIT = Settings.model_fields["broker_delivery_limit"].default


def test_a_message_past_the_delivery_limit_is_parked_and_its_job_dead_lettered(
    start_system: StartSystem,
) -> None:
    # No worker yet: the job's first message waits on its queue.
    system = start_system(isolated=True, workers=0)
    assert "CANCELFLOW_BROKER_DELIVERY_LIMIT" not in system.env
    system.sandbox.reset("payway")
    [job_id] = payway_jobs(system, 1, "immediate")
    queue = next(
        q for q in create_celery(system.settings()).conf.task_queues
        if q.name == provider_queue("payway")
    )  # fmt: skip
    parked_before = system.parked()

    # Delivered LIMIT times and never acknowledged: each consumer's connection closes with
    # the message in hand, as a SIGKILLed worker's does, and RabbitMQ counts it.
    for n in range(LIMIT):
        with Connection(system.broker_url) as conn:
            message = None
            deadline = time.monotonic() + 30
            while message is None and time.monotonic() < deadline:
                message = queue(conn.channel()).get(no_ack=False)
                if message is None:
                    time.sleep(0.1)
            assert message is not None, f"delivery {n}: the message is not on {queue.name}"
            assert (message.headers or {}).get("x-delivery-count", 0) == n
            assert message.headers["job_id"] == job_id
            body = message.body

    start_worker(system, "worker")
    job = system.wait(job_id, timeout_s=60)
    assert job["status"] == "dead_lettered", job["status"]
    # The step never ran again: no eligibility check reached the provider.
    assert not [e for e in job["timeline"] if e["event"] == "started"], job["timeline"]

    status, listing = system.get("/v1/dead-letters?kind=job&limit=10")
    assert status == 200, listing
    [entry] = [d for d in listing["items"] if d["job_id"] == job_id]
    assert (entry["error_type"], entry["step"]) == ("DeliveryLimitExceeded", "eligibility")

    deadline = time.monotonic() + 30
    while system.parked() == parked_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert system.parked() == parked_before + 1
    with Connection(system.broker_url) as conn:
        assert queue(conn.channel()).get(no_ack=False) is None  # not requeued
        # The parked copy is the message itself (this system's vhost: ours to take it).
        dead_letters = next(
            q for q in create_celery(system.settings()).conf.task_queues
            if q.name == DEAD_LETTER_QUEUE
        )  # fmt: skip
        found = dead_letters(conn.channel()).get(no_ack=True)
        assert found is not None and found.body == body
        assert found.headers["job_id"] == job_id

    # A replay resumes the job at its step, with a message of its own: it finishes.
    assert system.post(f"/v1/dead-letters/{entry['id']}/replay")[0] == 202
    assert system.wait(job_id, timeout_s=60)["outcome"]["type"] == "cancelled"
