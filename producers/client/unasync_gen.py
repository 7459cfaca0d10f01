"""Write the blocking client (``_sync/client.py``) from the asyncio one (``_async/client.py``)
with ``unasync``, then format it as the repository does (``ruff format``).

    python producers/client/unasync_gen.py            # regenerate in place
    python producers/client/unasync_gen.py --check    # exit 1 if the checked-in file differs

``tests/producers/test_client_unasync.py`` runs the check.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import unasync

PACKAGE = Path(__file__).resolve().parent / "src" / "cancelflow_client"
SOURCE = PACKAGE / "_async" / "client.py"
TARGET = PACKAGE / "_sync" / "client.py"

# Besides unasync's own (async/await dropped, __aenter__ -> __enter__, aclose -> close,
# AsyncIterator -> Iterator, ...).
REPLACEMENTS = {
    "AsyncCancelflowClient": "CancelflowClient",
    "AsyncClient": "Client",
    "aclose": "close",
    "async_sleep": "sync_sleep",
    "_async": "_sync",
}
HEADER = "# Generated from _async/client.py by producers/client/unasync_gen.py: do not edit.\n"


def generate() -> str:
    """The blocking client's source, as it should be checked in."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "_async" / "client.py"
        src.parent.mkdir()
        shutil.copyfile(SOURCE, src)
        rule = unasync.Rule("/_async/", "/_sync/", additional_replacements=REPLACEMENTS)
        unasync.unasync_files([str(src)], rules=[rule])
        out = Path(tmp) / "_sync" / "client.py"
        out.write_text(HEADER + out.read_text())
        root = Path(__file__).resolve().parents[2]  # ruff's settings: the repository's
        ruff = [sys.executable, "-m", "ruff"]
        config = ["--config", str(root / "pyproject.toml")]
        # Imports sorted again (a renamed name moves), then formatted: as `make lint` wants.
        for args in (["check", "--quiet", "--fix", "--select", "I"], ["format", "--quiet"]):
            subprocess.run([*ruff, *args, *config, str(out)], check=True, cwd=root)  # noqa: S603
        return out.read_text()


def main() -> int:
    wanted = generate()
    if "--check" in sys.argv[1:]:
        if TARGET.read_text() != wanted:
            print(f"{TARGET} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
