"""A provider answering a huge body: a typed error after at most the limit, for every provider."""

from __future__ import annotations

import aiohttp
import pytest

from cancelflow.errors import ProviderProtocolError
from cancelflow.http import MAX_PROVIDER_BODY, ProviderHttp
from cancelflow.providers import REGISTRY
from tests.contract.providers import contract_for
from tests.contract.support import answering, harness, job_for
from tests.streaming import HugeAnswer, rss_bytes, serving

MiB = 1024 * 1024


@pytest.mark.parametrize("declare_length", [False, True], ids=["chunked", "content-length"])
@pytest.mark.parametrize("key", sorted(REGISTRY))
async def test_every_adapter_refuses_a_huge_answer(key: str, declare_length: bool) -> None:
    contract = contract_for(key)
    assert contract is not None
    answer = HugeAnswer(total=400 * MiB, declare_length=declare_length)
    async with harness(key, app=answering(answer.handle), **contract.settings) as h:
        before = rss_bytes()
        with pytest.raises(ProviderProtocolError, match=f"larger than {MAX_PROVIDER_BODY}"):
            await h.check(job_for(key, contract.success))
        grown = rss_bytes() - before
    await answer.finished()
    assert answer.sent < MAX_PROVIDER_BODY + 32 * MiB, answer.sent
    assert grown < 32 * MiB, grown


@pytest.mark.parametrize(("size", "refused"), [(4096, False), (4097, True)])
@pytest.mark.parametrize("declare_length", [False, True], ids=["chunked", "content-length"])
async def test_the_limit_is_exact(size: int, refused: bool, declare_length: bool) -> None:
    answer = HugeAnswer(total=size, declare_length=declare_length)
    answer.chunk = b"y" * size
    async with serving(answer) as url, aiohttp.ClientSession() as session:
        http = ProviderHttp(session, provider="p", base_url=url, timeout_s=5, max_body_bytes=4096)
        if refused:
            with pytest.raises(ProviderProtocolError) as caught:
                await http.request("GET", "/x")
            assert caught.value.status == 200 and not caught.value.retryable
        else:
            response = await http.request("GET", "/x")
            assert response.body == b"y" * size


def test_the_default_limit_is_one_mib() -> None:
    assert MiB == MAX_PROVIDER_BODY
