"""docs/callbacks.md and docs/callback-event.schema.json stay true to the code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from cancelflow import callbacks
from cancelflow.contract import JobRecord, Offer, Outcome, Status
from cancelflow.settings import CallbackSettings
from tests.callbacks.harness import SCHEMA

DOC = (Path(__file__).parents[2] / "docs" / "callbacks.md").read_text()
VALIDATOR = jsonschema_rs.validator_for(SCHEMA)


def _examples() -> list[dict[str, Any]]:
    blocks = re.findall(r"```json\n(.*?)```", DOC, flags=re.DOTALL)
    return [json.loads(b) for b in blocks]


def test_every_event_type_has_a_valid_example() -> None:
    examples = _examples()
    for example in examples:
        VALIDATOR.validate(example)
    assert {e["type"] for e in examples} == set(callbacks.EVENT_TYPES)
    assert len({e["id"] for e in examples}) == len(examples)


def test_the_schema_names_every_event_type_and_every_field_the_code_sends() -> None:
    assert set(SCHEMA["properties"]["type"]["enum"]) == set(callbacks.EVENT_TYPES)
    job = JobRecord(
        id="job_" + "0" * 32,
        provider="payway",
        subscription={},
        status=Status.QUEUED,
        created_at="2026-01-01T00:00:00.000Z",
        updated_at="2026-01-01T00:00:00.000Z",
    )
    event = callbacks.build_event(job, callbacks.OFFER_PRESENTED)
    assert set(event) == set(SCHEMA["properties"])
    data = SCHEMA["$defs"]["data"]
    assert set(event["data"]) == set(data["properties"]) == set(data["required"])
    assert set(SCHEMA["$defs"]["outcome"]["properties"]) == set(Outcome.model_fields)
    assert set(SCHEMA["$defs"]["offer"]["properties"]) == set(Offer.model_fields)


def test_the_schema_refuses_what_breaks_the_contract() -> None:
    [good] = [e for e in _examples() if e["type"] == "cancellation.succeeded"][:1]
    bad_outcome = json.loads(json.dumps(good))
    bad_outcome["data"]["outcome"]["type"] = "retained"
    for bad in (
        {**good, "schema_version": 2},
        {**good, "type": "cancellation.unknown"},
        {**good, "id": "not-an-event-id"},
        bad_outcome,
        {k: v for k, v in good.items() if k != "data"},
    ):
        with pytest.raises(jsonschema_rs.ValidationError):
            VALIDATOR.validate(bad)


@pytest.mark.parametrize("name", list(CallbackSettings.model_fields))
def test_every_callbacks_setting_is_documented(name: str) -> None:
    assert f"CANCELFLOW_CALLBACKS__{name.upper()}" in DOC
