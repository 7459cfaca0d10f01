"""Console sessions: a signed cookie naming the API token it was opened with, and its CSRF token.

The cookie holds no secret of the token's, only a hash prefix of it (``who``), the session's
expiry and its CSRF token, signed with HMAC-SHA256. The key is ``api.console_secret`` when set;
otherwise one generated at start-up by each process, so sessions then end when the API restarts
and hold on the replica that opened them only. Each request checks again that the token is
still configured, and takes its scope from the configuration, not from the cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Literal

COOKIE = "cf_console"
# The sign-in form's CSRF token, before there is a session (double submit: cookie and field).
SIGNIN_COOKIE = "cf_console_signin"
LIFETIME_S = 8 * 3600

Scope = Literal["read", "write"]


@dataclass(frozen=True)
class Session:
    who: str
    scope: Scope
    csrf: str
    expires: int

    @property
    def can_act(self) -> bool:
        return self.scope == "write"


def token_id(secret: bytes | str) -> str:
    """What the console and the audit log call a token: a prefix of its SHA-256, never itself."""
    raw = secret.encode() if isinstance(secret, str) else secret
    return "token:" + hashlib.sha256(raw).hexdigest()[:12]


def signing_key(configured: str | None) -> bytes:
    """The HMAC key: derived from the setting, else random for this process."""
    if configured:
        return hashlib.sha256(b"cancelflow-console-session\0" + configured.encode()).digest()
    return secrets.token_bytes(32)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, body: str) -> str:
    return _b64(hmac.new(key, body.encode("ascii"), hashlib.sha256).digest())


def open_session(key: bytes, *, who: str, scope: Scope, now: float | None = None) -> str:
    """A new session's cookie value, with a fresh CSRF token, valid ``LIFETIME_S``."""
    expires = int((time.time() if now is None else now) + LIFETIME_S)
    payload = {"who": who, "scope": scope, "csrf": secrets.token_urlsafe(24), "exp": expires}
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    return f"{body}.{_mac(key, body)}"


def read_session(key: bytes, value: str | None, *, now: float | None = None) -> Session | None:
    """The session a cookie value holds; None when missing, forged, malformed or expired."""
    if not value or not value.isascii() or value.count(".") != 1:
        return None
    body, mac = value.split(".")
    if not hmac.compare_digest(_mac(key, body), mac):
        return None
    try:
        payload = json.loads(_unb64(body))
        session = Session(
            who=str(payload["who"]),
            scope="write" if payload["scope"] == "write" else "read",
            csrf=str(payload["csrf"]),
            expires=int(payload["exp"]),
        )
    except (ValueError, KeyError, TypeError):
        return None
    if session.expires <= (time.time() if now is None else now):
        return None
    return session


def csrf_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a form's CSRF token with the session's."""
    if not given or not given.isascii():
        return False
    return hmac.compare_digest(expected.encode(), given.encode())
