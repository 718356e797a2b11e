"""What ingest exports on /metrics: instances and bytes in, rejections by reason, latencies."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from shared.events.common import IngestChannel
from shared.metrics import ServiceMetrics, initialise

_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_WAIT_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 1800, 3600)
_SIZE_BUCKETS = tuple(float(2**n) for n in range(10, 34, 2))  # 1 KiB .. 8 GiB
CHANNELS = tuple(c.value for c in IngestChannel)
INSTANCE_OUTCOMES = ("stored", "duplicate", "rejected", "failed")
STUDY_KINDS = ("first", "follow-up")
# STOW-RS answers (README "Sending a study") and DIMSE association outcomes (entrypoints.scp).
STOW_STATUSES = ("200", "202", "400", "401", "404", "409", "413", "415", "503")
# The STOW-RS routes' templates start with this (shared.http.CorrelationMiddleware's route).
STOW_ROUTE_PREFIX = "/dicomweb/to/"
ASSOCIATION_OUTCOMES = ("accepted", "rejected-limit", "rejected-called-ae", "rejected-calling-ae")


class IngestMetrics(ServiceMetrics):
    def __init__(self, *, registry: CollectorRegistry | None = None, version: str = "0.1.0"):
        super().__init__("ingest", version, registry=registry)
        self.instances_received = self.counter(
            "ingest_instances_received",
            "Instances received, by channel and outcome (stored, duplicate, rejected, failed).",
            ["channel", "outcome"],
        )
        self.bytes_received = self.counter(
            "ingest_bytes_received", "Bytes of instances stored, by channel.", ["channel"]
        )
        self.instances_rejected = self.counter(
            "ingest_instances_rejected",
            "Instances refused, by channel and DICOM status (hex).",
            ["channel", "status"],
        )
        self.instance_size = self.histogram(
            "ingest_instance_size_bytes", "Size of received instances.", buckets=_SIZE_BUCKETS
        )
        self.request_duration = self.histogram(
            "ingest_request_duration_seconds",
            "STOW-RS request and C-STORE association duration, by channel.",
            ["channel"],
            buckets=_REQUEST_BUCKETS,
        )
        self.requests = self.counter(
            "ingest_requests", "STOW-RS requests by HTTP status.", ["status"]
        )
        self.associations = self.counter(
            "ingest_associations", "DIMSE associations by outcome.", ["outcome"]
        )
        self.studies_assembled = self.counter(
            "ingest_studies_assembled", "study-received events emitted, by version kind.", ["kind"]
        )
        self.assembly_wait = self.histogram(
            "ingest_assembly_wait_seconds",
            "From a study's first instance to its announcement.",
            buckets=_WAIT_BUCKETS,
        )
        # The closed label sets, at zero from start-up (rules and dashboards rely on them).
        initialise(self.instances_received, CHANNELS, INSTANCE_OUTCOMES)
        initialise(self.bytes_received, CHANNELS)
        initialise(self.request_duration, CHANNELS)
        initialise(self.studies_assembled, STUDY_KINDS)
        initialise(self.requests, STOW_STATUSES)
        initialise(self.associations, ASSOCIATION_OUTCOMES)

    def answered(self, route: str, status: int) -> None:
        """Every answered STOW-RS request by its status (``CorrelationMiddleware``'s hook): the
        ones refused before the handler ran (401, a 422 on the path) as much as the others."""
        if route.startswith(STOW_ROUTE_PREFIX):
            self.requests.labels(str(status)).inc()
