"""Settings that point Cancelflow at the sandboxes, as ``CANCELFLOW_*`` variables."""

from __future__ import annotations

from sandboxes import receiver
from sandboxes.server import SANDBOXES


def provider_env(sandbox_url: str) -> dict[str, str]:
    """Every sandbox provider configured with its demo credentials, under ``sandbox_url``."""
    base = sandbox_url.rstrip("/")
    env = {}
    for key, spec in SANDBOXES.items():
        # Every provider signs its callbacks with the secret the sandbox's receiver checks.
        fields = {
            **spec.settings(f"{base}/{key}"),
            "callback_secret": receiver.DEMO_CALLBACK_SECRET,
        }
        for name, value in fields.items():
            env[f"CANCELFLOW_PROVIDERS__{key.upper()}__{name.upper()}"] = value
    return env
