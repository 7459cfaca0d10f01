"""Fixtures: a Redis DB of this session's own, the sandboxes, and a running system."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import fakeredis
import pytest
import redis

from cancelflow.messaging import create_celery
from cancelflow.settings import Settings
from producers.local import (
    NoFreeDb,
    ProcessGroup,
    cancelflow_command,
    free_port,
    http_ok,
    redis_answers,
    wait_until,
    with_db,
)
from producers.local import locked_db as shared_locked_db
from sandboxes.env import provider_env
from tests.support import Sandbox, System

BASE_REDIS_URL = os.environ.get("CANCELFLOW_REDIS_URL", "redis://127.0.0.1:6379")
API_TOKEN = "test-token"
READ_TOKEN = "read-token"


@contextmanager
def locked_db() -> Iterator[str]:
    """A Redis DB no other test session (or bench run) uses at the same time: developers run
    suites in parallel on one server."""
    if not redis_answers(with_db(BASE_REDIS_URL, 0)):
        pytest.fail(
            f"no Redis answers at {BASE_REDIS_URL}: "
            "run the tests with `make test`, which starts one"
        )
    try:
        with shared_locked_db(BASE_REDIS_URL, owner="tests") as url:
            yield url
    except NoFreeDb as exc:
        pytest.fail(str(exc))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run a coroutine test in a fresh event loop; leave sync tests to pytest."""
    function = pyfuncitem.obj
    if not inspect.iscoroutinefunction(function):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    asyncio.run(function(**{name: pyfuncitem.funcargs[name] for name in names}))
    return True


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with locked_db() as url:
        yield url


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeAsyncRedis]:
    """An in-memory async Redis (with Lua) for fast unit tests."""
    server = fakeredis.FakeServer()
    yield fakeredis.FakeAsyncRedis(server=server)


@pytest.fixture(scope="session")
def log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="cancelflow-tests-"))


@pytest.fixture(scope="session")
def sandbox(log_dir: Path) -> Iterator[Sandbox]:
    """Every provider sandbox, served by ``cancelflow sandbox`` in a subprocess."""
    port = free_port()
    procs = ProcessGroup(env={}, log_dir=log_dir)
    procs.start("sandbox", cancelflow_command("sandbox", "--port", str(port)))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/healthz"), timeout_s=20, what="sandbox")
        yield Sandbox(url)
    finally:
        procs.stop_all()


def system_env(redis_url: str, sandbox: Sandbox, **extra: str) -> dict[str, str]:
    return {
        "CANCELFLOW_REDIS_URL": redis_url,
        "CANCELFLOW_API_TOKENS": f"{API_TOKEN},{READ_TOKEN}:read",
        "CANCELFLOW_LOG_FORMAT": "json",
        "CANCELFLOW_CALLBACKS__ALLOW_HTTP": "true",
        "CANCELFLOW_CALLBACKS__ALLOWED_HOSTS": "127.0.0.1,localhost",
        # No worker metrics endpoint unless a test asks for one on a free port: many workers
        # (and other developers' test runs) share this host.
        "CANCELFLOW_WORKER__METRICS_PORT": "0",
        **{k: v for k, v in provider_env(sandbox.url).items()},
        # Fast retries keep the suite quick; the policy itself is unit-tested.
        **{
            f"CANCELFLOW_PROVIDERS__{k}__RETRY_BASE_S": "0.2"
            for k in ("PAYWAY", "AZOTTE", "APPDIRECT", "AXELSPRINGER")
        },
        **extra,
    }


def wait_for_workers(redis_url: str, hostnames: list[str], timeout_s: float = 60) -> None:
    """Until every worker answers a control ping (its queues are declared and consumed)."""
    if not hostnames:
        return  # an API alone (a ping to no destination would ask every worker)
    app = create_celery(Settings(redis_url=redis_url))

    def all_answer() -> bool:
        try:
            return len(app.control.ping(destination=hostnames, timeout=0.5)) == len(hostnames)
        except (redis.RedisError, OSError):
            return False  # the broker is (re)starting

    try:
        wait_until(all_answer, timeout_s=timeout_s, what=f"workers {hostnames}", interval_s=0.2)
    finally:
        app.close()


StartSystem = Callable[..., System]


@pytest.fixture(scope="session")
def start_system(redis_url: str, sandbox: Sandbox, log_dir: Path) -> Iterator[StartSystem]:
    """Start an API and a worker with the given extra settings; all stopped at session end."""
    groups: list[ProcessGroup] = []
    dbs = ExitStack()

    def start(
        *,
        workers: int = 1,
        concurrency: int = 16,
        worker_args: tuple[str, ...] = (),
        db_url: str | None = None,
        isolated: bool = False,
        beat: bool = False,
        **extra: str,
    ) -> System:
        """``isolated``: on a Redis DB of its own, so no other system's worker takes its jobs."""
        if isolated:
            db_url = dbs.enter_context(locked_db())
        env = system_env(db_url or redis_url, sandbox, **extra)
        procs = ProcessGroup(env=env, log_dir=log_dir / f"system-{len(groups)}")
        groups.append(procs)
        port = free_port()
        procs.start("api", cancelflow_command("api", "--port", str(port)))
        hostnames = []
        for n in range(workers):
            name = "worker" if n == 0 else f"worker{n}"
            hostnames.append(f"{name}-{port}@{socket.gethostname()}")
            procs.start(
                name,
                cancelflow_command(
                    "worker", "-c", str(concurrency), "-n", hostnames[-1], *worker_args
                ),
            )
        if beat:
            procs.start(
                "beat", cancelflow_command("beat", f"--schedule={procs.log_dir}/beat-schedule")
            )
        api_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{api_url}/readyz"), timeout_s=30, what="api")
        wait_for_workers(db_url or redis_url, hostnames)
        return System(
            api_url=api_url,
            token=API_TOKEN,
            sandbox=sandbox,
            redis_url=db_url or redis_url,
            procs=procs,
            env=env,
        )

    try:
        yield start
    finally:
        for g in groups:
            g.stop_all()
        dbs.close()


@pytest.fixture(scope="session")
def system(start_system: StartSystem) -> System:
    """The default running system, shared by the integration tests."""
    return start_system(worker_args=("--beat",))
