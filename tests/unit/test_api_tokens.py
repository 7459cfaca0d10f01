"""API token entries fail closed: each bad form stops start-up naming CANCELFLOW_API_TOKENS,
never quoting the entry; good ones get a name for logs and a namespace for their keys."""

from __future__ import annotations

import os

import pytest

from cancelflow.errors import ConfigError
from cancelflow.settings import load_settings, parse_token_entry
from producers.api import parse_tokens


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("CANCELFLOW_"):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize(
    "entry",
    [
        "s3cretA:Read",
        "s3cretA:ro",
        "s3cretA:WRITE",
        "a:s3cretA:read",
        "s3cretA:",
        "ops=s3cretA:admin",
        "=s3cretA",
        "bad name=s3cretA",
        "ops=",
        "ops=s3cretA=x",
    ],
)
def test_each_bad_form_is_refused_at_start_up_without_echoing_it(
    env: pytest.MonkeyPatch, entry: str
) -> None:
    env.setenv("CANCELFLOW_API_TOKENS", f"good-token,{entry}")
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert "CANCELFLOW_API_TOKENS" in message and "entry 2" in message
    assert "s3cretA" not in message


def test_a_name_or_secret_listed_twice_is_refused(env: pytest.MonkeyPatch) -> None:
    env.setenv("CANCELFLOW_API_TOKENS", "ops=one-secret,ops=other-secret")
    with pytest.raises(ConfigError, match=r"CANCELFLOW_API_TOKENS.*used twice"):
        load_settings()
    env.setenv("CANCELFLOW_API_TOKENS", "a=same-secret,b=same-secret:read")
    with pytest.raises(ConfigError, match="same secret") as err:
        load_settings()
    assert "same-secret" not in str(err.value)


def test_good_forms_parse_with_names_scopes_and_namespaces(env: pytest.MonkeyPatch) -> None:
    env.setenv("CANCELFLOW_API_TOKENS", "legacy-secret,ro-secret:read,ops=ops-secret:write")
    tokens = parse_tokens(load_settings())
    assert [(t.name, t.scope) for t in tokens] == [
        ("unnamed-1", "write"),
        ("unnamed-2", "read"),
        ("ops", "write"),
    ]
    assert tokens[2].namespace == "name:ops"
    # Unnamed: a hash of the secret (stable if the list is reordered), not the secret.
    assert tokens[0].namespace.startswith("sha256:")
    assert "legacy-secret" not in tokens[0].namespace
    assert parse_token_entry("billing-reader=abc:read").name == "billing-reader"
