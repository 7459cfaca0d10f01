"""The sandbox's callback receiver, mounted at /receiver by the sandbox server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from cancelflow.callbacks import encode, signature_headers
from sandboxes.receiver import DEMO_CALLBACK_SECRET
from sandboxes.server import build_app
from tests.callbacks.secrets import OTHER_SECRET, ROTATED

EVENT = {
    "id": "evt_" + "1" * 32,
    "type": "cancellation.succeeded",
    "data": {"job_id": "job_" + "2" * 32},
}


async def _serve() -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(build_app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/receiver"


def test_verifies_deduplicates_fails_on_demand_and_lists_what_it_got() -> None:
    async def scenario() -> None:
        runner, base = await _serve()
        try:
            async with aiohttp.ClientSession() as http:

                async def post(event: dict[str, Any], secret: str = DEMO_CALLBACK_SECRET) -> int:
                    body = encode(event)
                    headers = signature_headers(event["id"], body, [secret])
                    async with http.post(f"{base}/events", data=body, headers=headers) as resp:
                        return resp.status

                async def put(control: dict[str, Any]) -> int:
                    async with http.put(f"{base}/_control", json=control) as resp:
                        return resp.status

                assert await post(EVENT) == 200
                assert await post(EVENT) == 200  # the same event again: a duplicate
                assert await post({**EVENT, "id": "evt_" + "3" * 32}, secret=OTHER_SECRET) == 400
                assert await put({"fail_next": 2, "status": 503}) == 200
                assert [await post(EVENT) for _ in range(3)] == [503, 503, 200]
                assert await put({"down": True}) == 200
                try:
                    await post(EVENT)
                    raise AssertionError("a receiver that is down answered")
                except aiohttp.ServerDisconnectedError:
                    pass
                assert await put({"fail_next": -1}) == 422
                assert await put({"secrets": ["rotated"]}) == 422  # not a whsec_ secret
                assert await put({"secrets": [ROTATED]}) == 200
                assert await post({**EVENT, "id": "evt_" + "4" * 32}, secret=ROTATED) == 200
                async with http.get(
                    f"{base}/_events", params={"job_id": "job_" + "2" * 32}
                ) as resp:
                    got = await resp.json()
                requests = [(r["status"], r["verified"], r["duplicate"]) for r in got["requests"]]
                assert requests == [
                    (200, True, False),
                    (200, True, True),
                    (400, False, False),
                    (503, False, False),
                    (503, False, False),
                    (200, True, True),
                    (200, True, False),
                ]
                assert [e["id"] for e in got["events"]] == [EVENT["id"], "evt_" + "4" * 32]
                assert "No matching signature found" in got["requests"][2]["error"]
                async with http.post(f"{base}/_reset") as resp:
                    assert resp.status == 200
                async with http.get(f"{base}/_events") as resp:
                    assert await resp.json() == {"events": [], "requests": []}
                async with http.get(f"{base}/_control") as resp:
                    assert (await resp.json())["secrets"] == [DEMO_CALLBACK_SECRET]
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_unsigned_or_unparsable_posts_are_recorded_unverified() -> None:
    async def scenario() -> None:
        runner, base = await _serve()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{base}/events", data=b"not json") as resp:
                    assert resp.status == 400
                    assert "webhook-timestamp" in (await resp.json())["error"]
                async with http.get(f"{base}/_events") as resp:
                    [request] = (await resp.json())["requests"]
                assert request["verified"] is False and request["event_id"] is None
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_env_gives_every_provider_the_receivers_secret() -> None:
    from sandboxes.env import provider_env

    env = provider_env("http://127.0.0.1:1")
    keys = {name.split("__")[1] for name in env}
    for key in keys:
        assert env[f"CANCELFLOW_PROVIDERS__{key}__CALLBACK_SECRET"] == DEMO_CALLBACK_SECRET
    assert json.dumps(env)  # all strings
