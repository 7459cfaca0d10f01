"""deploy/compose/sentinel.yml: valid Compose; its Redis nodes and sentinels exactly
deploy/redis/acl.yaml's rendering (tests/redis_acl.py); every Cancelflow service on sentinel://
URLs that Settings reads as such; and, run for real with the local redis-server, a master, a
replica and three sentinels started from the shipped arguments and script: the replica
replicates, the sentinels find one another and fail over, and the old master comes back as a
replica, with no command of the replica's or the sentinels' users refused."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from cancelflow.broker_urls import parse_sentinel
from cancelflow.redis_clients import sync_client
from cancelflow.settings import Settings
from messaging.config import celery_config
from tests.deploy.support import DEPLOY, ENV_EXAMPLE, setting_names, yaml_documents
from tests.deploy.test_compose import check_jsonschema, is_ours, services
from tests.deploy.test_lockdown import (
    REDIS_SERVER,
    assert_no_access_without_password,
    compose_role,
    free_port,
    needs_redis_server,
)
from tests.redis_acl import (
    SENTINEL_MASTER,
    compose_password,
    compose_sentinel_lines,
    compose_user_args,
    data_node_users,
    redis_users,
    replication_users,
)

SENTINEL = DEPLOY / "compose" / "sentinel.yml"
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
# The Compose Redis's users, then the replica's and the sentinels' (acl.yaml's order).
NODE_USERS = ["api", "worker", "beat", "flower", "replica", "sentinel"]
NODE_OPTIONS = ["redis-server", "--appendonly", "yes", "--appendfsync", "everysec"]


def overrides() -> dict[str, Any]:
    return yaml_documents(SENTINEL)[0]


def node_command(announce: str, *, replica_of: str | None) -> list[str]:
    """What a data node must run: AOF, the name it is reached by, how it logs in to a master,
    whom it replicates, and every user (acl.yaml's rendering)."""
    password = compose_password(replication_users()["replica"].password_var)
    args = [*NODE_OPTIONS, "--replica-announce-ip", announce]
    args += ["--masteruser", "replica", "--masterauth", password]
    if replica_of is not None:
        args += ["--replicaof", replica_of, "6379"]
    return args + compose_user_args(NODE_USERS)


def interpolated(value: str, passwords: dict[str, str]) -> str:
    """``value`` as Compose gives it: each ``${VAR:?...}`` replaced by ``passwords[VAR]``."""
    return re.sub(r"\$\{([A-Z_]+):\?[^}]*\}", lambda m: passwords[m.group(1)], value)


def test_the_sentinel_override_matches_the_compose_spec() -> None:
    result = check_jsonschema(SENTINEL)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_redis_nodes_have_exactly_the_acl_sources_users() -> None:
    found = overrides()["services"]
    for name, expected in (
        ("redis", node_command("redis", replica_of=None)),
        ("redis-replica", node_command("redis-replica", replica_of="redis")),
    ):
        assert found[name]["command"] == expected, (
            f"deploy/compose/sentinel.yml's {name} command must read:\n"
            + "\n".join(f'      - "{a}"' for a in expected)
        )
    assert set(NODE_USERS) == set(data_node_users()) - {"billing-consumer", "keda"}


def test_each_sentinel_starts_from_the_acl_sources_configuration() -> None:
    found = overrides()["services"]
    for name in SENTINELS:
        command = found[name]["command"]
        assert command[:2] == ["sh", "-c"] and command[3] == "sentinel", name
        expected = compose_sentinel_lines(announce=name)
        assert command[4:] == expected, (
            f"deploy/compose/sentinel.yml's {name} configuration must read:\n"
            + "\n".join(f'      - "{line}"' for line in expected)
        )
        # Its data on a volume of its own: the configuration Sentinel rewrites.
        assert found[name]["volumes"] == [f"{name}-data:/data"], name
        assert f"{name}-data" in overrides()["volumes"]
        assert "ports" not in found[name], f"{name}: published nowhere"
    # Two of three agree before a failover.
    monitor = next(line for line in expected if line.startswith("sentinel monitor "))
    assert monitor == f"sentinel monitor {SENTINEL_MASTER} redis 6379 2"


def test_every_cancelflow_service_reaches_redis_through_the_sentinels_as_its_role() -> None:
    base = services()
    ours = {name for name, service in base.items() if is_ours(service)} - {"sandbox"}
    found = overrides()["services"]
    assert ours <= set(found), f"not on Sentinel: {ours - set(found)}"
    passwords = {u.password_var: f"{u.name}-pw" for u in data_node_users().values()}
    for name in ours:
        role = compose_role(base[name])
        assert role is not None, name
        env = {**base[name].get("environment", {}), **found[name]["environment"]}
        assert set(env) <= setting_names() | {"FLOWER_BASIC_AUTH"}, name
        url = env["CANCELFLOW_REDIS_URL"]
        assert url.count(compose_password(redis_users()[role].password_var)) == 1, name
        settings = Settings(redis_url=interpolated(url, passwords))
        target = parse_sentinel(settings.redis_url)
        assert target.sentinels == tuple((s, 26379) for s in SENTINELS), name
        assert (target.master, target.db) == (SENTINEL_MASTER, 0), name
        assert (target.username, target.password) == (role, f"{role}-pw"), name
        # No broker URL: the broker is the same Redis, through kombu's Sentinel transport.
        assert settings.broker_url is None and settings.broker_kind() == "redis", name
        config = celery_config(settings)
        assert config["broker_transport_options"]["master_name"] == SENTINEL_MASTER
        assert config["broker_url"].startswith(f"sentinel://{role}:{role}-pw@sentinel-1:26379;")
        for sentinel in SENTINELS:
            assert found[name]["depends_on"][sentinel] == {"condition": "service_healthy"}


def test_with_the_rabbitmq_profile_too_rabbitmq_is_the_broker_and_sentinel_the_store() -> None:
    base = services()
    rabbitmq = yaml_documents(DEPLOY / "compose" / "rabbitmq.yml")[0]["services"]
    passwords = {u.password_var: "pw" for u in data_node_users().values()}
    passwords["RABBITMQ_PASSWORD"] = "pw"
    for name in {n for n, s in base.items() if is_ours(s)} - {"sandbox"}:
        # Compose merges the files' environment mappings, later files winning.
        env = {
            **base[name].get("environment", {}),
            **rabbitmq[name]["environment"],
            **overrides()["services"][name]["environment"],
        }
        settings = Settings(
            redis_url=interpolated(env["CANCELFLOW_REDIS_URL"], passwords),
            broker_url=interpolated(env["CANCELFLOW_BROKER_URL"], passwords),
        )
        assert settings.broker_kind() == "amqp", name
        assert parse_sentinel(settings.redis_url).master == SENTINEL_MASTER, name


def test_every_password_the_profile_needs_is_named_in_env_example() -> None:
    text = ENV_EXAMPLE.read_text()
    needed = set(re.findall(r"\$\{([A-Z_]+):\?", SENTINEL.read_text()))
    assert needed == {u.password_var for n, u in data_node_users().items() if n in NODE_USERS}
    for var in needed:
        assert var in text, var


def test_redis_and_the_sentinels_are_published_nowhere_and_keep_their_data() -> None:
    found = overrides()["services"]
    assert "ports" not in found["redis-replica"]
    assert found["redis-replica"]["volumes"] == ["redis-replica-data:/data"]
    for name in SENTINELS:
        # The script writes /data/sentinel.conf: not as root.
        assert found[name]["user"] == "999:999", name


# --- for real -----------------------------------------------------------------------------


@dataclass
class Cluster:
    """The Compose file's Redis nodes and sentinels, each a process on a port of its own."""

    home: Path
    passwords: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], **kwargs: Any) -> None:
        log = (self.home / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kwargs)
        wait(lambda: self._listening(name), f"{name} to listen", 30)

    def _listening(self, name: str) -> bool:
        assert self.procs[name].poll() is None, (self.home / f"{name}.log").read_text()
        try:
            redis.Redis(port=self.ports[name], socket_timeout=1).ping()
        except redis.AuthenticationError:
            return True
        except redis.ConnectionError:
            return False
        return True

    def admin(self, name: str) -> redis.Redis:
        """The test's own user (not shipped), to read INFO and ACL LOG."""
        return redis.Redis(
            port=self.ports[name], username="admin", password="admin-pw", socket_timeout=2
        )

    def anonymous(self, name: str) -> redis.Redis:
        return redis.Redis(port=self.ports[name], socket_timeout=2)


