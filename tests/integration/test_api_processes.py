"""``cancelflow api --processes 2``: two real API processes on one port answer as one API:
their metrics add up on ``/metrics`` whichever answers, a console session signed by one is
good on the other, and SIGTERM stops both and removes their metrics files."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import signal
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from producers.local import cancelflow_command, free_port, wait_until
from tests.fixtures.system import StartSystem

pytestmark = pytest.mark.integration

ROUNDS = 40


def _metrics_dir(supervisor_pid: int) -> Path:
    """The directory the supervisor's spec (its command line) names for the metrics files."""
    argv = Path(f"/proc/{supervisor_pid}/cmdline").read_bytes().split(b"\0")
    spec = json.loads(argv[argv.index(b"producers.supervisor") + 1])
    return Path(spec["remove_dir"])


def test_two_api_processes_answer_as_one(start_system: StartSystem) -> None:
    system = start_system(workers=0, isolated=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = system.procs.start(
        "api-processes", cancelflow_command("api", "--port", str(port), "--processes", "2")
    )
    wait_until(
        lambda: system.procs.log_tail("api-processes", lines=200).count('"api.listening"') == 2,
        timeout_s=30,
        what="both API processes listening",
    )
    auth = {"Authorization": f"Bearer {system.token}"}
    # A connection of its own for each request: the kernel spreads them over both processes.
    for _ in range(ROUNDS):
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/stats", headers=auth)):  # noqa: S310
            pass
    metrics_dir = _metrics_dir(proc.pid)
    # Both processes answered some: each wrote its counters to a file of its own.
    counted = sorted(p.name for p in metrics_dir.glob("counter_*.db"))
    assert len(counted) == 2, (metrics_dir, sorted(p.name for p in metrics_dir.iterdir()))
    for _ in range(4):  # whichever process answers the scrape, the same sum
        scrape = urllib.request.Request(f"{url}/metrics", headers=auth)  # noqa: S310
        with urllib.request.urlopen(scrape) as r:  # noqa: S310
            text = r.read().decode()
        found = re.search(
            r'cancelflow_api_requests_total\{method="GET",route="/v1/stats",status="200"\} (\S+)',
            text,
        )
        assert found is not None, text[:2000]
        assert float(found.group(1)) == ROUNDS

    # The console: signed in on one process, the session holds on the other.
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(f"{url}/console/signin") as r:
        form = r.read().decode()
    csrf = re.search(r'name="csrf" value="([^"]+)"', form)
    assert csrf is not None, form[:2000]
    body = urllib.parse.urlencode({"token": system.token, "csrf": csrf.group(1)}).encode()
    with opener.open(f"{url}/console/signin", data=body) as r:
        assert r.url.endswith("/console/")
    for _ in range(ROUNDS // 2):
        with opener.open(f"{url}/console/jobs") as r:
            assert r.status == 200
            assert r.url.endswith("/console/jobs"), "sent back to sign in: another key"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not metrics_dir.exists()
    assert "CANCELFLOW_API__CONSOLE_SECRET" not in os.environ
