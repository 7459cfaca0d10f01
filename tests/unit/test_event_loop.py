"""The API's event loop (``api.event_loop``): uvloop's when installed, asyncio's on request or
when uvloop is missing, and a start-up error when uvloop is asked for and missing."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from cancelflow.errors import ConfigError
from cancelflow.settings import Settings
from producers.api import new_event_loop


def _loop(choice: str) -> asyncio.AbstractEventLoop:
    return new_event_loop(Settings(api={"event_loop": choice}))


def test_auto_runs_on_uvloop_when_it_is_installed() -> None:
    loop = _loop("auto")
    try:
        assert isinstance(loop, uvloop.Loop)
        assert loop.run_until_complete(asyncio.sleep(0, result="ran")) == "ran"
    finally:
        loop.close()


def test_asyncio_is_asyncio_s_own_loop() -> None:
    loop = _loop("asyncio")
    try:
        assert not isinstance(loop, uvloop.Loop)
        assert isinstance(loop, asyncio.BaseEventLoop)
    finally:
        loop.close()


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # ``import uvloop`` raises ImportError
    loop = _loop("auto")
    try:
        assert isinstance(loop, asyncio.BaseEventLoop) and not isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    with pytest.raises(ConfigError, match="CANCELFLOW_API__EVENT_LOOP: uvloop is not installed"):
        _loop("uvloop")


def test_another_loop_is_refused_by_the_settings() -> None:
    with pytest.raises(ValueError, match="event_loop"):
        Settings(api={"event_loop": "trio"})
