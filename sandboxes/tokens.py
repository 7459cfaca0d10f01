"""Bearer tokens issued by a sandbox's token endpoint, with expiry and forced expiry."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable

DEFAULT_TOKEN_TTL_S = 3600

Clock = Callable[[], float]


@dataclasses.dataclass(frozen=True)
class Token:
    """What a token grants: to which client (and its tenant), which scopes, until when."""

    value: str
    client_id: str
    owner: str  # the client's organisation / partner: what the token may see
    scopes: frozenset[str]
    expires_at: float


class InvalidToken(Exception):
    """A presented token cannot be used; the message says why (missing, unknown, expired)."""


class TokenStore:
    """Issues opaque random tokens and answers whether a presented one is still valid."""

    def __init__(self, *, ttl_s: int, clock: Clock) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._tokens: dict[str, Token] = {}

    def issue(self, *, client_id: str, owner: str, scopes: frozenset[str] = frozenset()) -> Token:
        """A new token valid for `ttl_s` seconds from now."""
        token = Token(
            value=secrets.token_urlsafe(24),
            client_id=client_id,
            owner=owner,
            scopes=scopes,
            expires_at=self._clock() + self.ttl_s,
        )
        self._tokens[token.value] = token
        return token

    def check(self, value: str | None) -> Token:
        """The valid token behind `value`; raises InvalidToken saying why it is unusable."""
        if not value:
            raise InvalidToken("Access token is missing")
        token = self._tokens.get(value)
        if token is None:
            raise InvalidToken("Access token is invalid")
        if token.expires_at <= self._clock():
            raise InvalidToken("Access token has expired")
        return token

    def expire_all(self) -> int:
        """Make every issued token expired (kept, so clients see 'expired', not 'unknown')."""
        now = self._clock()
        for value, token in self._tokens.items():
            if token.expires_at > now:
                self._tokens[value] = dataclasses.replace(token, expires_at=now)
        return len(self._tokens)


def bearer_value(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None
