"""Settings of the consent service (``BEELDPORTAAL_CONSENT_*``), read once in main()."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.consent.domain.checks import DEFAULT_PROVIDER_CATEGORIES
from shared.settings import ServiceSettings


class ConsentSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="BEELDPORTAAL_CONSENT_", extra="ignore", hide_input_in_errors=True
    )

    service_name: str = "consent"

    # The consent API: Mitz notifications, treatment relationships, the closed question
    # (and /healthz, /readyz, /metrics).
    http_host: str = "127.0.0.1"
    http_port: int = 8082
    # How long a write waits to be visible in the API's registry view before it answers.
    view_sync_timeout_seconds: float = Field(default=10.0, gt=0)

    # The decision worker: /healthz, /readyz and /metrics on <host>:<port>; None serves none.
    decisions_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Where the worker's probes listen: 0.0.0.0 in a container, loopback on a workstation.
    decisions_metrics_host: str = "127.0.0.1"
    # The Mitz data category a study's images and reports fall under.
    data_category: str = "GGC002"
    # Provider type (directory type_code) -> the Mitz requesting-provider category of a
    # recipient of that type. A type missing here is decided as "any category".
    provider_categories: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_PROVIDER_CATEGORIES)
    )
