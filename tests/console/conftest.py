"""Debian's Chromium driven by Playwright, and screenshots kept as test artifacts.

No browser is downloaded: the tests use ``/usr/bin/chromium`` (CI installs it, see
``.ci/run``) and fail, not skip, when it is missing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests import fixtures


def pytest_configure(config: pytest.Config) -> None:
    # The console tests run against a real system: its fixtures come from the shared plugin.
    fixtures.use(config, fixtures.SYSTEM)


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"

Shot = Callable[[Page, str], Path]
TAKEN: list[Path] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Every screenshot this run took, listed at the end of the run."""
    if TAKEN:
        terminalreporter.section("console screenshots")
        for path in TAKEN:
            terminalreporter.write_line(str(path))


@pytest.fixture(scope="module")  # not the session: its event loop would run under every later test
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (as .ci/run does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def shot(request: pytest.FixtureRequest) -> Shot:
    """A full-page screenshot saved as ``test-artifacts/console/<test>-<name>.png``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    test = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)

    def take(page: Page, name: str) -> Path:
        path = ARTIFACTS / f"{test}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        TAKEN.append(path)
        return path

    return take
