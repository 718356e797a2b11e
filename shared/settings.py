"""Settings: one pydantic-settings object per service, read once in main() and passed down.

Connection details of the platform (Kafka, S3, PostgreSQL, the pseudonym key) are shared by all
services and read from ``BEELDPORTAAL_*``; each service adds its own ``BEELDPORTAAL_<SERVICE>_*``.
Nothing below an entrypoint reads ``os.environ``.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseSettings):
    """Where the Kafka cluster is and how producers behave."""

    model_config = SettingsConfigDict(
        env_prefix="BEELDPORTAAL_KAFKA_", extra="ignore", hide_input_in_errors=True
    )

    bootstrap_servers: str = "127.0.0.1:19092"
    client_id_prefix: str = "beeldportaal"
    # A study's event can list thousands of instances; topics allow this size too (shared.topics).
    max_message_bytes: int = 16 * 1024 * 1024
    # zstd. aiokafka fixes the level of every codec: lz4 and gzip at 9, zstd at 3. On a batch of
    # 50 study snapshots (117 KB) lz4 took 1,050 us, gzip 2,690, zstd 303, snappy 113; zstd
    # packs it 8.9x, lz4 5.8x, snappy 4.4x; decoding takes 38-75 us with any (2026-11-26).
    # Under load lz4 was 11 % of the consent and routing workers' samples, zstd 4 %, though
    # bench-decide's throughput did not change beyond its noise. zstd keeps the topics, which
    # are kept to rebuild the timeline from, smallest.
    compression: str = "zstd"
    # aiokafka's 16 KB default batch holds ~12 events and caps a producer at a few thousand
    # events/s (it sends one request per broker at a time); 256 KB measured 2-3x faster.
    max_batch_bytes: int = 256 * 1024
    linger_ms: int = 5
    request_timeout_ms: int = 30_000
    # Durability of every topic we create (ours and faust's changelogs). 1/1 suits the local
    # single broker; production sets 3/2 so acks=all survives the loss of one broker.
    replication_factor: int = Field(default=1, ge=1)
    min_insync_replicas: int = Field(default=1, ge=1)

    @property
    def bootstrap_list(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]


class S3Settings(BaseSettings):
    """The S3 server holding the DICOM bytes (any S3: versitygw locally, AWS/Ceph/... elsewhere)."""

    model_config = SettingsConfigDict(
        env_prefix="BEELDPORTAAL_S3_", extra="ignore", hide_input_in_errors=True
    )

    endpoint: str = "127.0.0.1:19000"
    access_key: str = "beeldportaal"
    secret_key: SecretStr = SecretStr("beeldportaal-dev-secret")
    region: str = "us-east-1"
    secure: bool = False
    bucket: str = "dicom"


class PostgresSettings(BaseSettings):
    """The PostgreSQL database holding the read models (timeline, audit)."""

    model_config = SettingsConfigDict(
        env_prefix="BEELDPORTAAL_POSTGRES_", extra="ignore", hide_input_in_errors=True
    )

    # A DSN may carry a password: kept secret so it never shows in a repr or a log line.
    dsn: SecretStr = SecretStr("postgresql://beeldportaal@127.0.0.1:15432/beeldportaal")

    @property
    def conninfo(self) -> str:
        return self.dsn.get_secret_value()


class PrivacySettings(BaseSettings):
    """Secrets that keep a BSN out of every event, log line and key."""

    model_config = SettingsConfigDict(
        env_prefix="BEELDPORTAAL_", extra="ignore", hide_input_in_errors=True
    )

    # Keyed HMAC of the BSN. Required: there is deliberately no default, a missing key is fatal.
    pseudonym_key: SecretStr

    @field_validator("pseudonym_key")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value().encode()) < 32:
            raise ValueError("pseudonym_key must be at least 32 bytes")
        return value


class ServiceSettings(BaseSettings):
    """Base of every service's settings: its name, log level, metrics and the platform it uses."""

    model_config = SettingsConfigDict(
        env_prefix="BEELDPORTAAL_", extra="ignore", hide_input_in_errors=True
    )

    service_name: str = "beeldportaal"
    log_level: str = "INFO"
    log_json: bool = True
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
