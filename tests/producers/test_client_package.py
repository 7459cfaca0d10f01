"""The client is a distribution of its own: it installs alone (httpx and pydantic, nothing of
the server's), its blocking half is what unasync makes of its asyncio half, and its models are
the server's, field for field."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import typing
import venv
import warnings
import zipfile
from datetime import datetime
from enum import StrEnum
from pathlib import Path

import pytest
from pydantic import BaseModel

import cancelflow_client
from cancelflow import contract, dead_letters, endpoints
from cancelflow_client import ClientSettings, SettingsError, models
from producers import schemas

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "producers" / "client"


def _generator() -> typing.Any:
    spec = importlib.util.spec_from_file_location("unasync_gen", CLIENT / "unasync_gen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_blocking_client_is_what_unasync_makes_of_the_asyncio_one() -> None:
    gen = _generator()
    checked_in = gen.TARGET.read_text()
    assert checked_in == gen.generate(), (
        "producers/client/src/cancelflow_client/_sync/client.py is out of date: "
        "run .venv/bin/python producers/client/unasync_gen.py"
    )
    # And it is blocking: no coroutine, no asyncio left in it.
    assert "async def" not in checked_in and "await " not in checked_in
    assert "asyncio" not in checked_in


def test_both_clients_have_the_same_methods() -> None:
    def public(cls: type) -> set[str]:
        return {n for n in vars(cls) if not n.startswith("_")}

    sync = public(cancelflow_client.CancelflowClient)
    asyncio_ = public(cancelflow_client.AsyncCancelflowClient)
    assert sync - {"close"} == asyncio_ - {"aclose"}
    assert {"enqueue", "get", "decide", "wait", "list", "providers", "replay"} <= sync


# The client's wire models and the server's they copy: every field, every enum value.
PAIRS: list[tuple[type[BaseModel], type[BaseModel]]] = [
    (models.Reason, contract.Reason),
    (models.CancellationRequest, contract.CancellationRequest),
    (models.Decision, contract.Decision),
    (models.Outcome, contract.Outcome),
    (models.Offer, contract.Offer),
    (models.TimelineEntry, contract.TimelineEntry),
    (models.CallbackAttempt, contract.CallbackAttempt),
    (models.JobRecord, contract.JobRecord),
    (models.JobSummary, schemas.JobSummary),
    (models.JobPage, schemas.JobPage),
    (models.Stats, schemas.Stats),
    (models.DeadLetter, dead_letters.DeadLetter),
    (models.Replayed, schemas.Replayed),
    (models.ProviderState, schemas.ProviderState),
    (models.Enqueued, schemas.Enqueued),
    (models.FieldError, schemas.FieldError),
    (models.Problem, schemas.Problem),
    (models.EndpointCreate, schemas.EndpointCreate),
    (models.EndpointUpdate, schemas.EndpointUpdate),
    (models.SecretRotation, schemas.SecretRotation),
    (models.WebhookEndpoint, endpoints.WebhookEndpoint),
    (models.EndpointPage, schemas.EndpointPage),
    (models.EndpointSecret, schemas.EndpointSecret),
]


def test_the_client_event_types_are_the_servers() -> None:
    assert typing.get_args(models.EventType) == typing.get_args(schemas.EventType)


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_the_client_models_are_the_servers(ours: type[BaseModel], theirs: type[BaseModel]) -> None:
    assert list(ours.model_fields) == list(theirs.model_fields)
    for name, field in ours.model_fields.items():
        server = theirs.model_fields[name]
        if server.default_factory is None or field.default_factory is not None:
            # (A field the server makes itself, an id, is always in its answers.)
            assert field.is_required() == server.is_required(), name


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(models.Status, contract.Status), (models.OutcomeType, contract.OutcomeType)],
)
def test_the_client_enums_are_the_servers(ours: type[StrEnum], theirs: type[StrEnum]) -> None:
    assert [m.value for m in ours] == [m.value for m in theirs]


def test_dead_letter_kinds_are_the_servers() -> None:
    assert typing.get_args(models.DeadLetterKind) == dead_letters.KINDS


def test_a_server_job_record_reads_as_the_clients() -> None:
    record = contract.JobRecord(
        id="job_" + "0" * 32,
        provider="payway",
        subscription={"account_id": "a"},
        status=contract.Status.FINISHED,
        outcome=contract.Outcome(type=contract.OutcomeType.CANCELLED),
        created_at="2026-01-01T00:00:00.000Z",
        updated_at="2026-01-01T00:00:01.000Z",
    )
    read = models.JobRecord.model_validate_json(record.model_dump_json())
    ours, theirs = read.model_dump(mode="json"), record.model_dump(mode="json")
    # The client reads timestamps as datetimes (the document's ``date-time``).
    for stamp in ("created_at", "updated_at"):
        assert datetime.fromisoformat(ours.pop(stamp)) == datetime.fromisoformat(theirs.pop(stamp))
    assert ours == theirs


def test_an_invalid_variable_is_named_and_its_value_never_shown() -> None:
    with pytest.raises(SettingsError) as caught:
        ClientSettings.from_env({"CANCELFLOW_CLIENT__RETRIES": "many", "HOME": "/"})
    assert "CANCELFLOW_CLIENT__RETRIES" in str(caught.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conf = ClientSettings.from_env({"CANCELFLOW_CLIENT__TOKEN": "s3cret"})
    assert "s3cret" not in repr(conf)


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv's interpreter, with pip and nothing else."""
    env_dir = tmp_path_factory.mktemp("fresh") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    return env_dir / "bin" / "python"


