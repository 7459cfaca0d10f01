"""Every problem type the code uses is documented in docs/problems.md, and the other way
round; the API's answers carry them."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

import pytest

from producers.local import http_json
from producers.problems import TITLES, TYPE_BASE, Problem
from tests.fixtures.system import READ_TOKEN
from tests.support import System

ROOT = Path(__file__).parents[2]
DOC = (ROOT / "docs" / "problems.md").read_text()


def _documented() -> dict[str, str]:
    """Each ``## <kind>`` of the page, with the bold title under it."""
    sections = re.findall(r"^## ([a-z-]+)\n\n\*\*(.+?)\*\*", DOC, flags=re.MULTILINE)
    return dict(sections)


def test_every_kind_is_documented_with_its_title_and_nothing_else_is() -> None:
    documented = _documented()
    assert set(documented) == {p.value for p in Problem}
    assert documented == {p.value: TITLES[p] for p in Problem}
    assert set(TITLES) == set(Problem)


def test_every_kind_the_code_names_exists_and_every_kind_is_used() -> None:
    used: set[str] = set()
    for path in (ROOT / "producers").rglob("*.py"):
        if path.name == "problems.py":
            continue  # its table names every kind
        source = path.read_text()
        used |= set(re.findall(r"\bProblem\.([A-Z_]+)\b", source))
        # A title string where the kind goes (the old signature) must not come back.
        assert not re.search(r"\bproblem\(\s*\d{3},\s*\"", source), path
    assert used <= set(Problem.__members__)
    # invalid() and unavailable() in problems.py pick these two for their callers.
    assert set(Problem.__members__) == used | {"VALIDATION_ERROR", "UNAVAILABLE"}


def test_a_type_is_an_absolute_uri_under_one_base() -> None:
    assert TYPE_BASE.startswith("https://") and TYPE_BASE.endswith("/problems/")
    assert Problem.RATE_LIMITED.uri == "https://cancelflow.dev/problems/rate-limited"


def _payway(**extra: Any) -> dict[str, Any]:
    return {
        "provider": "payway",
        "subscription": {
            "account_id": secrets.token_hex(12),
            "user_product_id": secrets.token_hex(12),
            "cancellation_reason_id": "5cb80481c00000000000000a",
        },
        **extra,
    }


def _type(body: Any) -> str:
    assert isinstance(body, dict), body
    assert body["title"] == TITLES[Problem(body["type"].removeprefix(TYPE_BASE))]
    return str(body["type"]).removeprefix(TYPE_BASE)


@pytest.mark.integration
def test_api_answers_carry_their_types(billing_api: System) -> None:
    url = billing_api.api_url
    status, body = http_json("GET", f"{url}/v1/cancellations")
    assert (status, _type(body)) == (401, "unauthorized")
    status, body = billing_api.get(f"/v1/cancellations/job_{'0' * 32}")
    assert (status, _type(body)) == (404, "not-found")
    status, body = billing_api.get("/v1/nothing-here")
    assert (status, _type(body)) == (404, "not-found")
    status, body = billing_api.post("/v1/cancellations", raw=b"{not json")
    assert (status, _type(body)) == (400, "malformed-json")
    status, body = billing_api.post("/v1/cancellations", {"provider": "payway"})
    assert (status, _type(body)) == (422, "validation-error")
    assert "subscription" in [e["field"] for e in body["errors"]]
    status, body = billing_api.post("/v1/cancellations", _payway(metadata={"x": "x" * 5000}))
    assert (status, _type(body)) == (413, "payload-too-large")
    status, body = http_json("POST", f"{url}/v1/cancellations", _payway(), token=READ_TOKEN)
    assert (status, _type(body)) == (403, "forbidden")
    key = f"reuse-{secrets.token_hex(4)}"
    assert billing_api.post("/v1/cancellations", _payway(idempotency_key=key))[0] == 202
    status, body = billing_api.post("/v1/cancellations", _payway(idempotency_key=key))
    assert (status, _type(body)) == (422, "idempotency-key-reused")
    status, body = billing_api.post(f"/v1/cancellations/job_{'0' * 32}/decision", {"x": 1})
    assert (status, _type(body)) == (422, "validation-error")


@pytest.mark.integration
def test_a_rate_limited_answer_says_when_to_come_back(limited_api: System) -> None:
    answers = [limited_api.get("/v1/cancellations?limit=1") for _ in range(12)]
    limited = [body for status, body in answers if status == 429]
    assert limited, [status for status, _ in answers]
    assert _type(limited[0]) == "rate-limited" and limited[0]["retry_after"] > 0
