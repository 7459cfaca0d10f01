"""Adding a provider is what the README's guide says, proven on a throwaway provider.

``tests/contract/throwaway`` holds an adapter, a sandbox and a contract table written as the
guide says, and a plugin adding the guide's registry lines. A pytest run of its own with that
plugin (a new process: the registries are read when the modules deriving from them are
imported) must run every test the contract suite and the sandboxes' shared tests run for a
registered provider, and they must pass, with no edit to either suite; and the settings, the
queues, the API's validation and the OpenAPI document must have it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "tests.contract.throwaway.plugin"
KEY = "throwaway"
# A provider already in the tree with no bearer token, like the throwaway: every test it runs
# in these suites, the throwaway must run too.
LIKE = "appdirect"
SUITES = [
    "tests/contract/test_provider_contract.py",
    "tests/contract/test_redaction.py",
    "tests/sandboxes/test_control.py",
    "tests/sandboxes/test_faults.py",
]
DERIVED = "tests/contract/throwaway/derived.py"


def outcomes(junit: Path) -> dict[str, str]:
    """Each test case of a JUnit report (``file::name``) and how it ended."""
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314 - our own report
        ended = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        found[f"{case.get('classname')}::{case.get('name')}"] = ended[0] if ended else "passed"
    return found


def test_a_registered_provider_runs_the_contract_suite_and_is_everywhere_derived(
    tmp_path: Path,
) -> None:
    junit = tmp_path / "junit.xml"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            PLUGIN,
            "-p",
            "no:cacheprovider",
            "-q",
            f"--junitxml={junit}",
            "-k",
            f"{KEY} or {LIKE} or derived",
            *SUITES,
            DERIVED,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    ended = outcomes(junit)
    ours = {name: how for name, how in ended.items() if f"[{KEY}" in name or f"-{KEY}" in name}
    expected = {name.replace(LIKE, KEY) for name in ended if LIKE in name.split("::")[-1]}
    assert expected, "the suites ran nothing for the provider to compare with"
    assert set(ours) == expected, sorted(expected ^ set(ours))
    assert set(ours.values()) == {"passed"}, ours
    derived = {name: how for name, how in ended.items() if "derived" in name}
    assert len(derived) == 4
    assert set(derived.values()) == {"passed"}, derived
