"""No input makes a 5xx: hostile bytes, depths, encodings, sizes, ids, queries and headers, on
every route, each answered with a 4xx problem naming what is wrong, and the store unchanged.

The API under test is a real one (a subprocess on its own Redis DB, no worker) with billing
events on and a rate limit high enough never to answer first. "Unchanged" is the Redis keyspace
(every key but the rate limiter's, which counts every request by design), the dead-letter count
and the job count, read before and after each request.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote, urlsplit

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cancelflow.contract import JOB_ID_RE
from cancelflow.dead_letters import INDEX as DEAD_LETTERS
from cancelflow.dead_letters import DeadLetter, DeadLetterStore
from cancelflow.store import JOBS_INDEX, UNDISPATCHED
from producers.problems import PROBLEM_TYPE
from producers.ratelimit import PREFIX as RATE_LIMIT_PREFIX
from producers.schemas import DEAD_LETTER_ID_RE
from tests.fixtures.system import StartSystem
from tests.producers.test_api import _event, payway_body, signed
from tests.support import System

pytestmark = pytest.mark.integration

# Bounded and deterministic: the same examples on every run, in well under a minute.
FUZZ = settings(
    max_examples=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Target:
    """The API, and what it holds before the hostile requests: a job and a dead letter, so
    that ids naming their neighbouring keys (``<job>:timeline``, ``index``) have keys to hit."""

    system: System
    job_id: str
    dead_letter_id: str


@pytest.fixture(scope="session")
def target(start_system: StartSystem, billing_rules_path: Any) -> Iterator[Target]:
    system = start_system(
        workers=0,
        isolated=True,
        CANCELFLOW_API__RATE_LIMIT_PER_S="100000",
        CANCELFLOW_API__RATE_LIMIT_BURST="100000",
        CANCELFLOW_BILLING__RULES_PATH=str(billing_rules_path),
        CANCELFLOW_BILLING__SECRET="whsec_test_billing",
    )
    status, job = system.post("/v1/cancellations", payway_body())
    assert status == 202, job
    client = redis.Redis.from_url(system.redis_url)
    try:
        # The API marks a job dispatched after its answer (one write for many jobs): wait for
        # that write, or it would land inside a request's before/after reading.
        deadline = time.monotonic() + 30
        while client.zscore(UNDISPATCHED, job["id"]) is not None:
            assert time.monotonic() < deadline, "the job was never marked dispatched"
            time.sleep(0.05)
        dead = DeadLetterStore.add_sync(
            client, DeadLetter(kind="poison", error_type="Seeded", error="a seeded entry")
        )
    finally:
        client.close()
    yield Target(system, job["id"], dead.id)


# --- requests and the store ------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: Any


def send(
    system: System,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str | bytes] | None = None,
    *,
    token: bool = True,
) -> Answer:
    """One request with exactly these bytes (``path`` already percent-encoded)."""
    parts = urlsplit(system.api_url)
    conn = http.client.HTTPConnection(str(parts.hostname), parts.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        sent: dict[str, str | bytes] = {}
        if token:
            sent["Authorization"] = f"Bearer {system.token}"
        sent.update(headers or {})
        if body is not None:
            sent.setdefault("Content-Type", "application/json")
            sent["Content-Length"] = str(len(body))
        for name, value in sent.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        raw = resp.read()
        content_type = resp.getheader("Content-Type", "")
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        return Answer(resp.status, content_type, parsed)
    finally:
        conn.close()


def stored(system: System) -> tuple[frozenset[bytes], int, int]:
    """Every key but the rate limiter's, the dead-letter count and the job count."""
    client = redis.Redis.from_url(system.redis_url)
    try:
        keys = frozenset(
            k for k in client.scan_iter(count=1000) if not k.startswith(RATE_LIMIT_PREFIX.encode())
        )
        dead_letters = cast("int", client.zcard(DEAD_LETTERS))
        return keys, dead_letters, cast("int", client.zcard(JOBS_INDEX))
    finally:
        client.close()


