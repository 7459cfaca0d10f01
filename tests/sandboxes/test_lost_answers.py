"""Lost answers (`lost_answer_rate`): a cancel call takes effect, then the client gets a proxy's
502. That every provider's cancel does so once, and that its other calls never lose their
answer, is the contract suite's (tests/contract, over every registered provider); here, the
injector's shares and a refused cancel."""

from __future__ import annotations

import pytest

from sandboxes import appdirect
from sandboxes.faults import FaultInjector, FaultSettings
from tests.sandboxes.support import sandbox_client, state
from tests.sandboxes.test_appdirect import API as APPDIRECT_API
from tests.sandboxes.test_appdirect import signed_headers


async def test_a_refused_cancel_stays_refused_behind_the_502() -> None:
    # The provider refuses (AppDirect's 400 for a cancelled subscription); the proxy still
    # answers 502, and nothing is cancelled.
    path = f"{APPDIRECT_API}/subscriptions/{appdirect.DEMO.cancelled}"
    async with sandbox_client(faults=FaultSettings(lost_answer_rate=1)) as client:
        response = await client.delete(path, headers=signed_headers(client, "DELETE", path))
        assert response.status == 502
        snapshot = await state(client, "appdirect")
        assert snapshot["faults_injected"]["lost_answer"] == 1
        assert snapshot["effective_cancels"] == {}


def test_the_lost_answer_rate_is_the_share_of_cancel_calls() -> None:
    injector = FaultInjector(FaultSettings(lost_answer_rate=0.3, error_rate=0.2, seed=5))
    cancels = [injector.draw("PUT", "/cancel", b"", cancels=True) for _ in range(2000)]
    assert 500 <= sum(f is not None and f.value == "lost_answer" for f in cancels) <= 700
    reads = [injector.draw("GET", "/read", b"") for _ in range(2000)]
    assert not any(f is not None and f.value == "lost_answer" for f in reads)
    # The error share is unchanged by the lost-answer slice on calls that cancel nothing.
    assert 300 <= sum(f is not None and f.value == "error" for f in reads) <= 500


def test_lost_answers_share_the_exclusive_budget() -> None:
    with pytest.raises(ValueError, match="lost_answer_rate"):
        FaultSettings(error_rate=0.5, hang_rate=0.3, lost_answer_rate=0.3)
