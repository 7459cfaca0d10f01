"""The one Settings object. Built once at start-up and passed down; nothing else reads env."""

from __future__ import annotations

import difflib
import os
import re
import socket
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cancelflow.broker_urls import BrokerKind, broker_kind, check_broker_url, check_store_url
from cancelflow.errors import ConfigError
from cancelflow.providers import REGISTRY
from cancelflow.providers.base import ProviderSettings, callback_secret_key
from cancelflow.store import INFLIGHT_SPARE_S, INFLIGHT_TTL_S

ENV_PREFIX = "CANCELFLOW_"
DAY = 24 * 3600
# The span exporters ``OTEL_TRACES_EXPORTER`` may name (OTLP is over HTTP/protobuf).
TRACES_EXPORTERS = frozenset({"otlp", "console", "none"})
# kombu's Redis transport waits on BRPOP this long (``Transport.brpop_timeout``; Celery sets
# no ``polling_interval``): the broker's read timeout must outlast it. A unit test pins it.
KOMBU_BRPOP_TIMEOUT_S = 1.0
# What a blocking command may take beyond its own timeout before the read timeout is hit.
BLOCKING_READ_MARGIN_S = 1.0
# An idle Redis connection is PINGed before reuse after this long (kombu's default, which
# kombu also uses to drop a BRPOP connection whose reply is overdue).
REDIS_HEALTH_CHECK_INTERVAL_S = 25
# The longest countdown on RabbitMQ, which holds countdowns itself (brokers.amqp).
AMQP_MAX_COUNTDOWN_S = 24 * 3600.0

# An API token entry in CANCELFLOW_API_TOKENS: ``[name=]secret[:scope]``, scope exactly
# ``read`` or ``write`` (no scope: ``write``, as before scopes were checked). A name is shown in
# logs instead of the secret, and scopes the token's idempotency keys; a secret holds none of
# ``=``, ``:`` or ``,``, so every entry has one reading and anything else is refused.
TOKEN_SCOPES = ("read", "write")
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TOKEN_SECRET = re.compile(r"[\x21-\x7e]{1,512}")
_TOKEN_SECRET_FORBIDDEN = frozenset("=:,")


@dataclass(frozen=True)
class TokenEntry:
    """One parsed CANCELFLOW_API_TOKENS entry; ``name`` is None when none was given."""

    name: str | None
    secret: str
    scope: Literal["read", "write"]


def parse_token_entry(value: str) -> TokenEntry:
    """The entry as ``[name=]secret[:scope]``; ``ValueError`` saying what is wrong with it,
    never quoting it (it holds a secret)."""
    name: str | None = None
    rest = value
    if "=" in value:
        name, _, rest = value.partition("=")
        if not _TOKEN_NAME.fullmatch(name):
            raise ValueError(
                "a name (before '=') is 1-64 of A-Z a-z 0-9 _ . - (letter or digit first)"
            )
    secret, sep, scope = rest.partition(":")
    if sep and scope not in TOKEN_SCOPES:
        raise ValueError("the scope (after ':') must be exactly 'read' or 'write', lower case")
    if any(c in _TOKEN_SECRET_FORBIDDEN for c in secret) or not _TOKEN_SECRET.fullmatch(secret):
        raise ValueError(
            "the secret must be 1-512 printable ASCII characters without spaces, '=', ':' or ','"
            " (form: [name=]secret[:read|write])"
        )
    return TokenEntry(name=name, secret=secret, scope="read" if scope == "read" else "write")


def _providers_model() -> type[BaseModel]:
    # One optional field per registered provider: a provider is enabled when configured.
    fields: dict[str, Any] = {key: (spec.settings | None, None) for key, spec in REGISTRY.items()}
    return create_model(
        "ProvidersSettings", __config__=ConfigDict(extra="forbid", frozen=True), **fields
    )


