"""Redaction on every provider's real answers: what the sandboxes send and receive.

A recording middleware keeps each request's headers and each answer's headers and JSON body
while the adapter checks and cancels a subscription; redacted, none of them may still carry
a credential (the settings' secrets, a token a sandbox issued, a signature).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from cancelflow.logging import REDACTED, redact
from cancelflow.providers import REGISTRY
from sandboxes.server import build_app
from tests.contract.providers import contract_for
from tests.contract.support import harness, job_for

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def recording_app(seen: list[dict[str, Any]]) -> web.Application:
    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        body: Any = None
        if isinstance(response, web.Response) and response.body is not None:
            try:
                body = json.loads(bytes(response.body))  # type: ignore[arg-type]
            except ValueError:
                body = None
        seen.append(
            {
                "request_headers": dict(request.headers),
                "response_headers": dict(response.headers),
                "body": body,
            }
        )
        return response

    app = build_app()
    app.middlewares.append(record)
    return app


def _leaves_under_secret_names(value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if str(k).lower() in {"access_token", "refresh_token", "id_token"}:
                out.append(str(v))
            _leaves_under_secret_names(v, out)
    elif isinstance(value, list):
        for v in value:
            _leaves_under_secret_names(v, out)


def strings(value: Any) -> list[str]:
    """Every key and leaf of ``value`` as text."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (str(k), *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [str(value)]


@pytest.mark.parametrize("key", sorted(REGISTRY))
async def test_redacted_sandbox_traffic_carries_no_credential(key: str) -> None:
    contract = contract_for(key)
    assert contract is not None
    seen: list[dict[str, Any]] = []
    async with harness(key, app=recording_app(seen), **contract.settings) as h:
        secrets = [
            value.get_secret_value()
            for name in type(h.settings).model_fields
            if isinstance(value := getattr(h.settings, name), SecretStr)
        ]
        _, job = await h.check(job_for(key, contract.success))
        await h.confirm(job)
    assert len(seen) >= 2, seen
    issued: list[str] = []
    for exchange in seen:
        _leaves_under_secret_names(exchange["body"], issued)
        # What the adapter sent: a bearer token, an API key, an OAuth 1 signature.
        issued += [
            v
            for k, v in exchange["request_headers"].items()
            if k.lower() in {"authorization", "x-api-key"}
        ]
    credentials = [s for s in [*secrets, *issued] if len(s) >= 6]
    assert credentials, "the test found no credential to look for"
    # The unredacted traffic does carry them (or this test would prove nothing) ...
    raw = strings(seen)
    assert any(c in s for c in credentials for s in raw)
    # ... and the redacted traffic does not, while what is not secret stays readable.
    for exchange in seen:
        redacted = strings(redact(exchange))
        leaked = [c for c in credentials for s in redacted if c in s]
        assert not leaked, (exchange, leaked)
        assert redact(exchange)["request_headers"].get("Host") == exchange["request_headers"].get(
            "Host"
        )
    authorised = [
        e
        for e in seen
        if any(k.lower() in {"authorization", "x-api-key"} for k in e["request_headers"])
    ]
    assert authorised
    for exchange in authorised:
        headers = redact(exchange["request_headers"])
        assert all(
            v == REDACTED for k, v in headers.items() if k.lower() in {"authorization", "x-api-key"}
        )
