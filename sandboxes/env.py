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


def sandbox_env(sandbox_url: str) -> dict[str, str]:
    """What a server needs to run against the sandboxes by hand (``cancelflow sandbox
    --print-env``): every provider (``provider_env``), each one's result callbacks sent to the
    sandbox's receiver (which verifies their signatures), and plain-http loopback callbacks
    allowed."""
    base = sandbox_url.rstrip("/")
    env = provider_env(base)
    for key in sorted({name.split("__")[1] for name in env}):
        env[f"CANCELFLOW_PROVIDERS__{key}__CALLBACK_URL"] = f"{base}/receiver/events"
    host = base.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    env["CANCELFLOW_CALLBACKS__ALLOW_HTTP"] = "true"
    env["CANCELFLOW_CALLBACKS__ALLOWED_HOSTS"] = ",".join(dict.fromkeys([host, "127.0.0.1"]))
    return dict(sorted(env.items()))
