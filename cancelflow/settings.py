"""The one Settings object. Built once at start-up and passed down; nothing else reads env."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, create_model
from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cancelflow.errors import ConfigError
from cancelflow.providers import REGISTRY
from cancelflow.providers.base import ProviderSettings

ENV_PREFIX = "CANCELFLOW_"
DAY = 24 * 3600


def _providers_model() -> type[BaseModel]:
    # One optional field per registered provider: a provider is enabled when configured.
    fields: dict[str, Any] = {
        key: (spec.settings | None, None) for key, spec in REGISTRY.items()
    }
    return create_model(  # type: ignore[call-overload, no-any-return]
        "ProvidersSettings", __config__=ConfigDict(extra="forbid", frozen=True), **fields
    )


ProvidersSettings = _providers_model()


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Threads per worker process. Provider I/O runs on one event loop per process, so a
    # thread only waits; many threads cost little memory.
    concurrency: int = Field(default=32, ge=1, le=1000)
    # Redis redelivers a message not acknowledged within this many seconds (a worker died).
    # Every countdown and task time limit is kept well under it: see ``limits()``.
    visibility_timeout_s: int = Field(default=3600, ge=10)


class CallbackSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_http: bool = False
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    horizon_s: float = Field(default=3 * DAY, gt=0)

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [h.strip() for h in value.split(",") if h.strip()]
        return value


class Settings(BaseSettings):
    """Everything configurable, from ``CANCELFLOW_*`` variables (nested with ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore", frozen=True
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    providers: ProvidersSettings = Field(default_factory=ProvidersSettings)  # type: ignore[valid-type]
    job_retention_s: int = Field(default=30 * DAY, ge=60)
    idempotency_ttl_s: int = Field(default=DAY, ge=DAY)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    callbacks: CallbackSettings = Field(default_factory=CallbackSettings)

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    def provider(self, key: str) -> ProviderSettings:
        """The settings of a configured provider; ``KeyError`` when it is not configured."""
        found = getattr(self.providers, key, None)
        if found is None:
            raise KeyError(key)
        return found  # type: ignore[no-any-return]

    def enabled_providers(self) -> dict[str, ProviderSettings]:
        return {
            key: value
            for key in REGISTRY
            if (value := getattr(self.providers, key, None)) is not None
        }

    def limits(self) -> Limits:
        return Limits.from_visibility_timeout(self.worker.visibility_timeout_s)


class Limits(BaseModel):
    """Time limits derived from the visibility timeout so none can outlive it.

    A Redis message held unacknowledged longer than the visibility timeout is delivered
    again (celery/celery#2599, #7009). Retry countdowns are capped at a quarter of it and a
    task's hard time limit at a quarter too, so countdown + run time stays under half.
    """

    model_config = ConfigDict(frozen=True)

    visibility_timeout_s: int
    max_countdown_s: float
    task_soft_time_limit_s: float
    task_time_limit_s: float

    @classmethod
    def from_visibility_timeout(cls, vt: int) -> Limits:
        hard = min(300.0, vt / 4)
        return cls(
            visibility_timeout_s=vt,
            max_countdown_s=vt / 4,
            task_soft_time_limit_s=hard * 0.8,
            task_time_limit_s=hard,
        )


def env_name(loc: tuple[int | str, ...]) -> str:
    """``("providers", "payway", "client_id")`` -> ``CANCELFLOW_PROVIDERS__PAYWAY__CLIENT_ID``."""
    return ENV_PREFIX + "__".join(str(part).upper() for part in loc)


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment; a ``ConfigError`` names each bad variable."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        lines = [
            f"  {env_name(tuple(err['loc']))}: {err['msg']}"
            + (f" (got {err['input']!r})" if _showable(err) else "")
            for err in exc.errors()
        ]
        raise ConfigError("invalid settings:\n" + "\n".join(lines)) from None
    for key, spec in REGISTRY.items():
        configured = getattr(settings.providers, key, None)
        if configured is not None and spec.validate_settings is not None:
            try:
                spec.validate_settings(configured)
            except ValueError as exc:
                raise ConfigError(f"invalid settings:\n  {env_name(('providers', key))}: {exc}")
    return settings


def _showable(err: Any) -> bool:
    # Never echo what might be a secret; short scalar inputs help find typos.
    loc = "_".join(str(p) for p in err["loc"]).lower()
    if any(word in loc for word in ("secret", "token", "key", "password")):
        return False
    return isinstance(err.get("input"), str | int | float) and len(str(err["input"])) < 80
