"""deploy/Dockerfile and .dockerignore, read statically (there is no Docker engine to build
with here): stages, the lock file, the user, the entrypoint, what the build context holds."""

from __future__ import annotations

import json
import re
import tomllib
from fnmatch import fnmatch
from typing import Any

from packaging.specifiers import SpecifierSet

from tests.deploy.support import ROOT, dockerfile, image_entrypoint, resolve, setting_names

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def stages() -> list[list[dict[str, Any]]]:
    """The instructions of each stage, FROM first."""
    found: list[list[dict[str, Any]]] = []
    for instruction in dockerfile().structure:
        if instruction["instruction"] == "FROM":
            found.append([])
        if found and instruction["instruction"] != "COMMENT":
            found[-1].append(instruction)
    return found


def values(stage: list[dict[str, Any]], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def copied_sources(stage: list[dict[str, Any]]) -> list[str]:
    """What a stage COPYs from the build context (not ``--from`` another stage)."""
    sources = []
    for value in values(stage, "COPY"):
        parts = [p for p in value.split() if not p.startswith("--")]
        if "--from=" not in value:
            sources.extend(parts[:-1])
    return sources


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    # Enough of Docker's rules for the plain patterns the file uses (no negations).
    return any(fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in dockerignore())


def test_builder_installs_the_lock_file_and_runtime_only_copies_the_venv() -> None:
    builder, runtime = stages()
    assert values(builder, "FROM")[0].endswith("AS builder")
    runs = " ".join(values(builder, "RUN"))
    assert re.search(r"uv sync --frozen --no-dev --no-install-project", runs), "dependencies layer"
    assert re.search(r"uv sync --frozen --no-dev --no-editable", runs), "the project, not editable"
    assert values(runtime, "COPY") == ["--from=builder /opt/venv /opt/venv"]
    assert "-slim" in values(runtime, "FROM")[0], "a slim runtime"


def test_the_image_uses_the_uv_and_python_the_project_pins() -> None:
    (pin,) = re.findall(r'"uv==([^"]+)"', " ".join(values(stages()[0], "RUN")))
    makefile_pin = re.search(r'"uv==([^"]+)"', (ROOT / "Makefile").read_text())
    assert makefile_pin and pin == makefile_pin.group(1), "the same uv as `make setup`"
    # A global ARG (before the first FROM) chooses both stages' base image.
    structure = dockerfile().structure
    first_from = next(i["startline"] for i in structure if i["instruction"] == "FROM")
    global_args = dict(
        i["value"].split("=", 1)
        for i in structure
        if i["instruction"] == "ARG" and i["startline"] < first_from and "=" in i["value"]
    )
    python = global_args["PYTHON_VERSION"]
    assert all("python:${PYTHON_VERSION}-" in values(stage, "FROM")[0] for stage in stages())
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(python)


def test_every_package_is_copied_into_the_build() -> None:
    packages = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    copied = copied_sources(stages()[0])
    assert set(packages) <= set(copied), f"not copied: {set(packages) - set(copied)}"
    # hatchling needs the readme named in pyproject.toml to build the wheel.
    assert {"pyproject.toml", "uv.lock", PYPROJECT["project"]["readme"]} <= set(copied)


def test_build_context_holds_what_is_copied_and_no_local_state() -> None:
    for source in copied_sources(stages()[0]):
        assert not ignored(source), f".dockerignore excludes {source}, which the build copies"
    for local in (".venv", ".git", ".env", ".cache", "tests"):
        assert ignored(local), f"{local} should not be sent to the builder"


def test_runtime_runs_cancelflow_as_a_non_root_user() -> None:
    runtime = stages()[-1]
    (user,) = values(runtime, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric uid, so runAsNonRoot can verify it"
    assert image_entrypoint() == ["cancelflow"]
    (cmd,) = values(runtime, "CMD")
    args = json.loads(cmd)
    if args and not args[0].startswith("-"):
        resolve(["cancelflow", *args])


def test_image_environment_names_real_settings() -> None:
    env = dockerfile().envs
    ours = {k for k in env if k.startswith("CANCELFLOW_")}
    assert ours <= setting_names(), ours - setting_names()
    assert env["PATH"].startswith("/opt/venv/bin:")
