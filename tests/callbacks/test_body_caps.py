"""A receiver answering a huge body cannot make a worker read it: a few KiB, then hang up."""

from __future__ import annotations

import asyncio

import pytest

from cancelflow import callbacks
from cancelflow.callbacks import CallbackRetryable
from cancelflow.settings import CallbackSettings
from sandboxes.receiver import DEMO_CALLBACK_SECRET
from tests.streaming import HugeAnswer, rss_bytes, serving

MiB = 1024 * 1024
EVENT = {"id": "evt_" + "0" * 32, "type": "cancellation.succeeded", "data": {}}


async def deliver_to(answer: HugeAnswer) -> tuple[int, int]:
    """(status, RSS growth in bytes) of delivering one event to ``answer``."""
    async with serving(answer) as url:
        settings = CallbackSettings(allow_http=True, allowed_hosts=["127.0.0.1"])
        async with callbacks.open_session(settings) as session:
            before = rss_bytes()
            try:
                status, _, _ = await callbacks.deliver(
                    session, f"{url}/hook", EVENT, secrets=[DEMO_CALLBACK_SECRET], timeout_s=20
                )
            except CallbackRetryable as exc:  # a 400 is retried (briefly)
                assert exc.status is not None
                status = exc.status
            grown = rss_bytes() - before
        await answer.finished()
    return status, grown


@pytest.mark.parametrize("declare_length", [False, True], ids=["chunked", "content-length"])
@pytest.mark.parametrize("status", [200, 400])
def test_a_huge_answer_is_not_read(status: int, declare_length: bool) -> None:
    answer = HugeAnswer(total=400 * MiB, status=status, declare_length=declare_length)
    got, grown = asyncio.run(deliver_to(answer))
    assert got == status
    # What the server got rid of before the worker hung up: the first KiB the worker read
    # plus what the socket buffers on both sides hold, nowhere near the 400 MiB it offered.
    assert answer.sent < 32 * MiB, answer.sent
    assert grown < 32 * MiB, grown


def test_the_cap_is_a_few_kib() -> None:
    assert 1024 <= callbacks.MAX_RESPONSE_BODY <= 16 * 1024
