"""``/openapi.json`` says what the API accepts and answers: id formats, query parameters, the
body limits, one request schema per provider (discriminated by ``provider``, narrowed to the
providers configured: what the schemathesis run relies on), timestamps' formats, examples that
fit their schemas, the security of every route, and the headers every answer carries."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import Field

from cancelflow.contract import JOB_ID_RE, CancellationRequest, isoformat
from cancelflow.providers import REGISTRY
from cancelflow.providers.base import SubscriptionRef
from producers import api, openapi
from producers.schemas import CURSOR_RE, DEAD_LETTER_ID_RE
from producers.submit import IDEMPOTENCY_HEADER, KeyRefused, header_key


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


def _variants(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """provider -> the schema of its request, followed through the discriminator."""
    schemas = doc["components"]["schemas"]
    union = schemas["CancellationRequest"]
    refs = [v["$ref"] for v in union["oneOf"]]
    mapping = union["discriminator"]["mapping"]
    assert union["discriminator"]["propertyName"] == "provider"
    assert sorted(mapping.values()) == sorted(refs)
    return {key: schemas[ref.rsplit("/", 1)[1]] for key, ref in mapping.items()}


def test_the_request_is_one_schema_per_provider_discriminated_by_provider() -> None:
    doc = _doc()
    body = doc["paths"]["/v1/cancellations"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CancellationRequest"
    }
    variants = _variants(doc)
    assert set(variants) == set(REGISTRY)
    common = CancellationRequest.model_json_schema(ref_template=openapi.REF)
    for key, variant in variants.items():
        reference = REGISTRY[key].reference
        assert variant["properties"]["provider"] == {"type": "string", "const": key}
        assert variant["properties"]["subscription"] == {
            "$ref": f"#/components/schemas/{reference.__name__}"
        }
        assert {"provider", "subscription"} <= set(variant["required"])
        # The rest is the request model's own.
        rest = set(common["properties"]) - {"provider", "subscription"}
        assert {k: variant["properties"][k] for k in rest} == {
            k: common["properties"][k] for k in rest
        }
        # Each reference schema is the provider's model's: its required fields and formats.
        published = doc["components"]["schemas"][reference.__name__]
        own = reference.model_json_schema(ref_template=openapi.REF)
        assert published["required"] == own["required"]
        assert published["properties"] == own["properties"]
    payway = doc["components"]["schemas"]["PaywayRef"]
    assert payway["properties"]["account_id"]["pattern"] == "^[a-fA-F0-9]{24}$"


def test_a_provider_added_to_the_registry_gets_its_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    class TestRef(SubscriptionRef):
        ticket: str = Field(pattern="^T-[0-9]+$")

    spec = replace(REGISTRY["payway"], key="testprovider", reference=TestRef)
    monkeypatch.setitem(REGISTRY, "testprovider", spec)
    doc = _doc()
    variant = _variants(doc)["testprovider"]
    assert variant["title"] == "TestCancellationRequest"
    assert doc["components"]["schemas"]["TestRef"]["properties"]["ticket"]["pattern"] == (
        "^T-[0-9]+$"
    )


def test_request_bodies_are_narrowed_to_the_configured_providers() -> None:
    doc = _doc(providers={"payway": True, "azotte": False})
    by_provider = {key: v["properties"] for key, v in _variants(doc).items()}
    assert set(by_provider) == {"payway", "azotte"}
    assert by_provider["payway"]["subscription"] == {"$ref": "#/components/schemas/PaywayRef"}
    assert "callback_url" in by_provider["payway"]  # it has a callback secret
    assert "callback_url" not in by_provider["azotte"]
    # Every provider's reference is still published: jobs name them.
    assert {"AppDirectRef", "AxelSpringerRef"} <= set(doc["components"]["schemas"])


def test_a_jobs_subscription_is_a_providers_reference() -> None:
    schemas = _doc()["components"]["schemas"]
    for model in ("JobRecord", "JobSummary"):
        refs = {b["$ref"] for b in schemas[model]["properties"]["subscription"]["anyOf"]}
        assert refs == {
            f"#/components/schemas/{spec.reference.__name__}" for spec in REGISTRY.values()
        }


# Timestamps as ``contract.isoformat`` writes them, and as RFC 3339 requires.
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def test_every_timestamp_has_the_date_time_format() -> None:
    schemas = _doc()["components"]["schemas"]
    marked = {
        (name, prop)
        for name, schema in schemas.items()
        for prop, value in schema.get("properties", {}).items()
        if "date-time" in json.dumps(value)
    }
    assert {
        ("JobRecord", "created_at"),
        ("JobRecord", "updated_at"),
        ("JobSummary", "created_at"),
        ("TimelineEntry", "at"),
        ("CallbackAttempt", "at"),
        ("Offer", "decision_deadline"),
        ("DeadLetter", "created_at"),
        ("Stats", "since"),
        ("JobQuery", "created_after"),
        ("DeadLetterQuery", "older_than"),
    } <= marked
    # A billing event's created_at is the billing system's text, kept as sent: not checked.
    assert ("BillingEvent", "created_at") not in marked
    # What the API writes there is RFC 3339.
    assert RFC3339.match(isoformat(datetime.now(UTC)))


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield path, method, op


def _resolve(doc: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in item:
        *_, kind, name = item["$ref"].split("/")
        item = doc["components"][kind][name]
    return item


def test_every_operation_has_examples_that_fit_its_schemas() -> None:
    """Every request body, every answer with a body and every parameter has an example, and
    each validates against its schema (JSON Schema 2020-12, as OpenAPI 3.1 has it)."""
    doc = _doc(providers={"payway": True, "azotte": False})

    def check(schema: dict[str, Any], example: Any, where: str) -> None:
        # The components beside the schema, so its "#/components/..." references resolve.
        Draft202012Validator({**schema, "components": doc["components"]}).validate(example)
        assert example is not None, where

    checked = 0
    for path, method, op in _operations(doc):
        where = f"{method.upper()} {path}"
        assert op.get("summary"), where
        if "requestBody" in op:
            for media in op["requestBody"]["content"].values():
                check(media["schema"], media["example"], where)
                checked += 1
        for status, answer in op["responses"].items():
            for media_type, media in answer.get("content", {}).items():
                assert "example" in media, (where, status, media_type)
                if media_type.endswith("json") and media["schema"] != {"type": "object"}:
                    check(media["schema"], media["example"], f"{where} {status}")
                    checked += 1
                if media_type == "application/problem+json":
                    assert int(status) == media["example"]["status"], (where, status)
        for param in op.get("parameters", []):
            param = _resolve(doc, param)
            assert "example" in param, (where, param["name"])
            check(param["schema"], param["example"], f"{where} {param['name']}")
    assert checked > 40


def test_every_route_but_the_public_ones_needs_a_token_and_says_so() -> None:
    doc = _doc(billing_schemes=["stripe", "standard-webhooks"])
    public = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/assets/{name}"}
    for path, method, op in _operations(doc):
        if path in public:
            assert op["security"] == [], path
        elif path == "/v1/billing-events":
            assert op["security"] == [{"stripeSignature": []}, {"standardWebhooks": []}]
        else:
            assert op["security"] == [{"bearer": []}], (method, path)
            assert "401" in op["responses"], (method, path)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["stripeSignature"]["name"] == "Stripe-Signature"
    assert schemes["standardWebhooks"]["name"] == "webhook-signature"
    assert schemes["cancelflowSignature"]["name"] == "Cancelflow-Signature"


def test_every_answer_carries_the_request_id_and_the_headers_are_the_apis() -> None:
    doc = _doc()
    assert openapi.REQUEST_ID_HEADER == api.REQUEST_ID_HEADER
    for path, method, op in _operations(doc):
        for status, answer in op["responses"].items():
            assert "Request-Id" in answer["headers"], (method, path, status)
    create = doc["paths"]["/v1/cancellations"]["post"]
    header = next(p for p in create["parameters"] if p.get("name") == IDEMPOTENCY_HEADER)
    assert header["in"] == "header"
    pattern = re.compile(header["schema"]["pattern"])
    for value in ("order-1", '"order 1"', "k" * 255, '"a\\"b"'):
        assert pattern.fullmatch(value) and header_key([value]), value
    for value in ("k" * 256, '"open', "", '""', "\tkey\tx"):
        assert not pattern.fullmatch(value), value
        with pytest.raises(KeyRefused):
            header_key([value])
