"""Callbacks as the Standard Webhooks specification signs them, checked by its reference
library (``standardwebhooks``), and the ``whsec_`` secrets they are signed with."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import pytest
from aiohttp import ClientSession, web
from click.testing import CliRunner
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from cancelflow import callbacks
from cancelflow.errors import ConfigError
from cancelflow.settings import load_settings
from producers.cli import main
from producers.signatures import verify_signature
from sandboxes.receiver import DEMO_CALLBACK_SECRET, verify
from tests.callbacks.secrets import OTHER_SECRET, ROTATED

EVENT_ID = "evt_" + "a" * 32
EVENT: dict[str, Any] = {
    "id": EVENT_ID,
    "type": "cancellation.succeeded",
    "data": {"job_id": "job_1"},
}


def test_a_known_answer_from_the_specifications_libraries() -> None:
    # The example the Standard Webhooks libraries test against (python/tests/test_webhooks.py).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    got = callbacks.sign_standard("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, [secret])
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_reference_library_verifies_under_either_secret_while_rotating() -> None:
    body = callbacks.encode(EVENT)
    headers = callbacks.signature_headers(EVENT_ID, body, [ROTATED, DEMO_CALLBACK_SECRET])
    assert headers["webhook-id"] == EVENT["id"]
    assert headers["webhook-timestamp"].isdigit()
    assert [s.split(",")[0] for s in headers["webhook-signature"].split(" ")] == ["v1", "v1"]
    for held in (ROTATED, DEMO_CALLBACK_SECRET):
        assert Webhook(held).verify(body, headers) == EVENT
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(OTHER_SECRET).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(ROTATED).verify(body.replace(b"job_1", b"job_2"), headers)
    # The deprecated header, over the same timestamp, still verifies with the secret's text.
    t = int(headers["webhook-timestamp"])
    assert verify_signature(body, headers["Cancelflow-Signature"], [ROTATED]) == t


def test_the_signed_timestamp_cannot_be_replaced() -> None:
    body = callbacks.encode(EVENT)
    headers = callbacks.signature_headers(EVENT_ID, body, [ROTATED])
    replayed = {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) + 1)}
    with pytest.raises(WebhookVerificationError):
        Webhook(ROTATED).verify(body, replayed)
    other_id = {**headers, "webhook-id": "evt_" + "b" * 32}
    with pytest.raises(WebhookVerificationError):
        Webhook(ROTATED).verify(body, other_id)


def test_the_receiver_refuses_stale_timestamps_within_its_tolerance() -> None:
    body = callbacks.encode(EVENT)
    headers = callbacks.signature_headers(EVENT_ID, body, [ROTATED])
    t = int(headers["webhook-timestamp"])
    assert verify(body, headers, [OTHER_SECRET, ROTATED], now=t) is None
    assert verify(body, headers, [ROTATED], tolerance_s=10, now=t + 11) is not None
    assert verify(body, {**headers, "webhook-signature": "v1"}, [ROTATED]) is not None


def test_every_attempt_at_one_event_carries_the_same_webhook_id() -> None:
    seen: list[dict[str, str]] = []

    async def scenario() -> None:
        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            seen.append(dict(request.headers))
            Webhook(DEMO_CALLBACK_SECRET).verify(body, dict(request.headers))
            return web.Response(status=503 if len(seen) == 1 else 204)

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        try:
            async with ClientSession() as session:
                with pytest.raises(callbacks.CallbackRetryable):
                    await callbacks.deliver(
                        session, url, EVENT, secrets=[DEMO_CALLBACK_SECRET], timeout_s=5
                    )
                status, _, _ = await callbacks.deliver(
                    session, url, EVENT, secrets=[DEMO_CALLBACK_SECRET], timeout_s=5
                )
                assert status == 204
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    assert [h["webhook-id"] for h in seen] == [EVENT["id"], EVENT["id"]]


def _payway(**extra: Any) -> dict[str, Any]:
    return {
        "base_url": "https://payway.example.com",
        "client_id": "client",
        "client_secret": "client-secret",
        **extra,
    }


@pytest.mark.parametrize(
    "bad",
    [
        "whsec_cancelflow_demo_callback_secret",  # the old demo secret: not base64
        base64.b64encode(b"x" * 32).decode(),  # no whsec_ prefix
        "whsec_" + base64.b64encode(b"short").decode(),  # too few bytes
        "whsec_" + base64.b64encode(b"x" * 32).decode() + "!",
    ],
)
@pytest.mark.parametrize("field", ["callback_secret", "callback_secret_previous"])
def test_a_secret_that_is_not_whsec_base64_stops_start_up(field: str, bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(providers={"payway": _payway(**{field: bad})})
    message = str(err.value)
    assert f"CANCELFLOW_PROVIDERS__PAYWAY__{field.upper()}" in message
    assert bad not in message
    assert "cancelflow secret" in message


def test_a_secret_from_the_environment_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("CANCELFLOW_"):
            monkeypatch.delenv(key)
    for name, value in _payway(callback_secret="whsec_not base64").items():
        monkeypatch.setenv(f"CANCELFLOW_PROVIDERS__PAYWAY__{name.upper()}", value)
    with pytest.raises(ConfigError, match="CANCELFLOW_PROVIDERS__PAYWAY__CALLBACK_SECRET"):
        load_settings()


def test_cancelflow_secret_prints_a_secret_settings_and_the_library_accept() -> None:
    runner = CliRunner()
    first = runner.invoke(main, ["secret"])
    second = runner.invoke(main, ["secret", "--bytes", "64"])
    assert first.exit_code == 0 and second.exit_code == 0
    secret, longer = first.output.strip(), second.output.strip()
    assert secret != longer and secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert len(base64.b64decode(longer.removeprefix("whsec_"), validate=True)) == 64
    conf = load_settings(providers={"payway": _payway(callback_secret=secret)}).provider("payway")
    assert conf.callback_secret is not None
    body = callbacks.encode(EVENT)
    headers = callbacks.signature_headers(
        EVENT["id"], body, [conf.callback_secret.get_secret_value()]
    )
    assert Webhook(secret).verify(body, headers) == EVENT
    assert runner.invoke(main, ["secret", "--bytes", "16"]).exit_code != 0
