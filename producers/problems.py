"""RFC 9457 problem details: every API error is ``application/problem+json``."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError

PROBLEM_TYPE = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.Response(
        status=status, text=json.dumps(body), content_type=PROBLEM_TYPE, headers=headers
    )


def unavailable(
    detail: str, *, retry_after_s: int, title: str = "Service unavailable", **extra: Any
) -> web.Response:
    """503 with ``Retry-After`` (header, and ``retry_after`` in the body): try again later."""
    return problem(
        503,
        title,
        detail,
        headers={"Retry-After": str(retry_after_s)},
        retry_after=retry_after_s,
        **extra,
    )


def field_errors(
    exc: ValidationError, *, prefix: tuple[str | int, ...] = ()
) -> list[dict[str, str]]:
    """Each invalid field with its dotted path and what is wrong with it."""
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in (*prefix, *err["loc"])) or "(body)"
        out.append({"field": loc, "message": err["msg"]})
    return out


def invalid(errors: list[dict[str, str]]) -> web.Response:
    fields = ", ".join(e["field"] for e in errors)
    return problem(422, "Invalid request", f"invalid fields: {fields}", errors=errors)
