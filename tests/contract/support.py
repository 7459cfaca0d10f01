"""An adapter built through the registry, talking over real HTTP to an in-process server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from cancelflow.contract import (
    JobRecord,
    Reason,
    Status,
    Step,
    TimelineEntry,
    isoformat,
    new_job_id,
    utcnow,
)
from cancelflow.http import ProviderHttp
from cancelflow.logging import redact
from cancelflow.providers import REGISTRY
from cancelflow.providers.base import Confirmation, Eligibility, Provider, ProviderSettings
from sandboxes.env import provider_env
from sandboxes.server import build_app


def settings_for(key: str, root_url: str, **overrides: Any) -> ProviderSettings:
    """The provider's settings from ``sandboxes.env.provider_env``, as the system parses them."""
    prefix = f"CANCELFLOW_PROVIDERS__{key.upper()}__"
    values: dict[str, Any] = {
        name.removeprefix(prefix).lower(): value
        for name, value in provider_env(root_url).items()
        if name.startswith(prefix)
    }
    return REGISTRY[key].settings.model_validate({**values, **overrides})


def job_for(key: str, subscription: dict[str, Any], **fields: Any) -> JobRecord:
    now = isoformat(utcnow())
    return JobRecord(
        id=new_job_id(),
        provider=key,
        subscription=subscription,
        reason=fields.pop("reason", Reason(code="PRICE", comment="Too expensive")),
        status=Status.CHECKING,
        created_at=now,
        updated_at=now,
        **fields,
    )


@dataclass
class Harness:
    """One provider's adapter and its server's control routes."""

    key: str
    root_url: str
    settings: ProviderSettings
    adapter: Provider
    session: aiohttp.ClientSession

    def ref(self, subscription: dict[str, Any]) -> Any:
        return REGISTRY[self.key].reference.model_validate(subscription)

    async def check(self, job: JobRecord) -> tuple[Eligibility, JobRecord]:
        """The adapter's check, and the job with the answer on its timeline (as steps do)."""
        answer = await self.adapter.check(self.ref(job.subscription), job)
        entry = TimelineEntry(
            at=isoformat(utcnow()),
            step=Step.ELIGIBILITY.value,
            event=answer.kind,
            response=redact(answer.response),
        )
        return answer, job.model_copy(update={"timeline": [*job.timeline, entry]})

    async def confirm(self, job: JobRecord) -> Confirmation:
        return await self.adapter.confirm(self.ref(job.subscription), job)

    async def _control(self, method: str, action: str, body: Any = None) -> Any:
        url = f"{self.root_url}/{self.key}/_sandbox/{action}"
        async with self.session.request(method, url, json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def state(self) -> dict[str, Any]:
        state: dict[str, Any] = await self._control("GET", "state")
        return state

    async def faults(self, **faults: Any) -> None:
        await self._control("PUT", "faults", faults)

    async def expire_tokens(self) -> None:
        await self._control("POST", "expire-tokens")


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free local port in the running loop; its root URL."""
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@asynccontextmanager
async def harness(
    key: str, *, app: web.Application | None = None, **overrides: Any
) -> AsyncIterator[Harness]:
    """The provider's adapter against a fresh sandbox server (or ``app``), built through
    ``REGISTRY[key].build`` with the sandbox's demo settings plus ``overrides``."""
    async with serve(app or build_app()) as root_url, aiohttp.ClientSession() as session:
        settings = settings_for(key, root_url, **overrides)
        http = ProviderHttp(
            session, provider=key, base_url=str(settings.base_url), timeout_s=settings.timeout_s
        )
        yield Harness(key, root_url, settings, REGISTRY[key].build(settings, http), session)


Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answering(handler: Answer) -> web.Application:
    """An app answering every method and path with ``handler``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app
