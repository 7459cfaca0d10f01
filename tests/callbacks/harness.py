"""In-process set-up for step-level tests: fake Redis, the sandbox receiver on a real port,
the real callbacks session, and jobs driven to each state by the real steps."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
from aiohttp import web

from cancelflow import callbacks, chain, delivery, lifecycle, wiring
from cancelflow.contract import CancellationRequest, JobRecord, Offer, Outcome, Step
from cancelflow.dead_letters import DeadLetter, DeadLetterStore
from cancelflow.hooks import Hook
from cancelflow.providers.payway import PaywayRef
from cancelflow.settings import Settings, load_settings
from cancelflow.store import JobStore
from sandboxes.receiver import (
    DEMO_CALLBACK_SECRET,
    EVENTS_PATH,
    Receiver,
    ReceiverControl,
    create_app,
)

SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "callback-event.schema.json").read_text())
REF = PaywayRef(
    account_id="5cb80481a000000000000001",
    user_product_id="5cb80481b000000000000001",
    cancellation_reason_id="5cb80481c00000000000000a",
)


def settings(
    *,
    secret: str | None = DEMO_CALLBACK_SECRET,
    previous: str | None = None,
    provider_url: str | None = None,
    **callbacks_settings: Any,
) -> Settings:
    payway: dict[str, Any] = {
        "base_url": "http://127.0.0.1:9/payway",
        "client_id": "client",
        "client_secret": "client-secret",
        "callback_secret": secret,
        "callback_secret_previous": previous,
        "callback_url": provider_url,
    }
    return load_settings(
        providers={"payway": payway},
        callbacks={"allow_http": True, "allowed_hosts": ["127.0.0.1"], **callbacks_settings},
    )


@dataclass
class Harness:
    deps: wiring.Deps
    receiver: Receiver
    url: str

    async def job(self, *, callback_url: str | None = "", **request: Any) -> JobRecord:
        """A new queued job (callback URL: the receiver's unless given; None for none)."""
        body = CancellationRequest(
            provider="payway",
            subscription=REF.model_dump(),
            callback_url=self.url if callback_url == "" else callback_url,
            **request,
        )
        # One job per call: each gets a subscription identity of its own.
        created = await self.deps.store.create(body, identity=uuid.uuid4().hex)
        return created.job

    async def checking(self, **request: Any) -> JobRecord:
        job = await self.job(**request)
        moved = await self.deps.store.transition(job, lifecycle.Event.CHECK)
        assert moved.applied
        return await self.deps.store.get(job.id)

    async def finished(self, outcome: Outcome, **request: Any) -> str:
        job = await self.checking(**request)
        nxt = await chain.finish(self.deps, job, outcome, step=Step.CONFIRM, attempt=0)
        assert nxt.step is Step.CALLBACK
        return job.id

    async def offered(self, **request: Any) -> str:
        job = await self.checking(**request)
        offer = Offer(kind="offer", offer_identifier="of_demo", details={"discount": "50%"})
        await self.deps.store.record(
            job.id, chain.entry(Step.ELIGIBILITY, "offer_received", 0), offer=offer
        )
        nxt = await chain.retention_offer(self.deps, job.id)
        assert nxt.args == (lifecycle.EVENT_OFFER,)
        return job.id

    async def dead_lettered(self, **request: Any) -> str:
        job = await self.checking(**request)
        await chain.dead_letter(
            self.deps,
            job.id,
            step=Step.CONFIRM,
            error_type="ProviderUnavailable",
            error="gave up after 8 attempts",
            traceback=None,
            payload={},
        )
        return job.id

    async def record(self, job_id: str) -> JobRecord:
        return await self.deps.store.get(job_id)

    async def dead_letters(self) -> list[DeadLetter]:
        return await self.deps.dead_letters.list()

    def configure(self, **control: Any) -> None:
        """Tell the receiver how to behave (`PUT /receiver/_control` in process)."""
        self.receiver.configure(ReceiverControl(**control))


@asynccontextmanager
async def harness(
    config: Settings | None = None, *, hooks: dict[str, list[Hook]] | None = None
) -> AsyncIterator[Harness]:
    config = config or settings()
    receiver = Receiver()
    runner = web.AppRunner(create_app(receiver))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    session = callbacks.open_session(config.callbacks)
    deps = wiring.Deps(
        settings=config,
        store=JobStore(redis, retention_s=3600, idempotency_ttl_s=24 * 3600),
        dead_letters=DeadLetterStore(redis),
        providers={},
        callback_session=session,
        hooks=hooks or {},
    )
    try:
        yield Harness(deps, receiver, f"http://127.0.0.1:{port}{EVENTS_PATH}")
    finally:
        await session.close()
        await runner.cleanup()
        await redis.aclose()


async def deliver_until_done(
    h: Harness, job_id: str, event: str = lifecycle.EVENT_OUTCOME, *, max_attempts: int = 10
) -> list[callbacks.CallbackRetryable]:
    """Run the callback step as the task would, retrying at once; the errors retried on."""
    errors: list[callbacks.CallbackRetryable] = []
    for attempt in range(max_attempts):
        try:
            await delivery.callback(h.deps, job_id, event, attempt=attempt)
        except callbacks.CallbackRetryable as exc:
            errors.append(exc)
            continue
        return errors
    raise AssertionError(f"still retrying after {max_attempts} attempts: {errors}")


def results(job: JobRecord, target: str | None = None) -> list[str]:
    """The job's callback attempt results, oldest first, for one target or all."""
    return [c.result for c in job.callbacks if target is None or target_of(c.url) == target]


def target_of(url: str | None) -> str:
    return url if url and url.startswith("hook:") else delivery.WEBHOOK
