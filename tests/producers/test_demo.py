"""`cancelflow demo --keep` as a newcomer runs it, where no Redis answers (the embedded one):
the table readable at 100 columns, then the system left running with the console's URL and a
token that signs in; Ctrl-C stops it all. And `cancelflow sandbox --print-env`."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from producers.local import cancelflow_command, free_port, http_ok
from sandboxes.env import provider_env
from tests.support import default_sigint

pytestmark = pytest.mark.integration

CONSOLE_LINE = re.compile(
    r"Console: (?P<url>http://\S+/console/)\s+sign in with the API token: (?P<token>\S+)"
)
JOB_ID = re.compile(r"job_[0-9a-f]{32}")


@pytest.fixture
def demo() -> Iterator[subprocess.Popen[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANCELFLOW_")}
    proc = subprocess.Popen(
        cancelflow_command("demo", "--keep"),
        # Port 1: no Redis answers there, so the demo starts its embedded one.
        env={**env, "CANCELFLOW_REDIS_URL": "redis://127.0.0.1:1/0", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_sigint,  # the Ctrl-C the test sends must reach it
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_demo_keep_leaves_the_console_running_until_ctrl_c(
    demo: subprocess.Popen[str],
) -> None:
    assert demo.stdout is not None
    lines: list[str] = []
    found = None
    deadline = time.monotonic() + 280
    while found is None and time.monotonic() < deadline:
        line = demo.stdout.readline()
        if not line:
            pytest.fail("the demo ended before saying where the console is:\n" + "".join(lines))
        lines.append(line)
        found = CONSOLE_LINE.search(line)
    assert found is not None, "".join(lines)
    output = "".join(lines)
    assert "embedded one (fakeredis)" in output
    assert "every outcome as expected" in output, output

    # The table fits in 100 columns, with every job id whole.
    table = output[
        output.index("Cancelflow demo: every outcome") : output.index("every outcome as")
    ]
    assert max(len(line) for line in table.splitlines()) <= 100, table
    shown = set(JOB_ID.findall(table))
    assert len(shown) >= 20

    console_url, token = found["url"], found["token"]
    api_url = console_url.removesuffix("/console/")
    with httpx.Client(base_url=api_url, timeout=10) as http:
        listed = http.get(
            "/v1/cancellations?limit=100", headers={"Authorization": f"Bearer {token}"}
        )
        assert listed.status_code == 200
        assert shown <= {j["id"] for j in listed.json()["items"]}
        # The token signs in to the console, and a job of the table is there to look at.
        form = http.get("/console/signin")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert form.status_code == 200 and csrf is not None
        signed = http.post("/console/signin", data={"csrf": csrf[1], "token": token})
        assert signed.status_code == 303, signed.text
        job_id = sorted(shown)[0]
        page = http.get(f"/console/jobs/{job_id}")
        assert page.status_code == 200 and job_id in page.text

    time.sleep(1)
    assert demo.poll() is None  # still running after the table
    demo.send_signal(signal.SIGINT)
    assert demo.wait(timeout=60) == 0
    assert not http_ok(f"{api_url}/healthz")  # stopped with it


def test_sandbox_print_env_points_every_provider_and_callback_at_it() -> None:
    port = free_port()
    printed = subprocess.run(
        cancelflow_command("sandbox", "--port", str(port), "--print-env"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    env: dict[str, str] = {}
    for line in printed.stdout.splitlines():
        words = shlex.split(line)
        assert words[0] == "export", line
        name, _, value = words[1].partition("=")
        env[name] = value
    url = f"http://127.0.0.1:{port}"
    assert provider_env(url).items() <= env.items()
    keys = {name.split("__")[1] for name in provider_env(url)}
    for key in keys:
        assert env[f"CANCELFLOW_PROVIDERS__{key}__CALLBACK_URL"] == f"{url}/receiver/events"
    assert env["CANCELFLOW_CALLBACKS__ALLOW_HTTP"] == "true"
    assert "127.0.0.1" in env["CANCELFLOW_CALLBACKS__ALLOWED_HOSTS"].split(",")

    # What it printed is what a server reads: the settings load, every provider on.
    base = {k: v for k, v in os.environ.items() if not k.startswith("CANCELFLOW_")}
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cancelflow.settings import load_settings\n"
            "print(' '.join(sorted(load_settings().enabled_providers())))",
        ],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == sorted(k.lower() for k in keys)