def refused(target: Target, expected: set[int], method: str, path: str, **kw: Any) -> Answer:
    """Send; assert a 4xx of ``expected`` as problem+json saying what is wrong, and that the
    store is as it was."""
    before = stored(target.system)
    answer = send(target.system, method, path, **kw)
    after = stored(target.system)
    assert answer.status in expected, (method, path, answer)
    assert answer.content_type.startswith(PROBLEM_TYPE), (method, path, answer)
    assert isinstance(answer.body, dict) and answer.body["status"] == answer.status, answer
    assert answer.body.get("title") and (answer.body.get("detail") or answer.body.get("errors"))
    assert after == before, (method, path, answer.status)
    return answer


# --- the measured inputs ---------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_value(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"v": value}
    return value


JOB = "job_" + "0" * 32


def test_json_nested_1000_deep_is_400_on_every_json_route(target: Target) -> None:
    raw = nested(1000)
    for path in ("/v1/cancellations", f"/v1/cancellations/{target.job_id}/decision"):
        answer = refused(target, {400}, "POST", path, body=raw)
        assert "nested more than" in answer.body["detail"]
    refused(target, {400}, "POST", "/v1/billing-events", body=raw, headers=signed(raw), token=False)


def test_metadata_and_survey_nested_300_deep_are_400(target: Target) -> None:
    metadata = json.dumps(payway_body(metadata=deep_value(300))).encode()
    refused(target, {400}, "POST", "/v1/cancellations", body=metadata)
    survey = json.dumps({"decision": "reject", "survey": deep_value(300)}).encode()
    refused(target, {400}, "POST", f"/v1/cancellations/{target.job_id}/decision", body=survey)


def test_a_lone_surrogate_is_400(target: Target) -> None:
    for value in ("\ud800", "ok\udfffok"):
        raw = json.dumps(payway_body(metadata={"note": value})).encode()  # "\\ud800" escapes
        answer = refused(target, {400}, "POST", "/v1/cancellations", body=raw)
        assert "surrogate" in answer.body["detail"]
    raw = json.dumps({"decision": "accept", "survey": {"\ud800": 1}}).encode()
    refused(target, {400}, "POST", f"/v1/cancellations/{target.job_id}/decision", body=raw)


def test_a_string_over_the_limit_is_400(target: Target) -> None:
    raw = json.dumps(payway_body(metadata={"note": "x" * 20_000})).encode()
    answer = refused(target, {400}, "POST", "/v1/cancellations", body=raw)
    assert "over 16384 characters" in answer.body["detail"]


def old_cursor(value: Any) -> str:
    """A cursor in the format the API used to hand out (base64 of a JSON pair)."""
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        old_cursor(["nan", JOB]),
        old_cursor(["1e999", JOB]),
        old_cursor([[1], [2]]),
        old_cursor(["1.5", [JOB]]),
        old_cursor([1, 2, 3]),
        f"nan~{JOB}",
        f"inf~{JOB}",
        f"1e999~{JOB}",
        "1.5~index",
        "1.5~job_x:timeline",
        "",
        "%FF%FE",
        "~" * 300,
    ],
)
def test_a_cursor_not_handed_out_is_422(target: Target, cursor: str) -> None:
    answer = refused(target, {422}, "GET", f"/v1/cancellations?cursor={quote(cursor, safe='%')}")
    assert answer.body["errors"][0]["field"] == "query.cursor"


@pytest.mark.parametrize("limit", ["²", "abc", "1.5", "-1", "5000", "", "1e3", "%FF"])
def test_a_dead_letter_limit_not_an_integer_in_range_is_422(target: Target, limit: str) -> None:
    answer = refused(target, {422}, "GET", f"/v1/dead-letters?limit={quote(limit, safe='%')}")
    assert answer.body["errors"][0]["field"] == "query.limit"


def test_a_dead_letter_limit_in_range_is_read(target: Target) -> None:
    answer = send(target.system, "GET", "/v1/dead-letters?limit=1")
    assert answer.status == 200 and len(answer.body["items"]) == 1


