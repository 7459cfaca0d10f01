"""Builds the objects a process needs from Settings, once, at start-up."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cancelflow.dead_letters import DeadLetterStore
from cancelflow.guard import GuardLimits, ProviderGuard
from cancelflow.http import CallObserver, ProviderHttp
from cancelflow.providers import REGISTRY
from cancelflow.providers.base import Provider
from cancelflow.settings import Settings
from cancelflow.steps import Deps
from cancelflow.store import JobObserver, JobStore


def redis_client(settings: Settings) -> Redis:
    """The async Redis client: a dropped connection (a Redis restart, a failover) is retried
    with backoff on a fresh connection instead of failing the step."""
    client: Redis = Redis.from_url(
        settings.redis_url,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), 6),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return client


def build_providers(
    settings: Settings,
    session: aiohttp.ClientSession,
    *,
    redis: Redis | None = None,
    observer: CallObserver | None = None,
    may_send: Callable[[], bool] | None = None,
) -> dict[str, Provider]:
    """One adapter per configured provider, all on the process's shared HTTP session, each
    behind its guard in Redis (when a Redis is given)."""
    providers: dict[str, Provider] = {}
    for key, conf in settings.enabled_providers().items():
        guard = None
        if redis is not None:
            guard = ProviderGuard(
                redis,
                key,
                GuardLimits(
                    calls_per_second=conf.calls_per_second,
                    max_in_flight=conf.max_in_flight,
                    breaker_failures=conf.breaker_failures,
                    breaker_cooldown_s=conf.breaker_cooldown_s,
                    lease_s=settings.limits().task_time_limit_s,
                ),
            )
        http = ProviderHttp(
            session,
            provider=key,
            base_url=str(conf.base_url),
            timeout_s=conf.timeout_s,
            observer=observer,
            guard=guard,
            may_send=may_send,
        )
        providers[key] = REGISTRY[key].build(conf, http)
    return providers


def build_deps(
    settings: Settings,
    *,
    redis: Redis,
    session: aiohttp.ClientSession | None = None,
    observer: CallObserver | None = None,
    job_observer: JobObserver | None = None,
    holder: str = "",
    may_send: Callable[[], bool] | None = None,
) -> Deps:
    """What the steps need. ``observer`` is told of every provider call, ``job_observer`` of
    jobs that end and callback attempts (both: metrics). ``holder``: the worker process the
    job store takes steps and leases for (``worker.leases``)."""
    return Deps(
        settings=settings,
        store=JobStore(
            redis,
            retention_s=settings.job_retention_s,
            idempotency_ttl_s=settings.idempotency_ttl_s,
            observer=job_observer,
            holder=holder,
            alive_s=settings.worker.lease_s,
        ),
        dead_letters=DeadLetterStore(redis),
        providers=(
            build_providers(settings, session, redis=redis, observer=observer, may_send=may_send)
            if session
            else {}
        ),
        session=session,
    )
