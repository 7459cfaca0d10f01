"""Reading the deployment files, and checking what they name against the code itself: the
``cancelflow`` commands, the queues, the settings."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import click
import yaml
from dockerfile_parse import DockerfileParser
from pydantic import BaseModel, SecretStr

from cancelflow.contract import DEAD_LETTER_QUEUE
from cancelflow.settings import ENV_PREFIX, Settings
from messaging.config import queues
from producers.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = DEPLOY / "Dockerfile"

# Every queue a worker should consume: all but the dead-letter queue, which parks raw
# messages for operators and has no consumer.
CONSUMED_QUEUES = frozenset(q.name for q in queues()) - {DEAD_LETTER_QUEUE}


# --- files ------------------------------------------------------------------------------------


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def compose() -> dict[str, Any]:
    return yaml_documents(COMPOSE_FILE)[0]


def env_file(path: Path) -> dict[str, str]:
    """A dotenv file as Compose reads it: ``KEY=VALUE`` lines, ``#`` comment lines."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not KEY=VALUE: {raw!r}"
        assert key not in values, f"{path.name}:{number}: {key} set twice"
        values[key.strip()] = value.strip()
    return values


def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(DOCKERFILE))
    return parser


def image_entrypoint() -> list[str]:
    """The ENTRYPOINT of the Dockerfile's last stage (exec form)."""
    entrypoints = [i for i in dockerfile().structure if i["instruction"] == "ENTRYPOINT"]
    assert entrypoints, "the Dockerfile has no ENTRYPOINT"
    value = json.loads(entrypoints[-1]["value"])
    assert isinstance(value, list)
    return [str(v) for v in value]


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml_documents(directory / "kustomization.yaml")[0]


def generator_literals(directory: Path, kind: str, name: str) -> dict[str, str]:
    """The ``literals`` of one config map or secret generator of a kustomization."""
    key = {"ConfigMap": "configMapGenerator", "Secret": "secretGenerator"}[kind]
    for generator in kustomization(directory).get(key, []):
        if generator["name"] == name:
            assert set(generator) <= {"name", "behavior", "literals", "options"}, (
                f"{directory}: {name}: only literals are read by these tests"
            )
            return dict(item.split("=", 1) for item in generator.get("literals", []))
    return {}


def kustomize_sources(directory: Path) -> Iterator[Path]:
    """The YAML files a kustomization (and its bases and components) take as resources."""
    k = kustomization(directory)
    for entry in [*k.get("resources", []), *k.get("components", [])]:
        path = (directory / entry).resolve()
        if path.is_dir():
            yield from kustomize_sources(path)
        else:
            yield path


