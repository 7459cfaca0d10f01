"""The HTTP door's typed errors say whether a failed request may have reached the provider."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web

from cancelflow.errors import (
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)
from cancelflow.http import ProviderHttp
from tests.contract.support import answering, serve


async def send(root_url: str, *, timeout_s: float = 2.0) -> ProviderError:
    """A POST through the door that must fail; the error it raised."""
    async with aiohttp.ClientSession() as session:
        http = ProviderHttp(session, provider="test", base_url=root_url, timeout_s=timeout_s)
        with pytest.raises(ProviderError) as caught:
            await http.request("POST", "/cancel", json_body={"id": "1"})
        return caught.value


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_a_5xx_may_have_acted(status: int) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, text="Bad Gateway")

    async with serve(answering(answer)) as url:
        error = await send(url)
    assert isinstance(error, ProviderUnavailable)
    assert error.may_have_acted and error.as_dict()["may_have_acted"] is True


async def test_a_429_did_not_act() -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "3"})

    async with serve(answering(answer)) as url:
        error = await send(url)
    assert isinstance(error, ProviderRateLimited)
    assert not error.may_have_acted and error.as_dict()["may_have_acted"] is False


async def test_a_read_timeout_may_have_acted() -> None:
    async def answer(request: web.Request) -> web.Response:
        await asyncio.sleep(1)
        return web.Response()

    async with serve(answering(answer)) as url:
        error = await send(url, timeout_s=0.2)
    assert isinstance(error, ProviderTimeout)
    assert error.may_have_acted


async def test_a_reset_after_the_request_was_sent_may_have_acted() -> None:
    received = asyncio.Event()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        received.set()
        assert request.transport is not None
        request.transport.abort()  # the connection dies before any answer
        await asyncio.sleep(1)
        return web.Response()

    async with serve(answering(answer)) as url:
        error = await send(url)
    assert received.is_set()
    assert isinstance(error, ProviderUnavailable)
    assert error.may_have_acted


async def test_a_refused_connection_did_not_act() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more: the connection is refused before sending.
    error = await send(f"http://127.0.0.1:{port}")
    assert isinstance(error, ProviderUnavailable)
    assert error.retryable
    assert not error.may_have_acted


async def test_a_4xx_error_did_not_act() -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"code": "invalid"}, status=400)

    async with serve(answering(answer)) as url, aiohttp.ClientSession() as session:
        http = ProviderHttp(session, provider="test", base_url=url, timeout_s=2)
        response = await http.request("POST", "/cancel")
        error = http.error(response)
    assert response.status == 400
    assert not error.may_have_acted


def test_a_timeout_without_a_door_may_have_acted() -> None:
    # A step overrunning its time limit mid-call (the worker raises it): by default unknown.
    assert ProviderTimeout("soft time limit", provider="").may_have_acted
    assert not ProviderUnavailable("x", provider="").may_have_acted
    assert not ProviderTimeout("x", provider="", may_have_acted=False).may_have_acted
