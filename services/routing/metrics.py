"""What routing exports on /metrics: routes by channel and priority, failures by reason code,
the directory's size and the API's writes. No label ever holds a URA of a patient or a study
UID: only codes from closed sets."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from shared.events.common import DeliveryChannel, Urgency
from shared.events.routing import RouteFailureReason
from shared.metrics import ServiceMetrics, initialise, safe_label


class RoutingMetrics(ServiceMetrics):
    def __init__(self, *, registry: CollectorRegistry | None = None, version: str = "0.1.0"):
        super().__init__("routing", version, registry=registry)
        self.routes_resolved = self.counter(
            "routing_routes_resolved",
            "route-resolved events emitted, by delivery channel and priority.",
            ["channel", "priority"],
        )
        self.routes_failed = self.counter(
            "routing_routes_failed",
            "route-failed events emitted, by reason code.",
            ["reason"],
        )
        self.directory_providers = self.gauge(
            "routing_directory_providers", "Providers in this process's directory view."
        )
        self.directory_records_skipped = self.counter(
            "routing_directory_records_skipped",
            "provider-directory records the view could not apply (invalid; logged, skipped).",
        )
        self.directory_writes = self.counter(
            "routing_directory_writes",
            "Directory API writes, by action (put, unchanged, remove).",
            ["action"],
        )
        initialise(
            self.routes_resolved, [c.value for c in DeliveryChannel], [u.value for u in Urgency]
        )
        initialise(self.routes_failed, [*(r.value for r in RouteFailureReason), "unknown"])
        initialise(self.directory_writes, ("put", "unchanged", "remove"))
        initialise(self.handler_duration, ("route",))

    def resolved(self, channel: str, priority: str) -> None:
        self.routes_resolved.labels(safe_label(channel), safe_label(priority)).inc()

    def route_failed(self, reason: str) -> None:
        self.routes_failed.labels(safe_label(reason)).inc()
