"""``/openapi.json``: the API described by the pydantic models that validate its requests and
shape its answers (``model_json_schema``), so the document cannot drift from the code."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any, get_args

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from cancelflow.contract import JOB_ID_RE, CancellationRequest, Decision, JobRecord
from cancelflow.dead_letters import DeadLetter
from cancelflow.endpoints import ENDPOINT_ID_RE, MAX_ENDPOINTS, WebhookEndpoint
from cancelflow.providers import REGISTRY
from cancelflow.settings import BillingScheme
from producers import openapi_examples as ex
from producers.billing_auth import STANDARD_WEBHOOKS_HEADERS, STRIPE_HEADER
from producers.problems import PROBLEM_TYPE
from producers.problems import Problem as ProblemType
from producers.schemas import (
    DEAD_LETTER_ID_RE,
    BillingEvent,
    BillingResult,
    DeadLetterPage,
    DeadLetterQuery,
    EndpointCreate,
    EndpointPage,
    EndpointSecret,
    EndpointUpdate,
    Health,
    JobPage,
    JobQuery,
    JobSummary,
    Problem,
    ProviderStates,
    Replayed,
    SecretRotation,
    Stats,
    StatsQuery,
)
from producers.signatures import SIGNATURE_HEADER
from producers.submit import IDEMPOTENCY_HEADER

JSON = "application/json"
# producers.api's header (which imports this module): the same, as a test checks.
REQUEST_ID_HEADER = "Request-Id"
REF = "#/components/schemas/{model}"

_ERRORS = {
    400: "the body is not JSON within the limits (nesting, string sizes, UTF-8), or a header "
    "is not UTF-8",
    401: "no token, or not one of ours",
    403: "the token is read-only",
    404: "no such job, dead letter or webhook endpoint (an id not of the format also names none)",
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
        EndpointCreate,
        EndpointUpdate,
        SecretRotation,
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
        WebhookEndpoint,
        EndpointPage,
        EndpointSecret,
    ]
    refs = [spec.reference for spec in REGISTRY.values()]
    return [
        *((m, "validation") for m in (*requests, *refs)),
        *((m, "serialization") for m in answers),
    ]


# A callback URL the API accepts whatever its settings: https, and a host name (address
# literals may be refused as private; ``callbacks.check_url_form``).
_CALLBACK_URL = {
    "type": "string",
    "format": "uri",
    "maxLength": 2083,
    "pattern": "^https://[a-z]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z]([a-z0-9-]{0,20}[a-z0-9])?)+"
    "(/[A-Za-z0-9._~-]*)*$",
}
# Timestamps the API writes (``contract.isoformat``: RFC 3339, UTC, milliseconds): every string
# property of an answer named so. Request models' timestamps are ``datetime`` fields, which
# pydantic already gives ``format: date-time``; a billing event's ``created_at`` is the billing
# system's own text, kept as sent, so it gets none.
_TIMESTAMP_NAME = re.compile(r"^(at|since|.+_at|.+_deadline)$")
# The security requirement of each kind of route.
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
_PUBLIC: list[dict[str, Any]] = []
_SCHEME_NAMES: dict[str, str] = {
    "cancelflow": "cancelflowSignature",
    "standard-webhooks": "standardWebhooks",
    "stripe": "stripeSignature",
}
# What ``/docs/assets/`` serves (``producers.docs_page``): Swagger UI's files, and our script.
DOCS_VENDORED = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png")
DOCS_ASSETS = (*DOCS_VENDORED, "cancelflow-docs.js")


# What ``submit.header_key`` accepts, exactly (a schemathesis run sends what lies outside it
# and expects a refusal): around optional blanks, either 1-255 printable ASCII characters with
# no blank at either end, not starting with a quote; or an RFC 8941 string, ``"…"``, of 1-255
# printable ASCII characters, ``\\"`` and ``\\\\`` escaped (another backslash is itself).
IDEMPOTENCY_KEY_PATTERN = (
    r'^[ \t]*(?:[!#-~](?:[ -~]{0,253}[!-~])?|"(?:\\["\\]|\\(?!["\\])|[ !#-\[\]-~]){1,255}")[ \t]*$'
)


def variant_name(provider: str) -> str:
    """The component of ``provider``'s request: ``PaywayCancellationRequest``, …"""
    return REGISTRY[provider].reference.__name__.removesuffix("Ref") + "CancellationRequest"