# A node being reconfigured drops its clients (a Sentinel ends its SLAVEOF with CLIENT KILL TYPE
# normal) and a restarted one may not listen yet: for a poll of a node, "not yet".
RECONNECTING: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)


def wait(
    check: Callable[[], bool],
    what: str,
    timeout_s: float,
    *,
    not_yet: tuple[type[Exception], ...] = (),
) -> None:
    """Poll ``check`` until it holds; an exception of ``not_yet`` counts as "not yet"."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except not_yet:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def shipped_node_argv(cluster: Cluster, service: str) -> list[str]:
    """A data node's shipped command, on this machine: passwords in, `redis` and
    `redis-replica` as 127.0.0.1 and their ports, plus where it listens and writes and an
    admin user of the test's."""
    args = [interpolated(a, cluster.passwords) for a in overrides()["services"][service]["command"]]
    for flag in ("--replica-announce-ip",):
        args[args.index(flag) + 1] = "127.0.0.1"
    if "--replicaof" in args:
        i = args.index("--replicaof")
        assert args[i + 1 : i + 3] == ["redis", "6379"]
        args[i + 1 : i + 3] = ["127.0.0.1", str(cluster.ports["redis"])]
    data = cluster.home / service
    data.mkdir(exist_ok=True)
    port = cluster.ports[service]
    extra = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", ""]
    admin = ["--user", "admin", "on", ">admin-pw", "~*", "&*", "+@all"]
    assert REDIS_SERVER is not None
    return [REDIS_SERVER, *args[1:], *extra, *admin]


