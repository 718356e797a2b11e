"""What the timeline API exports on /metrics: requests, access decisions, audit writes, WADO-RS
streams and the state of its consent views.

Labels are route templates, statuses, endpoints, outcomes and condition names only: never a
BSN, a pseudonym, a URA or a UID.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry

from shared.metrics import ServiceMetrics, initialise, safe_label

ENDPOINTS = ("timeline-search", "qido-rs", "wado-rs", "access-log-search")
ACCESS_OUTCOMES = ("allowed", "denied", "emergency")


class ViewState(Protocol):
    @property
    def is_caught_up(self) -> bool: ...

    @property
    def failed(self) -> bool: ...

    def lag(self) -> int: ...


class TimelineMetrics(ServiceMetrics):
    def __init__(self, *, registry: CollectorRegistry | None = None, version: str = "0.1.0"):
        super().__init__("timeline", version, registry=registry)
        self.requests = self.counter(
            "timeline_api_requests", "Timeline API requests by route template and HTTP status.",
            ["route", "status"],
        )  # fmt: skip
        self.access_decisions = self.counter(
            "timeline_access_decisions",
            "Access checks by endpoint (timeline-search, qido-rs, wado-rs, access-log-search) "
            "and outcome (allowed, denied, emergency).",
            ["endpoint", "outcome"],
        )
        self.access_denials = self.counter(
            "timeline_access_denied_conditions",
            "Conditions that failed in denied access checks (one count per condition).",
            ["condition"],
        )
        self.audit_records = self.counter(
            "timeline_audit_records",
            "NEN 7513 records by result: written (Kafka and PostgreSQL) or failed (503).",
            ["result"],
        )
        self.wado_streams = self.counter(
            "timeline_wado_streams",
            "WADO-RS retrievals by how the stream ended (ok, aborted, checksum-mismatch).",
            ["outcome"],
        )
        self.wado_bytes = self.counter(
            "timeline_wado_bytes", "DICOM bytes streamed to viewers over WADO-RS."
        )
        self.search_duration = self.histogram(
            "timeline_search_duration_seconds",
            "Time to answer a timeline search (access check, read model, audit).",
        )
        self.view_lag = self.gauge(
            "timeline_view_lag", "Records on Kafka a consent view has not applied yet.", ["view"]
        )
        self.view_caught_up = self.gauge(
            "timeline_view_caught_up",
            "1 when a consent view holds its topics' history and has not failed.",
            ["view"],
        )
        initialise(self.access_decisions, ENDPOINTS, ACCESS_OUTCOMES)
        initialise(self.audit_records, ("written", "failed"))
        initialise(self.wado_streams, ("ok", "aborted", "checksum-mismatch"))

    def watch_view(self, name: str, view: ViewState) -> None:
        """Read a view's state at every scrape."""
        label = safe_label(name)
        self.view_lag.labels(label).set_function(lambda: float(view.lag()))
        self.view_caught_up.labels(label).set_function(
            lambda: float(view.is_caught_up and not view.failed)
        )

    def request(self, route: str, status: int) -> None:
        self.requests.labels(safe_label(route), str(status)).inc()

    def access(self, endpoint: str, outcome: str, conditions: tuple[str, ...] = ()) -> None:
        self.access_decisions.labels(safe_label(endpoint), safe_label(outcome)).inc()
        for condition in conditions:
            self.access_denials.labels(safe_label(condition)).inc()

    def audited(self, ok: bool) -> None:
        self.audit_records.labels("written" if ok else "failed").inc()

    def wado(self, outcome: str) -> None:
        self.wado_streams.labels(safe_label(outcome)).inc()
