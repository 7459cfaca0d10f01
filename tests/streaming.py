"""A server on 127.0.0.1 that answers with a huge body, streamed, and counts what it sent."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

CHUNK = b"x" * (64 * 1024)  # one buffer, written again and again: nothing is allocated per MiB


@dataclass
class HugeAnswer:
    """What the server sent: bytes handed to the connection before the client went away."""

    total: int
    status: int = 200
    declare_length: bool = False
    content_type: str = "application/json"
    chunk: bytes = CHUNK  # written until ``total`` is reached (the last write may pass it)
    sent: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=self.status)
        resp.content_type = self.content_type
        if self.declare_length:
            resp.content_length = self.total
        try:
            await resp.prepare(request)
            while self.sent < self.total:
                await resp.write(self.chunk)
                self.sent += len(self.chunk)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client closed the connection: what we wanted
        finally:
            self.done.set()
        return resp

    async def finished(self) -> None:
        await asyncio.wait_for(self.done.wait(), 10)


@asynccontextmanager
async def serving(answer: HugeAnswer) -> AsyncIterator[str]:
    """``answer`` on every path of a server on a free port of 127.0.0.1; its root URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize()
