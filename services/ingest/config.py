"""Settings of the ingest service (``BEELDPORTAAL_INGEST_*``), read once in main()."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="BEELDPORTAAL_INGEST_", extra="ignore", hide_input_in_errors=True
    )

    service_name: str = "ingest"

    # STOW-RS (and /healthz, /readyz, /metrics).
    http_host: str = "127.0.0.1"
    http_port: int = 8081
    # Where a stored study can be retrieved with WADO-RS (``{base}/studies/{uid}``), named in
    # STOW-RS answers as RetrieveURL: the timeline's DICOMweb API (its ``/dicomweb``), which
    # answers requesters who may see the patient's timeline. Unset, answers name no
    # RetrieveURL: ingest itself serves no WADO-RS.
    retrieve_base_url: str | None = None

    # C-STORE SCP.
    dimse_host: str = "127.0.0.1"
    dimse_port: int = 11112
    dimse_max_associations: int = 16

    # Who may send and who can receive: organisations, their AE titles and peer addresses.
    peers_file: Path | None = None

    # Received parts are spooled in memory up to this size, then to disk in spool_dir.
    spool_memory_bytes: int = 8 * 1024 * 1024
    spool_dir: Path | None = None
    max_instance_bytes: int = 8 * 1024**3
    max_instances_per_request: int = 10_000
    # Instances of one request processed concurrently (S3 write + Kafka acknowledgement).
    store_concurrency: int = 8
    # Threads for blocking work (S3 calls of large instances): enough for every request in flight.
    io_threads: int = Field(default=32, ge=4)
    # Instances up to this size are checked and stored on the event loop (one signed PUT, no
    # worker thread); larger ones are streamed to S3 from a worker thread. 0: all in threads.
    inline_store_bytes: int = Field(default=1024 * 1024, ge=0, le=4 * 1024 * 1024)

    # Study assembly: announce a study once no instance arrived for this long.
    stable_age_seconds: float = Field(default=15.0, gt=0)
    assembly_check_interval_seconds: float = Field(default=0.5, gt=0)
    # A study whose newest instance came with completes_study (as ingest wrote them before
    # 2026-11-27; it now says so only when the whole request is in, and the study is then
    # announced at once) is announced once no new instance came for this long (capped at the
    # stable age). A straggler later than this is not lost: it makes a version 2.
    assembly_completion_quiet_seconds: float = Field(default=0.5, ge=0)
    # The assembly worker: /healthz, /readyz and /metrics on <host>:<port>; None serves none.
    assembly_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Where the worker's probes listen: 0.0.0.0 in a container, loopback on a workstation.
    assembly_metrics_host: str = "127.0.0.1"
