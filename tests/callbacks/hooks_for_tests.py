"""Hooks the callback integration tests load into their worker
(``CANCELFLOW_CALLBACKS__HOOK_MODULES=tests.callbacks.hooks_for_tests``).

The job's metadata tells the hook what to do: ``{"hook": {"fail": 2}}`` fails its first two
calls for an event, ``{"hook": {"reject": true}}`` rejects it for good.
"""

from __future__ import annotations

import json
import os
from typing import Any

from redis.asyncio import Redis

from cancelflow.hooks import HookRejected, register_hook

EVENTS_KEY = "test:hooks:events"
NAME = "record"


async def record(event: dict[str, Any]) -> None:
    """Keep each event in the system's Redis, for the test to read."""
    told = event["data"]["metadata"].get("hook", {})
    # The worker's own Redis: a test fixture may read the environment it started the worker with.
    async with Redis.from_url(os.environ["CANCELFLOW_REDIS_URL"]) as redis:
        calls = await redis.incr(f"test:hooks:calls:{event['id']}")
        if told.get("reject"):
            raise HookRejected("told to reject")
        if calls <= told.get("fail", 0):
            raise RuntimeError(f"told to fail {told['fail']} times")
        await redis.rpush(EVENTS_KEY, json.dumps(event))


register_hook("*", record, name=NAME)
