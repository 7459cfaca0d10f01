"""Builds the objects a process needs from Settings, once, at start-up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from cancelflow import hooks
from cancelflow.dead_letters import DeadLetterStore
from cancelflow.guard import GuardLimits, ProviderGuard
from cancelflow.http import CallObserver, ProviderHttp
from cancelflow.logging import get_logger
from cancelflow.providers import REGISTRY
from cancelflow.providers.base import Provider
from cancelflow.redis_clients import async_client
from cancelflow.redis_packing import use_hiredis_packing
from cancelflow.settings import REDIS_HEALTH_CHECK_INTERVAL_S, Settings
from cancelflow.store import JobObserver, JobStore

log = get_logger(__name__)


@dataclass
class Deps:
    """What the steps need, built once per process (worker or API) by ``build_deps``."""

    settings: Settings
    store: JobStore
    dead_letters: DeadLetterStore
    providers: dict[str, Provider]
    session: aiohttp.ClientSession | None = None
    # Callbacks have their own session: its resolver refuses internal addresses.
    callback_session: aiohttp.ClientSession | None = None
    # In-process result hooks by provider ("*": every provider), see cancelflow.hooks.
    hooks: dict[str, list[hooks.Hook]] = field(default_factory=dict)
    # Jobs whose confirm this process is running now (see ``chain.confirm``).
    confirming: set[str] = field(default_factory=set)


Persistence = Literal["none", "rdb", "aof", "rdb+aof", "unknown"]
# What a restart of a Redis that keeps nothing on disk loses: everything Cancelflow holds.
LOST_ON_RESTART = "every job record, queued message and idempotency key"


def redis_client(settings: Settings) -> Redis:
    """The async Redis client: a dropped connection (a Redis restart, a failover) is retried
    with backoff on a fresh connection instead of failing the step. Connects and replies are
    bounded by ``redis_connect_timeout_s`` and ``redis_read_timeout_s``: a peer that accepts
    and never answers raises ``redis.TimeoutError`` within one timeout, instead of waiting
    forever. A timeout is not retried: the wait is already spent (seven tries would make one
    call wait seven timeouts), and a write that timed out may have been applied."""
    client: Redis = async_client(
        settings.redis_url,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        socket_timeout=settings.redis_read_timeout_s,
        socket_keepalive=True,
        health_check_interval=REDIS_HEALTH_CHECK_INTERVAL_S,
        # Retry's default errors include TimeoutError: named here so they do not.
        retry=Retry(
            ExponentialBackoff(cap=2.0, base=0.05), 6, supported_errors=(RedisConnectionError,)
        ),
        retry_on_error=[RedisConnectionError],
    )
    # Its commands packed in C, as the sync client's are (a job's creation: some forty
    # arguments and a script).
    return use_hiredis_packing(client)


async def redis_persistence(redis: Redis) -> Persistence:
    """How Redis keeps its data on disk, from ``CONFIG GET``: ``none`` (no RDB snapshots, no
    AOF), ``rdb``, ``aof`` or ``rdb+aof``. Where CONFIG is refused (Cancelflow's own ACL users,
    deploy/redis/acl.yaml: CONFIG GET shows configuration secrets; managed Redis services
    rename it), from ``INFO persistence``: ``aof`` when AOF is on (RDB snapshots are not
    visible there), else ``unknown``; ``unknown`` too when Redis does not answer. Never raises."""
    try:
        save = _config_value(await redis.config_get("save"), "save")
        appendonly = _config_value(await redis.config_get("appendonly"), "appendonly")
    except (RedisError, OSError):
        return await _persistence_from_info(redis)
    if save is None or appendonly is None:
        return "unknown"
    rdb, aof = bool(save.strip()), appendonly.strip().lower() == "yes"
    if rdb and aof:
        return "rdb+aof"
    return "rdb" if rdb else "aof" if aof else "none"


async def _persistence_from_info(redis: Redis) -> Persistence:
    try:
        info = await redis.info("persistence")
    except (RedisError, OSError):
        return "unknown"
    return "aof" if str(info.get("aof_enabled")) == "1" else "unknown"


def _config_value(reply: object, key: str) -> str | None:
    if not isinstance(reply, dict):
        return None
    for name, value in reply.items():
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name.lower() == key:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


async def report_persistence(redis: Redis, settings: Settings, *, process: str) -> Persistence:
    """Log, once at start-up, a warning if Redis keeps nothing on disk (saying what a restart
    would lose), or that its persistence is unknown; bounded by the Redis timeouts."""
    try:
        async with asyncio.timeout(
            settings.redis_connect_timeout_s + settings.redis_read_timeout_s
        ):
            found = await redis_persistence(redis)
    except TimeoutError:
        found = "unknown"
    if found == "none":
        log.warning(
            "redis.persistence.none",
            process=process,
            detail="Redis keeps nothing on disk (no RDB snapshots, no AOF): "
            f"a Redis restart loses {LOST_ON_RESTART}",
        )
    elif found == "unknown":
        log.info("redis.persistence.unknown", process=process)
    else:
        log.info("redis.persistence", process=process, persistence=found)
    return found


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
