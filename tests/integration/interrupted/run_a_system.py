"""The run ``test_interrupted_runs`` interrupts: it starts a system (sandbox, API, worker, on two
locked Redis DBs), says so in ``$CANCELFLOW_INTERRUPT_READY``, then waits to be interrupted.

Not named ``test_*``: pytest collects it only when given its path."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.fixtures.system import StartSystem


def test_waits_to_be_interrupted(redis_url: str, start_system: StartSystem) -> None:
    system = start_system(isolated=True)
    ready = Path(os.environ["CANCELFLOW_INTERRUPT_READY"])
    ready.write_text(json.dumps({"dbs": [redis_url, system.redis_url]}))
    time.sleep(300)
    raise AssertionError("never interrupted")
