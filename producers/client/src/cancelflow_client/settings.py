"""Where the API is and how to reach it, from the environment.

``CANCELFLOW_CLIENT__URL``, ``__TOKEN``, ``__TIMEOUT_S``, ``__RETRIES``, ``__RETRY_TIME_S``: a
client's own settings, so a machine that only calls the API needs none of the server's. The
names they had before (``CANCELFLOW_API_URL`` ...; ``CANCELFLOW_API_TOKEN`` was one letter from
the server's ``CANCELFLOW_API_TOKENS``) are still read, with a ``FutureWarning``; a new name
wins.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

# Field -> (its variable, the variable's old name).
CLIENT_ENV = {
    "api_url": ("CANCELFLOW_CLIENT__URL", "CANCELFLOW_API_URL"),
    "api_token": ("CANCELFLOW_CLIENT__TOKEN", "CANCELFLOW_API_TOKEN"),
    "api_timeout_s": ("CANCELFLOW_CLIENT__TIMEOUT_S", "CANCELFLOW_API_TIMEOUT_S"),
    "api_retries": ("CANCELFLOW_CLIENT__RETRIES", "CANCELFLOW_API_RETRIES"),
    "api_retry_time_s": ("CANCELFLOW_CLIENT__RETRY_TIME_S", "CANCELFLOW_API_RETRY_TIME_S"),
}
TOKEN_VARIABLE = CLIENT_ENV["api_token"][0]


class SettingsError(ValueError):
    """A client variable's value is invalid: the message names the variable (never a token's
    value)."""


class ClientSettings(BaseModel):
    """The client's settings; ``ClientSettings.from_env()`` reads them from the environment
    (an invalid value raises pydantic's ``ValidationError`` naming the variable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_url: str = "http://127.0.0.1:8080"
    api_token: SecretStr | None = None
    # Longer than the API waits on its Redis (10 s by default) before answering 503: the
    # client hears the 503 and its Retry-After rather than timing out.
    api_timeout_s: float = Field(default=15.0, gt=0)
    # Retries after the first attempt, all within ``api_retry_time_s`` of it: enough to ride
    # out a Redis restart or failover behind the API (it asks for 5 s between tries).
    api_retries: int = Field(default=6, ge=0)
    api_retry_time_s: float = Field(default=60.0, ge=0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if environ is None else environ
        found: dict[str, str] = {}
        for name, (new, old) in CLIENT_ENV.items():
            if new in env:
                found[name] = env[new]
            elif old in env:
                warnings.warn(f"{old} is deprecated: set {new}", FutureWarning, stacklevel=2)
                found[name] = env[old]
        names = {name: CLIENT_ENV[name][0] for name in found}
        try:
            return cls.model_validate(found)
        except ValidationError as exc:
            # The variable's name and what is wrong, never the value (it may be a token).
            raise SettingsError(
                "; ".join(
                    f"{names.get(str(err['loc'][0]), err['loc'][0])}: {err['msg']}"
                    for err in exc.errors()
                )
            ) from None