PUBLIC = ("/healthz", "/readyz", "/openapi.json", "/docs", "/docs/assets/swagger-ui.css")


# Every route, each with a path that exists (ids of the seeded job and dead letter).
def routes(t: Target) -> list[tuple[str, str]]:
    return [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/docs/assets/swagger-ui.css"),
        ("GET", "/metrics"),
        ("GET", "/v1/providers"),
        ("GET", "/v1/stats"),
        ("GET", "/v1/cancellations"),
        ("POST", "/v1/cancellations"),
        ("GET", f"/v1/cancellations/{t.job_id}"),
        ("POST", f"/v1/cancellations/{t.job_id}/decision"),
        ("POST", "/v1/billing-events"),
        ("GET", "/v1/dead-letters"),
        ("GET", f"/v1/dead-letters/{t.dead_letter_id}"),
        ("POST", f"/v1/dead-letters/{t.dead_letter_id}/replay"),
        ("DELETE", f"/v1/dead-letters/{t.dead_letter_id}"),
    ]


@pytest.mark.parametrize("query", ["nope=1", "limit=1&limit=2", "%FF=1", "since_s=nan"])
def test_unknown_or_malformed_query_values_are_422_on_every_route(
    target: Target, query: str
) -> None:
    for method, path in routes(target):
        if query.startswith("limit") and path not in ("/v1/cancellations", "/v1/dead-letters"):
            continue  # elsewhere "limit" is unknown: the first case covers it
        if query.startswith("since_s") and path != "/v1/stats":
            continue
        headers = signed(b"{}") if path == "/v1/billing-events" else None
        body = b"{}" if method == "POST" else None
        answer = refused(target, {422}, method, f"{path}?{query}", body=body, headers=headers)
        assert answer.body["errors"][0]["field"].startswith("query."), answer


def test_a_signature_header_of_undecodable_bytes_is_401(target: Target) -> None:
    raw = json.dumps(_event()).encode()
    for value in (b"\xff\xfe", b"t=1,v1=\xff", "t=1,v1=é".encode()):
        answer = refused(
            target,
            {401},
            "POST",
            "/v1/billing-events",
            body=raw,
            headers={"Cancelflow-Signature": value},
            token=False,
        )
        assert "Cancelflow-Signature" in answer.body["detail"]


def test_an_authorization_header_of_undecodable_bytes_is_401_problem_json(target: Target) -> None:
    for value in (b"Bearer tok\xff", b"Bearer \xff\xfe", "Bearer tök".encode(), b"\xffBearer x"):
        for method, path in routes(target):
            if path == "/v1/billing-events" or path in PUBLIC:
                continue  # not token-authenticated
            answer = refused(
                target, {401}, method, path, headers={"Authorization": value}, token=False
            )
            assert answer.body["title"] == "Unauthorized"


def test_any_other_header_of_undecodable_bytes_is_400(target: Target) -> None:
    for method, path in routes(target):
        answer = refused(target, {400}, method, path, headers={"X-Note": b"\xff\xfe"})
        assert "X-Note" in answer.body["detail"]


