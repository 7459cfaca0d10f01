"""``/openapi.json``: the API described by the pydantic models that validate its requests and
shape its answers (``model_json_schema``), so the document cannot drift from the code."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from cancelflow.contract import JOB_ID_RE, CancellationRequest, Decision, JobRecord
from cancelflow.dead_letters import DeadLetter
from cancelflow.providers import REGISTRY
from producers.problems import PROBLEM_TYPE
from producers.schemas import (
    DEAD_LETTER_ID_RE,
    BillingEvent,
    BillingResult,
    DeadLetterPage,
    DeadLetterQuery,
    Health,
    JobPage,
    JobQuery,
    Problem,
    ProviderStates,
    Replayed,
    Stats,
    StatsQuery,
)

JSON = "application/json"
REF = "#/components/schemas/{model}"

_ERRORS = {
    400: "the body is not JSON within the limits (nesting, string sizes, UTF-8), or a header "
    "is not UTF-8",
    401: "no token, or not one of ours",
    403: "the token is read-only",
    404: "no such job or dead letter (an id not of the format also names none)",
    409: "conflict (see the detail)",
    413: "the body is larger than the limit",
    422: "invalid fields, each listed in `errors`",
    429: "the token's rate limit is spent: wait `Retry-After` seconds",
    503: "not ready",
}


def _models() -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    requests: list[type[BaseModel]] = [
        CancellationRequest,
        Decision,
        BillingEvent,
        JobQuery,
        StatsQuery,
        DeadLetterQuery,
    ]
    answers: list[type[BaseModel]] = [
        JobRecord,
        JobPage,
        Problem,
        DeadLetter,
        DeadLetterPage,
        Replayed,
        Health,
        Stats,
        BillingResult,
        ProviderStates,
    ]
    refs = [spec.reference for spec in REGISTRY.values()]
    return [
        *((m, "validation") for m in (*requests, *refs)),
        *((m, "serialization") for m in answers),
    ]


# ``CancellationRequest`` narrowed to the deployment's providers (``document(providers=…)``).
CONFIGURED_REQUEST = "ConfiguredCancellationRequest"
# A callback URL the API accepts whatever its settings: https, and a host name (address
# literals may be refused as private; ``callbacks.check_url_form``).
_CALLBACK_URL = {
    "type": "string",
    "format": "uri",
    "maxLength": 2083,
    "pattern": "^https://[a-z]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z]([a-z0-9-]{0,20}[a-z0-9])?)+"
    "(/[A-Za-z0-9._~-]*)*$",
}


def document(
    *,
    max_body_bytes: int,
    max_json_depth: int = 32,
    max_json_string_chars: int = 16 * 1024,
    providers: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API. ``providers`` (configured provider -> whether it
    has a callback secret) narrows the request body to what this deployment accepts: one
    variant per provider, with its own reference schema."""
    keys, defs = models_json_schema(_models(), ref_template=REF)
    schemas = defs.get("$defs", {})
    ref = {model: value["$ref"] for (model, _mode), value in keys.items()}
    request_body = {"$ref": ref[CancellationRequest]}
    if providers is not None:
        schemas[CONFIGURED_REQUEST] = _request_variants(
            schemas[CancellationRequest.__name__], providers
        )
        request_body = {"$ref": REF.format(model=CONFIGURED_REQUEST)}

    def body(model: type[BaseModel], description: str) -> dict[str, Any]:
        schema = request_body if model is CancellationRequest else {"$ref": ref[model]}
        return {
            "required": True,
            "description": f"{description} At most {max_body_bytes} bytes.",
            "content": {JSON: {"schema": schema}},
        }

    def answer(
        model: type[BaseModel] | None, description: str, **headers: dict[str, Any]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"description": description}
        if model is not None:
            out["content"] = {JSON: {"schema": {"$ref": ref[model]}}}
        if headers:
            out["headers"] = headers
        return out

    def errors(*codes: int) -> dict[str, Any]:
        out = {}
        for code in codes:
            item: dict[str, Any] = {
                "description": _ERRORS[code],
                "content": {PROBLEM_TYPE: {"schema": {"$ref": ref[Problem]}}},
            }
            if code == 429:
                item["headers"] = {
                    "Retry-After": {
                        "required": True,
                        "description": "seconds",
                        "schema": {"type": "integer", "minimum": 1},
                    }
                }
            if code == 401:
                item["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
            out[str(code)] = item
        return out

    def params(model: type[BaseModel]) -> list[dict[str, Any]]:
        return _query_parameters(schemas[model.__name__])

    job_id = {
        "name": "job_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": JOB_ID_RE.pattern},
        "example": "job_" + "0" * 32,
    }
    dl_id = {
        "name": "dl_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": DEAD_LETTER_ID_RE.pattern},
        "example": "dl_" + "0" * 32,
    }
    read = (401, 429)
    write = (401, 403, 429)
    public: list[dict[str, Any]] = []
    paths: dict[str, Any] = {
        "/v1/cancellations": {
            "post": {
                "operationId": "createCancellation",
                "summary": "Queue a cancellation",
                "description": (
                    "The same `idempotency_key` with the same body returns the same job "
                    "(`Cancelflow-Enqueue: existing`); with another body, 422 "
                    "(idempotency-key-reused). A request for a "
                    "subscription whose job is in flight joins it (`Cancelflow-Enqueue: joined`)."
                ),
                "requestBody": body(
                    CancellationRequest,
                    "`subscription` is the provider's reference (see the `*Ref` schemas).",
                ),
                "responses": {
                    "202": answer(
                        JobRecord,
                        "the job, with `how`: created, existing (a repeat) or joined",
                        Location={"required": True, "schema": {"type": "string"}},
                        **{
                            "Cancelflow-Enqueue": {
                                "required": True,
                                "schema": {
                                    "type": "string",
                                    "enum": ["created", "existing", "joined"],
                                },
                            }
                        },
                    ),
                    **errors(400, *write, 409, 413, 422),
                },
            },
            "get": {
                "operationId": "listCancellations",
                "summary": "List jobs, newest first",
                "description": (
                    "Filters combine. Follow `next_cursor` (with the same filters) until it is "
                    "null; a page may be short, even empty, while it is not."
                ),
                "parameters": params(JobQuery),
                "responses": {"200": answer(JobPage, "one page of jobs"), **errors(*read, 422)},
            },
        },
        "/v1/cancellations/{job_id}": {
            "get": {
                "operationId": "getCancellation",
                "summary": "A job: status, outcome, timeline, callback attempts",
                "parameters": [job_id],
                "responses": {"200": answer(JobRecord, "the job"), **errors(*read, 404)},
            },
        },
        "/v1/cancellations/{job_id}/decision": {
            "post": {
                "operationId": "decideCancellation",
                "summary": "The customer's answer to a retention offer",
                "parameters": [job_id],
                "requestBody": body(
                    Decision, "Accept (the job ends `retained`) or reject (it goes on to confirm)."
                ),
                "responses": {
                    "202": answer(JobRecord, "the job after the decision"),
                    **errors(400, *write, 404, 409, 413, 422),
                },
            },
        },
        "/v1/stats": {
            "get": {
                "operationId": "getStats",
                "summary": "Counts of recent jobs by provider and status; dead letters; billing",
                "description": (
                    "Jobs created since the start of the hour `since_s` seconds ago (at most 31 "
                    "days; `since` in the answer is that hour), by provider and current status. "
                    "Read from hourly counts the job store keeps as it creates and moves jobs: "
                    "at most 745 hashes, whatever the number of jobs, so the answer takes the "
                    "same time at 300,000 jobs as at 3. A job still counts after its record "
                    "expired; jobs created before the counts existed (an older version) do not."
                ),
                "parameters": params(StatsQuery),
                "responses": {"200": answer(Stats, "the counts"), **errors(*read, 422)},
            },
        },
        "/v1/billing-events": {
            "post": {
                "operationId": "postBillingEvent",
                "summary": "A billing event, mapped to a cancellation by the billing rules",
                "description": (
                    "Signed, not token-authenticated: `Cancelflow-Signature: t=<unix>,v1=<hex "
                    'HMAC-SHA256 of "<t>.<body>">` under the billing secret. The event id is the '
                    "idempotency key: a redelivered event returns its first job."
                ),
                "security": [{"billingSignature": []}],
                "requestBody": body(BillingEvent, "The event."),
                "responses": {
                    "200": answer(BillingResult, "no rule matches: ignored (and counted)"),
                    "202": answer(
                        BillingResult, "a job was created, or the event's job already exists"
                    ),
                    **errors(400, 401, 413, 429),
                    "422": {
                        "description": (
                            "not a billing event (not stored), or one that cannot make a valid "
                            "request (dead-lettered: `dead_letter_id`)"
                        ),
                        "content": {PROBLEM_TYPE: {"schema": {"$ref": ref[Problem]}}},
                    },
                    **errors(503),
                },
            },
        },
        "/v1/dead-letters": {
            "get": {
                "operationId": "listDeadLetters",
                "summary": "Dead letters, newest first",
                "parameters": params(DeadLetterQuery),
                "responses": {
                    "200": answer(DeadLetterPage, "the dead letters"),
                    **errors(*read, 422),
                },
            },
        },
        "/v1/dead-letters/{dl_id}": {
            "get": {
                "operationId": "getDeadLetter",
                "parameters": [dl_id],
                "responses": {"200": answer(DeadLetter, "the dead letter"), **errors(*read, 404)},
            },
            "delete": {
                "operationId": "deleteDeadLetter",
                "parameters": [dl_id],
                "responses": {"204": answer(None, "purged"), **errors(*write, 404)},
            },
        },
        "/v1/dead-letters/{dl_id}/replay": {
            "post": {
                "operationId": "replayDeadLetter",
                "parameters": [dl_id],
                "responses": {
                    "202": answer(Replayed, "replayed from the step it failed at"),
                    **errors(*write, 404, 409),
                },
            },
        },
        "/v1/providers": {
            "get": {
                "operationId": "listProviders",
                "summary": "Each configured provider's circuit breaker and calls in flight",
                "responses": {"200": answer(ProviderStates, "the providers"), **errors(*read)},
            },
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics: this API process's, and queue depths, dead "
                "letters and jobs awaiting a decision as read at this request",
                "responses": {
                    "200": {
                        "description": "the Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **errors(*read),
                },
            },
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "security": public,
                "responses": {"200": answer(Health, "alive")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "security": public,
                "responses": {"200": answer(Health, "Redis answers"), **errors(503)},
            },
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "security": public,
                "responses": {
                    "200": {
                        "description": "this document",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    }
                },
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Cancelflow",
            "version": "1",
            "description": (
                "Cancels subscriptions at third-party providers. "
                "Errors are `application/problem+json` (RFC 9457). "
                f"JSON bodies are at most {max_body_bytes} bytes, nested at most "
                f"{max_json_depth} deep, with strings of at most {max_json_string_chars} "
                "characters, in UTF-8 without lone surrogates (`CANCELFLOW_API__MAX_BODY_BYTES`, "
                "`__MAX_JSON_DEPTH`, `__MAX_JSON_STRING_CHARS`): else 400 (413 for the size). "
                "An unknown, repeated or malformed query parameter is 422 on every route. "
                "An id in a path that is not of its format is 404, as an unknown id is."
            ),
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`token` (read and write) or a read-only token",
                },
                "billingSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Cancelflow-Signature",
                },
            },
        },
    }


