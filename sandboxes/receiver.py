"""A callback receiver, mounted at `/receiver` by the sandbox server: a stand-in for a
producer's endpoint that verifies, records and deduplicates Cancelflow's callbacks.

Point a job (or a provider's `CALLBACK_URL`) at `http://HOST:PORT/receiver/events`.
Each POST is verified as the Standard Webhooks specification says, with its reference library
(`standardwebhooks.Webhook.verify` on the `webhook-id`, `webhook-timestamp` and
`webhook-signature` headers), against each configured secret (by default
`DEMO_CALLBACK_SECRET`, which `sandboxes.env.provider_env` gives every provider), and answered
as a careful receiver would:

- bad or stale signature (older or newer than `tolerance_s`, at most the library's 5 minutes):
  400 (the sender dead-letters it);
- an event id seen before: 200 again, nothing recorded twice (deduplication by event id);
- otherwise: 200, and the event is kept.

Control routes (never faulted):

- `GET /receiver/_events[?job_id=…]`: `{"events": [accepted events, once each], "requests":
  [every request: event id, type, job id, verified, error, status answered, duplicate,
  traceparent]}`
- `PUT /receiver/_control`: replace the behaviour (fields left out go back to defaults):
  `{"fail_next": 2, "status": 503}` answers the next 2 requests 503; `{"down": true}`
  drops every connection unanswered; `delay_ms`, `retry_after_s`, `secrets`, `tolerance_s`.
- `GET /receiver/_control`, `POST /receiver/_reset` (forget everything, defaults back).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from cancelflow.providers.base import callback_secret_key

KEY = "receiver"
EVENTS_PATH = "/events"
# whsec_ + base64(b"cancelflow-demo-callback-secret!"): a demo's, not for anything real.
DEMO_CALLBACK_SECRET = "whsec_Y2FuY2VsZmxvdy1kZW1vLWNhbGxiYWNrLXNlY3JldCE="
# standardwebhooks.Webhook.verify refuses timestamps more than 5 minutes off, whatever we say.
LIBRARY_TOLERANCE_S = 300


def _whsec(value: str) -> str:
    callback_secret_key(value)  # the senders' own rule, so the two can never disagree
    return value


WebhookSecret = Annotated[str, AfterValidator(_whsec)]


class ReceiverControl(BaseModel):
    """How the receiver behaves; `PUT /receiver/_control` replaces it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Answer the next N requests with `status` (then behave again).
    fail_next: int = Field(default=0, ge=0)
    status: int = Field(default=503, ge=300, le=599)
    # Sent with the failing answers, when set.
    retry_after_s: int | None = Field(default=None, ge=0)
    # Close every connection without an answer, as a receiver that is down would.
    down: bool = False
    # Wait this long before answering (to exceed the sender's timeout).
    delay_ms: float = Field(default=0, ge=0, le=120_000)
    secrets: list[WebhookSecret] = Field(
        default_factory=lambda: [DEMO_CALLBACK_SECRET], min_length=1
    )
    tolerance_s: int = Field(default=LIBRARY_TOLERANCE_S, ge=0, le=LIBRARY_TOLERANCE_S)


@dataclass
class Received:
    """One request, as the receiver saw it."""

    at: float
    status: int
    event_id: str | None = None
    event_type: str | None = None
    job_id: str | None = None
    verified: bool = False
    duplicate: bool = False
    error: str | None = None
    # The W3C trace context the request came with, if any (docs/tracing.md).
    traceparent: str | None = None


