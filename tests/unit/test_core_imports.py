"""The core (``cancelflow/``) knows nothing of Celery: importing every one of its modules loads
neither celery nor kombu (nor their own dependencies). The Celery glue is ``messaging/``
(shared by producers and workers) and ``worker/``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CELERY_FAMILY = ("celery", "kombu", "billiard", "amqp", "vine")

# In a fresh interpreter: this test process has imported Celery for other tests.
PROBE = """
import importlib, json, pkgutil, sys
import cancelflow
names = [m.name for m in pkgutil.walk_packages(cancelflow.__path__, "cancelflow.")]
for name in names:
    importlib.import_module(name)
loaded = sorted(n for n in sys.modules if n.split(".")[0] in FAMILY)
print(json.dumps({"modules": names, "loaded": loaded}))
""".replace("FAMILY", repr(CELERY_FAMILY))


def test_no_module_of_the_core_imports_celery_or_kombu() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    found = json.loads(done.stdout)
    # Every module was imported, the split ones included.
    assert {
        "cancelflow.lifecycle",
        "cancelflow.chain",
        "cancelflow.decisions",
        "cancelflow.sweeps",
        "cancelflow.delivery",
        "cancelflow.retry",
        "cancelflow.store",
        "cancelflow.wiring",
        "cancelflow.metrics",
    } <= set(found["modules"])
    assert found["loaded"] == []


def test_the_probe_sees_celery_when_it_is_imported() -> None:
    # The same probe, with a module that does import Celery: it is found.
    done = subprocess.run(
        [sys.executable, "-c", "import messaging.config\n" + PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = json.loads(done.stdout)["loaded"]
    assert "celery" in loaded and "kombu" in loaded