def kustomize_build(directory: Path) -> list[dict[str, Any]] | None:
    """The rendered manifests (``kubectl kustomize``), or None where kubectl is missing."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


# --- settings ---------------------------------------------------------------------------------


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Union, UnionType):
        return [m for arg in get_args(annotation) for m in _models(arg)]
    return []


def _holds_secret(annotation: Any) -> bool:
    return annotation is SecretStr or any(_holds_secret(arg) for arg in get_args(annotation))


def _leaf_settings() -> dict[str, Any]:
    """Every ``CANCELFLOW_*`` variable Settings reads, with its field's type: one per leaf
    field, nested with ``__`` (provider settings included, one model per provider)."""
    leaves: dict[str, Any] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            nested = _models(info.annotation)
            for sub in nested:
                walk(sub, f"{prefix}{name.upper()}__")
            if not nested:
                leaves[f"{prefix}{name.upper()}"] = info.annotation

    walk(Settings, ENV_PREFIX)
    return leaves


def setting_names() -> frozenset[str]:
    """Every ``CANCELFLOW_*`` variable Settings reads."""
    return frozenset(_leaf_settings())


def secret_setting_names() -> frozenset[str]:
    """The settings typed ``SecretStr`` (the API tokens, provider credentials, callback
    secrets): they belong in a Secret, not a ConfigMap."""
    return frozenset(
        name for name, annotation in _leaf_settings().items() if _holds_secret(annotation)
    )


# --- commands ---------------------------------------------------------------------------------


@dataclass
class Command:
    """A command line resolved against the real CLI that would run it."""

    argv: list[str]
    path: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)

    @property
    def queues(self) -> list[str]:
        """The queues a ``cancelflow worker`` command consumes (``-Q``)."""
        assert self.path == ["cancelflow", "worker"], self.argv
        assert self.params["queues"], f"{self.argv}: name the queues (-Q)"
        return [q.strip() for q in self.params["queues"].split(",")]

    def option(self, *names: str) -> str | None:
        """The value of an option passed through to Celery (``-n x`` or ``--hostname=x``)."""
        args = self.extra
        for i, arg in enumerate(args):
            for name in names:
                if arg == name and i + 1 < len(args):
                    return args[i + 1]
                if arg.startswith(f"{name}="):
                    return arg.split("=", 1)[1]
        return None


# Programs from other images the files may run; their arguments are not ours to check.
FOREIGN_PROGRAMS = frozenset({"redis-server", "redis-cli", "sleep", "sh"})


def resolve(argv: Sequence[str]) -> Command:
    """Parse a command line the way the program would, failing on an unknown command or
    option: ``cancelflow`` by its click group, what ``cancelflow worker|beat`` hands on to
    Celery by Celery's own parser, ``celery -A worker.app flower`` by Flower's options."""
    argv = list(argv)
    assert argv, "empty command"
    if argv[0] == "cancelflow":
        return _resolve_cancelflow(argv)
    if argv[0] == "celery":
        return _resolve_celery(argv)
    assert argv[0] in FOREIGN_PROGRAMS, f"{argv}: unknown program {argv[0]!r}"
    return Command(argv=argv, path=[argv[0]])


def _resolve_cancelflow(argv: list[str]) -> Command:
    command: click.Command = cli
    path = ["cancelflow"]
    args = argv[1:]
    while isinstance(command, click.Group):
        assert args and not args[0].startswith("-"), (
            f"{argv}: `{' '.join(path)}` needs a subcommand"
        )
        name = args.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, (
            f"{argv}: `{' '.join(path)}` has no command {name!r} (has {sorted(command.commands)})"
        )
        command, path = sub, [*path, name]
    try:
        ctx = command.make_context(" ".join(path), list(args))
    except click.ClickException as exc:
        raise AssertionError(f"{argv}: {exc.format_message()}") from None
    resolved = Command(argv=argv, path=path, params=dict(ctx.params), extra=list(ctx.args))
    if resolved.extra:
        _check_celery_options(resolved)
    return resolved


def _celery_context() -> Any:
    from celery.bin.base import CLIContext

    from messaging.config import create_celery

    return CLIContext(app=create_celery(Settings()), no_color=True, workdir=None, quiet=True)


def _check_celery_options(command: Command) -> None:
    # `cancelflow worker` and `cancelflow beat` hand unknown options to Celery unchanged.
    from celery.bin.beat import beat
    from celery.bin.worker import worker

    if command.path == ["cancelflow", "flower"]:
        # `cancelflow flower` execs `celery -A worker.app flower` with the rest.
        _check_flower_options(command.argv, command.extra)
        return
    celery_command = {"worker": worker, "beat": beat}.get(command.path[-1])
    assert celery_command is not None, f"{command.argv}: unexpected arguments {command.extra}"
    try:
        celery_command.make_context(command.path[-1], list(command.extra), obj=_celery_context())
    except click.ClickException as exc:
        raise AssertionError(
            f"{command.argv}: celery {command.path[-1]}: {exc.format_message()}"
        ) from None


def _resolve_celery(argv: list[str]) -> Command:
    # The only Celery command line we run directly is Flower on the workers' app.
    assert argv[1:4] in (["-A", "worker.app", "flower"], ["--app", "worker.app", "flower"]), (
        f"{argv}: expected `celery -A worker.app flower ...`"
    )
    _check_flower_options(argv, argv[4:])
    return Command(argv=argv, path=["celery", "flower"], extra=argv[4:])


def _check_flower_options(argv: list[str], args: list[str]) -> None:
    from flower.options import options

    for arg in args:
        assert arg.startswith("--"), f"{argv}: Flower options are --name=value, got {arg!r}"
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        assert name in options, f"{argv}: Flower has no option --{name}"
