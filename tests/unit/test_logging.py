from __future__ import annotations

import json
import logging

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
    assert line["event"] == "provider.token.fetched"
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
