"""Canaries for the upstream internals Cancelflow overrides: each fails when an upgrade
changes the source of what it replaces or relies on. Then read the new upstream source, adapt
the override, and put the new hash here."""

from __future__ import annotations

import hashlib
import inspect
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from producers import http_refusals

ROOT = Path(__file__).resolve().parents[2]

# producers/http_refusals.py: what it overrides, and what its overrides rely on (the error
# handler ``start`` makes for a refused request, the record of a refusal it inspects).
AIOHTTP_SOURCES: dict[str, tuple[Any, str]] = {
    "RequestHandler.handle_error": (
        RequestHandler.handle_error,
        "94962ffef500c17222910ffeb4dc46ab273ed0bce8622472138f316d4a5cb1f6",
    ),
    "RequestHandler.data_received": (
        RequestHandler.data_received,
        "1ee57ebe052e6c80ced26c96e4ccb1223172e1d55afba460353c5e414914d3f6",
    ),
    "RequestHandler._make_error_handler": (
        RequestHandler._make_error_handler,
        "b73dcf1dd177a2437d6fc48ffdc9099ddd6212afb81bc23065b53bde4ea5fd1c",
    ),
    "_ErrInfo": (_ErrInfo, "0dc0301f961a8bf5af2dfe70b26f3a2b713819171c56b359e6d9b01807bc2dc1"),
    "Server.__call__": (
        web.Server.__call__,
        "c5700549e688b1642127dabf810686e87af8acb2be722a02847646ffd1b31401",
    ),
    "AppRunner._make_server": (
        web.AppRunner._make_server,
        "2d5358865abd00e34faa0ba952f8be77a51dfbb05c4175e6aabdb8c296228308",
    ),
}


@pytest.mark.parametrize("name", sorted(AIOHTTP_SOURCES))
def test_the_aiohttp_source_http_refusals_overrides_is_the_one_it_was_written_against(
    name: str,
) -> None:
    upstream, expected = AIOHTTP_SOURCES[name]
    digest = hashlib.sha256(inspect.getsource(upstream).encode()).hexdigest()
    assert digest == expected, (
        f"aiohttp {aiohttp.__version__} changed {name}: read it again and adapt "
        f"{http_refusals.__name__} before updating this hash"
    )


def test_aiohttp_is_pinned_to_the_minor_version_the_overrides_were_written_against() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [d for d in project["project"]["dependencies"] if d.startswith("aiohttp")]
    assert pins == ["aiohttp>=3.14,<3.15"]
    assert aiohttp.__version__.startswith("3.14.")


def test_the_overrides_are_what_the_api_runner_builds() -> None:
    # Each override is a method of the class the runner uses: a rename upstream (the method
    # no longer overriding anything) fails here rather than silently.
    for cls, method in (
        (http_refusals.ProblemRequestHandler, "handle_error"),
        (http_refusals.ProblemRequestHandler, "data_received"),
        (http_refusals.ProblemServer, "__call__"),
        (http_refusals.ProblemAppRunner, "_make_server"),
    ):
        base = cls.__mro__[1]
        assert method in vars(cls) and hasattr(base, method), (cls, method)
