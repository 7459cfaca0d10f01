"""``producers.supervisor``: the children of ``cancelflow worker --processes N``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from producers.supervisor import (
    Child,
    Supervisor,
    child_hostname,
    line_logger,
    split_hostname,
    worker_children,
)


@pytest.mark.parametrize(
    ("hostname", "index", "expected"),
    [
        ("celery@%h", 0, "celery-0@%h"),
        ("w@box.example", 3, "w-3@box.example"),
        ("plain", 1, "plain-1"),
    ],
)
def test_child_hostname(hostname: str, index: int, expected: str) -> None:
    assert child_hostname(hostname, index) == expected


@pytest.mark.parametrize(
    "args",
    [
        ["-n", "w@h", "--loglevel=INFO"],
        ["--hostname", "w@h", "--loglevel=INFO"],
        ["--hostname=w@h", "--loglevel=INFO"],
        ["-nw@h", "--loglevel=INFO"],
    ],
)
def test_split_hostname_takes_every_spelling(args: list[str]) -> None:
    assert split_hostname(args) == ("w@h", ["--loglevel=INFO"])


def test_split_hostname_without_one() -> None:
    assert split_hostname(["-O", "fair"]) == (None, ["-O", "fair"])


def test_worker_children_names_ports_and_beat() -> None:
    children = worker_children(
        ["cancelflow", "worker"], 3, hostname="w@h", metrics_port=9808, beat=True
    )
    assert [c.argv for c in children] == [
        ["cancelflow", "worker", "-n", "w-0@h", "--beat"],
        ["cancelflow", "worker", "-n", "w-1@h"],
        ["cancelflow", "worker", "-n", "w-2@h"],
    ]
    assert [c.env for c in children] == [
        {"CANCELFLOW_WORKER__PROCESSES": "1", "CANCELFLOW_WORKER__METRICS_PORT": str(p)}
        for p in (9808, 9809, 9810)
    ]


def test_worker_children_without_metrics_keep_them_off() -> None:
    [child] = worker_children(["w"], 1, hostname="w@h", metrics_port=0, beat=False)
    assert child.env == {"CANCELFLOW_WORKER__PROCESSES": "1"}


def test_worker_children_refuse_ports_past_the_last() -> None:
    with pytest.raises(ValueError, match="65535 to 65536"):
        worker_children(["w"], 2, hostname="w@h", metrics_port=65535, beat=False)


def test_line_logger_writes_cancelflow_json(capsys: pytest.CaptureFixture[str]) -> None:
    line_logger("json")("supervisor.process.started", index=1, pid=42)
    doc = json.loads(capsys.readouterr().err)
    assert doc["message"] == "supervisor.process.started"
    assert (doc["index"], doc["pid"], doc["level"]) == (1, 42, "info")
    assert doc["logger"] == "cancelflow.supervisor"
    assert doc["timestamp"].endswith("Z")


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_dying_at_start_stops_the_rest_with_its_status() -> None:
    events: list[tuple[str, dict[str, object]]] = []
    children = [
        Child(0, _python("import time; time.sleep(60)"), {}),
        Child(1, _python("raise SystemExit(3)"), {}),
    ]
    sup = Supervisor(children, lambda event, **kw: events.append((event, kw)), poll_s=0.05)
    assert sup.run() == 3
    names = [e for e, _ in events]
    assert "supervisor.process.failed" in names
    assert children[0].proc is None  # stopped, and waited for


def test_a_child_dying_after_it_ran_a_while_is_replaced(tmp_path: Path) -> None:
    """Two ends past ``min_uptime_s`` are two restarts; the third run stops the supervisor
    with SIGTERM, which the supervisor passes on to it."""
    events: list[tuple[str, dict[str, object]]] = []
    script = (
        "import os, pathlib, signal, sys, time\n"
        "p = pathlib.Path(sys.argv[1]); n = int(p.read_text() or 0) + 1; p.write_text(str(n))\n"
        "if n == 3:\n"
        "    os.kill(os.getppid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "time.sleep(0.3)\n"
    )
    counter = tmp_path / "runs"
    counter.write_text("")
    child = Child(0, [*_python(script), str(counter)], {})
    sup = Supervisor(
        [child], lambda event, **kw: events.append((event, kw)), min_uptime_s=0.2, poll_s=0.05
    )
    assert sup.run() == 128 + signal.SIGTERM
    assert counter.read_text() == "3"
    assert child.restarts == 2
    assert [e for e, _ in events] == [
        "supervisor.process.started",
        "supervisor.process.restarting",
        "supervisor.process.started",
        "supervisor.process.restarting",
        "supervisor.process.started",
        "supervisor.process.stopped",
    ]


def test_a_signal_while_the_children_start_stops_every_one_of_them() -> None:
    """SIGTERM before the last child is started: the ones started get it passed on, the
    rest are not started, and the supervisor ends."""
    events: list[str] = []
    children = [Child(i, _python("import time; time.sleep(60)"), {}) for i in range(3)]
    sup = Supervisor(children, lambda event, **kw: events.append(event), poll_s=0.05)
    real_start = sup.start

    def start_then_signal(child: Child) -> None:
        real_start(child)
        if child.index == 0:
            signal.raise_signal(signal.SIGTERM)  # handled by the supervisor, as from outside

    sup.start = start_then_signal  # type: ignore[method-assign]
    assert sup.run() == 128 + signal.SIGTERM
    assert events.count("supervisor.process.started") == 1
    assert events.count("supervisor.process.stopped") == 1


def test_the_supervisor_module_imports_the_standard_library_only() -> None:
    """It is what a ``--processes`` worker runs as: neither Celery nor pydantic in it."""
    code = (
        "import sys, producers.supervisor\n"
        "heavy = {'celery', 'kombu', 'pydantic', 'structlog', 'redis', 'click', 'cancelflow'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
