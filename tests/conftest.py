"""What every test needs, and nothing heavier: the runner for ``async def`` tests.

The fixtures of a running system (a Redis DB of the session's own, the sandboxes, APIs and
workers) live in ``tests.fixtures.system``, registered by the conftests of the directories
whose tests use them, so a unit test run imports neither Celery nor the sandboxes.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest

# The fixture plugins assert too, and some conftests import from them before registering them.
pytest.register_assert_rewrite("tests.fixtures")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run a coroutine test in a fresh event loop; leave sync tests to pytest."""
    function = pyfuncitem.obj
    if not inspect.iscoroutinefunction(function):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    asyncio.run(function(**{name: pyfuncitem.funcargs[name] for name in names}))
    return True
