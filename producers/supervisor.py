"""``cancelflow worker --processes N``: N Celery worker processes under one command (and
``cancelflow api --processes N``: N API processes on one port, ``api_children``).

A Cancelflow worker runs its steps on one event loop (``worker.pool``): one process, one
core. Celery's prefork pool spreads one worker over every core; a Cancelflow worker does it
with N whole worker processes, each with its own loop, consumer, heartbeat, leases and
metrics port. Nothing is shared between them but the broker and the job store, so each is
exactly the worker one process would be, and a crash of one loses nothing the others hold:
its leases expire and its messages come back as for any killed worker.

The worker command works out the children's command lines and then becomes this module
(``exec``: the same process id, for the service manager), which imports the standard library
only: the supervisor costs about 11 MB, where the command line with its settings costs 67. It
starts the children, passes the signals on, and replaces a child that died after it had run
a while. One that dies within ``min_uptime_s`` of its start (a configuration error, a broker
refusing it) stops the whole command with the child's exit status, for the service manager
to see, rather than a restart loop nobody notices.

- Each child leads a process group of its own, so Ctrl-C in a terminal reaches it once, from
  the supervisor (Celery takes a second SIGINT as a cold shutdown). On Linux a child is
  killed when the supervisor dies (PR_SET_PDEATHSIG), so none outlives a SIGKILLed command.
- SIGTERM, SIGINT and SIGQUIT are passed to every child (Celery's warm, warm and cold
  shutdown); the supervisor then waits for them all and exits 0 if they all did.
- Child ``i`` is named ``NAME-i@HOST`` from the worker's ``-n NAME@HOST`` (Celery's default
  ``celery@%h``) and serves its metrics on ``metrics_port + i``.
- The children inherit the command's environment; the spec this module is given on its
  command line holds only their arguments and the variables that differ (no secrets).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from producers.deathsig import DIE_WITH_PARENT

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
MIN_UPTIME_S = 10.0


def child_hostname(hostname: str, index: int) -> str:
    """``NAME@HOST`` -> ``NAME-index@HOST`` (a name without ``@`` gets the suffix at its end)."""
    name, at, host = hostname.partition("@")
    return f"{name}-{index}{at}{host}"


def split_hostname(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """The ``-n`` / ``--hostname`` of Celery worker arguments, and the arguments without it."""
    found: str | None = None
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        if arg in ("-n", "--hostname"):
            found = next(it, None)
        elif arg.startswith("--hostname="):
            found = arg.split("=", 1)[1]
        elif arg.startswith("-n") and len(arg) > 2:
            found = arg[2:]
        else:
            rest.append(arg)
    return found, rest


def _exit_status(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128 + N for a death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Child:
    index: int
    argv: list[str]
    env: dict[str, str]  # the variables that differ from the supervisor's environment
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0


def worker_children(
    command: Sequence[str], processes: int, *, hostname: str, metrics_port: int, beat: bool
) -> list[Child]:
    """The children of ``cancelflow worker --processes N``: ``command`` (a one-process worker
    command, without ``-n`` and ``--beat``) with each its name and metrics port; beat, if
    asked for, in the first one only."""
    if metrics_port and metrics_port + processes - 1 > 65535:
        raise ValueError(f"metrics ports {metrics_port} to {metrics_port + processes - 1}")
    children = []
    for i in range(processes):
        env = {"CANCELFLOW_WORKER__PROCESSES": "1"}
        if metrics_port:
            env["CANCELFLOW_WORKER__METRICS_PORT"] = str(metrics_port + i)
        argv = [
            *command,
            "-n",
            child_hostname(hostname, i),
            *(["--beat"] if beat and i == 0 else []),
        ]
        children.append(Child(i, argv, env))
    return children


def api_children(
    command: Sequence[str], processes: int, *, console_secret: bool
) -> tuple[list[Child], str]:
    """The children of ``cancelflow api --processes N`` (``command``: one API process on the
    shared port, ``--reuse-port``), and the directory their metrics share, made empty here.

    - Prometheus' multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): each process writes its
      counters and histograms to files there, and ``/metrics``, whichever process answers
      the scrape, adds them all up (``cancelflow.metrics.render``). The supervisor removes
      the directory when it ends.
    - The console's session cookies are signed by one key for all of them: without
      ``CANCELFLOW_API__CONSOLE_SECRET`` (``console_secret`` False), one generated here for
      this run goes into the environment they inherit (never onto a command line)."""
    metrics_dir = tempfile.mkdtemp(prefix="cancelflow-api-metrics-")
    if not console_secret:
        os.environ["CANCELFLOW_API__CONSOLE_SECRET"] = secrets.token_urlsafe(32)
    env = {"CANCELFLOW_API__PROCESSES": "1", "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    return [Child(i, list(command), dict(env)) for i in range(processes)], metrics_dir


def line_logger(fmt: str) -> Callable[..., None]:
    """Lines like the rest of Cancelflow's on stderr (``cancelflow.logging``), without
    structlog: JSON when asked for or when stderr is not a terminal, else ``key=value``."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())

    def log(event: str, level: str = "info", **kw: Any) -> None:
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        if use_json:
            line = json.dumps(
                {**kw, "level": level, "timestamp": now, "logger": "cancelflow.supervisor"}
                | {"message": event}
            )
        else:
            pairs = " ".join(f"{k}={v}" for k, v in kw.items())
            line = f"{now} [{level:<8}] {event:<30} {pairs}"
        print(line, file=sys.stderr, flush=True)

    return log