class Receiver:
    """What the receiver got, and how it is told to behave."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.control = ReceiverControl()
        self._failures_left = 0
        self.requests: list[Received] = []
        self.events: dict[str, dict[str, Any]] = {}

    def configure(self, control: ReceiverControl) -> None:
        self.control = control
        self._failures_left = control.fail_next

    def take_failure(self) -> bool:
        """Whether this request is one of the `fail_next` to fail."""
        if self._failures_left <= 0:
            return False
        self._failures_left -= 1
        return True

    def fail(self, body: bytes, headers: Mapping[str, str]) -> Received:
        """Record a request answered with the failure the receiver was told to give."""
        seen = _received(body, status=self.control.status, error="told to fail")
        seen.traceparent = headers.get("traceparent")
        self.requests.append(seen)
        return seen

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Received:
        """Verify, deduplicate and keep one delivery; what the receiver answers."""
        seen = _received(body, status=200)
        seen.traceparent = headers.get("traceparent")
        error = verify(body, headers, self.control.secrets, tolerance_s=self.control.tolerance_s)
        if error is not None:
            seen.status, seen.error = 400, error
        else:
            seen.verified = True
            if not seen.event_id:
                seen.status, seen.error = 400, "no event id"
            elif seen.event_id in self.events:
                seen.duplicate = True
            else:
                self.events[seen.event_id] = json.loads(body)
        self.requests.append(seen)
        return seen

    def snapshot(self, job_id: str | None = None) -> dict[str, Any]:
        def wanted(job: Any) -> bool:
            return job_id is None or job == job_id

        return {
            "events": [e for e in self.events.values() if wanted(_job_id(e))],
            "requests": [asdict(r) for r in self.requests if wanted(r.job_id)],
        }


RECEIVER = web.AppKey("receiver", Receiver)


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secrets: list[str],
    *,
    tolerance_s: int = LIBRARY_TOLERANCE_S,
    now: float | None = None,
) -> str | None:
    """None when the Standard Webhooks signature holds under one of ``secrets``, else why not."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        sent_at = int(lowered.get("webhook-timestamp", ""))
    except ValueError:
        return "WebhookVerificationError: no webhook-timestamp, or not Unix seconds"
    if abs((time.time() if now is None else now) - sent_at) > tolerance_s:
        return f"WebhookVerificationError: timestamp more than {tolerance_s}s from now"
    errors = []
    for secret in secrets:
        try:
            Webhook(secret).verify(body, lowered, json_parse=False)
        except (WebhookVerificationError, ValueError) as exc:
            # ValueError: a signature header the library cannot split or decode.
            errors.append(f"{type(exc).__name__}: {exc}")
        else:
            return None
    return errors[0] if len(set(errors)) == 1 else "; ".join(errors)


def _received(body: bytes, *, status: int, error: str | None = None) -> Received:
    """What a request body says of itself (nothing if it is not a JSON object)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    event = parsed if isinstance(parsed, dict) else {}
    return Received(
        at=time.time(),
        status=status,
        event_id=_str(event.get("id")),
        event_type=_str(event.get("type")),
        job_id=_job_id(event),
        error=error,
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _job_id(event: dict[str, Any]) -> str | None:
    data = event.get("data")
    return _str(data.get("job_id")) if isinstance(data, dict) else None


def create_app(receiver: Receiver | None = None) -> web.Application:
    """The receiver sub-application (mount it at `/receiver`)."""
    app = web.Application()
    app[RECEIVER] = state = receiver or Receiver()

    async def events(request: web.Request) -> web.StreamResponse:
        control = state.control
        if control.down:
            # No answer at all: the sender sees the connection drop.
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=503)
        if control.delay_ms:
            await asyncio.sleep(control.delay_ms / 1000)
        body = await request.read()
        if state.take_failure():
            headers = {"Retry-After": str(control.retry_after_s)} if control.retry_after_s else {}
            state.fail(body, request.headers)
            return web.json_response(
                {"error": "told to fail"}, status=control.status, headers=headers
            )
        seen = state.accept(body, request.headers)
        answer = {"received": seen.event_id, "duplicate": seen.duplicate}
        if seen.error:
            answer = {"error": seen.error}
        return web.json_response(answer, status=seen.status)

    async def list_events(request: web.Request) -> web.Response:
        return web.json_response(state.snapshot(request.query.get("job_id")))

    async def get_control(request: web.Request) -> web.Response:
        return web.json_response(state.control.model_dump(mode="json"))

    async def put_control(request: web.Request) -> web.Response:
        text = await request.text()
        try:
            control = ReceiverControl.model_validate_json(text or "{}")
        except ValidationError as exc:
            errors = json.loads(exc.json(include_url=False))
            return web.json_response({"error": "invalid body", "errors": errors}, status=422)
        state.configure(control)
        return web.json_response(control.model_dump(mode="json"))

    async def reset(request: web.Request) -> web.Response:
        state.reset()
        return web.json_response({"reset": True})

    app.router.add_post(EVENTS_PATH, events)
    app.router.add_get("/_events", list_events)
    app.router.add_get("/_control", get_control)
    app.router.add_put("/_control", put_control)
    app.router.add_post("/_reset", reset)
    return app
