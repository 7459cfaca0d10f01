"""The shipped Redis ACL (deploy/redis/acl.yaml) run for real: a redis-server of this test's own
with those users, the API, a worker, beat and the billing consumer each logged in as its own
user; a job goes end to end, billing events come in by the stream and by HTTP, beat's tasks
run, and Redis refused nothing any of them asked (its ACL LOG holds only the persistence
report's CONFIG GET, refused by design). Then each user is
refused what it must never do: FLUSHALL, FLUSHDB, CONFIG SET, KEYS, DEBUG, SHUTDOWN, and keys
and channels outside its patterns."""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import pytest
import redis

from producers.billing import EVENT_FIELD
from producers.local import ProcessGroup, cancelflow_command, http_json, http_ok, wait_until
from tests.deploy.test_lockdown import start_redis
from tests.fixtures.system import API_TOKEN, system_env, wait_for_workers
from tests.producers.conftest import BILLING_SECRET, RULES
from tests.producers.test_api import signed
from tests.redis_acl import acl_file, redis_users
from tests.support import Sandbox

pytestmark = pytest.mark.integration

ADMIN = "test-admin"  # this test's own, to seed the stream and read the ACL log: not shipped


@dataclass
class AclSystem:
    port: int
    passwords: dict[str, str]
    api_url: str
    procs: ProcessGroup
    sandbox: Sandbox

    def url(self, user: str) -> str:
        return f"redis://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/0"

    def client(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user))

    def job(self, job_id: str) -> dict[str, Any]:
        status, job = http_json("GET", f"{self.api_url}/v1/cancellations/{job_id}", token=API_TOKEN)
        assert status == 200, job
        return job  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def acl_system(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclSystem]:
    tmp = tmp_path_factory.mktemp("redis-acl")
    passwords = {name: secrets.token_hex(16) for name in redis_users()}
    passwords[ADMIN] = secrets.token_hex(16)
    acl = tmp / "users.acl"
    shipped = acl_file({k: v for k, v in passwords.items() if k != ADMIN})
    acl.write_text(shipped + f"user {ADMIN} on >{passwords[ADMIN]} ~* &* +@all\n")
    rules = tmp / "rules.yaml"
    rules.write_text(RULES)
    for port in start_redis(["redis-server", "--aclfile", str(acl), "--appendonly", "no"], tmp):
        env = system_env(
            "redis://unused",  # each process gets its own user's URL below
            sandbox,
            CANCELFLOW_BILLING__RULES_PATH=str(rules),
            CANCELFLOW_BILLING__SECRET=BILLING_SECRET,
            CANCELFLOW_BILLING__BLOCK_S="0.5",
        )
        system = AclSystem(
            port, passwords, "", ProcessGroup(env=env, log_dir=tmp / "logs"), sandbox
        )
        api_port = _free_port()
        worker = f"acl-worker-{api_port}@{socket.gethostname()}"
        commands = {
            "api": cancelflow_command("api", "--port", str(api_port)),
            "worker": cancelflow_command("worker", "-c", "4", "-n", worker),
            "beat": cancelflow_command("beat", f"--schedule={tmp}/beat-schedule"),
            "billing-consumer": cancelflow_command("billing-consumer"),
        }
        try:
            for user, argv in commands.items():
                system.procs.start(user, argv, extra_env={"CANCELFLOW_REDIS_URL": system.url(user)})
            system.api_url = f"http://127.0.0.1:{api_port}"
            wait_until(partial(http_ok, f"{system.api_url}/readyz"), timeout_s=30, what="api")
            wait_for_workers(system.url(ADMIN), [worker])
            yield system
        finally:
            system.procs.stop_all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_finished(system: AclSystem, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        job = system.job(job_id)
        if job["status"] == "finished":
            return job
        assert job["status"] != "dead_lettered", job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def payway_subscription(sandbox: Sandbox) -> dict[str, str]:
    status, created = http_json(
        "POST", f"{sandbox.url}/payway/_sandbox/subscriptions", {"count": 1, "kind": "immediate"}
    )
    assert status == 200, created
    return {**created["references"][0], "cancellation_reason_id": "5cb80481c00000000000000a"}


def billing_event(sandbox: Sandbox) -> dict[str, Any]:
    sub = payway_subscription(sandbox)
    return {
        "id": f"evt_{secrets.token_hex(8)}",
        "type": "payment.final_failure",
        "data": {"provider": "payway", **{k: sub[k] for k in ("account_id", "user_product_id")}},
    }


def billing_job(system: AclSystem, event_id: str) -> str:
    """The job a billing event made, found through the API's listing."""
    deadline = time.monotonic() + 60
    while True:
        status, page = http_json(
            "GET", f"{system.api_url}/v1/cancellations?provider=payway&limit=100", token=API_TOKEN
        )
        assert status == 200, page
        for job in page["items"]:
            if event_id in json.dumps(job):
                return str(job["id"])
        assert time.monotonic() < deadline, f"no job for {event_id}"
        time.sleep(0.2)


def test_every_role_runs_as_its_own_user_and_redis_refuses_none_of_them(
    acl_system: AclSystem,
) -> None:
    system, admin = acl_system, acl_system.client(ADMIN)
    # A job, end to end: API (api) -> worker (worker) -> the provider -> finished.
    status, job = http_json(
        "POST",
        f"{system.api_url}/v1/cancellations",
        {"provider": "payway", "subscription": payway_subscription(system.sandbox)},
        token=API_TOKEN,
    )
    assert status == 202, job
    assert wait_finished(system, job["id"])["outcome"]["type"] == "cancelled"
    # A billing event on the stream (billing-consumer) and one over HTTP (api).
    streamed = billing_event(system.sandbox)
    admin.xadd("cf:billing:events", {EVENT_FIELD: json.dumps(streamed)})
    posted = json.dumps(billing_event(system.sandbox)).encode()
    status, result = http_json(
        "POST",
        f"{system.api_url}/v1/billing-events",
        raw=posted,
        headers=signed(posted),
    )
    assert status == 202, result
    for event_id in (streamed["id"], json.loads(posted)["id"]):
        assert wait_finished(system, billing_job(system, event_id))["status"] == "finished"
    # Beat (beat) sends its periodic tasks to `maintenance`; a worker takes them.
    wait_until(
        lambda: "cancelflow.resume_stalled" in system.procs.log_tail("beat", 200),
        timeout_s=60,
        what="beat's first maintenance task",
    )
    wait_until(lambda: admin.llen("maintenance") == 0, timeout_s=30, what="maintenance drained")
    # The API's reads (metrics, providers, stats, dead letters, readiness) as the api user.
    for path in ("/metrics", "/v1/providers", "/v1/stats", "/v1/dead-letters", "/readyz"):
        status, _ = http_json("GET", f"{system.api_url}{path}", token=API_TOKEN)
        assert status == 200, path
    status, ready = http_json("GET", f"{system.api_url}/readyz")
    assert ready["persistence"] == "unknown"  # from INFO: no AOF here (CONFIG GET is refused)

    # The persistence report asks CONFIG GET first, refused by design (it falls back to INFO):
    # the one refusal expected.
    refused = [
        entry
        for entry in cast("list[dict[str, Any]]", admin.acl_log(count=100))
        if not (entry["object"] == "config|get" and entry["username"] in ("api", "worker"))
    ]
    assert refused == [], json.dumps(refused, default=str, indent=1)
    for name in ("api", "worker", "beat", "billing-consumer"):
        assert "NOPERM" not in system.procs.log_tail(name, 2000), name


# What no user may do, whatever its role.
DANGEROUS = [
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "SET", "appendonly", "no"),
    ("CONFIG", "GET", "*"),
    ("KEYS", "*"),
    ("MONITOR",),
    ("ACL", "LIST"),
    ("CLIENT", "KILL", "TYPE", "normal"),
    ("SWAPDB", "0", "1"),
]

