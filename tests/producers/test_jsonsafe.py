"""cancelflow.jsonsafe: what it refuses and why, and that it changes nothing it accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cancelflow.jsonsafe import JsonLimits, JsonRejected, loads


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
        (b"[" * 33 + b"]" * 33, "too_deep"),
        (b'{"a": ' * 40 + b"1" + b"}" * 40, "too_deep"),
        (b'{"id": "e-\\ud800"}', "lone_surrogate"),
        (b'{"\\udfff": 1}', "lone_surrogate"),
        ('"\ud800"', "lone_surrogate"),
        (b'"\xed\xa0\x80"', "not_utf8"),
        (b"\xff\xfe{\x00}\x00", "not_utf8"),
        (b"{nope", "not_json"),
        (b"", "not_json"),
        (b"NaN", "not_json"),
        (b"[Infinity]", "not_json"),
        (b"1" * 5000, "not_json"),
        (b"[1e999]", "not_finite"),
        (b'"' + b"x" * 70_000 + b'"', "string_too_long"),
        (b" " * (1024 * 1024 + 1), "too_large"),
    ],
)
def test_refused(raw: bytes | str, reason: str) -> None:
    with pytest.raises(JsonRejected) as caught:
        loads(raw)
    assert caught.value.reason == reason
    str(caught.value).encode("ascii")  # safe to log: names places, never the content


def test_brackets_inside_strings_are_not_nesting() -> None:
    assert loads(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"{{{{"}') == {
        "a": "[" * 42 + '"{{{{'
    }
    assert loads(b"[" * 32 + b"]" * 32, JsonLimits(max_depth=32)) is not None


def test_a_surrogate_pair_is_one_character_not_a_lone_surrogate() -> None:
    assert loads(b'"\\ud83d\\ude00"') == "\U0001f600"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**100), max_value=10**100)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@given(json_values)
def test_whatever_it_accepts_it_reads_as_json_loads_does(value: Any) -> None:
    text = json.dumps(value)
    assert loads(text.encode()) == json.loads(text)
    assert loads(text) == json.loads(text)
