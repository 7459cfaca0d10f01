"""Cancelflow's Redis users as deploy/redis/acl.yaml defines them, rendered as each deployment
writes them: an ACL file's lines (Kubernetes, tests) and redis-server's ``--user`` arguments
(Compose). Used by tests/deploy (the manifests must say exactly this) and
tests/integration/test_redis_acl.py (the system runs with it)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

ACL_SOURCE = Path(__file__).resolve().parents[1] / "deploy" / "redis" / "acl.yaml"


@dataclass(frozen=True)
class RedisUser:
    name: str
    password_var: str
    # Every rule after the password: the common ones, then the role's.
    rules: tuple[str, ...]


def redis_users() -> dict[str, RedisUser]:
    """Every role's user, by name."""
    source = yaml.safe_load(ACL_SOURCE.read_text())
    common = tuple(source["common"].split())
    return {
        name: RedisUser(name, user["password_var"], common + tuple(user["rules"].split()))
        for name, user in source["users"].items()
    }


def acl_line(user: RedisUser, password: str) -> str:
    return " ".join(("user", user.name, "on", f">{password}", *user.rules))


def acl_file(passwords: Mapping[str, str]) -> str:
    """An ACL file with no default user and the users named in ``passwords`` (name ->
    password), in the source's order."""
    users = redis_users()
    lines = ["user default off"]
    lines += [acl_line(u, passwords[name]) for name, u in users.items() if name in passwords]
    return "\n".join(lines) + "\n"


def compose_password(var: str) -> str:
    """How docker-compose.yml names a password: required, from ``.env``."""
    return f"${{{var}:?set {var} in .env}}"


def compose_user_args(names: Iterable[str]) -> list[str]:
    """redis-server's ``--user`` arguments for these users, their passwords from ``.env``."""
    users = redis_users()
    args = ["--user", "default", "off"]
    for name in names:
        user = users[name]
        args += ["--user", user.name, "on", f">{compose_password(user.password_var)}"]
        args += list(user.rules)
    return args
