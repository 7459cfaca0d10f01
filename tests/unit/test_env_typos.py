"""A ``CANCELFLOW_*`` variable nothing reads is reported with the closest one that is read;
the client's, the tests' and the chaos runs' variables are known; the client's old names are
still read, with a warning."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import structlog

from cancelflow.errors import ConfigError
from cancelflow.logging import configure_logging
from cancelflow.settings import (
    CLIENT_ENV_NAMES,
    load_settings,
    settings_env_names,
    unknown_env,
    warn_unknown_env,
)
from cancelflow_client import CLIENT_ENV, ClientSettings


def test_typos_are_reported_with_the_closest_name() -> None:
    found = unknown_env(
        {
            "CANCELFLOW_REDIS_ULR": "redis://x",
            "CANCELFLOW_WORKER__CONCURENCY": "8",
            "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_ID": "known",
            "CANCELFLOW_REDIS_URL": "known",
            "HOME": "not ours",
        }
    )
    assert found == [
        ("CANCELFLOW_REDIS_ULR", "CANCELFLOW_REDIS_URL"),
        ("CANCELFLOW_WORKER__CONCURENCY", "CANCELFLOW_WORKER__CONCURRENCY"),
    ]


def test_known_variables_of_others_are_not_reported() -> None:
    env = dict.fromkeys(
        [
            *CLIENT_ENV_NAMES,
            "CANCELFLOW_TEST_REDIS",
            "CANCELFLOW_CHAOS_JOBS",
            "CANCELFLOW_CHAOS_REPORT",
            "BENCH_JOBS",
            "CANCELFLOW_BILLING_STREAM",  # the server's flat alias
            "CANCELFLOW_WORKER",  # a whole group, as JSON
            "CANCELFLOW_PROVIDERS__PAYWAY",
        ],
        "v",
    )
    assert unknown_env(env) == []


def test_every_nested_variable_is_known() -> None:
    names = settings_env_names()
    assert {
        "CANCELFLOW_API_TOKENS",
        "CANCELFLOW_API__MAX_BODY_BYTES",
        "CANCELFLOW_BILLING__SECRET_PREVIOUS",
        "CANCELFLOW_PROVIDERS__AZOTTE__BASE_URL",
        "CANCELFLOW_CALLBACKS__ALLOWED_HOSTS",
    } <= names


def test_the_client_list_is_the_clients_own() -> None:
    assert {name for pair in CLIENT_ENV.values() for name in pair} == CLIENT_ENV_NAMES


def test_each_unknown_variable_gets_a_warning_without_its_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(fmt="json", level="INFO")
    try:
        warn_unknown_env(
            {"CANCELFLOW_REDIS_ULR": "redis://:hunter2@db", "CANCELFLOW_API_TOKEN": "x"}
        )
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    lines = [json.loads(s) for s in capsys.readouterr().err.strip().splitlines()]
    assert [(x["message"], x["level"], x["variable"], x["did_you_mean"]) for x in lines] == [
        ("settings.unknown_variable", "warning", "CANCELFLOW_REDIS_ULR", "CANCELFLOW_REDIS_URL")
    ]
    assert "hunter2" not in json.dumps(lines)


def test_the_client_reads_its_new_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANCELFLOW_CLIENT__URL", "http://new:1")
    monkeypatch.setenv("CANCELFLOW_CLIENT__TOKEN", "tok")
    monkeypatch.setenv("CANCELFLOW_CLIENT__RETRIES", "2")
    conf = ClientSettings.from_env()
    assert conf.api_url == "http://new:1" and conf.api_retries == 2
    assert conf.api_token is not None and conf.api_token.get_secret_value() == "tok"


def test_old_client_names_are_read_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANCELFLOW_API_URL", "http://old:1")
    monkeypatch.setenv("CANCELFLOW_API_TOKEN", "old-tok")
    with pytest.warns(FutureWarning) as warned:
        conf = ClientSettings.from_env()
    assert conf.api_url == "http://old:1"
    assert conf.api_token is not None and conf.api_token.get_secret_value() == "old-tok"
    messages = sorted(str(w.message) for w in warned)
    assert messages == [
        "CANCELFLOW_API_TOKEN is deprecated: set CANCELFLOW_CLIENT__TOKEN",
        "CANCELFLOW_API_URL is deprecated: set CANCELFLOW_CLIENT__URL",
    ]
    assert "old-tok" not in " ".join(messages)
    # The new name wins, and nothing is said about the old one then.
    monkeypatch.setenv("CANCELFLOW_CLIENT__URL", "http://new:1")
    monkeypatch.delenv("CANCELFLOW_API_TOKEN")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ClientSettings.from_env().api_url == "http://new:1"


def test_a_misspelt_nested_variable_stops_start_up_naming_the_right_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CANCELFLOW_WORKER__CONCURENCY", "8")
    with pytest.raises(
        ConfigError,
        match=r"CANCELFLOW_WORKER__CONCURENCY: .*\(did you mean "
        r"CANCELFLOW_WORKER__CONCURRENCY\?\)",
    ):
        load_settings()
