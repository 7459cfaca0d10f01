from __future__ import annotations

import pytest

from cancelflow.errors import ConfigError
from cancelflow.settings import Settings, env_name, load_settings

PAYWAY = {
    "CANCELFLOW_PROVIDERS__PAYWAY__BASE_URL": "https://backend.example.com",
    "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_ID": "client",
    "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_SECRET": "s3cret-value",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(__import__("os").environ):
        if key.startswith("CANCELFLOW_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_reads_nested_provider_settings_and_comma_separated_tokens(env: pytest.MonkeyPatch) -> None:
    for k, v in PAYWAY.items():
        env.setenv(k, v)
    env.setenv("CANCELFLOW_API_TOKENS", "one, two:read")
    env.setenv("CANCELFLOW_PROVIDERS__PAYWAY__TIMEOUT_S", "2.5")
    settings = load_settings()
    assert [t.get_secret_value() for t in settings.api_tokens] == ["one", "two:read"]
    payway = settings.provider("payway")
    assert payway.timeout_s == 2.5
    assert list(settings.enabled_providers()) == ["payway"]


def test_a_missing_setting_names_the_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("CANCELFLOW_PROVIDERS__PAYWAY__BASE_URL", "https://backend.example.com")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_ID: Field required" in str(err.value)
    assert "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_SECRET" in str(err.value)


def test_an_invalid_value_names_the_variable_but_never_echoes_a_secret(
    env: pytest.MonkeyPatch,
) -> None:
    for k, v in PAYWAY.items():
        env.setenv(k, v)
    env.setenv("CANCELFLOW_PROVIDERS__PAYWAY__TIMEOUT_S", "soon")
    env.setenv("CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_SECRET", "x" * 300)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "CANCELFLOW_PROVIDERS__PAYWAY__TIMEOUT_S" in str(err.value)
    assert "'soon'" in str(err.value)


def test_unknown_provider_is_refused(env: pytest.MonkeyPatch) -> None:
    env.setenv("CANCELFLOW_PROVIDERS__ACME__BASE_URL", "https://acme.example.com")
    with pytest.raises(ConfigError, match="CANCELFLOW_PROVIDERS__ACME"):
        load_settings()


def test_secrets_do_not_show_in_repr(env: pytest.MonkeyPatch) -> None:
    for k, v in PAYWAY.items():
        env.setenv(k, v)
    settings = load_settings()
    assert "s3cret-value" not in repr(settings)
    assert "s3cret-value" not in str(settings.model_dump())


def test_limits_keep_countdowns_and_time_limits_under_the_visibility_timeout() -> None:
    for vt in (20, 600, 3600, 86400):
        limits = Settings(worker={"visibility_timeout_s": vt}).limits()
        assert limits.max_countdown_s + limits.task_time_limit_s <= vt / 2
        assert limits.task_soft_time_limit_s < limits.task_time_limit_s


def test_env_name() -> None:
    assert (
        env_name(("providers", "payway", "client_id")) == "CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_ID"
    )


def test_billing_stream_has_the_name_billing_systems_are_told(env: pytest.MonkeyPatch) -> None:
    env.setenv("CANCELFLOW_BILLING_STREAM", "billing:events")
    assert load_settings().billing.stream == "billing:events"
    env.setenv("CANCELFLOW_BILLING__STREAM", "nested:wins")
    assert load_settings().billing.stream == "nested:wins"


def test_redis_timeouts_default_to_5s_connect_and_10s_read(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert (settings.redis_connect_timeout_s, settings.redis_read_timeout_s) == (5.0, 10.0)
    env.setenv("CANCELFLOW_REDIS_CONNECT_TIMEOUT_S", "0.5")
    env.setenv("CANCELFLOW_REDIS_READ_TIMEOUT_S", "4")
    settings = load_settings()
    assert (settings.redis_connect_timeout_s, settings.redis_read_timeout_s) == (0.5, 4.0)


def test_the_read_timeout_must_outlast_every_blocking_read(env: pytest.MonkeyPatch) -> None:
    env.setenv("CANCELFLOW_BILLING__BLOCK_S", "5")
    env.setenv("CANCELFLOW_REDIS_READ_TIMEOUT_S", "5.5")
    with pytest.raises(ConfigError, match=r"CANCELFLOW_REDIS_READ_TIMEOUT_S: 5\.5s is too short"):
        load_settings()
    env.setenv("CANCELFLOW_REDIS_READ_TIMEOUT_S", "6")
    assert load_settings().redis_read_timeout_s == 6.0


def test_kombu_brpop_timeout_is_the_one_the_read_timeout_is_checked_against() -> None:
    # Fails when kombu changes how long its BRPOP blocks: the check above would then be wrong.
    from kombu.transport import redis as kombu_redis

    from cancelflow.settings import KOMBU_BRPOP_TIMEOUT_S
    from messaging.config import celery_config

    assert kombu_redis.Transport.brpop_timeout == KOMBU_BRPOP_TIMEOUT_S
    options = celery_config(Settings())["broker_transport_options"]
    assert "polling_interval" not in options  # it would replace brpop_timeout
    assert options["socket_timeout"] > KOMBU_BRPOP_TIMEOUT_S
    assert options["socket_connect_timeout"] == 5.0
