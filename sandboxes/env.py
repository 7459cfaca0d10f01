"""Settings that point Cancelflow at the sandboxes, as ``CANCELFLOW_*`` variables."""

from __future__ import annotations

from sandboxes import payway


def provider_env(sandbox_url: str) -> dict[str, str]:
    """Every sandbox provider configured with its demo credentials, under ``sandbox_url``."""
    base = sandbox_url.rstrip("/")
    env = {
        "CANCELFLOW_PROVIDERS__PAYWAY__BASE_URL": f"{base}/payway",
        "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_ID": payway.DEMO_CLIENT_ID,
        "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_SECRET": payway.DEMO_CLIENT_SECRET,
    }
    return env
