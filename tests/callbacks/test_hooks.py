"""The in-process hook registry."""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from cancelflow import hooks
from cancelflow.callbacks import CallbackRejected, CallbackRetryable


async def noop(event: dict[str, Any]) -> None:
    pass


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    saved = {p: dict(h) for p, h in hooks._registry.items()}
    hooks._registry.clear()
    yield
    hooks._registry.clear()
    hooks._registry.update(saved)


def test_register_names_hooks_and_checks_the_provider() -> None:
    hook = hooks.register_hook("payway", noop)
    assert hook.name == f"{__name__}.noop" and hook.target == f"hook:{__name__}.noop"
    with pytest.raises(ValueError, match="unknown provider"):
        hooks.register_hook("acme", noop)
    with pytest.raises(TypeError):
        hooks.register_hook("payway", "not callable")  # type: ignore[arg-type]


def test_a_provider_gets_its_own_hooks_and_those_for_every_provider() -> None:
    hooks.register_hook("payway", noop, name="billing")
    hooks.register_hook("*", noop, name="audit")
    hooks.register_hook("payway", noop, name="billing", timeout_s=2)  # replaces
    found = hooks.for_provider(hooks.registered(), "payway")
    assert [(h.name, h.timeout_s) for h in found] == [("billing", 2), ("audit", None)]
    assert [h.name for h in hooks.for_provider(hooks.registered(), "other")] == ["audit"]
    hooks.unregister_hook("payway", "billing")
    assert [h.name for h in hooks.for_provider(hooks.registered(), "payway")] == ["audit"]


def test_load_imports_the_modules_that_register() -> None:
    module = types.ModuleType("cancelflow_test_hooks_module")
    source = (
        "from cancelflow.hooks import register_hook\n"
        "async def h(e): pass\n"
        "register_hook('payway', h, name='from-module')\n"
    )
    exec(source, module.__dict__)  # noqa: S102 - a module made on the spot
    sys.modules[module.__name__] = module
    try:
        loaded = hooks.load([module.__name__])
    finally:
        del sys.modules[module.__name__]
    assert [h.name for h in loaded["payway"]] == ["from-module"]
    with pytest.raises(ModuleNotFoundError):
        hooks.load(["no.such.module"])


def test_run_maps_a_hook_s_failures_to_callback_errors() -> None:
    async def raises(exc: BaseException) -> None:
        raise exc

    async def slow(event: dict[str, Any]) -> None:
        await asyncio.sleep(5)

    def run(fn: Any, timeout_s: float = 1) -> float:
        return asyncio.run(hooks.run(hooks.Hook("payway", "h", fn), {}, timeout_s=timeout_s))

    async def naps(event: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)

    # The seconds the hook took: at least its 50 ms nap, and well short of the 1 s timeout.
    assert 0.05 <= run(naps) < 0.5
    with pytest.raises(CallbackRejected, match="no thanks"):
        run(lambda e: raises(hooks.HookRejected("no thanks")))
    with pytest.raises(CallbackRetryable, match="KeyError"):
        run(lambda e: raises(KeyError("x")))
    with pytest.raises(CallbackRetryable, match=r"within 0\.05s"):
        run(slow, timeout_s=0.05)