@dataclass
class Supervisor:
    """Runs ``children`` until a forwarded signal has stopped them all (see the module)."""

    children: list[Child]
    log: Callable[..., None]
    min_uptime_s: float = MIN_UPTIME_S
    poll_s: float = 0.2
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    remove_dir: str | None = None  # removed once every child ended (the API's metrics files)
    _stopping: bool = False
    _status: int = 0

    def start(self, child: Child) -> None:
        child.proc = subprocess.Popen(  # noqa: S603 - argv built by the worker command
            child.argv,
            env={**self.environ, **child.env},
            process_group=0,
            preexec_fn=DIE_WITH_PARENT,  # one libc call between fork and exec, no lock taken
        )
        child.started_at = time.monotonic()
        self.log("supervisor.process.started", index=child.index, pid=child.proc.pid)
        if self._stopping:  # a signal came while it started: it missed the one passed on
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signum)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED}
        try:
            for child in self.children:
                if not self._stopping:
                    self.start(child)
            while True:
                for child in self.children:
                    self._check(child)
                if self._stopping and all(c.proc is None for c in self.children):
                    return self._status
                time.sleep(self.poll_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.remove_dir is not None:
                shutil.rmtree(self.remove_dir, ignore_errors=True)

    def _check(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.poll() is None:
            return
        status = _exit_status(proc.returncode)
        child.proc = None
        if self._stopping:
            self._status = self._status or status
            self.log("supervisor.process.stopped", index=child.index, status=status)
            return
        uptime = time.monotonic() - child.started_at
        if uptime < self.min_uptime_s:
            self.log(
                "supervisor.process.failed",
                level="error",
                index=child.index,
                status=status,
                uptime_s=round(uptime, 1),
                hint=f"it ended within {self.min_uptime_s:g} s of its start: stopping them all",
            )
            self._status = status or 1
            self._on_signal(signal.SIGTERM, None)
            return
        child.restarts += 1
        self.log(
            "supervisor.process.restarting",
            level="warning",
            index=child.index,
            status=status,
            uptime_s=round(uptime, 1),
            restarts=child.restarts,
        )
        self.start(child)


def exec_supervisor(
    children: list[Child], *, log_format: str, remove_dir: str | None = None
) -> None:
    """Become ``python -m producers.supervisor`` for ``children`` (does not return)."""
    spec = {
        "log_format": log_format,
        "children": [[c.argv, c.env] for c in children],
        "remove_dir": remove_dir,
    }
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", "producers.supervisor", json.dumps(spec)]
    os.execv(sys.executable, argv)  # noqa: S606 - our own interpreter and module


def main(argv: Sequence[str]) -> int:
    spec = json.loads(argv[0])
    children = [Child(i, list(a), dict(e)) for i, (a, e) in enumerate(spec["children"])]
    log = line_logger(spec["log_format"])
    return Supervisor(children, log, remove_dir=spec.get("remove_dir")).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
