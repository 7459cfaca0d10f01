"""Verification of two-legged OAuth 1.0 HMAC-SHA1 requests (consumer key and secret, no token).

The signature is recomputed with oauthlib's RFC 5849 functions, the same code clients sign with,
so the sandbox accepts exactly what a correct client sends and nothing hand-rolled can drift.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

from oauthlib import common
from oauthlib.oauth1.rfc5849 import signature

from sandboxes.tokens import Clock

# How far oauth_timestamp may be from the server's clock, either way (seconds).
TIMESTAMP_WINDOW_S = 300


class OAuth1Rejected(Exception):
    """The request's OAuth 1.0 signature is missing or unacceptable; the message says why."""


class OAuth1Verifier:
    """Checks consumer key, signature method, timestamp, nonce uniqueness and signature."""

    def __init__(self, consumers: Mapping[str, str], *, clock: Clock) -> None:
        self._consumers = consumers  # consumer key -> consumer secret
        self._clock = clock
        # Nonces seen, with when each can be forgotten: once its timestamp is out of the window,
        # the timestamp check alone refuses a replay.
        self._nonces: set[tuple[str, str]] = set()
        self._nonce_expiries: collections.deque[tuple[float, tuple[str, str]]] = collections.deque()

    def verify(
        self, *, method: str, url: str, authorization: str | None, form_body: str | None
    ) -> str:
        """The consumer key of a correctly signed request; raises OAuth1Rejected otherwise.

        `url` is the absolute URL as the client requested it, query string included;
        `form_body` is the body when it is form-encoded (its parameters are signed too).
        """
        if not authorization or not authorization.lower().startswith("oauth "):
            raise OAuth1Rejected("Missing OAuth Authorization header")
        query = url.partition("?")[2]
        try:
            params = signature.collect_parameters(
                uri_query=query,
                body=form_body,
                headers={"Authorization": authorization},
                exclude_oauth_signature=False,
            )
        except ValueError:
            raise OAuth1Rejected("Malformed OAuth parameters") from None
        oauth: dict[str, str] = dict(param for param in params if param[0].startswith("oauth_"))
        consumer_key = oauth.get("oauth_consumer_key", "")
        secret = self._consumers.get(consumer_key)
        if secret is None:
            raise OAuth1Rejected("Unknown consumer key")
        if oauth.get("oauth_signature_method") != "HMAC-SHA1":
            raise OAuth1Rejected("oauth_signature_method must be HMAC-SHA1")
        if oauth.get("oauth_version", "1.0") != "1.0":
            raise OAuth1Rejected("oauth_version must be 1.0")
        if "oauth_token" in oauth:
            raise OAuth1Rejected("Two-legged OAuth: no oauth_token expected")
        timestamp = self._timestamp(oauth.get("oauth_timestamp", ""))
        nonce = oauth.get("oauth_nonce", "")
        if not nonce:
            raise OAuth1Rejected("Missing oauth_nonce")

        # oauthlib's own verifier, fed the way its endpoints feed it: every parameter but the
        # signature, and the absolute URL (base_string_uri drops default ports and the query).
        request = common.Request(url, http_method=method.upper(), body=form_body)
        request.params = [param for param in params if param[0] != "oauth_signature"]
        request.signature = oauth.get("oauth_signature", "")
        if not signature.verify_hmac_sha1(request, client_secret=secret):
            raise OAuth1Rejected("Invalid signature")
        self._remember_nonce(consumer_key, nonce, timestamp)
        return consumer_key

    def _timestamp(self, raw: str) -> float:
        try:
            timestamp = int(raw)
        except ValueError:
            raise OAuth1Rejected("Missing or malformed oauth_timestamp") from None
        if abs(self._clock() - timestamp) > TIMESTAMP_WINDOW_S:
            raise OAuth1Rejected("oauth_timestamp is too old or too far in the future")
        return float(timestamp)

    def _remember_nonce(self, consumer_key: str, nonce: str, timestamp: float) -> None:
        now = self._clock()
        while self._nonce_expiries and self._nonce_expiries[0][0] < now:
            self._nonces.discard(self._nonce_expiries.popleft()[1])
        key = (consumer_key, nonce)
        if key in self._nonces:
            raise OAuth1Rejected("oauth_nonce has already been used")
        self._nonces.add(key)
        # Past this moment the timestamp check alone refuses a replay.
        self._nonce_expiries.append((timestamp + TIMESTAMP_WINDOW_S, key))
