"""The CLI's API token need not be on the command line, where the process list shows it."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from producers import cli
from producers.cli import common


@click.command()
@common.client_options
def show(api_url: str | None, token: str | None, as_json: bool) -> None:
    """The token the real client commands would use (``cli._client_settings``)."""
    found = common.client_settings(api_url, token).api_token
    click.echo(found.get_secret_value() if found else "")


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.delenv("CANCELFLOW_API_TOKEN", raising=False)
    monkeypatch.delenv("CANCELFLOW_CLIENT__TOKEN", raising=False)
    return CliRunner()


def test_the_token_comes_from_the_environment(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CANCELFLOW_CLIENT__TOKEN", "from-env")
    done = runner.invoke(show, [])
    assert (done.exit_code, done.stdout.strip(), done.stderr) == (0, "from-env", "")


def test_the_token_comes_from_a_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("from-file\n")
    done = runner.invoke(show, ["--token-file", str(path)])
    assert (done.exit_code, done.stdout.strip(), done.stderr) == (0, "from-file", "")


def test_a_token_on_the_command_line_works_but_warns_of_the_process_list(
    runner: CliRunner,
) -> None:
    done = runner.invoke(show, ["--token", "on-argv"])
    assert (done.exit_code, done.stdout.strip()) == (0, "on-argv")
    assert "process list" in done.stderr


def test_no_token_anywhere_exits_2_and_says_where_to_put_one(runner: CliRunner) -> None:
    done = runner.invoke(show, [])
    assert done.exit_code == 2
    assert "CANCELFLOW_CLIENT__TOKEN" in done.stderr and "--token-file" in done.stderr


def test_every_client_command_documents_the_risk(runner: CliRunner) -> None:
    done = runner.invoke(cli.main, ["status", "--help"])
    assert "--token-file" in done.stdout
    assert "process list" in done.stdout
