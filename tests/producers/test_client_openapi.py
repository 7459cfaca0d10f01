"""The client's types against the API's OpenAPI document (issue #18: "the client's types match
it: a test compares them").

``test_client_package.py`` holds the client's models to the server's Python models (field names
and which are required). This holds them to what the API publishes: every schema of
``/openapi.json`` has its client type, and every field of each has the same JSON type, format,
enum, pattern and bounds in the schema pydantic makes of the client's model. A field the server
adds, a timestamp typed as a plain string, an enum value or a provider's reference that the
client does not know, fails here.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from cancelflow_client import models
from producers.openapi import document

REF = "#/components/schemas/{model}"
DOC: dict[str, Any] = document(max_body_bytes=65536)["components"]["schemas"]

CLIENT: dict[str, type[BaseModel]] = {
    name: value
    for name, value in vars(models).items()
    if isinstance(value, type)
    and issubclass(value, BaseModel)
    and value.__module__ == models.__name__
    and not name.startswith("_")
}
_, _defs = models_json_schema([(m, "validation") for m in CLIENT.values()], ref_template=REF)
CLIENT_SCHEMAS: dict[str, Any] = _defs["$defs"]

# Schemas of the document that no client type copies, and why.
SERVER_ONLY = {
    # The query parameters of the listing routes: the client's methods take them as keywords.
    "JobQuery",
    "DeadLetterQuery",
    "StatsQuery",
    # What a billing system posts and is answered (signed by the billing system, not by us).
    "BillingEvent",
    "BillingResult",
    # The health checks' answer: for the orchestrator's probes.
    "Health",
}
# The client's own types that no schema describes, and why.
CLIENT_ONLY = {
    # An enqueue's answer as the client returns it: the job (the body) and how it was made
    # (the status code: 201 created, 200 existing or joined).
    "Enqueued",
}
# ``CancellationRequest`` in the document is one schema per provider (``<Provider>Cancellation
# Request``), discriminated by ``provider``; the client has one request type and checks its
# ``subscription`` against ``SUBSCRIPTION_REFS[provider]``.
VARIANTS = set(DOC["CancellationRequest"]["discriminator"]["mapping"].values())
VARIANT_NAMES = {ref.rsplit("/", 1)[1] for ref in VARIANTS}

_KEYWORDS = ("type", "format", "const", "pattern", "minLength", "maxLength", "minimum", "maximum")


def shape(schema: dict[str, Any]) -> Any:
    """What a value must be, in JSON Schema terms, without titles, descriptions or examples."""
    if "$ref" in schema:
        return ("ref", schema["$ref"].rsplit("/", 1)[1])
    for union in ("anyOf", "oneOf"):
        if union in schema:
            return (union, frozenset(shape(s) for s in schema[union]))
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return shape(schema["allOf"][0])
    out: list[Any] = [(k, schema[k]) for k in _KEYWORDS if k in schema]
    if "enum" in schema:
        out.append(("enum", tuple(schema["enum"])))
    if "items" in schema:
        out.append(("items", shape(schema["items"])))
    if isinstance(schema.get("additionalProperties"), dict):
        out.append(("values", shape(schema["additionalProperties"])))
    return tuple(out)


def fields(schema: dict[str, Any]) -> dict[str, Any]:
    return {name: shape(s) for name, s in schema.get("properties", {}).items()}


def test_every_schema_has_its_client_type_and_every_type_its_schema() -> None:
    published = set(DOC) - SERVER_ONLY - VARIANT_NAMES
    typed = set(CLIENT_SCHEMAS) - CLIENT_ONLY
    assert published - typed == set(), "schemas the client has no type for"
    assert typed - published == set(), "client types the document does not describe"


SHARED = sorted((set(DOC) & set(CLIENT_SCHEMAS)) - {"CancellationRequest"})
# Answers hold whichever provider's reference the job has: the client reads it as an object
# (``SUBSCRIPTION_REFS[job.provider]`` types it); the document says which references it can be.
SUBSCRIPTION_ANSWERS = {("JobRecord", "subscription"), ("JobSummary", "subscription")}


@pytest.mark.parametrize("name", SHARED)
def test_each_client_type_is_its_schema(name: str) -> None:
    ours, theirs = CLIENT_SCHEMAS[name], DOC[name]
    assert ours.get("enum") == theirs.get("enum")
    if name not in CLIENT:  # an enum
        return
    required, published_required = set(ours.get("required", [])), set(theirs.get("required", []))
    if CLIENT[name].model_config.get("extra") == "forbid":
        # What the client sends: required exactly where the API requires it.
        assert required == published_required
    else:
        # What the client reads: it may do without a field the API always sends (an older
        # server's answer), never require one the API may leave out.
        assert required <= published_required
    mine, published = fields(ours), fields(theirs)
    assert list(mine) == list(published)
    for field in set(mine) & set(published):
        if (name, field) in SUBSCRIPTION_ANSWERS:
            assert mine[field] == (("type", "object"),)
            assert published[field] == (
                "anyOf",
                frozenset(("ref", m.__name__) for m in models.SUBSCRIPTION_REFS.values()),
            )
            continue
        assert mine[field] == published[field], field


@pytest.mark.parametrize("variant", sorted(VARIANT_NAMES))
def test_each_providers_request_is_the_clients_request_with_its_reference(variant: str) -> None:
    published = DOC[variant]
    provider = published["properties"]["provider"]["const"]
    ref = models.SUBSCRIPTION_REFS[provider]
    assert published["properties"]["subscription"] == {"$ref": REF.format(model=ref.__name__)}
    ours = CLIENT_SCHEMAS["CancellationRequest"]
    assert set(ours["required"]) == set(published["required"])
    mine, theirs = fields(ours), fields(published)
    assert list(mine) == list(theirs)
    assert mine["provider"] == (("type", "string"), ("minLength", 1), ("maxLength", 64))
    assert mine["subscription"] == (("type", "object"),)
    for field in set(mine) - {"provider", "subscription"}:
        assert mine[field] == theirs[field], field


def test_the_client_checks_a_subscription_as_the_api_does() -> None:
    from cancelflow_client import AsyncCancelflowClient
    from cancelflow_client.errors import ValidationFailed

    bad = {"account_id": "not-hex", "user_product_id": "a" * 24, "cancellation_reason_id": "b" * 24}
    with pytest.raises(ValidationFailed) as caught:
        AsyncCancelflowClient._enqueue_call(
            "payway",
            bad,
            reason=None,
            callback_url=None,
            idempotency_key=None,
            metadata=None,
        )
    assert [e.field for e in caught.value.problem.errors or []] == ["subscription.account_id"]
