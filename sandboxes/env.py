"""Settings that point Cancelflow at the sandboxes, as ``CANCELFLOW_*`` variables."""

from __future__ import annotations

from sandboxes import appdirect, axelspringer, azotte, payway, receiver


def provider_env(sandbox_url: str) -> dict[str, str]:
    """Every sandbox provider configured with its demo credentials, under ``sandbox_url``."""
    base = sandbox_url.rstrip("/")
    env = {
        "CANCELFLOW_PROVIDERS__PAYWAY__BASE_URL": f"{base}/payway",
        "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_ID": payway.DEMO_CLIENT_ID,
        "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_SECRET": payway.DEMO_CLIENT_SECRET,
        "CANCELFLOW_PROVIDERS__AZOTTE__BASE_URL": f"{base}/azotte",
        "CANCELFLOW_PROVIDERS__AZOTTE__API_KEY": azotte.DEMO_API_KEY,
        "CANCELFLOW_PROVIDERS__AZOTTE__TENANT": azotte.DEMO_TENANT,
        "CANCELFLOW_PROVIDERS__APPDIRECT__BASE_URL": f"{base}/appdirect",
        "CANCELFLOW_PROVIDERS__APPDIRECT__CONSUMER_KEY": appdirect.DEMO_CONSUMER_KEY,
        "CANCELFLOW_PROVIDERS__APPDIRECT__CONSUMER_SECRET": appdirect.DEMO_CONSUMER_SECRET,
        "CANCELFLOW_PROVIDERS__AXELSPRINGER__BASE_URL": f"{base}/axelspringer/api/v1",
        "CANCELFLOW_PROVIDERS__AXELSPRINGER__TOKEN_URL": f"{base}/axelspringer/oauth2/token",
        "CANCELFLOW_PROVIDERS__AXELSPRINGER__CLIENT_ID": axelspringer.DEMO_CLIENT_ID,
        "CANCELFLOW_PROVIDERS__AXELSPRINGER__CLIENT_SECRET": axelspringer.DEMO_CLIENT_SECRET,
        "CANCELFLOW_PROVIDERS__AXELSPRINGER__PARTNER_ID": axelspringer.DEMO_PARTNER_ID,
    }
    # Every provider signs its callbacks with the secret the sandbox's receiver checks.
    for key in {name.split("__")[1] for name in env}:
        env[f"CANCELFLOW_PROVIDERS__{key}__CALLBACK_SECRET"] = receiver.DEMO_CALLBACK_SECRET
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
