"""Two replays of one dead letter at once deliver once, for every kind (issue 14, point 9).

The same contract runs on fakeredis and on the real Redis of the session (``make test``)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast

import fakeredis
import pytest
from redis.asyncio import Redis

from cancelflow import chain, delivery, lifecycle, wiring
from cancelflow.contract import CancellationRequest, Status, Step
from cancelflow.dead_letters import AlreadyReplayed
from cancelflow.settings import Settings
from cancelflow.wiring import build_deps

SETTINGS = Settings(
    providers={
        "payway": {"base_url": "http://127.0.0.1:9/payway", "client_id": "c", "client_secret": "s"}
    }
)

Backend = Callable[[], AbstractAsyncContextManager[Redis]]


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest) -> Backend:
    """A Redis client factory: in memory, or the session's real Redis DB."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    @asynccontextmanager
    async def open_redis() -> AsyncIterator[Redis]:
        client: Redis = Redis.from_url(url) if url else fakeredis.FakeAsyncRedis()
        try:
            yield client
        finally:
            await client.aclose()

    return open_redis


async def dead_lettered_job(deps: wiring.Deps) -> str:
    req = CancellationRequest(
        provider="payway",
        subscription={
            "account_id": secrets.token_hex(12),
            "user_product_id": secrets.token_hex(12),
            "cancellation_reason_id": secrets.token_hex(12),
        },
    )
    job_id = (await deps.store.create(req, identity=secrets.token_hex(8))).job.id
    await chain.dead_letter(
        deps,
        job_id,
        step=Step.ELIGIBILITY,
        error_type="ProviderUnavailable",
        error="503",
        traceback=None,
        payload={"args": [job_id]},
    )
    return job_id


async def only_letter(deps: wiring.Deps, job_id: str, kind: str) -> str:
    found = [d for d in await deps.dead_letters.list(limit=10_000) if d.job_id == job_id]
    assert [d.kind for d in found if d.kind == kind] == [kind]
    return next(d.id for d in found if d.kind == kind)


def split(results: Sequence[Any]) -> tuple[list[lifecycle.Next], list[BaseException]]:
    went = [r for r in results if isinstance(r, lifecycle.Next)]
    refused = [r for r in results if isinstance(r, BaseException)]
    return went, refused


async def test_two_replays_of_a_job_dead_letter_at_once_move_it_once(backend: Backend) -> None:
    async with backend() as redis:
        deps = build_deps(SETTINGS, redis=redis)
        job_id = await dead_lettered_job(deps)
        dl_id = await only_letter(deps, job_id, "job")

        results = await asyncio.gather(
            chain.replay(deps, dl_id), chain.replay(deps, dl_id), return_exceptions=True
        )

        went, refused = split(results)
        assert [n.step for n in went] == [Step.ELIGIBILITY]
        assert [type(e) for e in refused] == [AlreadyReplayed]
        assert await deps.dead_letters.get(dl_id) is None
        assert not await cast("Awaitable[int]", redis.sismember("cf:dl:kind:job", dl_id))
        assert await redis.zscore("cf:dl:index", dl_id) is None
        job = await deps.store.get(job_id)
        assert job.status is Status.QUEUED
        assert [e.event for e in job.timeline].count("replayed") == 1


async def test_two_replays_of_a_callback_dead_letter_at_once_deliver_once(
    backend: Backend,
) -> None:
    async with backend() as redis:
        deps = build_deps(SETTINGS, redis=redis)
        job_id = await dead_lettered_job(deps)
        await delivery.dead_letter_callback(
            deps, job_id, "outcome@webhook", error="410 Gone", traceback=None
        )
        dl_id = await only_letter(deps, job_id, "callback")

        results = await asyncio.gather(
            chain.replay(deps, dl_id), chain.replay(deps, dl_id), return_exceptions=True
        )

        went, refused = split(results)
        # Only one of them hands back the callback step to send: one delivery.
        assert [(n.step, n.args) for n in went] == [(Step.CALLBACK, ("outcome@webhook",))]
        assert [type(e) for e in refused] == [AlreadyReplayed]
        assert await deps.dead_letters.get(dl_id) is None
        assert not await cast("Awaitable[int]", redis.sismember("cf:dl:kind:callback", dl_id))


async def test_a_replay_after_a_replay_is_refused_and_a_claim_gets_the_entry_once(
    backend: Backend,
) -> None:
    async with backend() as redis:
        deps = build_deps(SETTINGS, redis=redis)
        job_id = await dead_lettered_job(deps)
        dl_id = await only_letter(deps, job_id, "job")
        claims = await asyncio.gather(*(deps.dead_letters.claim(dl_id) for _ in range(8)))
        assert [c.id for c in claims if c is not None] == [dl_id]
        with pytest.raises(AlreadyReplayed):
            await chain.replay(deps, dl_id)
        # Unclaimed, the job stays where the dead letter left it.
        assert (await deps.store.get(job_id)).status is Status.DEAD_LETTERED