# Asked of the ACL only (ACL DRYRUN): DEBUG is refused by Redis before the ACL is consulted
# (enable-debug-command), and a SHUTDOWN let through would end the test's server.
DRY_RUN = [("DEBUG", "SLEEP", "0"), ("SHUTDOWN", "NOSAVE"), ("DEBUG", "SET-ACTIVE-EXPIRE", "0")]

# user -> (commands it may run, commands it must be refused: keys outside its patterns,
# writes to keys it may only read, commands of another role)
ALLOWED_AND_NOT: dict[str, tuple[list[tuple[str, ...]], list[tuple[str, ...]]]] = {
    "api": (
        [
            ("SET", "cf:acl-test", "1"),
            ("LLEN", "maintenance"),
            ("LPUSH", "callbacks-acl-test", "m"),
        ],
        [
            ("SET", "elsewhere", "1"),
            ("LPUSH", "maintenance-acl-test", "m"),
            ("XADD", "cf:billing:events", "*", "event", "{}"),
            ("BRPOP", "cancellations.payway", "0.01"),
            ("HSET", "unacked:w", "t", "m"),
            ("PUBLISH", "/0.celery.pidbox", "m"),
        ],
    ),
    "worker": (
        [("SET", "cf:acl-test", "1"), ("HSET", "unacked:w", "t", "m"), ("LLEN", "maintenance")],
        [
            ("SET", "elsewhere", "1"),
            ("XADD", "cf:billing:events", "*", "event", "{}"),
            ("PUBLISH", "elsewhere", "m"),
        ],
    ),
    "beat": (
        [("LPUSH", "maintenance-acl-test", "m"), ("PUBLISH", "/0.celeryev/task.sent", "m")],
        [
            ("GET", "cf:job:x"),
            ("LPUSH", "cancellations.acl-test", "m"),
            ("BRPOP", "maintenance-acl-test", "0.01"),
            ("PUBLISH", "/0.celery.pidbox", "m"),
        ],
    ),
    "billing-consumer": (
        [("XLEN", "cf:billing:events"), ("LPUSH", "cancellations.acl-test", "m")],
        [
            ("SET", "elsewhere", "1"),
            ("LPUSH", "callbacks-acl-test", "m"),
            ("HSET", "unacked:w", "t", "m"),
        ],
    ),
    "flower": (
        [("LLEN", "cancellations.payway"), ("PUBLISH", "/0.celery.pidbox", "m")],
        [
            ("LPUSH", "cancellations.acl-test", "m"),
            ("LPOP", "callbacks"),
            ("GET", "cf:job:x"),
            ("DEL", "dead_letters"),
        ],
    ),
    "keda": (
        [("LLEN", "cancellations.payway"), ("LLEN", "callbacks")],
        [("LPOP", "callbacks"), ("SET", "x", "1"), ("LLEN", "cf:job:1"), ("PUBLISH", "c", "m")],
    ),
}


@pytest.mark.parametrize("user", sorted(ALLOWED_AND_NOT))
def test_each_user_is_refused_what_its_role_never_does(acl_system: AclSystem, user: str) -> None:
    assert set(ALLOWED_AND_NOT) == set(redis_users()), "every shipped user is checked"
    client = acl_system.client(user)
    allowed, refused = ALLOWED_AND_NOT[user]
    for command in allowed:
        client.execute_command(*command)
    for command in [*refused, *DANGEROUS]:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    admin = acl_system.client(ADMIN)
    for command in DRY_RUN:
        verdict = admin.execute_command("ACL", "DRYRUN", user, *command)
        assert verdict != b"OK" and b"no permissions" in verdict, (command, verdict)
    # And nothing without a password: the default user is off.
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=acl_system.port).ping()
    # Cleaning up after the allowed writes, as the admin: none reached another role's data.
    acl_system.client(ADMIN).delete(
        "cf:acl-test",
        "unacked:w",
        "callbacks-acl-test",
        "maintenance-acl-test",
        "cancellations.acl-test",
    )
