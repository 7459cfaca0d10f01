"""``cancelflow flower`` and every place that runs Flower: no default credentials, no start
without them, no unauthenticated API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from producers.flower_cmd import auth_problem
from tests.deploy.support import ENV_EXAMPLE, ROOT, compose, env_file

CANCELFLOW = Path(sys.executable).with_name("cancelflow")


def run_flower(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``cancelflow flower`` with only these Flower variables, and a broker nobody listens
    on: a Flower that did start could reach no Redis of this machine."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "CANCELFLOW_"))}
    clean["CANCELFLOW_REDIS_URL"] = "redis://127.0.0.1:1/0"
    return subprocess.run(
        [str(CANCELFLOW), "flower", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_flower_refuses_to_start_without_credentials() -> None:
    result = run_flower("--address=127.0.0.1", "--port=5555")
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("cancelflow flower: set FLOWER_BASIC_AUTH=user:password"), line
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        ((), {"FLOWER_BASIC_AUTH": "admin:change-me"}, "well-known default"),
        ((), {"FLOWER_BASIC_AUTH": "admin:"}, "must be user:password"),
        ((), {"FLOWER_BASIC_AUTH": "op:s3cret", "FLOWER_UNAUTHENTICATED_API": "true"}, "unset"),
        (("--no-auth", "--address=0.0.0.0"), {}, "--no-auth needs --address=127.0.0.1"),
        (("--no-auth",), {}, "--no-auth needs --address=127.0.0.1"),
        (("--no-auth", "--address=127.0.0.1"), {"FLOWER_BASIC_AUTH": "op:s3"}, "choose one"),
    ],
)
def test_flower_refuses_weak_or_open_configurations(
    args: tuple[str, ...], env: dict[str, str], says: str
) -> None:
    result = run_flower(*args, **env)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert says in line, line


def test_flower_starts_flower_once_credentials_are_set() -> None:
    # `--help` goes through to Flower itself: proof the exec reaches it, without a server.
    result = run_flower("--help", FLOWER_BASIC_AUTH="operator:s3cret-pass")
    assert result.returncode == 0, result.stderr
    assert "Web based tool for monitoring and administrating Celery clusters" in result.stdout


def test_no_auth_is_only_for_loopback() -> None:
    assert auth_problem(["--address=127.0.0.1"], {}, no_auth=True) is None
    assert auth_problem(["--address", "localhost"], {}, no_auth=True) is None
    assert auth_problem([], {"FLOWER_ADDRESS": "0.0.0.0"}, no_auth=True) is not None  # noqa: S104
    assert auth_problem(["--basic_auth=a:b1", "--basic_auth="], {}, no_auth=False) is not None


def test_no_file_ships_flower_credentials_or_an_open_api() -> None:
    assert "FLOWER_BASIC_AUTH" not in env_file(ENV_EXAMPLE), ".env.example: no Flower password"
    flower_lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if "FLOWER" in line]
    assert not any("change-me" in line for line in flower_lines), flower_lines
    for path in [ROOT / "docker-compose.yml", ROOT / "Makefile", *(ROOT / "deploy").rglob("*")]:
        if path.is_file() and path.suffix not in (".json", ".md"):  # docs may name them
            text = path.read_text()
            assert "FLOWER_UNAUTHENTICATED_API" not in text, path
            assert not re.search(r"basic[_-]auth[=:]\s*(?!user:password)\w+:\w+", text, re.I), path


def test_compose_flower_runs_through_the_guard_and_needs_credentials() -> None:
    flower = compose()["services"]["flower"]
    assert "entrypoint" not in flower, "the image's entrypoint: `cancelflow flower`"
    assert flower["command"][0] == "flower"
    assert "--no-auth" not in flower["command"]
    auth = flower["environment"]["FLOWER_BASIC_AUTH"]
    # Compose refuses to start when the variable is unset or empty (`:?`).
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]+\}", auth), auth


def test_make_flower_runs_through_the_guard() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nflower:", 1)[1].split("\n\n", 1)[0]
    assert "cancelflow flower" in recipe, recipe
    assert "celery" not in recipe.replace("Celery", ""), "not celery flower directly: no guard"
