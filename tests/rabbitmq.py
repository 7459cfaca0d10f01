"""A RabbitMQ for the tests: a vhost of their own, on a server that lets them make one.

The server is, in order: the one at ``CANCELFLOW_TEST_AMQP_URL`` (its management API at
``CANCELFLOW_TEST_AMQP_MANAGEMENT_URL``, else port 15672 of the same host, same credentials);
the one on 127.0.0.1:5672 when it answers and its ``guest`` is an administrator (the only
user that may make and delete a vhost); else a ``rabbitmq-server`` of the tests' own, on free
ports, in a temporary directory (node name, database, logs, Erlang cookie and epmd all its
own), stopped afterwards. The machine's RabbitMQ belongs to others: on it, only the vhosts
made here are ever made or deleted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Debian's server script as any user (/usr/sbin/rabbitmq-server switches to the rabbitmq user).
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


@dataclass(frozen=True)
class Management:
    """RabbitMQ's management API: ``url`` without credentials, and the credentials."""

    url: str
    user: str
    password: str

    def call(self, method: str, path: str, body: Any = None, *, timeout_s: float = 10) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - http(s) to the broker under test
            f"{self.url}/api/{path}", data=data, method=method
        )
        auth = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {auth}")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            raw = response.read()
        return json.loads(raw) if raw else None

    def administrator(self) -> bool:
        """Whether these credentials may make and delete vhosts."""
        try:
            me = self.call("GET", "whoami", timeout_s=2)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        tags = me.get("tags") if isinstance(me, dict) else None
        tags = tags.split(",") if isinstance(tags, str) else (tags or [])
        return "administrator" in tags

    def with_credentials(self) -> str:
        """``url`` with the credentials in it (what Cancelflow's setting takes)."""
        parts = urllib.parse.urlsplit(self.url)
        user = urllib.parse.quote(self.user, safe="")
        password = urllib.parse.quote(self.password, safe="")
        return parts._replace(netloc=f"{user}:{password}@{parts.netloc}").geturl()


@dataclass(frozen=True)
class RabbitServer:
    """A server the tests may make vhosts on: its AMQP URL (no vhost) and management API."""

    amqp_url: str
    management: Management
    pid: int | None = None  # a server of the tests' own (its CPU time is theirs to count)

    @contextlib.contextmanager
    def vhost(self) -> Iterator[str]:
        """A vhost of its own, deleted afterwards: the AMQP URL to it."""
        name = f"cancelflow-test-{uuid.uuid4().hex[:12]}"
        quoted = urllib.parse.quote(name, safe="")
        self.management.call("PUT", f"vhosts/{quoted}")
        try:
            user = urllib.parse.quote(self.management.user, safe="")
            self.management.call(
                "PUT",
                f"permissions/{quoted}/{user}",
                {"configure": ".*", "write": ".*", "read": ".*"},
            )
            yield f"{self.amqp_url.rstrip('/')}/{quoted}"
        finally:
            with contextlib.suppress(urllib.error.URLError, OSError):
                self.management.call("DELETE", f"vhosts/{quoted}")


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def rabbit_server() -> Iterator[RabbitServer]:
    """The server the tests use (see the module's docstring)."""
    given = os.environ.get("CANCELFLOW_TEST_AMQP_URL")
    if given:
        parts = urllib.parse.urlsplit(given)
        management_url = os.environ.get(
            "CANCELFLOW_TEST_AMQP_MANAGEMENT_URL", f"http://{parts.hostname}:15672"
        )
        management = Management(
            management_url.rstrip("/"),
            urllib.parse.unquote(parts.username or "guest"),
            urllib.parse.unquote(parts.password or "guest"),
        )
        if not management.administrator():
            raise RuntimeError(
                f"CANCELFLOW_TEST_AMQP_URL: its user may not make vhosts through the management "
                f"API at {management_url} (an administrator is needed, the tests make their own)"
            )
        yield RabbitServer(parts._replace(path="").geturl(), management)
        return
    local = Management("http://127.0.0.1:15672", "guest", "guest")
    if _answers("127.0.0.1", 5672) and local.administrator():
        yield RabbitServer("amqp://guest:guest@127.0.0.1:5672", local)
        return
    with private_rabbit_server() as server:
        yield server


@contextlib.contextmanager
def private_rabbit_server(*, timeout_s: float = 90) -> Iterator[RabbitServer]:
    """A ``rabbitmq-server`` of its own, with the management plugin, on free ports."""
    if not os.path.exists(SERVER):
        raise RuntimeError(
            "no RabbitMQ the tests may use and rabbitmq-server is missing: "
            "apt-get install rabbitmq-server (.ci/run does), or set CANCELFLOW_TEST_AMQP_URL"
        )
    amqp, http, dist, epmd = _free_ports(4)
    home = Path(tempfile.mkdtemp(prefix="cancelflow-rabbitmq-"))
    (home / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{amqp}\n"
        f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {http}\n"
        # The node's own disk-free alarm would stop publishers on a nearly full /tmp.
        "disk_free_limit.absolute = 50MB\n"
    )
    (home / "enabled_plugins").write_text("[rabbitmq_management].\n")
    (home / "rabbitmq-env.conf").write_text("")
    env = {
        **os.environ,
        "HOME": str(home),  # its Erlang cookie
        "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
        "RABBITMQ_LOG_BASE": str(home / "log"),
        "RABBITMQ_PID_FILE": str(home / "rabbitmq.pid"),
        "RABBITMQ_NODENAME": f"cancelflow-test-{amqp}@localhost",
        "RABBITMQ_DIST_PORT": str(dist),
        "ERL_EPMD_PORT": str(epmd),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
    log = (home / "server.log").open("ab")
    proc = subprocess.Popen(
        [SERVER], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    management = Management(f"http://127.0.0.1:{http}", "guest", "guest")
    try:
        deadline = time.monotonic() + timeout_s
        while not management.administrator():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (home / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"rabbitmq-server did not start:\n{tail}")
            time.sleep(0.3)
        yield RabbitServer(f"amqp://guest:guest@127.0.0.1:{amqp}", management, proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        # Its epmd daemonised itself out of the process group: stop it by its own port.
        epmd_bin = shutil.which("epmd") or next(
            Path("/usr/lib/erlang").glob("erts-*/bin/epmd"), None
        )
        if epmd_bin is not None:
            subprocess.run(
                [str(epmd_bin), "-port", str(epmd), "-kill"],
                env=env,
                capture_output=True,
                check=False,
                timeout=10,
            )
        log.close()
        shutil.rmtree(home, ignore_errors=True)
