"""``producers.signatures.verify_signature``: what a receiver runs on every callback."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cancelflow.callbacks import sign
from producers.signatures import (
    MalformedSignature,
    SignatureError,
    SignatureMismatch,
    TimestampOutsideTolerance,
    verify_signature,
)

T = 1_700_000_000
BODY = b'{"id":"evt_0123","type":"cancellation.succeeded"}'


def test_a_good_signature_verifies_and_gives_its_timestamp() -> None:
    header = sign(BODY, ["secret"], timestamp=T)
    assert verify_signature(BODY, header, ["secret"], now=T + 10) == T


def test_while_rotating_either_secret_verifies() -> None:
    header = sign(BODY, ["new", "old"], timestamp=T)
    assert verify_signature(BODY, header, ["old"], now=T) == T
    assert verify_signature(BODY, header, ["new"], now=T) == T
    # A receiver may hold both too, while it rotates on its side.
    assert verify_signature(BODY, header, ["other", "new"], now=T) == T


@pytest.mark.parametrize(
    ("body", "secrets"),
    [
        (BODY.replace(b"succeeded", b"failed"), ["secret"]),  # tampered body
        (BODY + b" ", ["secret"]),  # re-serialised body
        (BODY, ["wrong"]),
    ],
)
def test_a_bad_signature_is_rejected(body: bytes, secrets: list[str]) -> None:
    header = sign(BODY, ["secret"], timestamp=T)
    with pytest.raises(SignatureMismatch):
        verify_signature(body, header, secrets, now=T)


def test_the_timestamp_is_signed_too() -> None:
    header = sign(BODY, ["secret"], timestamp=T).replace(f"t={T}", f"t={T + 1}")
    with pytest.raises(SignatureMismatch):
        verify_signature(BODY, header, ["secret"], now=T)


@pytest.mark.parametrize("offset", [301, -301, 86_400, -86_400])
def test_a_stale_or_future_timestamp_is_rejected(offset: int) -> None:
    header = sign(BODY, ["secret"], timestamp=T)
    with pytest.raises(TimestampOutsideTolerance):
        verify_signature(BODY, header, ["secret"], now=T + offset)


def test_the_tolerance_is_inclusive_and_configurable() -> None:
    header = sign(BODY, ["secret"], timestamp=T)
    assert verify_signature(BODY, header, ["secret"], now=T + 300) == T
    assert verify_signature(BODY, header, ["secret"], now=T - 300) == T
    with pytest.raises(TimestampOutsideTolerance):
        verify_signature(BODY, header, ["secret"], tolerance=5, now=T + 6)


def test_now_defaults_to_the_clock() -> None:
    assert verify_signature(BODY, sign(BODY, ["secret"]), ["secret"]) > 0
    with pytest.raises(TimestampOutsideTolerance):
        verify_signature(BODY, sign(BODY, ["secret"], timestamp=T), ["secret"])


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "t=,v1=abc",
        "t=abc,v1=abc",
        "t=-5,v1=abc",
        f"v1={'0' * 64}",
        f"t={T}",
        f"t={T},v0=abc",
        f"t={T},t={T},v1={'0' * 64}",
        f"t={T},,v1={'0' * 64}",
        f"t={T};v1={'0' * 64}",
    ],
)
def test_a_malformed_header_is_rejected(header: str | None) -> None:
    with pytest.raises(MalformedSignature):
        verify_signature(BODY, header, ["secret"], now=T)


def test_unknown_schemes_are_ignored_and_spaces_tolerated() -> None:
    good = sign(BODY, ["secret"], timestamp=T).split(",")[1].removeprefix("v1=")
    assert verify_signature(BODY, f"t={T}, v0=whatever, v1={good.upper()}", ["secret"], now=T) == T


def test_every_error_is_a_signature_error_and_a_value_error() -> None:
    for cls in (MalformedSignature, TimestampOutsideTolerance, SignatureMismatch):
        assert issubclass(cls, SignatureError) and issubclass(cls, ValueError)


def test_no_secret_is_a_programming_error() -> None:
    header = sign(BODY, ["secret"], timestamp=T)
    for secrets in ([], [""]):
        with pytest.raises(ValueError, match="secret") as err:
            verify_signature(BODY, header, secrets, now=T)
        assert not isinstance(err.value, SignatureError)


@given(
    body=st.binary(max_size=512), secret=st.text(min_size=1, max_size=40), flip=st.integers(0, 511)
)
def test_any_body_signed_verifies_and_any_changed_byte_does_not(
    body: bytes, secret: str, flip: int
) -> None:
    header = sign(body, [secret], timestamp=T)
    assert verify_signature(body, header, [secret], now=T) == T
    if body:
        i = flip % len(body)
        changed = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
        with pytest.raises(SignatureMismatch):
            verify_signature(changed, header, [secret], now=T)
