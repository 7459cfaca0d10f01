"""The broker apart from the job store: URLs checked at start-up, RabbitMQ's configuration."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime

import pytest
from celery import signals

from brokers import amqp
from brokers.routing import queue_of
from cancelflow.broker_urls import parse_sentinel
from cancelflow.contract import DEAD_LETTER_QUEUE, MAINTENANCE_QUEUE
from cancelflow.errors import ConfigError
from cancelflow.settings import Settings, load_settings
from messaging.config import celery_config, create_celery
from producers.local import cancelflow_command


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("CANCELFLOW_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_the_broker_is_the_job_stores_redis_unless_named(env: pytest.MonkeyPatch) -> None:
    env.setenv("CANCELFLOW_REDIS_URL", "redis://store:6379/1")
    settings = load_settings()
    assert settings.broker() == "redis://store:6379/1"
    assert settings.broker_kind() == "redis"
    assert celery_config(settings)["broker_url"] == "redis://store:6379/1"
    env.setenv("CANCELFLOW_BROKER_URL", "amqp://cf:pw@rabbit:5672/cancelflow")
    settings = load_settings()
    assert settings.broker_kind() == "amqp"
    config = celery_config(settings)
    assert config["broker_url"] == "amqp://cf:pw@rabbit:5672/cancelflow"
    # The job store, and the (unused) result backend, stay on Redis.
    assert config["result_backend"] == "redis://store:6379/1"


@pytest.mark.parametrize(
    ("variable", "url", "says"),
    [
        ("CANCELFLOW_BROKER_URL", "kafka://u:hunter2@k:9092", "is not a broker Cancelflow runs on"),
        ("CANCELFLOW_BROKER_URL", "localhost:5672", "is not a broker"),
        ("CANCELFLOW_REDIS_URL", "amqp://u:hunter2@rabbit//", "goes in CANCELFLOW_BROKER_URL"),
        ("CANCELFLOW_REDIS_URL", "http://u:hunter2@redis", "the job store needs redis://"),
    ],
)
def test_a_url_scheme_that_cannot_work_is_refused_naming_the_variable_never_the_password(
    env: pytest.MonkeyPatch, variable: str, url: str, says: str
) -> None:
    env.setenv(variable, url)
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    line = next(line for line in message.splitlines() if variable in line)
    assert says in line, message
    assert "hunter2" not in message


def test_a_process_started_with_a_bad_broker_url_says_so_in_one_line() -> None:
    # The worker's runner, as an operator starts it: no traceback, the variable named.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANCELFLOW_")}
    env["CANCELFLOW_BROKER_URL"] = "kafka://k:9092"
    for argv in (["worker"], ["flower", "--no-auth", "--address=127.0.0.1"]):
        done = subprocess.run(
            cancelflow_command(*argv),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert "CANCELFLOW_BROKER_URL: " in done.stderr, done.stderr
        assert "is not a broker Cancelflow runs on" in done.stderr, done.stderr


def rabbit_settings(**extra: object) -> Settings:
    return Settings(broker_url="amqp://guest:guest@rabbit:5672/cf", **extra)  # type: ignore[arg-type]


def test_every_rabbitmq_queue_is_a_quorum_queue_with_a_delivery_limit() -> None:
    config = celery_config(rabbit_settings(broker_delivery_limit=7))
    assert config["broker_transport"] is None  # kombu's py-amqp, by the URL's scheme
    assert config["broker_transport_options"]["confirm_publish"] is True
    assert config["broker_native_delayed_delivery_queue_type"] == "quorum"
    queues = {q.name: q for q in config["task_queues"]}
    for name, queue in queues.items():
        assert queue.queue_arguments["x-queue-type"] == "quorum", name
        assert queue.durable, name
        # Native delayed delivery routes countdowns through topic exchanges only.
        assert queue.exchange.type == "topic", name
        if name == DEAD_LETTER_QUEUE:
            assert "x-dead-letter-exchange" not in queue.queue_arguments
            continue
        assert queue.queue_arguments["x-delivery-limit"] == 7, name
        if name == MAINTENANCE_QUEUE:  # beat's messages expire by design: none to park
            assert "x-dead-letter-exchange" not in queue.queue_arguments
        else:
            assert queue.queue_arguments["x-dead-letter-exchange"] == DEAD_LETTER_QUEUE, name
            assert queue.queue_arguments["x-dead-letter-routing-key"] == DEAD_LETTER_QUEUE


def test_countdowns_on_rabbitmq_are_capped_by_a_day_not_the_visibility_timeout() -> None:
    assert Settings().limits().max_countdown_s == 3600 / 4
    assert rabbit_settings().limits().max_countdown_s == amqp.MAX_COUNTDOWN_S == 24 * 3600
    # Time limits do not change: a task still runs at most 300 s.
    assert rabbit_settings().limits().task_time_limit_s == Settings().limits().task_time_limit_s


def test_a_fraction_of_a_second_countdown_is_rounded_up_to_a_whole_second() -> None:
    # Celery's native delayed delivery refuses a countdown under 1 s and truncates others.
    app = create_celery(rabbit_settings())
    assert isinstance(app, amqp.AmqpCelery)
    app.conf.broker_url = "memory://"
    app.conf.broker_transport_options = {}
    sent: list[dict[str, object]] = []

    def record(*_: object, headers: dict[str, object], **__: object) -> None:
        sent.append(headers)

    signals.before_task_publish.connect(record, weak=False)
    try:
        before = time.time()
        app.send_task("cancelflow.eligibility", args=["job_x"], countdown=0.3, queue="callbacks")
    finally:
        signals.before_task_publish.disconnect(record)
        # The in-memory broker is shared by every test of the process: leave it as it was
        # (its "cancelflow" exchange is a direct one on Redis).
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            channel.queue_delete("callbacks")
            channel.exchange_delete(amqp.EXCHANGE.name)
        app.close()
    (headers,) = sent
    eta = headers["eta"]
    assert isinstance(eta, str)
    assert datetime.fromisoformat(eta).timestamp() >= before + 1.0 - 0.01


def test_a_delayed_messages_routing_key_names_its_queue() -> None:
    assert queue_of("cancellations.payway") == "cancellations.payway"
    delayed = ".".join("0" * 27 + "1") + ".cancellations.payway"
    assert queue_of(delayed) == "cancellations.payway"
    assert queue_of(None) is None


def test_a_sentinel_url_names_its_sentinels_master_and_db() -> None:
    url = "sentinel://:pw@s1:26379;sentinel://s2:26380;sentinel://s3/2?master=cf"
    found = parse_sentinel(url)
    assert found.sentinels == (("s1", 26379), ("s2", 26380), ("s3", 26379))
    assert (found.master, found.db, found.password) == ("cf", 2, "pw")
    # kombu's form: the master goes in the transport options, not the URL.
    assert found.kombu_url() == "sentinel://:pw@s1:26379;sentinel://s2:26380;sentinel://s3:26379/2"
    config = celery_config(Settings(redis_url=url))
    assert config["broker_url"] == found.kombu_url()
    assert config["broker_transport_options"]["master_name"] == "cf"
    assert config["result_backend_transport_options"]["master_name"] == "cf"
    with pytest.raises(ConfigError, match="name the master"):
        load_settings(redis_url="sentinel://s1:26379")
