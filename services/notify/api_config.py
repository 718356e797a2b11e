"""Settings of the notify API (``BEELDPORTAAL_NOTIFY_*``), read once in ``serve()``.

The delivery worker's settings are ``services.notify.config.NotifySettings`` under the same
prefix; each ignores the other's fields, so one environment can configure both processes, and
``BEELDPORTAAL_NOTIFY_PICKUP_KEY`` is the one key both use (the worker signs pickup links, the
API verifies them).
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from services.notify.domain.pickup import MIN_KEY_BYTES
from shared.settings import ServiceSettings


class NotifyApiSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="BEELDPORTAAL_NOTIFY_", extra="ignore", hide_input_in_errors=True
    )

    service_name: str = "notify-api"

    # The status, dead-letter and pickup API (and /healthz, /readyz, /metrics).
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8084, ge=1, le=65535)

    # HMAC key of pickup links. Required, like the pseudonym key: there is deliberately no
    # default (the local platform generates one per state directory).
    pickup_key: SecretStr
    # Keys that signed links still in circulation after a rotation (a JSON list), newest first.
    pickup_retired_keys: list[SecretStr] = Field(default_factory=list)

    # How long a read waits for the views to hold what is on the topics before answering (the
    # status then says it may be stale; a re-drive answers 202).
    view_sync_timeout_seconds: float = Field(default=10.0, gt=0)
    # How long a re-drive may take (the Kafka transaction and the view applying it).
    redrive_timeout_seconds: float = Field(default=30.0, gt=0)
    # How long a pickup waits for Kafka to acknowledge its NEN 7513 record (access-logged)
    # before refusing with 503: no download starts unaudited.
    audit_timeout_seconds: float = Field(default=10.0, gt=0)

    @field_validator("pickup_key")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value().encode()) < MIN_KEY_BYTES:
            raise ValueError(f"pickup_key must be at least {MIN_KEY_BYTES} bytes")
        return value

    @field_validator("pickup_retired_keys")
    @classmethod
    def _all_long_enough(cls, values: list[SecretStr]) -> list[SecretStr]:
        if any(len(v.get_secret_value().encode()) < MIN_KEY_BYTES for v in values):
            raise ValueError(f"every retired pickup key must be at least {MIN_KEY_BYTES} bytes")
        return values

    @property
    def pickup_keys(self) -> tuple[bytes, ...]:
        """Verification keys, newest first."""
        keys = [self.pickup_key, *self.pickup_retired_keys]
        return tuple(k.get_secret_value().encode() for k in keys)