BAD_IDS = [
    "index",
    "kind:poison",
    "kinds-indexed",
    "{job}:timeline",
    "{job}:callbacks",
    "{dl}x",
    "JOB_" + "0" * 32,
    "job_" + "A" * 32,
    "dl_" + "A" * 32,
    "%2E%2E",
    "%00",
    "%FF",
    "{job}%0A",
    "{dl}%0A",
    "x" * 5000,
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_an_id_not_of_its_format_is_404_and_touches_no_key(target: Target, bad: str) -> None:
    """``DELETE /v1/dead-letters/index`` used to delete the dead-letter index."""
    bad = bad.format(job=target.job_id, dl=target.dead_letter_id)
    decision = json.dumps({"decision": "accept"}).encode()
    for method, path, body in (
        ("GET", f"/v1/cancellations/{bad}", None),
        ("POST", f"/v1/cancellations/{bad}/decision", decision),
        ("GET", f"/v1/dead-letters/{bad}", None),
        ("POST", f"/v1/dead-letters/{bad}/replay", None),
        ("DELETE", f"/v1/dead-letters/{bad}", None),
    ):
        answer = refused(target, {404}, method, path, body=body)
        assert "not a" in answer.body["detail"], answer


def test_hostile_bodies_before_authentication_are_401_not_500(target: Target) -> None:
    for raw in (nested(1000), b"\xff\xfe", json.dumps({"x": "\ud800"}).encode()):
        refused(target, {401}, "POST", "/v1/cancellations", body=raw, token=False)
        refused(target, {401}, "POST", "/v1/billing-events", body=raw, token=False)


# --- property-based ----------------------------------------------------------------------------

JSON_ROUTES = ("/v1/cancellations", "/v1/cancellations/{job}/decision")


@FUZZ
@given(
    depth=st.integers(min_value=33, max_value=5000),
    brackets=st.lists(st.sampled_from([("[", "]"), ('{"k":', "}")]), min_size=1, max_size=4),
    route=st.sampled_from(JSON_ROUTES),
)
def test_any_nesting_over_the_limit_is_400(
    target: Target, depth: int, brackets: list[tuple[str, str]], route: str
) -> None:
    opens = "".join(brackets[i % len(brackets)][0] for i in range(depth))
    closes = "".join(brackets[i % len(brackets)][1] for i in reversed(range(depth)))
    raw = (opens + "1" + closes).encode()
    refused(target, {400, 413}, "POST", route.format(job=target.job_id), body=raw)


@FUZZ
@given(raw=st.binary(max_size=2048), route=st.sampled_from(JSON_ROUTES))
def test_any_bytes_get_a_4xx(target: Target, raw: bytes, route: str) -> None:
    refused(target, {400, 422}, "POST", route.format(job=target.job_id), body=raw)


@FUZZ
@given(
    encoding=st.sampled_from(["utf-16", "utf-32", "latin-1", "cp1252"]),
    text=st.text(alphabet="éàüß", min_size=1, max_size=20),
)
def test_a_body_in_another_encoding_is_400(target: Target, encoding: str, text: str) -> None:
    body = json.dumps(payway_body(metadata={"note": text}), ensure_ascii=False)
    refused(target, {400}, "POST", "/v1/cancellations", body=body.encode(encoding))


@FUZZ
@given(
    prefix=st.text(max_size=20),
    surrogate=st.integers(min_value=0xD800, max_value=0xDFFF),
    where=st.sampled_from(["metadata", "key", "subscription", "survey"]),
)
def test_a_lone_surrogate_anywhere_is_400(
    target: Target, prefix: str, surrogate: int, where: str
) -> None:
    bad = prefix + chr(surrogate)
    if where == "survey":
        raw = json.dumps({"decision": "reject", "survey": {"why": bad}}).encode()
        refused(target, {400}, "POST", f"/v1/cancellations/{target.job_id}/decision", body=raw)
        return
    body = payway_body()
    if where == "metadata":
        body["metadata"] = {"note": bad}
    elif where == "key":
        body["metadata"] = {bad: 1}
    else:
        body["subscription"]["account_id"] = bad
    refused(target, {400}, "POST", "/v1/cancellations", body=json.dumps(body).encode())


@FUZZ
@given(size=st.integers(min_value=16_385, max_value=60_000))
def test_any_string_over_the_limit_is_400(target: Target, size: int) -> None:
    raw = json.dumps(payway_body(idempotency_key="k" * size)).encode()
    refused(target, {400}, "POST", "/v1/cancellations", body=raw)


ID_CHARS = st.characters(codec="utf-8", exclude_characters="/?#")


@FUZZ
@given(bad=st.text(ID_CHARS, min_size=1, max_size=80))
def test_any_id_not_of_its_format_is_404(target: Target, bad: str) -> None:
    if bad in (".", ".."):
        return  # normalised away by the client's URL, not an id at all
    quoted = quote(bad, safe="")
    if not JOB_ID_RE.fullmatch(bad):
        refused(target, {404}, "GET", f"/v1/cancellations/{quoted}")
    if not DEAD_LETTER_ID_RE.fullmatch(bad):
        refused(target, {404}, "DELETE", f"/v1/dead-letters/{quoted}")


QUERY_ROUTES = ("/v1/cancellations", "/v1/stats", "/v1/dead-letters", "/v1/providers", "/metrics")
KNOWN = {"provider", "status", "created_after", "created_before", "limit", "cursor", "since_s"}
KNOWN |= {"kind", "error_type", "older_than", "newer_than"}


@FUZZ
@given(
    key=st.text(string.ascii_letters + string.digits + "_-.é", min_size=1, max_size=20),
    value=st.text(max_size=40),
    route=st.sampled_from(QUERY_ROUTES),
)
def test_any_unknown_query_parameter_is_422(
    target: Target, key: str, value: str, route: str
) -> None:
    if key in KNOWN:
        return
    query = f"{quote(key, safe='')}={quote(value, safe='', errors='surrogatepass')}"
    answer = refused(target, {422}, "GET", f"{route}?{query}")
    assert answer.body["errors"][0]["field"].startswith("query.")


@FUZZ
@given(
    value=st.sampled_from(["limit", "since_s", "created_after", "older_than", "status"]),
    junk=st.text(string.ascii_letters + "²½-+.,:", min_size=1, max_size=12),
)
def test_malformed_query_values_are_422(target: Target, value: str, junk: str) -> None:
    route = {
        "limit": "/v1/dead-letters",
        "older_than": "/v1/dead-letters",
        "since_s": "/v1/stats",
        "created_after": "/v1/cancellations",
        "status": "/v1/cancellations",
    }[value]
    # "²" first: no value of any of these parameters (a status, a number, a date) starts so.
    refused(target, {422}, "GET", f"{route}?{value}={quote('²' + junk, safe='')}")


# Bytes an HTTP parser takes in a header value (no control characters but tab), ending in one
# that is never UTF-8.
HEADER_BYTES = st.binary(min_size=1, max_size=40).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c != 127).strip() + b"\xff"
)


