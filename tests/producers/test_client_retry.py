"""The client's retry policy: a pure decision, tested as a table (randomness fixed)."""

from __future__ import annotations

import email.utils

import pytest

from cancelflow_client import (
    ApiError,
    CancelflowClient,
    Conflict,
    NotFound,
    Problem,
    RateLimited,
    RetryPolicy,
    ServerError,
    TransportError,
    error_for,
    parse_retry_after,
)
from producers.local import free_port

POLICY = RetryPolicy(retries=6, total_s=60, backoff_s=0.2, max_backoff_s=5, max_retry_after_s=30)


def api_error(status: int, retry_after: str | None = None) -> ApiError:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    body = Problem(title="x", status=status).model_dump_json().encode()
    return error_for(status, body, headers)


def refused() -> TransportError:
    return TransportError("GET /x: ConnectionRefusedError", sent=False)


def reset() -> TransportError:
    return TransportError("POST /x: ConnectionResetError", sent=True)


@pytest.mark.parametrize(
    ("error", "attempt", "elapsed_s", "retry_safe", "expected"),
    [
        # 503 with Retry-After: never sooner, plus up to a tenth of it as jitter (rand=1).
        (api_error(503, "5"), 0, 0.0, True, 5.5),
        (api_error(503, "5"), 0, 0.0, False, 5.5),  # the API did nothing: any call retries
        (api_error(429, "2"), 3, 10.0, False, 2.2),
        # 503 without Retry-After (a proxy's): the jittered backoff, doubling, capped.
        (api_error(503), 0, 0.0, True, 0.2),
        (api_error(502), 2, 0.0, True, 0.8),
        (api_error(504), 5, 0.0, True, 5.0),
        # A Retry-After past what the caller would wait: give up at once.
        (api_error(503, "31"), 0, 0.0, True, None),
        # Bounded: by attempts, and by total time (no wait that would end past it).
        (api_error(503, "5"), 6, 0.0, True, None),
        (api_error(503, "5"), 1, 55.0, True, None),
        (api_error(503, "5"), 1, 54.0, True, 5.5),
        # Network errors: refused is always safe; reset only for calls safe to repeat.
        (refused(), 0, 0.0, False, 0.2),
        (reset(), 1, 0.0, True, 0.4),
        (reset(), 1, 0.0, False, None),
        # Answers that a retry cannot change.
        (api_error(500), 0, 0.0, True, None),
        (api_error(404), 0, 0.0, True, None),
        (api_error(409), 0, 0.0, True, None),
    ],
)
def test_retry_policy(
    error: Exception, attempt: int, elapsed_s: float, retry_safe: bool, expected: float | None
) -> None:
    delay = POLICY.delay(
        error, attempt=attempt, elapsed_s=elapsed_s, retry_safe=retry_safe, rand=lambda: 1.0
    )
    assert delay == (pytest.approx(expected) if expected is not None else None)


def test_jitter_spreads_waits_between_retry_after_and_a_tenth_more() -> None:
    error = api_error(503, "10")
    low = POLICY.delay(error, attempt=0, elapsed_s=0, retry_safe=True, rand=lambda: 0.0)
    high = POLICY.delay(error, attempt=0, elapsed_s=0, retry_safe=True, rand=lambda: 0.999)
    assert low == 10.0
    assert high is not None and 10.99 < high < 11.0


def test_error_types_and_retry_after_from_header_or_body() -> None:
    assert isinstance(api_error(503, "7"), ServerError)
    assert api_error(503, "7").retry_after_s == 7.0
    limited = error_for(
        429, Problem(title="x", status=429, retry_after=0.4).model_dump_json().encode()
    )
    assert isinstance(limited, RateLimited) and limited.retry_after == 0.4
    assert isinstance(api_error(404), NotFound) and isinstance(api_error(409), Conflict)


def test_parse_retry_after() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == pytest.approx(30.0)
    assert parse_retry_after(date, now=1_000_100) == 0.0


def test_giving_up_names_the_host_and_the_attempts() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = CancelflowClient(url, "t", retries=2, backoff_s=0.01)
    with pytest.raises(TransportError) as err:
        client.get("job_x")
    assert f"no answer from {url} (3 attempts over" in str(err.value)
    assert err.value.sent is False