def document(
    *,
    max_body_bytes: int,
    max_json_depth: int = 32,
    max_json_string_chars: int = 16 * 1024,
    providers: Mapping[str, bool] | None = None,
    billing_schemes: Sequence[BillingScheme] | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API. ``providers`` (configured provider -> whether it
    has a callback secret) narrows the request body to what this deployment accepts (by default
    every provider of the registry); either way ``CancellationRequest`` is one schema per
    provider, discriminated by ``provider``, each with its own reference schema.
    ``billing_schemes``: the billing signatures accepted (by default all three)."""
    keys, defs = models_json_schema(_models(), ref_template=REF)
    schemas = defs.get("$defs", {})
    ref = {model: value["$ref"] for (model, _mode), value in keys.items()}
    schemas.update(_request_variants(schemas[CancellationRequest.__name__], providers))
    for answer_model in (JobRecord, JobSummary):
        schemas[answer_model.__name__]["properties"]["subscription"] = _any_reference()
    if providers is not None:
        # As a deployment's document narrows ``callback_url`` (``_request_variants``), an
        # endpoint's URL is held to what a callback URL may be (``callbacks.check_url_form``).
        schemas[EndpointCreate.__name__]["properties"]["url"] = _CALLBACK_URL
        schemas[EndpointUpdate.__name__]["properties"]["url"] = {
            "anyOf": [_CALLBACK_URL, {"type": "null"}],
            "default": None,
        }
    for name, schema in schemas.items():
        if name != BillingEvent.__name__:
            _mark_timestamps(schema)
    request_body = {"$ref": ref[CancellationRequest]}
    schemes = list(get_args(BillingScheme)) if billing_schemes is None else list(billing_schemes)
    signed: list[dict[str, list[str]]] = [{_SCHEME_NAMES[s]: []} for s in schemes]

    def body(model: type[BaseModel], description: str, example: Any) -> dict[str, Any]:
        schema = request_body if model is CancellationRequest else {"$ref": ref[model]}
        return {
            "required": True,
            "description": f"{description} At most {max_body_bytes} bytes.",
            "content": {JSON: {"schema": schema, "example": example}},
        }

    def answer(
        model: type[BaseModel] | None,
        description: str,
        example: Any = None,
        **headers: dict[str, Any],
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"description": description}
        if model is not None:
            out["content"] = {JSON: {"schema": {"$ref": ref[model]}, "example": example}}
        out["headers"] = {**headers, REQUEST_ID_HEADER: {"$ref": "#/components/headers/RequestId"}}
        return out

    def errors(*codes: int, **kinds: tuple[ProblemType, str]) -> dict[str, Any]:
        """The problem answers of ``codes``; ``kinds`` (``e401=(type, detail)``) names the
        example's problem type where it is not the status's usual one."""
        out = {}
        for code in codes:
            example = ex.problem(code, *kinds.get(f"e{code}", (None, None)))
            item: dict[str, Any] = {
                "description": _ERRORS[code],
                "content": {PROBLEM_TYPE: {"schema": {"$ref": ref[Problem]}, "example": example}},
                "headers": {REQUEST_ID_HEADER: {"$ref": "#/components/headers/RequestId"}},
            }
            if code in (429, 503):
                item["headers"]["Retry-After"] = {
                    "required": code == 429,
                    "description": "seconds",
                    "schema": {"type": "integer", "minimum": 1},
                }
            if code == 401 and "e401" not in kinds:
                item["headers"]["WWW-Authenticate"] = {"schema": {"type": "string"}}
            out[str(code)] = item
        return out

    def params(model: type[BaseModel]) -> list[dict[str, Any]]:
        return _query_parameters(schemas[model.__name__])

    job_id = {
        "name": "job_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": JOB_ID_RE.pattern},
        "example": ex.JOB_ID,
    }
    dl_id = {
        "name": "dl_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": DEAD_LETTER_ID_RE.pattern},
        "example": ex.DL_ID,
    }
    endpoint_id = {
        "name": "endpoint_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": f"^{ENDPOINT_ID_RE.pattern}$"},
        "example": ex.ENDPOINT_ID,
    }
    idempotency_key = {
        "name": IDEMPOTENCY_HEADER,
        "in": "header",
        "required": False,
        "description": (
            "draft-ietf-httpapi-idempotency-key-header: the same as the body's "
            "`idempotency_key` (both may be given, equal; different, 400 "
            'idempotency-key-mismatch). A bare value or an RFC 8941 string (`"…"`).'
        ),
        "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
        "example": "order-81723-cancel",
    }
    request_id = {"$ref": "#/components/parameters/RequestId"}
    read = (401, 429)
    write = (401, 403, 429)
    paths: dict[str, Any] = {
        "/v1/cancellations": {
            "post": {
                "operationId": "createCancellation",
                "summary": "Queue a cancellation",
                "description": (
                    "The same idempotency key (`Idempotency-Key` or `idempotency_key`) with the "
                    "same body returns the same job (`Cancelflow-Enqueue: existing`); with "
                    "another body, 422 (idempotency-key-reused). A request for a subscription "
                    "whose job is in flight joins it (`Cancelflow-Enqueue: joined`). The body is "
                    "one schema per provider, chosen by `provider`."
                ),
                "security": _BEARER,
                "parameters": [idempotency_key, request_id],
                "requestBody": body(
                    CancellationRequest,
                    "`subscription` is the provider's reference (see the `*Ref` schemas).",
                    ex.cancellation_request(),
                ),
                "responses": {
                    "202": answer(
                        JobRecord,
                        "the job, with `how`: created, existing (a repeat) or joined",
                        ex.created_job(),
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
                "security": _BEARER,
                "parameters": [*params(JobQuery), request_id],
                "responses": {
                    "200": answer(JobPage, "one page of jobs", ex.job_page()),
                    **errors(*read, 422),
                },
            },
        },
        "/v1/cancellations/{job_id}": {
            "get": {
                "operationId": "getCancellation",
                "summary": "A job: status, outcome, timeline, callback attempts",
                "security": _BEARER,
                "parameters": [job_id, request_id],
                "responses": {
                    "200": answer(JobRecord, "the job", ex.job_record()),
                    **errors(*read, 404),
                },
            },
        },
        "/v1/cancellations/{job_id}/decision": {
            "post": {
                "operationId": "decideCancellation",
                "summary": "The customer's answer to a retention offer",
                "security": _BEARER,
                "parameters": [job_id, request_id],
                "requestBody": body(
                    Decision,
                    "Accept (the job ends `retained`) or reject (it goes on to confirm).",
                    ex.decision(),
                ),
                "responses": {
                    "202": answer(JobRecord, "the job after the decision", ex.decided_job()),
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
                "security": _BEARER,
                "parameters": [*params(StatsQuery), request_id],
                "responses": {
                    "200": answer(Stats, "the counts", ex.stats()),
                    **errors(*read, 422),
                },
            },
        },
        "/v1/billing-events": {
            "post": {
                "operationId": "postBillingEvent",
                "summary": "A billing event, mapped to a cancellation by the billing rules",
                "description": (
                    "Signed, not token-authenticated, with any one of the schemes in "
                    "`security`: `Cancelflow-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "
                    '"<t>.<body>">`; Standard Webhooks (`webhook-id`, `webhook-timestamp`, '
                    '`webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`); '
                    "or Stripe's `Stripe-Signature` (a Stripe webhook endpoint posts here as it "
                    "is). A bad, missing, stale or unaccepted signature is 401 bad-signature, "
                    "with `scheme` and `reason`. The event id is the idempotency key: a "
                    "redelivered event returns its first job."
                ),
                "security": signed,
                "parameters": [request_id],
                "requestBody": body(BillingEvent, "The event.", ex.billing_event()),
                "responses": {
                    "200": answer(
                        BillingResult,
                        "no rule matches: ignored (and counted)",
                        ex.billing_result("ignored"),
                    ),
                    "202": answer(
                        BillingResult,
                        "a job was created, or the event's job already exists",
                        ex.billing_result(),
                    ),
                    **errors(
                        400,
                        401,
                        413,
                        429,
                        e401=(
                            ProblemType.BAD_SIGNATURE,
                            "Stripe-Signature: signed +412s ago (tolerance 300s)",
                        ),
                    ),
                    "422": {
                        "description": (
                            "not a billing event (not stored), or one that cannot make a valid "
                            "request (dead-lettered: `dead_letter_id`)"
                        ),
                        "content": {
                            PROBLEM_TYPE: {
                                "schema": {"$ref": ref[Problem]},
                                "example": {
                                    **ex.problem(
                                        422,
                                        ProblemType.INVALID_BILLING_EVENT,
                                        "the event cannot make a valid request; "
                                        "it is dead-lettered",
                                    ),
                                    "dead_letter_id": ex.DL_ID,
                                },
                            }
                        },
                        "headers": {REQUEST_ID_HEADER: {"$ref": "#/components/headers/RequestId"}},
                    },
                    **errors(503, e503=(ProblemType.BILLING_NOT_CONFIGURED, "set …")),
                },
            },
        },
        "/v1/dead-letters": {
            "get": {
                "operationId": "listDeadLetters",
                "summary": "Dead letters, newest first",
                "security": _BEARER,
                "parameters": [*params(DeadLetterQuery), request_id],
                "responses": {
                    "200": answer(DeadLetterPage, "the dead letters", ex.dead_letter_page()),
                    **errors(*read, 422),
                },
            },
        },
        "/v1/dead-letters/{dl_id}": {
            "get": {
                "operationId": "getDeadLetter",
                "summary": "A dead letter: the step, every attempt's error, the payload",
                "security": _BEARER,
                "parameters": [dl_id, request_id],
                "responses": {
                    "200": answer(DeadLetter, "the dead letter", ex.dead_letter()),
                    **errors(*read, 404),
                },
            },
            "delete": {
                "operationId": "deleteDeadLetter",
                "summary": "Purge a dead letter",
                "security": _BEARER,
                "parameters": [dl_id, request_id],
                "responses": {"204": answer(None, "purged"), **errors(*write, 404)},
            },
        },
        "/v1/dead-letters/{dl_id}/replay": {
            "post": {
                "operationId": "replayDeadLetter",
                "summary": "Replay a dead letter from the step it failed at",
                "security": _BEARER,
                "parameters": [dl_id, request_id],
                "responses": {
                    "202": answer(Replayed, "replayed from the step it failed at", ex.replayed()),
                    **errors(*write, 404, 409),
                },
            },
        },
        "/v1/webhook-endpoints": {
            "post": {
                "operationId": "createWebhookEndpoint",
                "summary": "Register a callback URL of your own, with its own secret",
                "description": (
                    "Every job's events whose type the filter names (all, when it is empty) "
                    "are sent to every enabled endpoint, signed with the endpoint's own "
                    "`whsec_` secret (Standard Webhooks), besides a job's own `callback_url`. "
                    "The secret is in this answer only: keep it. The URL is checked as a "
                    "`callback_url` is (https, no credentials, no internal address literal; "
                    "its host's addresses at each delivery). At most "
                    f"{MAX_ENDPOINTS} endpoints."
                ),
                "security": _BEARER,
                "parameters": [request_id],
                "requestBody": body(
                    EndpointCreate, "The URL, filter and rotation overlap.", ex.endpoint_create()
                ),
                "responses": {
                    "201": answer(
                        EndpointSecret,
                        "the endpoint, and its secret (shown this once)",
                        ex.endpoint_secret(),
                        Location={"required": True, "schema": {"type": "string"}},
                    ),
                    **errors(
                        400,
                        *write,
                        409,
                        413,
                        422,
                        e409=(ProblemType.TOO_MANY_ENDPOINTS, "at most 100 webhook endpoints"),
                    ),
                },
            },
            "get": {
                "operationId": "listWebhookEndpoints",
                "summary": "Every webhook endpoint, oldest first (no secrets)",
                "security": _BEARER,
                "parameters": [request_id],
                "responses": {
                    "200": answer(EndpointPage, "the endpoints", ex.endpoint_page()),
                    **errors(*read, 422),
                },
            },
        },
        "/v1/webhook-endpoints/{endpoint_id}": {
            "get": {
                "operationId": "getWebhookEndpoint",
                "summary": "A webhook endpoint: its filter, whether it is enabled (and why "
                "not), since when it has been failing",
                "security": _BEARER,
                "parameters": [endpoint_id, request_id],
                "responses": {
                    "200": answer(WebhookEndpoint, "the endpoint", ex.endpoint()),
                    **errors(*read, 404),
                },
            },
            "patch": {
                "operationId": "updateWebhookEndpoint",
                "summary": "Change an endpoint's URL, filter, overlap; enable or disable it",
                "description": "Only the fields given change. `enabled: true` re-enables a "
                "disabled endpoint and forgets its failures.",
                "security": _BEARER,
                "parameters": [endpoint_id, request_id],
                "requestBody": body(EndpointUpdate, "The fields to change.", {"enabled": False}),
                "responses": {
                    "200": answer(
                        WebhookEndpoint,
                        "the endpoint as it is now",
                        ex.endpoint(
                            enabled=False,
                            disabled_reason="disabled by an operator",
                            disabled_at=ex.UPDATED,
                        ),
                    ),
                    **errors(400, *write, 404, 413, 422),
                },
            },
            "delete": {
                "operationId": "deleteWebhookEndpoint",
                "summary": "Delete a webhook endpoint: it is sent nothing more",
                "security": _BEARER,
                "parameters": [endpoint_id, request_id],
                "responses": {"204": answer(None, "deleted"), **errors(*write, 404)},
            },
        },
        "/v1/webhook-endpoints/{endpoint_id}/rotate-secret": {
            "post": {
                "operationId": "rotateWebhookEndpointSecret",
                "summary": "A new secret for the endpoint; the old one still signs during "
                "the overlap",
                "description": (
                    "While the overlap lasts (`overlap_s`, default the endpoint's "
                    "`rotation_overlap_s`), every delivery carries two signatures in "
                    "`webhook-signature` (`v1,<new> v1,<old>`), so the receiver can move "
                    "to the new secret at its own pace. The new secret is in this answer only. "
                    "The body may be empty."
                ),
                "security": _BEARER,
                "parameters": [endpoint_id, request_id],
                "requestBody": {
                    **body(SecretRotation, "The overlap.", {"overlap_s": 3600}),
                    "required": False,
                },
                "responses": {
                    "200": answer(
                        EndpointSecret,
                        "the endpoint, and its new secret (shown this once)",
                        ex.endpoint_secret(rotated=True),
                    ),
                    **errors(400, *write, 404, 413, 422),
                },
            },
        },
        "/v1/providers": {
            "get": {
                "operationId": "listProviders",
                "summary": "Each configured provider's circuit breaker and calls in flight",
                "security": _BEARER,
                "parameters": [request_id],
                "responses": {
                    "200": answer(ProviderStates, "the providers", ex.provider_states()),
                    **errors(*read),
                },
            },
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics: this API process's, and queue depths, dead "
                "letters and jobs awaiting a decision as read at this request",
                "security": _BEARER,
                "parameters": [request_id],
                "responses": {
                    "200": {
                        "description": "the Prometheus text exposition format",
                        "content": {
                            "text/plain": {
                                "schema": {"type": "string"},
                                "example": (
                                    "# TYPE cancelflow_dead_letters gauge\n"
                                    "cancelflow_dead_letters 1.0\n"
                                ),
                            }
                        },
                        "headers": {REQUEST_ID_HEADER: {"$ref": "#/components/headers/RequestId"}},
                    },
                    **errors(*read),
                },
            },
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Alive (answers without Redis)",
                "security": _PUBLIC,
                "parameters": [request_id],
                "responses": {"200": answer(Health, "alive", ex.health())},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Ready: Redis answers",
                "security": _PUBLIC,
                "parameters": [request_id],
                "responses": {
                    "200": answer(Health, "Redis answers", ex.health(ready=True)),
                    **errors(
                        503, e503=(ProblemType.NOT_READY, "redis unreachable: ConnectionError")
                    ),
                },
            },
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "description": "Public, as `/docs` is: it holds no secret (see the info).",
                "security": _PUBLIC,
                "parameters": [request_id],
                "responses": {
                    "200": {
                        "description": "this document",
                        "content": {
                            JSON: {
                                "schema": {"type": "object"},
                                "example": {"openapi": "3.1.0", "info": {"title": "Cancelflow"}},
                            }
                        },
                        "headers": {REQUEST_ID_HEADER: {"$ref": "#/components/headers/RequestId"}},
                    }
                },
            },
        },
        "/docs": {
            "get": {
                "operationId": "docs",
                "summary": "This document as a page (Swagger UI, served from this API)",
                "security": _PUBLIC,
                "parameters": [request_id],
                "responses": {
                    "200": {
                        "description": "the page",
                        "content": {
                            "text/html": {
                                "schema": {"type": "string"},
                                "example": "<!doctype html><title>Cancelflow API</title>…",
                            }
                        },
                        "headers": {REQUEST_ID_HEADER: {"$ref": "#/components/headers/RequestId"}},
                    }
                },
            },
        },
        "/docs/assets/{name}": {
            "get": {
                "operationId": "docsAsset",
                "summary": "The page's scripts and styles (the vendored Swagger UI)",
                "security": _PUBLIC,
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": list(DOCS_ASSETS)},
                        "example": DOCS_ASSETS[0],
                    },
                    request_id,
                ],
                "responses": {
                    "200": {
                        "description": "the file",
                        "content": {
                            media: {"schema": {"type": "string"}, "example": example}
                            for media, example in (
                                ("text/css", ".swagger-ui{…}"),
                                ("text/javascript", "!function(e,t){…}"),
                                ("image/png", "(PNG bytes)"),
                            )
                        },
                        "headers": {REQUEST_ID_HEADER: {"$ref": "#/components/headers/RequestId"}},
                    },
                    **errors(404),
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
                "Every route takes a bearer token but the health checks, this document and its "
                "page (`/docs`: they describe the API and hold nothing secret: no token, "
                "secret or address, only which providers are configured, as `/readyz` says "
                "too) and `POST /v1/billing-events` (signed instead). "
                "Errors are `application/problem+json` (RFC 9457), each with a `type` of its "
                "own. Every answer carries `Request-Id` (the caller's, when well formed). "
                f"JSON bodies are at most {max_body_bytes} bytes, nested at most "
                f"{max_json_depth} deep, with strings of at most {max_json_string_chars} "
                "characters, in UTF-8 without lone surrogates (`CANCELFLOW_API__MAX_BODY_BYTES`, "
                "`__MAX_JSON_DEPTH`, `__MAX_JSON_STRING_CHARS`): else 400 (413 for the size). "
                "An unknown, repeated or malformed query parameter is 422 on every route. "
                "An id in a path that is not of its format is 404, as an unknown id is."
            ),
        },
        "security": _BEARER,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "parameters": {
                "RequestId": {
                    "name": REQUEST_ID_HEADER,
                    "in": "header",
                    "required": False,
                    "description": (
                        "your id for this request (1-128 printable ASCII characters): answered "
                        "in `Request-Id` and logged with every line the request causes; "
                        "anything else is replaced by one of ours"
                    ),
                    "schema": {"type": "string"},
                    "example": "req_7f3a9c",
                }
            },
            "headers": {
                "RequestId": {
                    "required": True,
                    "description": "the request's id: the caller's `Request-Id`, or a new one",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 128},
                }
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`token` (read and write) or a read-only token",
                },
                **{_SCHEME_NAMES[s]: _SIGNATURE_SCHEMES[s] for s in get_args(BillingScheme)},
            },
        },
    }


# Billing events' signatures (``producers.billing_auth``), as OpenAPI security schemes.
_SIGNATURE_SCHEMES: dict[str, dict[str, Any]] = {
    "cancelflow": {
        "type": "apiKey",
        "in": "header",
        "name": SIGNATURE_HEADER,
        "description": '`t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">` under '
        "CANCELFLOW_BILLING__SECRET",
    },
    "standard-webhooks": {
        "type": "apiKey",
        "in": "header",
        "name": STANDARD_WEBHOOKS_HEADERS[2],
        "description": "Standard Webhooks: `webhook-id`, `webhook-timestamp` and "
        '`webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">` under '
        "CANCELFLOW_BILLING__STANDARD_WEBHOOKS_SECRET",
    },
    "stripe": {
        "type": "apiKey",
        "in": "header",
        "name": STRIPE_HEADER,
        "description": "Stripe's `t=<unix>,v1=<hex>[,v1=…]` under "
        "CANCELFLOW_BILLING__STRIPE_SECRET (the endpoint's signing secret)",
    },
}


def _request_variants(
    schema: dict[str, Any], providers: Mapping[str, bool] | None
) -> dict[str, Any]:
    """``CancellationRequest`` as one schema per provider (every provider of the registry, or
    the configured ones), discriminated by ``provider``: each with ``provider`` its key,
    ``subscription`` its reference, and, when configured, ``callback_url`` only where the
    provider has a callback secret. The variants are components of their own; the returned
    mapping holds them and ``CancellationRequest``, their union."""
    keys = list(REGISTRY) if providers is None else [k for k in REGISTRY if k in providers]
    out: dict[str, Any] = {}
    for key in keys:
        name = variant_name(key)
        variant = copy.deepcopy(schema)
        variant["title"] = name
        variant["description"] = f"A cancellation at {key}."
        props = variant["properties"]
        props["provider"] = {"type": "string", "const": key}
        props["subscription"] = {"$ref": REF.format(model=REGISTRY[key].reference.__name__)}
        if providers is not None:
            if providers[key]:
                props["callback_url"] = {
                    "anyOf": [_CALLBACK_URL, {"type": "null"}],
                    "default": None,
                }
            else:
                del props["callback_url"]
        out[name] = variant
    out[CancellationRequest.__name__] = {
        "title": CancellationRequest.__name__,
        "description": (
            "What a producer asks for: one schema per provider, chosen by `provider`"
            + (" (the providers configured here)." if providers is not None else ".")
        ),
        "oneOf": [{"$ref": REF.format(model=name)} for name in out],
        "discriminator": {
            "propertyName": "provider",
            "mapping": {key: REF.format(model=variant_name(key)) for key in keys},
        },
    }
    return out


def _any_reference() -> dict[str, Any]:
    """A job's ``subscription``: the reference of its ``provider`` (any provider's, as the
    job store may hold jobs of a provider no longer configured)."""
    return {
        "description": "the request's `subscription`: the reference of the job's `provider`",
        "anyOf": [
            {"$ref": REF.format(model=spec.reference.__name__)} for spec in REGISTRY.values()
        ],
    }


def _mark_timestamps(schema: dict[str, Any]) -> None:
    """``format: date-time`` on every string property named as a timestamp."""
    for name, prop in schema.get("properties", {}).items():
        if not _TIMESTAMP_NAME.match(name):
            continue
        for branch in [prop, *prop.get("anyOf", [])]:
            if branch.get("type") == "string":
                branch.setdefault("format", "date-time")


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
        if name in ex.QUERY:
            param["example"] = ex.QUERY[name]
        if prop.get("type") == "array":
            param.update(style="form", explode=True)
        out.append(param)
    return out
