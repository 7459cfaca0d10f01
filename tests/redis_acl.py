"""Cancelflow's Redis users as deploy/redis/acl.yaml defines them, rendered as each deployment
writes them: an ACL file's lines (Kubernetes, tests) and redis-server's ``--user`` arguments
(Compose). Used by tests/deploy (the manifests must say exactly this) and
tests/integration/test_redis_acl.py (the system runs with it).

With Sentinel, the data nodes also have the replication users (``replica``, ``sentinel``), and
the sentinels their own users and settings (``sentinel_directives``): a sentinel's
configuration as its file's lines (Kubernetes) or its ``--sentinel``/``--user`` arguments
(Compose)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ACL_SOURCE = Path(__file__).resolve().parents[1] / "deploy" / "redis" / "acl.yaml"


@dataclass(frozen=True)
class RedisUser:
    name: str
    password_var: str
    # Every rule after the password: the common ones, then the role's.
    rules: tuple[str, ...]


def _source() -> dict[str, Any]:
    source: dict[str, Any] = yaml.safe_load(ACL_SOURCE.read_text())
    return source


def redis_users() -> dict[str, RedisUser]:
    """Every role's user, by name."""
    source = _source()
    common = tuple(source["common"].split())
    return {
        name: RedisUser(name, user["password_var"], common + tuple(user["rules"].split()))
        for name, user in source["users"].items()
    }


def replication_users() -> dict[str, RedisUser]:
    """The users a replica and the sentinels log in to a data node as (no common rules)."""
    return {
        name: RedisUser(name, user["password_var"], tuple(user["rules"].split()))
        for name, user in _source()["replication"].items()
    }


def data_node_users() -> dict[str, RedisUser]:
    """Every user of a data node under Sentinel: the roles', then replication's."""
    return {**redis_users(), **replication_users()}


@dataclass(frozen=True)
class SentinelUser:
    name: str
    # None: on without a password (the sentinels' `default`, for discovery only).
    password_var: str | None
    rules: tuple[str, ...]


def sentinel_users() -> dict[str, SentinelUser]:
    """The users of the sentinels themselves, by name."""
    return {
        name: SentinelUser(name, user.get("password_var"), tuple(user["rules"].split()))
        for name, user in _source()["sentinels"].items()
    }


# The sentinels' settings, the same in Compose and Kubernetes: the master's name (in every
# sentinel:// URL, `?master=`), two of three sentinels to agree it is down, down after 5 s
# without an answer (a failover then takes a few seconds more).
SENTINEL_MASTER = "cancelflow"
SENTINEL_QUORUM = 2
SENTINEL_DOWN_AFTER_MS = 5000
SENTINEL_FAILOVER_TIMEOUT_MS = 60000


def acl_line(user: RedisUser, password: str) -> str:
    return " ".join(("user", user.name, "on", f">{password}", *user.rules))


def acl_file(passwords: Mapping[str, str]) -> str:
    """An ACL file with no default user and the users named in ``passwords`` (name ->
    password), in the source's order (the roles', then replication's)."""
    users = data_node_users()
    lines = ["user default off"]
    lines += [acl_line(u, passwords[name]) for name, u in users.items() if name in passwords]
    return "\n".join(lines) + "\n"


def compose_password(var: str) -> str:
    """How docker-compose.yml names a password: required, from ``.env``."""
    return f"${{{var}:?set {var} in .env}}"


def compose_user_args(names: Iterable[str]) -> list[str]:
    """redis-server's ``--user`` arguments for these users, their passwords from ``.env``."""
    users = data_node_users()
    args = ["--user", "default", "off"]
    for name in names:
        user = users[name]
        args += ["--user", user.name, "on", f">{compose_password(user.password_var)}"]
        args += list(user.rules)
    return args


def sentinel_user_words(user: SentinelUser, password: str | None) -> list[str]:
    """A sentinel user's definition after ``user <name>``: ``on``, its password, its rules."""
    assert (password is None) == (user.password_var is None), user.name
    key = "nopass" if password is None else f">{password}"
    return [user.name, "on", key, *user.rules]


def sentinel_directives(
    *, master_host: str, master_port: int, passwords: Mapping[str, str]
) -> list[list[str]]:
    """A sentinel's configuration, one directive (its words) per entry: what it monitors at
    first (it rewrites the line after a failover) and how it logs in to the data nodes and to
    the other sentinels, then its users. ``passwords`` by user name (``sentinel``: the
    ``sentinel`` user's, on the data nodes and on the sentinels alike)."""
    m = SENTINEL_MASTER
    quorum = str(SENTINEL_QUORUM)
    # Hostnames (Compose services, Kubernetes pods) rather than IPs, which change: resolved
    # before `monitor` names one, and given to clients as they are.
    lines = [
        ["sentinel", "resolve-hostnames", "yes"],
        ["sentinel", "announce-hostnames", "yes"],
        ["sentinel", "monitor", m, master_host, str(master_port), quorum],
        ["sentinel", "auth-user", m, "sentinel"],
        ["sentinel", "auth-pass", m, passwords["sentinel"]],
        ["sentinel", "down-after-milliseconds", m, str(SENTINEL_DOWN_AFTER_MS)],
        ["sentinel", "failover-timeout", m, str(SENTINEL_FAILOVER_TIMEOUT_MS)],
        ["sentinel", "parallel-syncs", m, "1"],
        ["sentinel", "sentinel-user", "sentinel"],
        ["sentinel", "sentinel-pass", passwords["sentinel"]],
    ]
    for name, user in sentinel_users().items():
        password = passwords[name] if user.password_var is not None else None
        lines.append(["user", *sentinel_user_words(user, password)])
    return lines


def sentinel_conf(*, master_host: str, passwords: Mapping[str, str]) -> str:
    """A sentinel's first configuration file (Kubernetes: its start script adds the name it
    announces)."""
    lines = [
        ["port", "26379"],
        *sentinel_directives(master_host=master_host, master_port=6379, passwords=passwords),
    ]
    return "\n".join(" ".join(words) for words in lines) + "\n"


def replication_conf(password: str) -> str:
    """A data node's file of how it logs in to a master (Kubernetes; Compose passes the same
    as arguments): as ``replica``."""
    return f"masteruser replica\nmasterauth {password}\n"


def compose_sentinel_lines(*, announce: str, master_host: str = "redis") -> list[str]:
    """A Compose sentinel's first configuration, one line each, the password from ``.env``:
    where it listens and what it calls itself, then ``sentinel_directives``."""
    passwords = {"sentinel": compose_password(replication_users()["sentinel"].password_var)}
    directives = [
        ["port", "26379"],
        ["sentinel", "announce-ip", announce],
        *sentinel_directives(master_host=master_host, master_port=6379, passwords=passwords),
    ]
    return [" ".join(words) for words in directives]
