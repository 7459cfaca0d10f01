"""The canary of ``messaging.patches``: every upstream method it overrides, copies or unpacks
still has the source it was written against, and the installed celery and kombu are the
minor versions pyproject.toml pins. A failure here means: read what changed upstream under
the override named, adapt it, and record the new hash."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from messaging import patches

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("qualified", sorted(patches.UPSTREAM))
def test_the_overridden_upstream_method_is_unchanged(qualified: str) -> None:
    assert patches.source_hash(qualified) == patches.UPSTREAM[qualified], (
        f"{qualified} changed upstream: read the change against messaging/patches.py"
    )


def test_celery_and_kombu_are_pinned_to_the_minor_version_installed() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("celery", "kombu"):
        [spec] = [d for d in deps if re.match(rf"{name}(\[|=)", d)]
        pinned = re.fullmatch(rf"{name}(\[[a-z,]+\])?==(\d+\.\d+)\.\*", spec)
        assert pinned is not None, f"{spec!r} is not an exact minor-version pin"
        installed = version(name)
        assert installed.startswith(pinned.group(2) + "."), (name, installed, spec)


def test_a_changed_method_is_caught() -> None:
    # The hash is of the source itself: another method's source does not match.
    assert (
        patches.source_hash("kombu.transport.redis:Channel._get")
        != patches.UPSTREAM["kombu.transport.redis:Channel._brpop_read"]
    )


def test_every_override_in_the_module_is_of_a_method_it_watches() -> None:
    # Each private method the module's classes define over an upstream one is watched.
    watched = {q.rsplit(".", 1)[-1] for q in patches.UPSTREAM}
    overrides = {
        name
        for cls in (
            patches.Channel,
            patches.SentEvents,
            patches.WorkerChannel,
            patches.QoS,
            patches.StepRequest,
            patches.LoopPoolBase,
        )
        for name, value in vars(cls).items()
        if callable(value)
        and name.startswith("_")
        and not name.startswith("__")
        and any(hasattr(base, name) for base in cls.__mro__[1:])
    }
    assert overrides <= watched
