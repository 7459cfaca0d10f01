"""``/openapi.json`` says what the API accepts: id formats, query parameters, the body limits,
and request bodies narrowed to the providers configured (what the schemathesis run relies on)."""

from __future__ import annotations

import re
from typing import Any

from cancelflow.contract import JOB_ID_RE
from producers import openapi
from producers.schemas import CURSOR_RE, DEAD_LETTER_ID_RE


def _doc(**kw: Any) -> dict[str, Any]:
    return openapi.document(max_body_bytes=4096, max_json_depth=7, max_json_string_chars=300, **kw)


def _param(op: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in op["parameters"] if p["name"] == name)


def test_path_ids_carry_their_formats() -> None:
    paths = _doc()["paths"]
    for path in ("/v1/cancellations/{job_id}", "/v1/cancellations/{job_id}/decision"):
        for op in paths[path].values():
            assert _param(op, "job_id")["schema"]["pattern"] == JOB_ID_RE.pattern
    for path in ("/v1/dead-letters/{dl_id}", "/v1/dead-letters/{dl_id}/replay"):
        for op in paths[path].values():
            assert _param(op, "dl_id")["schema"]["pattern"] == DEAD_LETTER_ID_RE.pattern
            assert "404" in op["responses"]


def test_query_parameters_are_the_models() -> None:
    paths = _doc()["paths"]
    limit = _param(paths["/v1/dead-letters"]["get"], "limit")["schema"]
    assert (limit["type"], limit["minimum"], limit["maximum"]) == ("integer", 0, 1000)
    cursor = _param(paths["/v1/cancellations"]["get"], "cursor")["schema"]
    assert cursor["pattern"] == CURSOR_RE.pattern
    assert re.fullmatch(cursor["pattern"], "1764579436.25~job_" + "a" * 32)


def test_the_limits_are_documented() -> None:
    description = _doc()["info"]["description"]
    assert "at most 4096 bytes, nested at most 7 deep" in description
    assert "strings of at most 300 characters" in description


def test_request_bodies_are_narrowed_to_the_configured_providers() -> None:
    doc = _doc(providers={"payway": True, "azotte": False})
    body = doc["paths"]["/v1/cancellations"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {
        "$ref": f"#/components/schemas/{openapi.CONFIGURED_REQUEST}"
    }
    variants = doc["components"]["schemas"][openapi.CONFIGURED_REQUEST]["oneOf"]
    by_provider = {v["properties"]["provider"]["const"]: v["properties"] for v in variants}
    assert set(by_provider) == {"payway", "azotte"}
    assert by_provider["payway"]["subscription"] == {"$ref": "#/components/schemas/PaywayRef"}
    assert "callback_url" in by_provider["payway"]  # it has a callback secret
    assert "callback_url" not in by_provider["azotte"]
    # Without providers, the plain model (its own schema is always published too).
    plain = _doc()["paths"]["/v1/cancellations"]["post"]["requestBody"]["content"]
    assert plain["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CancellationRequest"
    }
