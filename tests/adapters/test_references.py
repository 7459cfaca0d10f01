"""Provider references that would change the request path are refused, for every provider.

Each identity field of each registry provider's reference model, given a value that could
leave its place in the request (a dot segment, a separator, an escape, a control character,
nothing at all), fails validation, which the API answers with 422 naming the field.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from cancelflow.providers import REGISTRY
from cancelflow.settings import Settings
from producers.submit import validate_request
from tests.contract.providers import contract_for
from tests.contract.support import settings_for

HOSTILE = [
    ".",
    "..",
    "...",  # normalised away by some servers: refused like the dot segments
    ". .",
    "a/b",
    "/",
    "..%2f..",
    "%2F",
    "%2e%2e",
    "a\\b",
    "",
    "   ",
    "a\nb",
    "a\x00b",
    "a\x7fb",
    "a?x=1",
    "a#frag",
]
KEYS = sorted(REGISTRY)


def identity_fields(key: str) -> tuple[str, ...]:
    reference = REGISTRY[key].reference
    return reference.identity_fields or tuple(reference.model_fields)


def success(key: str) -> dict[str, Any]:
    contract = contract_for(key)
    assert contract is not None
    return dict(contract.success)


@pytest.mark.parametrize("key", KEYS)
def test_the_demo_references_are_valid(key: str) -> None:
    REGISTRY[key].reference.model_validate(success(key))


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("key", KEYS)
def test_a_reference_that_would_change_the_request_is_refused(key: str, value: str) -> None:
    for name in identity_fields(key):
        with pytest.raises(ValidationError) as caught:
            REGISTRY[key].reference.model_validate({**success(key), name: value})
        assert caught.value.errors()[0]["loc"] == (name,)


@pytest.mark.parametrize("key", ["appdirect", "axelspringer"])
@pytest.mark.parametrize("value", ["a.b", "a..b", ".hidden", "..x", "A-1_2~x"])
def test_dots_inside_a_path_segment_are_fine(key: str, value: str) -> None:
    (name,) = identity_fields(key)
    REGISTRY[key].reference.model_validate({**success(key), name: value})


@pytest.mark.parametrize("key", KEYS)
def test_the_api_validation_names_the_field(key: str) -> None:
    """What the API answers 422 with: the field under ``subscription``."""
    settings = Settings(
        providers={k: settings_for(k, "http://127.0.0.1:9").model_dump() for k in KEYS}
    )
    name = identity_fields(key)[0]
    body = {"provider": key, "subscription": {**success(key), name: ".."}}
    errors = validate_request(body, settings)
    assert isinstance(errors, list), errors
    assert [e["field"] for e in errors] == [f"subscription.{name}"]
    ok = validate_request({"provider": key, "subscription": success(key)}, settings)
    assert not isinstance(ok, list), ok