def shipped_sentinel_argv(cluster: Cluster, service: str) -> tuple[list[str], Path]:
    """The shipped `sh -c` script and its configuration lines, /data being a directory of the
    test's, the lines on this machine's ports, and an admin user of the test's. The shipped
    down-after (5 s) is kept: with 1 s, a loaded machine's sentinels took the just-promoted
    master for down too and failed over a second time, to the restarted old master, empty."""
    command = overrides()["services"][service]["command"]
    # Compose turns `$$` into `$`.
    script = command[2].replace("$$", "$")
    data = cluster.home / service
    data.mkdir(exist_ok=True)
    script = script.replace("/data/", f"{data}/")
    assert REDIS_SERVER is not None
    script = script.replace("exec redis-server ", f"exec {REDIS_SERVER} ")
    lines = []
    for line in (interpolated(x, cluster.passwords) for x in command[4:]):
        if line == "port 26379":
            line = f"port {cluster.ports[service]}\nbind 127.0.0.1"
        elif line.startswith("sentinel announce-ip "):
            line = "sentinel announce-ip 127.0.0.1"
        elif line.startswith("sentinel monitor "):
            line = line.replace(" redis 6379 ", f" 127.0.0.1 {cluster.ports['redis']} ")
        lines.append(line)
    lines.append("user admin on >admin-pw ~* &* +@all")
    return ["sh", "-c", script, command[3], *lines], data / "sentinel.conf"


@contextmanager
def compose_sentinel_cluster(tmp_path: Path) -> Iterator[Cluster]:
    passwords = {
        u.password_var: f"{u.name}-{u.password_var.lower()}" for u in data_node_users().values()
    }
    cluster = Cluster(tmp_path, passwords)
    for name in ("redis", "redis-replica", *SENTINELS):
        cluster.ports[name] = free_port()
    with stopped_after(cluster):
        cluster.start("redis", shipped_node_argv(cluster, "redis"))
        cluster.start("redis-replica", shipped_node_argv(cluster, "redis-replica"))
        for name in SENTINELS:
            argv, _ = shipped_sentinel_argv(cluster, name)
            cluster.start(name, argv)
        yield cluster


