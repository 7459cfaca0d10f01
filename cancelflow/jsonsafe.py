"""Bounded JSON decoding for bytes from outside: an HTTP body, a stream entry, a message.

``loads`` returns plain JSON values (dict, list, str, int, float, bool, None) or raises one
``JsonRejected`` (a ``ValueError``) saying why, for anything that ``json.loads`` would choke on
or that would hurt whoever handles the value next:

  too_large        more than ``max_bytes`` bytes
  not_utf8         not UTF-8 (RFC 8259 section 8.1: JSON between systems is UTF-8)
  not_json         not JSON text, ``NaN`` or ``Infinity`` included (they are not JSON)
  too_deep         arrays and objects nested more than ``max_depth`` deep: checked on the
                   text before parsing, so the parser never recurses that far (``json.loads``
                   raises ``RecursionError`` around 1,000 levels, and a value that deep breaks
                   pydantic, ``json.dumps`` and ``repr`` later)
  string_too_long  a string (or object key) longer than ``max_string_chars`` characters
  lone_surrogate   a ``\\ud800``-style escape with no pair: a Python ``str`` that cannot be
                   encoded, so it fails in Redis, in hashing, in logging (RFC 8259 section 8.2)
  not_finite       a number too large for a float (``1e999``)

Messages name positions and paths, never the rejected content, so they are safe to log and to
answer with.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

Reason = Literal[
    "too_large",
    "not_utf8",
    "not_json",
    "too_deep",
    "string_too_long",
    "lone_surrogate",
    "not_finite",
]

# The default nesting limit: real events and requests are a few levels deep.
DEFAULT_MAX_DEPTH = 32

# A JSON string literal (escapes included), unrolled so long strings do not backtrack.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, kw_only=True)
class JsonLimits:
    max_bytes: int = 1024 * 1024
    max_depth: int = DEFAULT_MAX_DEPTH
    max_string_chars: int = 64 * 1024


class JsonRejected(ValueError):
    """The document is refused: ``reason`` is the kind, the message says where."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


def loads(raw: bytes | bytearray | memoryview | str, limits: JsonLimits | None = None) -> Any:
    """The JSON value of ``raw`` within ``limits``; ``JsonRejected`` otherwise."""
    limits = limits or JsonLimits()
    text = _text(raw, limits)
    _check_depth(text, limits.max_depth)
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except JsonRejected:
        raise
    except RecursionError:  # the depth check should make this impossible: still never crash
        raise JsonRejected("too_deep", "nested too deep to parse") from None
    except ValueError as exc:  # JSONDecodeError, and int() over its digit limit
        raise JsonRejected("not_json", f"not JSON: {exc}") from None
    _check_strings(value, limits.max_string_chars)
    return value


def _text(raw: bytes | bytearray | memoryview | str, limits: JsonLimits) -> str:
    if isinstance(raw, str):
        if len(raw) > limits.max_bytes:  # each character is at least one byte
            raise JsonRejected("too_large", f"over {limits.max_bytes} bytes")
        found = _SURROGATE.search(raw)
        if found:
            raise JsonRejected("lone_surrogate", f"a lone surrogate at character {found.start()}")
        if len(raw.encode()) > limits.max_bytes:
            raise JsonRejected("too_large", f"over {limits.max_bytes} bytes")
        return raw
    data = bytes(raw)
    if len(data) > limits.max_bytes:
        raise JsonRejected("too_large", f"{len(data)} bytes, over {limits.max_bytes}")
    try:
        return data.decode("utf-8")  # strict: refuses encoded surrogates (b"\xed\xa0\x80") too
    except UnicodeDecodeError as exc:
        raise JsonRejected("not_utf8", f"not UTF-8 at byte {exc.start}") from None


def _check_depth(text: str, max_depth: int) -> None:
    # Strings removed, every bracket left is structure (in valid JSON; in invalid JSON the
    # parser refuses the text anyway, and a wrong count only refuses it sooner).
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            if depth > max_depth:
                raise JsonRejected("too_deep", f"nested more than {max_depth} deep")
        else:
            depth -= 1


def _check_strings(value: Any, max_chars: int) -> None:
    # Iterative: the depth is bounded already, but a stack of our own costs nothing.
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            _check_string(node, path, max_chars)
        elif isinstance(node, dict):
            for key, item in node.items():
                _check_string(key, (*path, "(key)"), max_chars)
                stack.append((item, (*path, key)))
        elif isinstance(node, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(node))


def _check_string(s: str, path: tuple[str | int, ...], max_chars: int) -> None:
    if len(s) > max_chars:
        raise JsonRejected(
            "string_too_long", f"a string over {max_chars} characters at {_where(path)}"
        )
    if not s.isascii() and _SURROGATE.search(s):
        raise JsonRejected("lone_surrogate", f"a lone surrogate at {_where(path)}")


def _where(path: tuple[str | int, ...]) -> str:
    """A dotted path fit for a log line: keys shortened, anything unprintable escaped."""
    if not path:
        return "(document)"
    parts = []
    for part in path:
        text = str(part)
        text = text if len(text) <= 40 else text[:40] + "…"
        parts.append(text.encode("ascii", "backslashreplace").decode("ascii"))
    return ".".join(parts)


def _no_constant(name: str) -> Any:
    raise JsonRejected("not_json", f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRejected("not_finite", f"the number {text[:40]} is too large")
    return value
