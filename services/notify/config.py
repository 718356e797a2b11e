"""Settings of the notify delivery worker (``BEELDPORTAAL_NOTIFY_*``), read once in main()."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from services.notify.domain.pickup import MIN_KEY_BYTES
from services.notify.domain.retry import DEFAULT_DELAYS, RetryPolicy, tier_topic_name
from shared.settings import ServiceSettings
from shared.topics import BY_NAME


class NotifySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="BEELDPORTAAL_NOTIFY_", extra="ignore", hide_input_in_errors=True
    )

    service_name: str = "notify"

    # The delivery worker: /healthz, /readyz and /metrics on <host>:<port>; None serves none.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Where the worker's probes listen: 0.0.0.0 in a container, loopback on a workstation.
    worker_metrics_host: str = "127.0.0.1"
    # Growing delays between attempts; after the last one the delivery is dead-lettered. Each
    # delay is a topic (delivery-retry-<delay>) that shared.topics must declare.
    retry_delays: tuple[float, ...] = DEFAULT_DELAYS
    # Deliveries taken per fetch, per queue (urgent, routine, retries). On the urgent and the
    # routine queue, deliveries of one partition go side by side (each delivery's attempts in
    # order), at most max_concurrent_deliveries at once; a retry tier's go one by one.
    max_records_per_batch: int = Field(default=50, ge=1, le=10_000)
    # Deliveries in flight at once per queue: what one worker asks of the receivers' PACSs at
    # a time, and what it holds in memory (a batch of instances each).
    max_concurrent_deliveries: int = Field(default=12, ge=1, le=512)
    # Seconds a receiver gets to answer one request (STOW-RS) or association (C-STORE).
    receiver_timeout_seconds: float = Field(default=60.0, gt=0)
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    # Threads for blocking work (S3 reads, C-STORE associations).
    io_threads: int = Field(default=32, ge=4, le=512)
    # Waits between the attempts of one webhook notification (so one more attempt than waits).
    webhook_backoff_seconds: tuple[float, ...] = (1.0, 5.0, 30.0)
    # Webhook requests in flight at once per receiving organisation (a batch's studies are
    # notified side by side; the waits between one notification's attempts hold no slot).
    max_concurrent_webhooks: int = Field(default=12, ge=1, le=512)
    # Portal pickup: links in the recipient's webhook are signed with this key (the notify API
    # verifies them with the same BEELDPORTAAL_NOTIFY_PICKUP_KEY), point at this base URL and
    # expire after this many days. Without a key, pickup webhooks carry no link.
    pickup_key: SecretStr | None = None
    public_base_url: str = "http://127.0.0.1:8084"
    pickup_link_days: float = Field(default=14.0, gt=0)
    # How long to wait for the provider directory before delivering anyway.
    view_start_timeout_seconds: float = Field(default=60.0, gt=0)

    @field_validator("pickup_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        # As the API demands of the same key: refused at start, not at the first pickup.
        if value is not None and len(value.get_secret_value().encode()) < MIN_KEY_BYTES:
            raise ValueError(f"pickup_key must be at least {MIN_KEY_BYTES} bytes")
        return value

    @field_validator("retry_delays")
    @classmethod
    def _tiers_are_declared(cls, delays: tuple[float, ...]) -> tuple[float, ...]:
        policy = RetryPolicy(delays=delays)
        missing = [tier_topic_name(d) for d in policy.delays if tier_topic_name(d) not in BY_NAME]
        if missing:
            raise ValueError(f"retry delays need declared topics (shared.topics): {missing}")
        return delays

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(delays=self.retry_delays)