@FUZZ
@given(value=HEADER_BYTES)
def test_any_undecodable_credential_is_401(target: Target, value: bytes) -> None:
    # 429 too: past its burst of failed authentications this address is limited (and told
    # so as a problem), which is the refusal a guesser must get.
    refused(target, {401, 429}, "GET", "/v1/stats", headers={"Authorization": value}, token=False)
    raw = json.dumps(_event()).encode()
    refused(
        target,
        {401, 429},
        "POST",
        "/v1/billing-events",
        body=raw,
        headers={"Cancelflow-Signature": value},
        token=False,
    )


@FUZZ
@given(value=HEADER_BYTES, name=st.sampled_from(["X-Note", "User-Agent", "Accept", "Origin"]))
def test_any_other_undecodable_header_is_400(target: Target, value: bytes, name: str) -> None:
    refused(target, {400}, "GET", "/v1/stats", headers={name: value})


# --- requests aiohttp's own HTTP parser refuses (producers/http_refusals.py) -----------------

# In a refused line, to show it is neither answered nor logged.
SECRET = "s3cret-in-a-refused-line"


NOT_GZIP = b"\x1f\x8b not gzip at all"  # gzip's magic number, then not gzip


def payload_headers(token: str, extra: str) -> bytes:
    return (
        f"POST /v1/cancellations HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


# name -> (what is sent, in writes the parser sees apart); every one refused by the parser,
# before any route, or (the body's framing and encoding) while the handler reads the body.
def unparsable(token: str) -> dict[str, tuple[bytes, ...]]:
    post = b"POST /v1/cancellations HTTP/1.1\r\nHost: api\r\n"
    return {
        "a request line that is not one": (b"GARBAGE\r\n\r\n",),
        "a method of characters no method has": (b"G@T /v1/stats HTTP/1.1\r\nHost: api\r\n\r\n",),
        "an HTTP version that does not exist": (b"GET /v1/stats HTTP/9.x\r\nHost: api\r\n\r\n",),
        "a NUL byte in a header value": (b"GET /healthz HTTP/1.1\r\nX-Note: a\x00b\r\n\r\n",),
        "a control byte in the credential": (
            f"GET /v1/stats HTTP/1.1\r\nAuthorization: Bearer {SECRET}\x01\r\n\r\n".encode(),
        ),
        "a space in a header name": (
            f"GET /v1/stats HTTP/1.1\r\nX Note: {SECRET}\r\n\r\n".encode(),
        ),
        "a header line without a colon": (
            f"GET /v1/stats HTTP/1.1\r\nAuthorization Bearer {SECRET}\r\n\r\n".encode(),
        ),
        "a Content-Length that is not a number": (post + b"Content-Length: abc\r\n\r\n",),
        "a negative Content-Length": (post + b"Content-Length: -1\r\n\r\n",),
        "two Content-Lengths": (post + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",),
        "Content-Length with Transfer-Encoding": (
            post + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        "an unsupported Transfer-Encoding": (post + b"Transfer-Encoding: gzip\r\n\r\nabc",),
        "a chunk size that is not hex": (
            post + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        ),
        "a header line over 8190 bytes": (
            b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
        ),
        "a request line over 8190 bytes": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",),
        "TLS sent to the plain port": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",),
        # The body's framing refused after the handler started reading it (its headers were
        # parsed apart): llhttp does not fail the body by itself, http_refusals does.
        "a chunk size that is not hex, after the headers": (
            payload_headers(token, "Transfer-Encoding: chunked\r\n"),
            b"zz\r\n{}\r\n0\r\n\r\n",
        ),
        "a chunk not ended where its size says, after the headers": (
            payload_headers(token, "Transfer-Encoding: chunked\r\n"),
            b"2\r\n{}XX\r\n0\r\n\r\n",
        ),
        "a gzip Content-Encoding over bytes that are not gzip": (
            payload_headers(
                token, f"Content-Encoding: gzip\r\nContent-Length: {len(NOT_GZIP)}\r\n"
            ),
            NOT_GZIP,
        ),
    }


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: Any


def exchange(system: System, writes: tuple[bytes, ...]) -> RawAnswer:
    """Send ``writes`` on one connection (pausing between them, so the server parses them
    apart) and read until the server closes it: a reset or no close fails the test."""
    parts = urlsplit(system.api_url)
    with socket.create_connection((str(parts.hostname), int(parts.port or 80)), timeout=30) as s:
        for n, data in enumerate(writes):
            if n:
                time.sleep(0.3)
            s.sendall(data)
        received = b""
        while chunk := s.recv(65536):  # b"": closed cleanly (a reset raises, a hang times out)
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    assert len(body) == length, (received, "more than one answer, or a short one")
    return RawAnswer(int(status_line.split()[1]), headers, json.loads(body))


@pytest.mark.parametrize("kind", sorted(unparsable("test-token")))
def test_a_request_the_http_parser_refuses_is_a_400_problem_and_the_connection_closed(
    target: Target, kind: str
) -> None:
    system = target.system
    api_log = system.procs.log_dir / "api.log"
    logged_before = api_log.stat().st_size
    before = stored(system)
    answer = exchange(system, unparsable(system.token)[kind])
    assert stored(system) == before
    assert answer.status == 400, answer
    assert answer.headers["content-type"].startswith(PROBLEM_TYPE), answer
    assert answer.body["type"].endswith("/malformed-request"), answer
    assert answer.body["status"] == 400 and answer.body["title"] and answer.body["detail"]
    assert answer.headers["request-id"].startswith("req_"), answer.headers
    assert SECRET not in json.dumps(answer.body)
    with api_log.open("rb") as log:
        log.seek(logged_before)
        lines = [json.loads(line) for line in log.read().splitlines() if line.startswith(b"{")]
    assert SECRET.encode() not in api_log.read_bytes()
    ours = [line for line in lines if line.get("request_id") == answer.headers["request-id"]]
    assert ours, lines
    assert all("Traceback" not in json.dumps(line) for line in ours), ours
