"""A broker on another Redis than the job store: an unreadable list item's dead-letter entry is
in the job store (CANCELFLOW_REDIS_URL), where the API and `cancelflow dlq` read it, and the
item is parked on the broker's own ``dead_letters`` list; the worker keeps working."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from cancelflow.contract import DEAD_LETTER_QUEUE, provider_queue
from producers.local import free_port, redis_answers, wait_until
from sandboxes.payway import DEMO
from tests.fixtures.system import StartSystem

pytestmark = [pytest.mark.integration, pytest.mark.redis_broker]


@pytest.fixture
def other_redis() -> Iterator[str]:
    """A redis-server of this test's own (no data but what the test writes): the broker."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make test installs Debian's package)")
    home = Path(tempfile.mkdtemp(prefix="cancelflow-broker-redis-"))
    port = free_port()
    log = (home / "redis.log").open("ab")
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(home)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: redis_answers(url), timeout_s=20, what="the broker's redis-server")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def test_an_unreadable_item_on_another_redis_broker_is_dead_lettered_in_the_job_store(
    start_system: StartSystem, other_redis: str
) -> None:
    system = start_system(isolated=True, CANCELFLOW_BROKER_URL=other_redis)
    assert system.broker_url == other_redis != system.redis_url
    store = redis.Redis.from_url(system.redis_url)
    broker = redis.Redis.from_url(other_redis)
    queue = provider_queue("payway")
    before = cast(int, store.zcard("cf:dl:index"))

    broker.lpush(queue, b"garbage{")

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and cast(int, store.zcard("cf:dl:index")) == before:
        time.sleep(0.2)
    status, listing = system.get("/v1/dead-letters?kind=poison&limit=10")
    assert status == 200, listing
    [entry] = listing["items"]
    assert (entry["error_type"], entry["queue"]) == ("UnreadableEnvelope", queue)
    assert entry["payload"]["body"] == "garbage{"
    # Nothing of the job store's on the broker's Redis; the item parked there, byte for byte.
    assert not [k for k in cast(list[bytes], broker.keys("cf:*")) if k.startswith(b"cf:dl")]
    assert broker.lrange(DEAD_LETTER_QUEUE, 0, -1) == [b"garbage{"]

    # The worker kept consuming.
    system.sandbox.reset("payway")
    job = system.wait(
        system.enqueue(
            {
                "provider": "payway",
                "subscription": {
                    "account_id": DEMO.immediate.account_id,
                    "user_product_id": DEMO.immediate.user_product_id,
                    "cancellation_reason_id": DEMO.reason_id,
                },
            }
        )["id"]
    )
    assert job["outcome"]["type"] == "cancelled"
