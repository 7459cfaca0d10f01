"""What follows from the registry for the throwaway provider: run only with its plugin, by
``tests/contract/test_adding_a_provider.py`` (the name is no ``test_*.py``: a plain run does
not collect it)."""

from __future__ import annotations

import pytest

from cancelflow.settings import load_settings
from messaging.config import queues
from producers import openapi
from producers.submit import validate_request
from sandboxes.env import provider_env
from tests.contract.throwaway.provider import KEY, ThrowawaySettings
from tests.contract.throwaway.sandbox import DEMO, DEMO_API_KEY


def test_its_settings_are_read_from_its_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in provider_env("http://127.0.0.1:9").items():
        monkeypatch.setenv(name, value)
    assert provider_env("http://127.0.0.1:9")["CANCELFLOW_PROVIDERS__THROWAWAY__API_KEY"] == (
        DEMO_API_KEY
    )
    conf = load_settings().provider(KEY)
    assert isinstance(conf, ThrowawaySettings)
    assert conf.api_key.get_secret_value() == DEMO_API_KEY
    assert str(conf.base_url) == f"http://127.0.0.1:9/{KEY}"


def test_it_has_its_own_queue() -> None:
    assert f"cancellations.{KEY}" in {q.name for q in queues()}


def test_the_api_validates_its_reference() -> None:
    settings = load_settings(providers={KEY: {"base_url": "http://x.test", "api_key": "k"}})
    body = {"provider": KEY, "reason": {"code": "PRICE"}}
    accepted = validate_request({**body, "subscription": {"member_id": DEMO.active}}, settings)
    assert not isinstance(accepted, list), accepted
    refused = validate_request({**body, "subscription": {"member": DEMO.active}}, settings)
    assert isinstance(refused, list)
    assert {e["field"] for e in refused} >= {"subscription.member_id", "subscription.member"}


def test_the_openapi_document_describes_its_reference() -> None:
    schemas = openapi.document(max_body_bytes=4096)["components"]["schemas"]
    mapping = schemas["CancellationRequest"]["discriminator"]["mapping"]
    variant = schemas[mapping[KEY].rsplit("/", 1)[1]]
    assert variant["properties"]["subscription"] == {"$ref": "#/components/schemas/ThrowawayRef"}
    assert "member_id" in schemas["ThrowawayRef"]["properties"]