ProvidersSettings = _providers_model()


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Threads per worker process. Provider I/O runs on one event loop per process, so a
    # thread only waits; many threads cost little memory.
    concurrency: int = Field(default=100, ge=1, le=1000)
    # Worker processes per ``cancelflow worker`` command, each with ``concurrency`` steps in
    # flight on an event loop of its own: a process runs on one core, so one per core uses
    # them all (``producers.supervisor``). 1: the command is the worker process itself.
    processes: int = Field(default=1, ge=1, le=64)
    # Redis redelivers a message not acknowledged within this many seconds (a worker died).
    # Every countdown and task time limit is kept well under it: see ``limits()``.
    visibility_timeout_s: int = Field(default=3600, ge=10)
    # Each worker process beats every ``heartbeat_s``; one silent for ``lease_s`` is dead:
    # another worker puts the messages it held (steps under way, retries waiting on their
    # countdown, prefetched ones) back on their queues and takes over its confirm leases.
    # A process sends a provider request only while its last beat is under
    # ``2 * heartbeat_s`` old, so ``lease_s`` must cover that plus one request: see
    # ``load_settings``. A killed worker's jobs move again within ``lease_s`` plus one sweep.
    lease_s: float = Field(default=20.0, ge=3)
    heartbeat_s: float = Field(default=3.0, gt=0)
    # The watchdog re-sends the step of a job this long past when it was expected to move,
    # once no live process holds it and its queue has moved past it (a message lost between
    # Redis's pop and its unacknowledged record, by a worker killed in between). Such a job
    # moves again within this plus one watchdog period (10 s): under the minute promised.
    stalled_after_s: float = Field(default=30.0, gt=0)
    # How often beat looks for parked jobs past their decision deadline.
    decision_sweep_s: float = Field(default=30.0, gt=0)
    # Prometheus metrics of the worker process on http://<metrics_host>:<metrics_port>/metrics;
    # 0 turns them off. Two workers on one host (not in containers) need a port each: the
    # second finds the port taken, logs it and runs without metrics.
    metrics_port: int = Field(default=9808, ge=0, le=65535)
    # Loopback unless told otherwise: the endpoint has no token. Deployments that are scraped
    # from outside the pod or container set CANCELFLOW_WORKER__METRICS_HOST=0.0.0.0 together
    # with a network policy that lets only Prometheus in (deploy/k8s/base/network-policies.yaml).
    metrics_host: str = "127.0.0.1"


class CallbackSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_http: bool = False
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    horizon_s: float = Field(default=3 * DAY, gt=0)
    # A receiver answering a 4xx other than 408/409/425/429 (a 404 while it deploys) is
    # retried this long from the target's first attempt, then dead-lettered; 410 never is.
    client_error_window_s: float = Field(default=3600.0, gt=0)
    # The longest wait between two attempts at a target: backoff never exceeds it, and a
    # receiver's Retry-After is honoured up to ``max_retry_after_s``. Waits longer than a
    # countdown may be (a quarter of the visibility timeout) are kept on the job's attempt
    # (``retry_at``) and waited in hops, so neither depends on the broker.
    max_backoff_s: float = Field(default=3600.0, gt=0)
    max_retry_after_s: float = Field(default=DAY, gt=0)
    # An endpoint (``/v1/webhook-endpoints``) whose deliveries have all failed for this long
    # is disabled (``callback.endpoint.disabled``); default 5 days, as Svix does.
    endpoint_disable_after_s: float = Field(default=5 * DAY, gt=0)
    # While an endpoint's secret is rotated, the old one signs too for this long by default.
    endpoint_rotation_overlap_s: float = Field(default=DAY, ge=0, le=30 * DAY)
    # Modules that register in-process result hooks (cancelflow.hooks), imported by workers.
    hook_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("allowed_hosts", "hook_modules", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [h.strip() for h in value.split(",") if h.strip()]
        return value


class ApiSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Per token, held in Redis so every API process counts against the same limit.
    rate_limit_per_s: float = Field(default=100.0, gt=0)
    rate_limit_burst: int = Field(default=200, ge=1)
    # Failed authentications per client address (held in Redis like the above): a caller
    # with a typo retries a few times, and clients behind one NAT share an address; a
    # guesser is held to this rate.
    auth_failures_per_s: float = Field(default=10.0, gt=0, le=1000)
    auth_failures_burst: int = Field(default=100, ge=1, le=100_000)
    # Larger request bodies are refused with 413 before they are read whole.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # JSON nested deeper than this is refused (400) before it is parsed (cancelflow.jsonsafe);
    # billing events from the stream are held to it too, and to max_body_bytes.
    max_json_depth: int = Field(default=32, ge=2, le=500)
    # A JSON string (or object key) in a request body longer than this many characters is
    # refused (400) too: no field of a request needs more.
    max_json_string_chars: int = Field(default=16 * 1024, ge=256, le=16 * 1024 * 1024)
    # The API's event loop: uvloop's when it is installed ("auto"; a third less CPU per
    # request in ``python -m bench.enqueue``), or always asyncio's, or uvloop's or fail.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Signs the web console's session cookies (producers/console). Unset: a key generated at
    # start-up, per process, so sessions end when the API restarts and hold on one replica only
    # (the processes of one ``cancelflow api --processes N`` share the key generated for them).
    console_secret: SecretStr | None = None
    # API processes per ``cancelflow api`` command (``--processes``), serving one port
    # (SO_REUSEPORT), their metrics added up on ``/metrics`` (``producers.supervisor``).
    processes: int = Field(default=1, ge=1, le=64)


# The signature schemes of billing events, and each one's (secret, previous secret) settings.
BillingScheme = Literal["cancelflow", "standard-webhooks", "stripe"]
BILLING_SCHEME_SECRETS: dict[str, tuple[str, str]] = {
    "cancelflow": ("secret", "secret_previous"),
    "standard-webhooks": ("standard_webhooks_secret", "standard_webhooks_secret_previous"),
    "stripe": ("stripe_secret", "stripe_secret_previous"),
}


class BillingSettings(BaseModel):
    """Billing events: a Redis Stream read as a consumer group, and ``POST /v1/billing-events``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stream: str = Field(default="cf:billing:events", min_length=1)
    group: str = Field(default="cancelflow-billing", min_length=1)
    # Stable across restarts by default, so a restarted consumer re-reads its own pending
    # entries at once instead of waiting for another to claim them.
    consumer: str = Field(default_factory=socket.gethostname, min_length=1)
    # A pending entry idle this long belongs to a dead consumer: another one claims it.
    claim_idle_s: float = Field(default=60.0, gt=0)
    # An entry delivered this many times without being acknowledged is dead-lettered.
    max_deliveries: int = Field(default=5, ge=1)
    batch_size: int = Field(default=50, ge=1, le=1000)
    block_s: float = Field(default=2.0, gt=0)
    rules_path: Path | None = None
    # ``POST /v1/billing-events`` is signed with one of three schemes (producers/billing_auth.py),
    # each with a secret and a previous one accepted while rotating: ``cancelflow``
    # (``Cancelflow-Signature``), ``standard-webhooks`` (``webhook-signature``, a whsec_ base64
    # secret) and ``stripe`` (``Stripe-Signature``, the endpoint's whsec_ secret as Stripe shows
    # it). Accepted: the schemes named in ``signature_schemes``, by default every scheme whose
    # secret is set; naming one without its secret stops start-up.
    secret: SecretStr | None = None
    secret_previous: SecretStr | None = None
    standard_webhooks_secret: SecretStr | None = None
    standard_webhooks_secret_previous: SecretStr | None = None
    stripe_secret: SecretStr | None = None
    stripe_secret_previous: SecretStr | None = None
    signature_schemes: Annotated[list[BillingScheme], NoDecode] | None = None
    # How far a signed timestamp may be from now (either way). Stripe's own default is 300 s;
    # the standardwebhooks library refuses more than 300 s whatever this says.
    signature_tolerance_s: int = Field(default=300, ge=1)

    @field_validator("signature_schemes", mode="before")
    @classmethod
    def _split_schemes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator("standard_webhooks_secret", "standard_webhooks_secret_previous")
    @classmethod
    def _whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            callback_secret_key(value.get_secret_value())  # a ValueError names the field
        return value

    @model_validator(mode="after")
    def _named_schemes_have_secrets(self) -> BillingSettings:
        for scheme in self.signature_schemes or []:
            if not self.scheme_secrets(scheme):
                name = BILLING_SCHEME_SECRETS[scheme][0].upper()
                raise ValueError(
                    f"CANCELFLOW_BILLING__SIGNATURE_SCHEMES names {scheme}, but "
                    f"CANCELFLOW_BILLING__{name} is not set"
                )
        return self

    def scheme_secrets(self, scheme: BillingScheme) -> list[str]:
        """The secrets of ``scheme``, current first; none when it has no secret set."""
        current, previous = (getattr(self, name) for name in BILLING_SCHEME_SECRETS[scheme])
        if current is None:
            return []
        return [s.get_secret_value() for s in (current, previous) if s is not None]

    def accepted_schemes(self) -> list[BillingScheme]:
        """The signature schemes ``POST /v1/billing-events`` accepts, in the order it looks
        for their headers."""
        named = self.signature_schemes
        return [
            s
            for s in get_args(BillingScheme)
            if (s in named if named is not None else bool(self.scheme_secrets(s)))
        ]


class Settings(BaseSettings):
    """Everything configurable, from ``CANCELFLOW_*`` variables (nested with ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore", frozen=True
    )

    # The job store (and the result backend): always Redis.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The broker: Redis or RabbitMQ; unset, the job store's Redis (``broker()``).
    broker_url: str | None = None
    # RabbitMQ's management API (``http://user:password@host:15672``), when it is enabled:
    # queue depths for the metrics and the console, and Flower's Broker page. Unset, depths
    # come from passive queue declares (cancelflow.brokers).
    broker_management_url: str | None = None
    # RabbitMQ: a message delivered this many times without being acknowledged (a worker
    # dying on it each time) is dead-lettered by the broker instead of delivered again.
    broker_delivery_limit: int = Field(default=20, ge=1, le=1000)
    # Every Redis connection (job store, broker, billing stream) gives up on a connect after
    # ``redis_connect_timeout_s`` and on a reply after ``redis_read_timeout_s``: a Redis that
    # accepts and never answers is an outage, not a hang. The read timeout must outlast the
    # blocking reads (kombu's BRPOP, the billing consumer's XREADGROUP BLOCK).
    redis_connect_timeout_s: float = Field(default=5.0, gt=0, le=60)
    redis_read_timeout_s: float = Field(default=10.0, gt=0, le=300)
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    providers: ProvidersSettings = Field(default_factory=ProvidersSettings)  # type: ignore[valid-type]
    job_retention_s: int = Field(default=30 * DAY, ge=60)
    idempotency_ttl_s: int = Field(default=DAY, ge=DAY)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    callbacks: CallbackSettings = Field(default_factory=CallbackSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    billing: BillingSettings = Field(default_factory=BillingSettings)
    # ``CANCELFLOW_BILLING_STREAM``, the name billing systems are told, for
    # ``CANCELFLOW_BILLING__STREAM``; the nested one wins when both are set.
    billing_stream: str | None = Field(default=None, min_length=1, exclude=True)
    # OpenTelemetry traces (cancelflow.tracing, docs/tracing.md): the standard variables,
    # read under their own names. Off unless ``OTEL_TRACES_EXPORTER`` names an exporter
    # (comma-separated: ``otlp``, ``console``; ``none`` is off); ``OTEL_SDK_DISABLED=true``
    # turns it off whatever the rest. The SDK reads every other ``OTEL_*`` itself.
    otel_traces_exporter: str = Field(
        default="none",
        validation_alias=AliasChoices("OTEL_TRACES_EXPORTER", "otel_traces_exporter"),
    )
    otel_sdk_disabled: bool = Field(
        default=False, validation_alias=AliasChoices("OTEL_SDK_DISABLED", "otel_sdk_disabled")
    )
    # Checked only: OTLP goes over HTTP/protobuf (the exporter installed), so a gRPC ask
    # stops start-up rather than sending HTTP to a gRPC port.
    otel_exporter_otlp_protocol: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "otel_exporter_otlp_protocol",
        ),
    )

    @field_validator("redis_url")
    @classmethod
    def _store_is_redis(cls, value: str) -> str:
        return check_store_url(value)

    @field_validator("broker_url")
    @classmethod
    def _broker_runs(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else check_broker_url(value)

    @field_validator("otel_traces_exporter")
    @classmethod
    def _known_exporters(cls, value: str) -> str:
        names = [n.strip().lower() for n in value.split(",") if n.strip()]
        unknown = sorted(set(names) - TRACES_EXPORTERS)
        if unknown:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER: unknown exporter {', '.join(unknown)!s} "
                f"(one or more of {', '.join(sorted(TRACES_EXPORTERS))})"
            )
        return ",".join(names) or "none"

    @model_validator(mode="after")
    def _otlp_over_http(self) -> Settings:
        protocol = self.otel_exporter_otlp_protocol
        if "otlp" in self.traces_exporters() and protocol not in (None, "", "http/protobuf"):
            raise ValueError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol} is not supported: Cancelflow exports "
                "OTLP over HTTP (http/protobuf, port 4318; docs/tracing.md)"
            )
        return self

    def traces_exporters(self) -> tuple[str, ...]:
        """The span exporters this process sends traces to (none: tracing is off)."""
        if self.otel_sdk_disabled:
            return ()
        return tuple(n for n in self.otel_traces_exporter.split(",") if n != "none")

    def broker(self) -> str:
        """The broker's URL: ``broker_url``, else the job store's Redis."""
        return self.broker_url or self.redis_url

    def broker_kind(self) -> BrokerKind:
        """``redis`` or ``amqp``: which broker the processes talk to."""
        return broker_kind(self.broker())

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("api_tokens")
    @classmethod
    def _tokens_well_formed(cls, value: list[SecretStr]) -> list[SecretStr]:
        # Fail closed: an entry that is not exactly ``[name=]secret[:read|write]`` stops
        # start-up rather than being read as something it may not mean (``tok:Read`` as a
        # write token). Messages give the entry's position, never its text.
        names: set[str] = set()
        secrets: set[str] = set()
        for n, raw in enumerate(value, start=1):
            try:
                entry = parse_token_entry(raw.get_secret_value())
            except ValueError as exc:
                raise ValueError(f"entry {n}: {exc}") from None
            if entry.name is not None:
                if entry.name in names:
                    raise ValueError(f"entry {n}: the name {entry.name!r} is used twice")
                names.add(entry.name)
            if entry.secret in secrets:
                raise ValueError(f"entry {n}: the same secret is listed twice")
            secrets.add(entry.secret)
        return value

    @model_validator(mode="after")
    def _billing_stream_alias(self) -> Settings:
        if self.billing_stream and "stream" not in self.billing.model_fields_set:
            object.__setattr__(
                self, "billing", self.billing.model_copy(update={"stream": self.billing_stream})
            )
        return self

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
        limits = Limits.from_visibility_timeout(self.worker.visibility_timeout_s)
        if self.broker_kind() == "amqp":
            # RabbitMQ holds a countdown itself (native delayed delivery): no visibility
            # timeout bounds it (brokers.amqp).
            limits = limits.model_copy(update={"max_countdown_s": AMQP_MAX_COUNTDOWN_S})
        return limits


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
    restore_interval_s: int

    @classmethod
    def from_visibility_timeout(cls, vt: int) -> Limits:
        hard = min(300.0, vt / 4)
        return cls(
            visibility_timeout_s=vt,
            max_countdown_s=vt / 4,
            task_soft_time_limit_s=hard * 0.8,
            task_time_limit_s=hard,
            restore_interval_s=max(1, min(10, vt // 10)),
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
            + _did_you_mean(err)
            for err in exc.errors()
        ]
        raise ConfigError("invalid settings:\n" + "\n".join(lines)) from None
    longest = max(KOMBU_BRPOP_TIMEOUT_S, settings.billing.block_s)
    if settings.redis_read_timeout_s < longest + BLOCKING_READ_MARGIN_S:
        raise ConfigError(
            f"invalid settings:\n  {env_name(('redis_read_timeout_s',))}: "
            f"{settings.redis_read_timeout_s:g}s is too short: blocking reads wait up to "
            f"{longest:g}s (kombu's BRPOP, CANCELFLOW_BILLING__BLOCK_S), so it must be at "
            f"least {longest + BLOCKING_READ_MARGIN_S:g}s"
        )
    soft = settings.limits().task_soft_time_limit_s
    for key, conf in settings.enabled_providers().items():
        # A step makes up to two calls (a token, then the call) and must end within the
        # task's soft time limit, itself derived from the visibility timeout.
        if conf.timeout_s * 2 > soft:
            raise ConfigError(
                f"invalid settings:\n  {env_name(('providers', key, 'timeout_s'))}: "
                f"{conf.timeout_s:g}s is too long: two calls must fit in the task soft time "
                f"limit of {soft:g}s (a fifth of CANCELFLOW_WORKER__VISIBILITY_TIMEOUT_S, "
                "at most 240s)"
            )
    worker = settings.worker
    if worker.lease_s < 3 * worker.heartbeat_s:
        raise ConfigError(
            "invalid settings:\n  CANCELFLOW_WORKER__LEASE_S: "
            f"{worker.lease_s:g}s is shorter than three heartbeats "
            f"(CANCELFLOW_WORKER__HEARTBEAT_S={worker.heartbeat_s:g}s)"
        )
    for key, conf in settings.enabled_providers().items():
        # A request sent by a process whose beat is just under 2 heartbeats old must end
        # before its lease can be taken over (see WorkerSettings.lease_s).
        if 2 * worker.heartbeat_s + conf.timeout_s > worker.lease_s:
            raise ConfigError(
                f"invalid settings:\n  {env_name(('providers', key, 'timeout_s'))}: "
                f"{conf.timeout_s:g}s is too long for CANCELFLOW_WORKER__LEASE_S="
                f"{worker.lease_s:g}s: two heartbeats plus one request must fit in a lease"
            )
    _check_lifetimes(settings)
    for key, spec in REGISTRY.items():
        configured = getattr(settings.providers, key, None)
        if configured is not None and spec.validate_settings is not None:
            try:
                spec.validate_settings(configured)
            except ValueError as exc:
                # The message carries exc; how the error chains is left as it was.
                raise ConfigError(f"invalid settings:\n  {env_name(('providers', key))}: {exc}")  # noqa: B904
    return settings


def _check_lifetimes(settings: Settings) -> None:
    """Refuse lifetimes that contradict each other: each record must outlive what points at it."""
    if settings.job_retention_s < settings.idempotency_ttl_s:
        # A retry with the key finds the job id under the key and then no job: a 404 where
        # the client was promised the job it created.
        raise ConfigError(
            f"invalid settings:\n  {env_name(('job_retention_s',))}: "
            f"{settings.job_retention_s}s is shorter than {env_name(('idempotency_ttl_s',))}="
            f"{settings.idempotency_ttl_s}s: a retry with an idempotency key must still find "
            "the job it names"
        )
    longest = INFLIGHT_TTL_S - INFLIGHT_SPARE_S
    for key, conf in settings.enabled_providers().items():
        # A parked job holds its subscription's in-flight marker until its deadline: a
        # marker that expired first would let a second job cancel the same subscription.
        if conf.decision_deadline_s > longest:
            raise ConfigError(
                f"invalid settings:\n  {env_name(('providers', key, 'decision_deadline_s'))}: "
                f"{conf.decision_deadline_s:g}s is longer than the in-flight marker allows: "
                f"the marker lives {INFLIGHT_TTL_S}s (cancelflow.store.INFLIGHT_TTL_S) and must "
                f"outlast the deadline by {INFLIGHT_SPARE_S}s, so at most {longest}s"
            )


def _did_you_mean(err: Any) -> str:
    # A misspelt nested variable (CANCELFLOW_WORKER__CONCURENCY) is refused by its group.
    if err["type"] != "extra_forbidden":
        return ""
    close = difflib.get_close_matches(
        env_name(tuple(err["loc"])), sorted(settings_env_names()), n=1
    )
    return f" (did you mean {close[0]}?)" if close else ""


def _showable(err: Any) -> bool:
    # Never echo what might be a secret; short scalar inputs help find typos.
    loc = "_".join(str(p) for p in err["loc"]).lower()
    # A URL may carry a password (redis://user:password@host).
    if any(word in loc for word in ("secret", "token", "key", "password", "url")):
        return False
    return isinstance(err.get("input"), str | int | float) and len(str(err["input"])) < 80


# ``CANCELFLOW_*`` variables that are not the server's: the API client's
# (``producers.client.CLIENT_ENV``, new names and the old ones it still reads; a unit test
# keeps the two lists equal) and the test suite's and chaos runs'.
CLIENT_ENV_NAMES = frozenset(
    {
        *(
            f"CANCELFLOW_CLIENT__{n}"
            for n in ("URL", "TOKEN", "TIMEOUT_S", "RETRIES", "RETRY_TIME_S")
        ),
        *(f"CANCELFLOW_API_{n}" for n in ("URL", "TOKEN", "TIMEOUT_S", "RETRIES", "RETRY_TIME_S")),
    }
)
_OTHERS_PREFIXES = ("CANCELFLOW_TEST_", "CANCELFLOW_CHAOS_")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        return next((m for a in get_args(annotation) if (m := _model_of(a)) is not None), None)
    return None


def settings_env_names(
    model: type[BaseModel] = Settings, loc: tuple[str, ...] = ()
) -> frozenset[str]:
    """Every variable ``model`` reads, nested groups (``__``) and the groups themselves (a
    group may be given whole, as JSON) included."""
    names: set[str] = set()
    for field, info in model.model_fields.items():
        if info.validation_alias is not None:
            continue  # read under a name of its own (OTEL_TRACES_EXPORTER)
        names.add(env_name((*loc, field)))
        nested = _model_of(info.annotation)
        if nested is not None:
            names |= settings_env_names(nested, (*loc, field))
    return frozenset(names)


def unknown_env(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """Each ``CANCELFLOW_*`` variable nothing reads (a typo, most often), with the closest
    variable that is read, or None."""
    known = settings_env_names()
    unknown = []
    for name in sorted(os.environ if environ is None else environ):
        upper = name.upper()  # pydantic-settings reads names in any case
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in CLIENT_ENV_NAMES:
            continue
        if upper.startswith(_OTHERS_PREFIXES):
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1)
        unknown.append((name, close[0] if close else None))
    return unknown


def warn_unknown_env(environ: Mapping[str, str] | None = None) -> None:
    """A ``settings.unknown_variable`` warning per ``unknown_env`` variable (never its value),
    for each process to call once its logging is configured."""
    from cancelflow.logging import get_logger

    for name, suggestion in unknown_env(environ):
        get_logger(__name__).warning(
            "settings.unknown_variable", variable=name, did_you_mean=suggestion
        )
