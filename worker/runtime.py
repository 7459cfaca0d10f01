"""Per-process runtime: one asyncio loop in a thread, one aiohttp session, one Redis pool.

The worker's pool (``worker.pool``) runs each step's coroutine on this loop; code in other
threads (maintenance tasks, a task run by another pool) hands its coroutine over with ``run``
and waits. Provider I/O of all tasks of a process runs concurrently on one event loop and one
connection pool, instead of one blocking call per thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import aiohttp

from cancelflow import callbacks, hooks, metrics, tracing
from cancelflow.logging import configure_logging, get_logger
from cancelflow.settings import Settings
from cancelflow.wiring import Deps, build_deps, redis_client
from worker import leases
from worker.leases import WORKER_ID

T = TypeVar("T")
log = get_logger(__name__)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="cancelflow-io", daemon=True
        )
        self._thread.start()
        self.deps: Deps = self.run(self._start())

    async def _start(self) -> Deps:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=200, ttl_dns_cache=300),
        )
        self.redis = redis_client(self.settings)
        deps = build_deps(
            self.settings,
            redis=self.redis,
            session=self.session,
            observer=metrics.observe_provider_call,
            job_observer=metrics.JOB_METRICS,
            holder=WORKER_ID,
            may_send=leases.fresh,
        )
        self.callback_session = callbacks.open_session(self.settings.callbacks)
        deps.callback_session = self.callback_session
        deps.hooks = hooks.load(self.settings.callbacks.hook_modules)
        return deps

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the runtime's loop and wait for its result in this thread."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        async def _close() -> None:
            await self.session.close()
            await self.callback_session.close()
            await self.redis.aclose()

        try:
            self.run(_close(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime(settings: Settings) -> Runtime:
    """The process's runtime, built on first use (after a fork, in the child)."""
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                configure_logging(fmt=settings.log_format, level=settings.log_level)
                tracing.configure(settings, service="cancelflow-worker")
                _runtime = Runtime(settings)
    return _runtime


def shutdown_runtime() -> None:
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.close()
            _runtime = None
        tracing.flush()
