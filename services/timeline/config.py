"""Settings of the timeline service (``BEELDPORTAAL_TIMELINE_*``), read once in main()."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.consent.domain.checks import DEFAULT_PROVIDER_CATEGORIES
from shared.settings import ServiceSettings


class TimelineSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="BEELDPORTAAL_TIMELINE_", extra="ignore", hide_input_in_errors=True
    )

    service_name: str = "timeline"

    # The FHIR search, access-log search and DICOMweb API (and /healthz, /readyz, /metrics).
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8085, ge=1, le=65535)
    # The base URL clients reach the API at (FHIR fullUrl, DICOMweb RetrieveURL).
    public_base_url: str = "http://127.0.0.1:8085"

    # The projection worker: /healthz, /readyz and /metrics on <host>:<port>; None serves none.
    projection_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Where the worker's probes listen: 0.0.0.0 in a container, loopback on a workstation.
    projection_metrics_host: str = "127.0.0.1"
    # Events per projection batch (one PostgreSQL transaction each).
    projection_batch: int = Field(default=2000, ge=1, le=100_000)
    # Processes ``beeldportaal timeline rebuild`` reads and loads the topics with (each a share
    # of the partitions); 0: one per CPU.
    rebuild_processes: int = Field(default=0, ge=0, le=64)

    # The Mitz data category images and reports fall under (as consent decides them).
    data_category: str = "GGC002"
    # Provider type (directory type_code) -> Mitz requesting-provider category, as in consent.
    provider_categories: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_PROVIDER_CATEGORIES)
    )
    # How long the API's views (consent registry, provider directory) may take to catch up.
    view_sync_timeout_seconds: float = Field(default=10.0, gt=0)
    # PostgreSQL connections of the API.
    pool_size: int = Field(default=8, ge=1, le=256)
