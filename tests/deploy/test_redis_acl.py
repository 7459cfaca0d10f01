"""deploy/redis/acl.yaml is the one source of Redis's users: Compose's `--user` arguments and
the example overlay's users.acl must be exactly its rendering (a failure prints what they must
say), and no user may do anything dangerous or reach every key. That the users are enough for
each role, and refuse what they must, is run for real in tests/integration/test_redis_acl.py.
"""

from __future__ import annotations

import json

from tests.deploy.support import ENV_EXAMPLE, compose
from tests.deploy.test_lockdown import COMPOSE_ROLES, K8S_ROLES, acl_passwords, acl_secret
from tests.redis_acl import (
    acl_file,
    compose_user_args,
    redis_users,
    replication_users,
    sentinel_users,
)

REDIS_OPTIONS = ["redis-server", "--appendonly", "yes", "--appendfsync", "everysec"]


def test_compose_redis_has_exactly_the_acl_sources_users() -> None:
    expected = REDIS_OPTIONS + compose_user_args(sorted(set(COMPOSE_ROLES.values()), key=_order))
    shipped = compose()["services"]["redis"]["command"]
    assert shipped == expected, "docker-compose.yml's redis command must read:\n" + "\n".join(
        f"      - {json.dumps(a)}" for a in expected
    )


def test_the_example_overlays_users_are_exactly_the_acl_sources() -> None:
    passwords = acl_passwords()
    assert set(passwords) == {*K8S_ROLES.values(), "keda"}, "the roles Kubernetes runs"
    expected = acl_file(passwords)
    assert acl_secret()["users.acl"] == expected, (
        "deploy/k8s/overlays/example/kustomization.yaml's users.acl must read:\n"
        + json.dumps(expected)
    )


def _order(name: str) -> int:
    return list(redis_users()).index(name)


def test_no_user_is_allowed_everything_or_anything_dangerous() -> None:
    for user in redis_users().values():
        rules = list(user.rules)
        assert rules[:2] == ["resetchannels", "-@all"], f"{user.name}: start from nothing"
        for everything in ("~*", "&*", "+@all", "allkeys", "allchannels", "allcommands", "*"):
            assert everything not in rules, f"{user.name}: {everything}"
        grants = [n for n, r in enumerate(rules) if r.startswith("+@")]
        last_grant = max(grants, default=-1)
        for taken in ("-@dangerous", "-@admin"):
            assert taken in rules[last_grant + 1 :], f"{user.name}: {taken} after its grants"
        # The one dangerous command given back: INFO, for the persistence report.
        after = rules[rules.index("-@dangerous") :]
        readded = [r for r in after if r.startswith("+")]
        assert readded in ([], ["+info"]), f"{user.name}: {readded}"
        assert not any(r.startswith("+") and r[1:] in _DANGEROUS for r in rules), user.name


_DANGEROUS = {"flushall", "flushdb", "config", "config|set", "debug", "shutdown", "keys"}


def test_every_password_compose_needs_is_named_in_env_example() -> None:
    text = ENV_EXAMPLE.read_text()
    for role in set(COMPOSE_ROLES.values()):
        assert redis_users()[role].password_var in text, role


def test_the_replica_and_the_sentinels_reach_no_key_and_no_category() -> None:
    users: list[tuple[str, tuple[str, ...]]] = [
        *((u.name, u.rules) for u in replication_users().values()),
        *((u.name, u.rules) for u in sentinel_users().values()),
    ]
    assert {name for name, _ in users} == {"replica", "sentinel", "default"}
    for name, rules_ in users:
        rules = list(rules_)
        assert rules[:2] == ["resetchannels", "-@all"], f"{name}: start from nothing"
        assert not [r for r in rules if r.startswith(("~", "%", "+@", "allkeys"))], name
        channels = [r for r in rules if r.startswith("&")]
        assert channels in ([], ["&__sentinel__:hello"]), f"{name}: {channels}"
    # The replica syncs, nothing more.
    assert replication_users()["replica"].rules[2:] == ("+psync", "+replconf", "+ping")
    # Without a password, a sentinel only says where the master and its replicas are.
    anonymous = sentinel_users()["default"]
    assert anonymous.password_var is None
    sentinel_commands = {r for r in anonymous.rules if r.startswith("+sentinel|")}
    assert sentinel_commands <= {
        f"+sentinel|{sub}"
        for sub in (
            "get-master-addr-by-name",
            "masters",
            "master",
            "slaves",
            "replicas",
            "sentinels",
        )
    }
    assert {r for r in anonymous.rules if r.startswith("+")} - sentinel_commands <= {
        "+ping",
        "+hello",
        "+client|setname",
    }
    # The sentinels log in to the data nodes and to one another as `sentinel`, one password.
    assert sentinel_users()["sentinel"].password_var == replication_users()["sentinel"].password_var
