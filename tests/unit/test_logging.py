from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from cancelflow.logging import REDACTED, configure_logging, get_logger, redact


def test_redact_replaces_secret_keys_recursively() -> None:
    data = {
        "access_token": "abc",
        "item": {"client_secret": "x", "ok": 1},
        "list": [{"Authorization": "Bearer y"}],
    }
    assert redact(data) == {
        "access_token": REDACTED,
        "item": {"client_secret": REDACTED, "ok": 1},
        "list": [{"Authorization": REDACTED}],
    }


def test_log_lines_are_json_with_context_and_without_secrets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(fmt="json", level="INFO")
    structlog.contextvars.bind_contextvars(job_id="job_1", provider="payway")
    try:
        get_logger("t").info(
            "provider.token.fetched", token="sekrit", response={"access_token": "sekrit2"}
        )
    finally:
        structlog.contextvars.clear_contextvars()
        logging.getLogger().handlers.clear()
        # The configuration writes to capsys's stream, closed after this test.
        structlog.reset_defaults()
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["message"] == "provider.token.fetched"
    assert line["job_id"] == "job_1" and line["provider"] == "payway"
    assert "sekrit" not in json.dumps(line)


def test_celery_task_lines_show_at_debug_only() -> None:
    # Two lines per task ("received", "succeeded in") that the steps' own lines cover.
    try:
        configure_logging(fmt="json", level="INFO")
        assert not logging.getLogger("celery.app.trace").isEnabledFor(logging.INFO)
        assert not logging.getLogger("celery.worker.strategy").isEnabledFor(logging.INFO)
        assert logging.getLogger("celery.app.trace").isEnabledFor(logging.WARNING)
        configure_logging(fmt="json", level="DEBUG")
        assert logging.getLogger("celery.app.trace").isEnabledFor(logging.INFO)
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()


@pytest.mark.parametrize(
    "key",
    [
        "refresh_token",
        "access_token",
        "apiKey",
        "api_key",
        "apikey",
        "X-Api-Key",
        "x-api-key",
        "oauth_signature",
        "Set-Cookie",
        "cookie",
        "Authorization",
        "proxy-authorization",
        "clientSecret",
        "CLIENT_SECRET",
        "password",
        "userPassword",
        "db.password",
        "auth",
        "X-Auth",
        "idToken",
        "sessionToken",
        "refreshtoken",
        "consumer_key",
        "privateKey",
        "callback_secret_previous",
    ],
)
def test_secret_keys_are_recognised_in_any_case_or_style(key: str) -> None:
    assert redact({key: "s3cr3t"}) == {key: REDACTED}


@pytest.mark.parametrize(
    "key",
    [
        "status",
        "subscription_id",
        "monkey",
        "author",
        "keyboard_layout",
        "expires_in",
        "token_name",
    ],
)
def test_ordinary_keys_pass(key: str) -> None:
    assert redact({key: "v"}) == {key: "v"}


def test_hostile_shapes_nested_lists_and_tuples() -> None:
    data = {
        "a": [[{"b": ({"refreshToken": "x1"}, {"ok": [1, 2, {"Set-Cookie": "x2"}]})}]],
        "apiKey": {"nested": "x3"},  # a secret key hides its whole value, whatever it is
        5: "not a string key",
    }
    assert redact(data) == {
        "a": [[{"b": [{"refreshToken": REDACTED}, {"ok": [1, 2, {"Set-Cookie": REDACTED}]}]}]],
        "apiKey": REDACTED,
        5: "not a string key",
    }
    assert data["apiKey"] == {"nested": "x3"}  # the input is not modified


def test_deep_nesting_is_redacted_without_recursion_error() -> None:
    depth = 50_000
    deep: Any = {"token": "x"}
    for _ in range(depth):
        deep = {"next": [deep]}
    out = redact(deep)
    for _ in range(depth):
        out = out["next"][0]
    assert out == {"token": REDACTED}


def test_a_huge_answer_is_redacted_in_linear_time() -> None:
    # 200,000 items: a quadratic walk would not end before the suite's per-test timeout.
    huge = {"items": [{"id": i, "apiKey": f"k{i}", "name": f"n{i}"} for i in range(200_000)]}
    out = redact(huge)
    assert out["items"][123_456] == {"id": 123_456, "apiKey": REDACTED, "name": "n123456"}
    assert "k199999" not in json.dumps(out)


def test_log_fields_are_redacted_by_pattern(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json", level="INFO")
    try:
        get_logger("t").info(
            "provider.http_response",
            refresh_token="sekrit1",
            apiKey="sekrit2",
            headers={"Set-Cookie": "sekrit3", "X-Api-Key": "sekrit4", "Accept": "json"},
            status=200,
        )
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert "sekrit" not in json.dumps(line)
    assert line["message"] == "provider.http_response" and line["status"] == 200
    assert line["headers"]["Accept"] == "json"


def test_keys_that_name_a_secret_without_holding_one_are_kept() -> None:
    answer = {
        "token_name": "crm",
        "token_type": "Bearer",
        "idempotency_key": "order-7",
        "oauth_signature_method": "HMAC-SHA1",
        "access_token": "s3cret",
        "oauth_signature": "abc",
    }
    assert redact(answer) == {
        "token_name": "crm",
        "token_type": "Bearer",
        "idempotency_key": "order-7",
        "oauth_signature_method": "HMAC-SHA1",
        "access_token": "[redacted]",
        "oauth_signature": "[redacted]",
    }


def test_json_lines_have_the_keys_collectors_read(capsys: pytest.CaptureFixture[str]) -> None:
    # Cloud Logging, Datadog and Loki read "message" (not structlog's "event"), "level",
    # an RFC 3339 "timestamp", and the logger's name, with no configuration of theirs.
    configure_logging(fmt="json", level="INFO")
    try:
        get_logger("cancelflow.t").info("job.enqueued", job_id="job_1")
        logging.getLogger("celery.worker").warning("from the stdlib")
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    ours, stdlib = (json.loads(s) for s in capsys.readouterr().err.strip().splitlines()[-2:])
    assert ours["message"] == "job.enqueued" and "event" not in ours
    assert ours["level"] == "info" and ours["logger"] == "cancelflow.t"
    assert ours["job_id"] == "job_1"
    assert stdlib["message"] == "from the stdlib" and stdlib["level"] == "warning"
    assert stdlib["logger"] == "celery.worker"
    for line in (ours, stdlib):
        stamp = line["timestamp"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", stamp), stamp
        parsed = datetime.fromisoformat(stamp)
        assert parsed.utcoffset() == timedelta(0)
        assert abs((datetime.now(UTC) - parsed).total_seconds()) < 60
