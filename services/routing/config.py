"""Settings of the routing service (``BEELDPORTAAL_ROUTING_*``), read once in main()."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class RoutingSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="BEELDPORTAAL_ROUTING_", extra="ignore", hide_input_in_errors=True
    )

    service_name: str = "routing"

    # The directory API (and /healthz, /readyz, /metrics).
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8083, ge=1, le=65535)
    # How long a write waits to be visible in this process's directory view before it answers
    # (503 after that: the write is on the topic, the caller may read it back shortly).
    view_sync_timeout_seconds: float = Field(default=10.0, gt=0)
    # How long to wait for the directory view to catch up before warning (the worker keeps
    # waiting: routing against a half-read directory would fail studies it could deliver).
    view_start_timeout_seconds: float = Field(default=60.0, gt=0)

    # The routing worker: /healthz, /readyz and /metrics on <host>:<port>; None serves none.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Where the worker's probes listen: 0.0.0.0 in a container, loopback on a workstation.
    worker_metrics_host: str = "127.0.0.1"
    # A YAML seed (Directory.load_yaml) that `seed` publishes; see deploy/local/demo-directory.yaml.
    directory_seed: Path | None = None