@contextmanager
def stopped_after(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, each of its processes stopped on the way out."""
    try:
        yield cluster
    finally:
        for proc in cluster.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in cluster.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def replicating(node: redis.Redis) -> bool:
    info: dict[str, Any] = node.info("replication")  # type: ignore[assignment]
    return bool(info["role"] == "slave" and info["master_link_status"] == "up")


def sentinel_url(cluster: Cluster, role: str) -> str:
    """The service's URL from the Compose file, on this machine's sentinels."""
    service = next(n for n, s in services().items() if is_ours(s) and compose_role(s) == role)
    url = interpolated(
        overrides()["services"][service]["environment"]["CANCELFLOW_REDIS_URL"], cluster.passwords
    )
    for name in SENTINELS:
        url = url.replace(f"{name}:26379", f"127.0.0.1:{cluster.ports[name]}")
    return url


@needs_redis_server
def test_the_shipped_sentinels_watch_the_master_and_fail_over_with_least_privilege(
    tmp_path: Path,
) -> None:
    with compose_sentinel_cluster(tmp_path) as cluster:
        exercise_sentinels(
            cluster,
            master="redis",
            replica="redis-replica",
            sentinels=SENTINELS,
            worker_url=sentinel_url(cluster, "worker"),
            # As Compose starts it again: a master, until the sentinels say otherwise.
            restart_master=lambda: cluster.start("redis", shipped_node_argv(cluster, "redis")),
        )


def exercise_sentinels(
    cluster: Cluster,
    *,
    master: str,
    replica: str,
    sentinels: tuple[str, ...],
    worker_url: str,
    restart_master: Callable[[], None],
) -> None:
    """A deployment's Redis nodes and sentinels, running, do their job with the shipped users:
    the replica syncs, the sentinels find it and one another, Cancelflow's client on the
    worker's URL writes through them; anonymous clients of a sentinel change nothing; the
    master SIGKILLed is failed over, the client follows, the old master restarted comes back as
    a replica; and nothing the replica or the sentinels sent was refused."""
    for name in (master, replica):
        assert_no_access_without_password(cluster.ports[name])
    wait(
        lambda: replicating(cluster.admin(replica)),
        "the replica to sync",
        20,
        not_yet=RECONNECTING,
    )

    def every_sentinel_sees_all() -> bool:
        for name in sentinels:
            # Anonymous, as Cancelflow asks them.
            found = cluster.anonymous(name).execute_command("SENTINEL", "MASTER", SENTINEL_MASTER)
            state = dict(zip(found[::2], found[1::2], strict=True))
            if (state[b"num-slaves"], state[b"num-other-sentinels"]) != (b"1", b"2"):
                return False
        return True

    wait(every_sentinel_sees_all, "each sentinel to find the replica and the others", 30)

    # Cancelflow's own client, from the worker's URL, finds the master by the sentinels.
    worker = sync_client(worker_url, socket_timeout=2)
    assert worker.set("cf:sentinel-test", "1")
    wait(
        lambda: cluster.admin(replica).get("cf:sentinel-test") == b"1",
        "the write to reach the replica",
        10,
    )

    # Anonymous clients of a sentinel read where the master is, and change nothing.
    anonymous = cluster.anonymous(sentinels[0])
    for refused in (
        ("SENTINEL", "SET", SENTINEL_MASTER, "down-after-milliseconds", "1"),
        ("SENTINEL", "FAILOVER", SENTINEL_MASTER),
        ("SENTINEL", "REMOVE", SENTINEL_MASTER),
        ("SENTINEL", "CONFIG", "GET", "*"),
        ("ACL", "LIST"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            anonymous.execute_command(*refused)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=cluster.ports[sentinels[0]], username="sentinel", password="wrong").ping()

    # The master dies: two sentinels agree, one promotes the replica, every client of the
    # sentinels is sent there.
    cluster.procs[master].send_signal(signal.SIGKILL)
    cluster.procs[master].wait()
    replica_port = str(cluster.ports[replica]).encode()

    def promoted() -> bool:
        return all(
            cluster.anonymous(n).execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER
            )[1]
            == replica_port
            for n in sentinels
        )

    wait(promoted, "the sentinels to promote the replica", 30)

    wait(
        lambda: bool(worker.set("cf:after-failover", "1")),
        "the worker's client to write to the new master",
        15,
        not_yet=(*RECONNECTING, redis.ReadOnlyError),
    )
    assert cluster.admin(replica).get("cf:sentinel-test") == b"1"

    # The old master restarts as the deployment starts it: the sentinels make it a replica
    # of the new one, which it logs in to as `replica`.
    restart_master()
    wait(
        lambda: replicating(cluster.admin(master)),
        "the old master to replicate",
        40,
        not_yet=RECONNECTING,
    )
    wait(
        lambda: cluster.admin(master).get("cf:after-failover") == b"1",
        "the old master to sync",
        10,
        not_yet=RECONNECTING,
    )

    # Every command the replica and the sentinels sent was allowed.
    for node in (master, replica, *sentinels):
        log: list[dict[str, Any]] = cluster.admin(node).acl_log()  # type: ignore[assignment]
        denied = [
            e
            for e in log
            # (Not the wrong password given above: a refused command, key or channel.)
            if e.get("username") in ("replica", "sentinel") and e["reason"] != "auth"
        ]
        assert not denied, f"{node}: {denied}"
