"""In-process result hooks: code that gets a provider's callback events without HTTP.

A hook is an async callable taking the event dict (the same body a callback URL gets)::

    from cancelflow.hooks import register_hook

    async def notify_billing(event: dict[str, Any]) -> None:
        await billing.subscription_ended(event["data"]["subscription"], event["type"])

    register_hook("payway", notify_billing)

Workers import the modules named in ``CANCELFLOW_CALLBACKS__HOOK_MODULES`` at start-up; each
registers its hooks at import. A job's hooks run in its callback step, each one tracked on
its own like the callback URL: a hook that raises is retried with backoff until the horizon,
then dead-lettered (raise ``HookRejected`` to dead-letter it at once). A hook never blocks
the URL delivery nor another hook, and never changes the job's outcome. Redelivery can run
a hook twice for one event: deduplicate by ``event["id"]``.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cancelflow.callbacks import CallbackRejected, CallbackRetryable
from cancelflow.errors import CancelflowError
from cancelflow.providers import REGISTRY

HookFn = Callable[[dict[str, Any]], Awaitable[None]]
ALL_PROVIDERS = "*"
# How a hook is named among a job's callback attempts (``CallbackAttempt.url``).
TARGET_PREFIX = "hook:"


class HookRejected(CancelflowError):
    """Raised by a hook that will never take this event: dead-letter it without retrying."""


@dataclass(frozen=True)
class Hook:
    provider: str
    name: str
    fn: HookFn
    # None: the callbacks' timeout (CANCELFLOW_CALLBACKS__TIMEOUT_S).
    timeout_s: float | None = None

    @property
    def target(self) -> str:
        return f"{TARGET_PREFIX}{self.name}"


_registry: dict[str, dict[str, Hook]] = {}


def register_hook(
    provider: str, fn: HookFn, *, name: str | None = None, timeout_s: float | None = None
) -> Hook:
    """Run ``fn`` on every callback event of ``provider`` ("*": every provider).

    ``name`` (default: the function's module and qualified name) identifies the hook in job
    records and dead letters: keep it stable. Registering a name again replaces the hook.
    """
    if provider != ALL_PROVIDERS and provider not in REGISTRY:
        raise ValueError(f"unknown provider {provider!r}; one of {sorted(REGISTRY)} or '*'")
    if not callable(fn):
        raise TypeError("a hook is an async callable taking the event dict")
    hook = Hook(provider, name or f"{fn.__module__}.{fn.__qualname__}", fn, timeout_s)
    _registry.setdefault(provider, {})[hook.name] = hook
    return hook


def unregister_hook(provider: str, name: str) -> None:
    """Remove a hook (tests, mostly)."""
    _registry.get(provider, {}).pop(name, None)


def registered() -> dict[str, list[Hook]]:
    """A snapshot of the registry: provider (or "*") -> its hooks."""
    return {provider: list(hooks.values()) for provider, hooks in _registry.items() if hooks}


def load(modules: Sequence[str]) -> dict[str, list[Hook]]:
    """Import the modules that register hooks; the registry's snapshot afterwards."""
    for module in modules:
        importlib.import_module(module)
    return registered()


def for_provider(hooks: Mapping[str, Sequence[Hook]], provider: str) -> list[Hook]:
    """The hooks that get ``provider``'s events: its own, then the ones for every provider."""
    found = {h.name: h for h in (*hooks.get(provider, ()), *hooks.get(ALL_PROVIDERS, ()))}
    return list(found.values())


async def run(hook: Hook, event: dict[str, Any], *, timeout_s: float) -> float:
    """Call the hook; its seconds on success. Errors come back as the callback errors:
    ``CallbackRejected`` for ``HookRejected``, ``CallbackRetryable`` for anything else."""
    limit = hook.timeout_s or timeout_s
    started = time.perf_counter()
    try:
        await asyncio.wait_for(hook.fn(event), timeout=limit)
    except HookRejected as exc:
        raise CallbackRejected(
            f"hook rejected the event: {exc}", elapsed_s=time.perf_counter() - started
        ) from exc
    except TimeoutError as exc:
        raise CallbackRetryable(
            f"hook did not finish within {limit:g}s", elapsed_s=time.perf_counter() - started
        ) from exc
    except Exception as exc:  # a hook's failure is the hook's, never the job's
        raise CallbackRetryable(
            f"hook raised {type(exc).__name__}: {exc}", elapsed_s=time.perf_counter() - started
        ) from exc
    return time.perf_counter() - started
