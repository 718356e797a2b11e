"""What the notify API exports on /metrics: requests, re-drives, pickup downloads and the state of
its two read models (the journey view and the dead letters).

Labels are routes, statuses, outcomes, priorities and view names only: never a URA, a study UID,
a delivery key or a pickup token. The delivery worker has metrics of its own
(``services.notify.worker_metrics``); each process exports one of the two.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry

from shared.metrics import ServiceMetrics, initialise, safe_label

PICKUP_OUTCOMES = (
    "ok", "malformed", "tampered", "expired", "forbidden", "not-found", "unavailable", "aborted",
    "unaudited",
)  # fmt: skip


class ViewState(Protocol):
    applied: int
    skipped: int

    @property
    def is_caught_up(self) -> bool: ...

    @property
    def failed(self) -> bool: ...

    def lag(self) -> int: ...


class NotifyApiMetrics(ServiceMetrics):
    def __init__(self, *, registry: CollectorRegistry | None = None, version: str = "0.1.0"):
        super().__init__("notify-api", version, registry=registry)
        self.requests = self.counter(
            "notify_api_requests", "Notify API requests by route template and HTTP status.",
            ["route", "status"],
        )  # fmt: skip
        self.redriven = self.counter(
            "notify_dead_letters_redriven",
            "Dead-lettered deliveries an operator re-drove, by the queue they went back to.",
            ["queue"],
        )
        self.pickups = self.counter(
            "notify_pickup_downloads",
            "Pickup downloads by outcome (ok, malformed, tampered, expired, forbidden, "
            "not-found, unavailable, aborted; unaudited: refused with 503 because Kafka did "
            "not take its NEN 7513 record).",
            ["outcome"],
        )
        self.pickup_bytes = self.counter(
            "notify_pickup_bytes", "DICOM bytes streamed to recipients in pickup zips."
        )
        self.view_lag = self.gauge(
            "notify_api_view_lag", "Records on Kafka a read model has not applied yet.", ["view"]
        )
        self.view_caught_up = self.gauge(
            "notify_api_view_caught_up",
            "1 when a read model holds its topics' history (and has not failed).",
            ["view"],
        )
        self.view_failed = self.gauge(
            "notify_api_view_failed", "1 when a read model stopped on a record.", ["view"]
        )
        self.view_skipped = self.gauge(
            "notify_api_view_skipped", "Records a read model skipped as poison.", ["view"]
        )
        self.journey_studies = self.gauge(
            "notify_journey_studies", "Studies held by the journey view (the status API)."
        )
        self.dead_letters = self.gauge(
            "notify_dead_letters", "Deliveries on the dead-letter topic, as the API sees it."
        )
        initialise(self.pickups, PICKUP_OUTCOMES)
        initialise(self.redriven, ("delivery-urgent", "delivery-routine"))

    def watch_view(self, name: str, view: ViewState) -> None:
        """Read a view's state at every scrape."""
        label = safe_label(name)
        self.view_lag.labels(label).set_function(lambda: float(view.lag()))
        self.view_caught_up.labels(label).set_function(lambda: float(view.is_caught_up))
        self.view_failed.labels(label).set_function(lambda: float(view.failed))
        self.view_skipped.labels(label).set_function(lambda: float(view.skipped))

    def request(self, route: str, status: int) -> None:
        self.requests.labels(safe_label(route), str(status)).inc()

    def redrove(self, queue: str, count: int = 1) -> None:
        self.redriven.labels(safe_label(queue)).inc(count)

    def pickup(self, outcome: str) -> None:
        self.pickups.labels(safe_label(outcome)).inc()
