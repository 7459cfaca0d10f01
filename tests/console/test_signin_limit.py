"""The console's sign-in form is limited per client address as failed bearer authentication is:
a failed sign-in counts as a failed authentication (one bucket for both doors), and once the
address has spent its failures it gets the sign-in page with 429 and ``Retry-After``, even for
a right token, while other addresses sign in.

Over HTTP against a real API. The burst is the default (100); the refill is slowed to one
failure per 100 s so that no failure is given back while the test runs (the same code path).
"""

from __future__ import annotations

import http.client
import re
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

import pytest

from cancelflow.settings import ApiSettings
from producers.console.sessions import COOKIE
from tests.fixtures.system import API_TOKEN, StartSystem
from tests.support import System

pytestmark = pytest.mark.integration

BURST = ApiSettings().auth_failures_burst


@pytest.fixture(scope="module")
def api(start_system: StartSystem) -> System:
    return start_system(workers=0, isolated=True, CANCELFLOW_API__AUTH_FAILURES_PER_S="0.01")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    text: str

    @property
    def session(self) -> bool:
        """Whether the answer opens a console session (sets its cookie)."""
        cookies = self.headers.get_all("Set-Cookie") or []
        return any(c.startswith(f"{COOKIE}=") for c in cookies)


def request(
    system: System,
    method: str,
    path: str,
    *,
    source: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request from ``source`` (every 127.x address is loopback on Linux: another client)."""
    url = urlsplit(system.api_url)
    conn = http.client.HTTPConnection(
        str(url.hostname), url.port, timeout=30, source_address=(source, 0)
    )
    try:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return Answer(answer.status, answer.headers, answer.read().decode())
    finally:
        conn.close()


class Browser:
    """What a browser does with the sign-in form: its CSRF cookie and field, then a POST."""

    def __init__(self, system: System, source: str) -> None:
        self.system, self.source = system, source
        form = request(system, "GET", "/console/signin", source=source)
        assert form.status == 200, form
        cookie = form.headers["Set-Cookie"].split(";", 1)[0]
        found = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert found is not None, form.text
        self.cookie, self.csrf = cookie, found.group(1)

    def sign_in(self, token: str) -> Answer:
        return request(
            self.system,
            "POST",
            "/console/signin",
            source=self.source,
            body=urlencode({"csrf": self.csrf, "token": token}).encode(),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Cookie": self.cookie,
            },
        )


def test_failed_sign_ins_are_limited_per_address_as_failed_authentication_is(api: System) -> None:
    guesser = Browser(api, "127.0.0.6")
    answers = [guesser.sign_in(f"guess-{n}") for n in range(BURST + 1)]
    assert [a.status for a in answers[:BURST]] == [401] * BURST
    limited = answers[BURST]
    assert limited.status == 429, limited
    assert limited.headers["Content-Type"].startswith("text/html")
    assert int(limited.headers["Retry-After"]) >= 1
    assert "Too many failed sign-ins" in limited.text and 'role="alert"' in limited.text
    assert 'label for="token">API token' in limited.text  # the sign-in page, to try later
    assert limited.headers["Content-Security-Policy"]  # the console's own headers

    # Held back, the address is refused before its token is looked at, at either door ...
    right = guesser.sign_in(API_TOKEN)
    assert right.status == 429 and not right.session, right
    bearer = request(
        api,
        "GET",
        "/v1/stats",
        source="127.0.0.6",
        headers={"Authorization": f"Bearer {API_TOKEN}"},
    )
    assert bearer.status == 429, bearer
    # ... and another address signs in.
    other = Browser(api, "127.0.0.7").sign_in(API_TOKEN)
    assert other.status == 303 and other.session, other


def test_failed_bearer_authentication_counts_against_the_sign_in_form(api: System) -> None:
    source = "127.0.0.8"
    for n in range(BURST):
        failed = request(
            api, "GET", "/v1/stats", source=source, headers={"Authorization": f"Bearer g-{n}"}
        )
        assert failed.status == 401, failed
    limited = Browser(api, source).sign_in(API_TOKEN)
    assert limited.status == 429 and limited.headers["Content-Type"].startswith("text/html")
    assert not limited.session