def _request_variants(schema: dict[str, Any], providers: Mapping[str, bool]) -> dict[str, Any]:
    """``CancellationRequest`` as one variant per configured provider: ``provider`` its key,
    ``subscription`` its reference, ``callback_url`` only where it has a callback secret."""
    variants = []
    for key, callbacks in sorted(providers.items()):
        variant = copy.deepcopy(schema)
        variant.pop("title", None)
        props = variant["properties"]
        props["provider"] = {"const": key}
        props["subscription"] = {"$ref": REF.format(model=REGISTRY[key].reference.__name__)}
        if callbacks:
            props["callback_url"] = {"anyOf": [_CALLBACK_URL, {"type": "null"}], "default": None}
        else:
            del props["callback_url"]
        variants.append(variant)
    return {
        "title": CONFIGURED_REQUEST,
        "description": "A CancellationRequest to a provider configured here.",
        "oneOf": variants,
    }


def _query_parameters(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Query parameters from a model's properties; ``X | None`` is just an optional ``X``."""
    required = set(schema.get("required", []))
    out = []
    for name, prop in schema.get("properties", {}).items():
        prop = copy.deepcopy(prop)
        for branch in prop.pop("anyOf", None) or []:
            if branch != {"type": "null"}:
                prop.update(branch)
        if "default" in prop and prop["default"] is None:
            del prop["default"]
        param: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": prop,
        }
        if prop.get("description"):
            param["description"] = prop["description"]
        if prop.get("type") == "array":
            param.update(style="form", explode=True)
        out.append(param)
    return out