def test_installed_alone_it_brings_nothing_of_the_servers(
    fresh_python: Path, tmp_path: Path
) -> None:
    """``pip install ./producers/client`` in a fresh venv: httpx and pydantic, and neither
    Celery, aiohttp nor Redis; then the client imports and works there, without the server."""
    python = fresh_python
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--prefer-binary", str(CLIENT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"cancelflow-client", "httpx", "pydantic"} <= names
    server_side = {"celery", "kombu", "aiohttp", "redis", "fakeredis", "flower", "cancelflow"}
    assert names.isdisjoint(server_side), names & server_side
    used = subprocess.run(
        [
            str(python),
            "-c",
            "import sys, cancelflow_client as c\n"
            "cf = c.CancelflowClient('http://127.0.0.1:9', 't', retries=0)\n"
            "try:\n"
            "    cf.get('job_x')\n"
            "except c.TransportError as e:\n"
            "    print('transport', e.sent)\n"
            "gone = [m for m in ('celery', 'aiohttp', 'redis', 'cancelflow', 'producers')\n"
            "        if m in sys.modules]\n"
            "print('imported', gone)\n",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: only what was installed can be imported
        timeout=60,
        check=False,
    )
    assert used.returncode == 0, used.stderr
    assert used.stdout.split("\n")[:2] == ["transport False", "imported []"]


def test_the_servers_wheel_ships_the_server_only(fresh_python: Path, tmp_path: Path) -> None:
    """The root distribution's wheel: the server's packages, without the client's copy (it is
    a dependency), the tests or the bench."""
    pip_wheel = [str(fresh_python), "-m", "pip", "wheel", "--no-deps", "--quiet"]
    built = subprocess.run(
        [*pip_wheel, "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("cancelflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"brokers", "cancelflow", "messaging", "worker", "producers", "sandboxes"}
    assert not [n for n in names if n.startswith(("producers/client/", "tests/", "bench/"))]
    assert "producers/cli/dlq.py" in names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]  # fmt: skip
    assert any("cancelflow-client" in r for r in requires)
    assert not any(dev in r for r in requires for dev in ("pytest", "mypy", "unasync", "ruff"))
