"""Helpers for sandbox tests: an in-process server and a client talking to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sandboxes.faults import FaultSettings
from sandboxes.server import PROVIDER_APPS, build_app

Client = TestClient[web.Request, web.Application]


@asynccontextmanager
async def sandbox_client(
    *, faults: FaultSettings | None = None, token_ttl_s: int | None = None
) -> AsyncIterator[Client]:
    """A client for a fresh server hosting every sandbox at `/{key}`."""
    app = build_app(faults=faults, token_ttl_s=token_ttl_s)
    async with TestClient(TestServer(app)) as client:
        yield client


def provider_app(client: Client, key: str) -> web.Application:
    """The mounted sub-app of provider `key` (index it with the provider's AppKey)."""
    return client.app[PROVIDER_APPS][key]


async def state(client: Client, key: str) -> dict[str, Any]:
    """The provider's control-route state snapshot."""
    response = await client.get(f"/{key}/_sandbox/state")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body
