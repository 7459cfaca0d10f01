"""The client's token goes to the API's own origin only, redirects or not.

Two servers on 127.0.0.1, on different ports (so different origins): the API redirects, the
other records what it was sent. Both clients, the blocking one and the asyncio one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from cancelflow_client import AsyncCancelflowClient, CancelflowClient, NotFound

TOKEN = "cf_test_redirect_token"
PROBLEM = {"title": "Not found", "status": 404, "detail": "no such job"}


@dataclass
class Seen:
    headers: list[dict[str, str]] = field(default_factory=list)


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@asynccontextmanager
async def api_redirecting_to_another_origin() -> AsyncIterator[tuple[str, Seen, Seen]]:
    """(API URL, what the API saw, what the other origin saw). The API answers every
    ``/v1/cancellations/{id}`` with 302 to the other origin, and ``/v1/cancellations/same-{id}``
    with 302 to itself (``/v1/cancellations/{id}`` on the other origin, then)."""
    at_api, elsewhere = Seen(), Seen()

    async def other(request: web.Request) -> web.Response:
        elsewhere.headers.append(dict(request.headers))
        return web.json_response(PROBLEM, status=404, content_type="application/problem+json")

    other_runner, other_url = await start(_app(other))

    async def api(request: web.Request) -> web.Response:
        at_api.headers.append(dict(request.headers))
        job = request.match_info["tail"].rsplit("/", 1)[-1]
        if job.startswith("same-"):
            raise web.HTTPFound(f"/v1/cancellations/back-{job.removeprefix('same-')}")
        raise web.HTTPFound(f"{other_url}/v1/cancellations/{job}")

    api_runner, api_url = await start(_app(api))
    try:
        yield api_url, at_api, elsewhere
    finally:
        await api_runner.cleanup()
        await other_runner.cleanup()


def _app(handler: Callable[[web.Request], object]) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)  # type: ignore[arg-type]
    return app


def authorization(headers: dict[str, str]) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == "authorization"), None)


def sync_get(api_url: str, job_id: str) -> None:
    with CancelflowClient(api_url, TOKEN, retries=0) as client, pytest.raises(NotFound):
        client.get(job_id)


async def async_get(api_url: str, job_id: str) -> None:
    async with AsyncCancelflowClient(api_url, TOKEN, retries=0) as client:
        with pytest.raises(NotFound):
            await client.get(job_id)


@pytest.mark.parametrize("flavour", ["blocking", "asyncio"])
async def test_a_redirect_to_another_origin_loses_the_token(flavour: str) -> None:
    async with api_redirecting_to_another_origin() as (api_url, at_api, elsewhere):
        if flavour == "blocking":
            await asyncio.to_thread(sync_get, api_url, "job_1")
        else:
            await async_get(api_url, "job_1")
    assert [authorization(h) for h in at_api.headers] == [f"Bearer {TOKEN}"]
    assert len(elsewhere.headers) == 1  # the redirect was followed ...
    assert authorization(elsewhere.headers[0]) is None  # ... without the token
    assert TOKEN not in repr(elsewhere.headers)


@pytest.mark.parametrize("flavour", ["blocking", "asyncio"])
async def test_a_redirect_within_the_origin_keeps_it(flavour: str) -> None:
    async with api_redirecting_to_another_origin() as (api_url, at_api, elsewhere):
        if flavour == "blocking":
            await asyncio.to_thread(sync_get, api_url, "same-job_2")
        else:
            await async_get(api_url, "same-job_2")
    # Same scheme, host and port: the token goes along; then off to the other origin, without.
    assert [authorization(h) for h in at_api.headers] == [f"Bearer {TOKEN}"] * 2
    assert [authorization(h) for h in elsewhere.headers] == [None]
