"""What consent exports on /metrics: the API (requests, notifications, answers, the view's state)
and the decision worker (a decision per study version and purpose, by basis).

Labels are routes, outcomes and decision names only: never a BSN, pseudonym or relationship id.
"""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from shared.events.consent import Basis, Decision, Purpose
from shared.metrics import DURATION_BUCKETS, ServiceMetrics, initialise, safe_label

# The decision each basis gives (design.md, "Two flows, two legal bases").
PERMIT_BASES = (
    Basis.PRESUMED_REFERRAL,
    Basis.EMERGENCY,
    Basis.PRESUMED_UNVERIFIED_IDENTITY,
    Basis.EXPLICIT_CONSENT,
)
DENY_BASES = (Basis.EXPLICIT_OBJECTION, Basis.NO_EXPLICIT_CONSENT, Basis.UNVERIFIED_IDENTITY)
FLAGGED_BASES = (Basis.EMERGENCY, Basis.PRESUMED_UNVERIFIED_IDENTITY)
NOTIFICATION_OUTCOMES = ("registered", "revoked", "duplicate", "pending", "rejected", "unavailable")


def _initialise_decisions(counter: Any) -> None:
    """Every (purpose, decision, basis) a decision can have, at zero."""
    purposes = [p.value for p in Purpose]
    initialise(counter, purposes, [Decision.PERMIT.value], [b.value for b in PERMIT_BASES])
    initialise(counter, purposes, [Decision.DENY.value], [b.value for b in DENY_BASES])


class ViewState(Protocol):
    applied: int
    skipped: int

    @property
    def patients(self) -> int: ...

    @property
    def is_caught_up(self) -> bool: ...

    def lag(self) -> int: ...


class ConsentMetrics(ServiceMetrics):
    def __init__(self, *, registry: CollectorRegistry | None = None, version: str = "0.1.0"):
        super().__init__("consent", version, registry=registry)
        self.requests = self.counter(
            "consent_api_requests", "Consent API requests by route and HTTP status.",
            ["route", "status"],
        )  # fmt: skip
        self.notifications = self.counter(
            "consent_mitz_notifications",
            "Mitz notifications by outcome (registered, revoked, duplicate, pending, rejected, "
            "unavailable).",
            ["outcome"],
        )
        self.relationship_writes = self.counter(
            "consent_relationship_writes",
            "Treatment relationship writes by action (register, end) and outcome.",
            ["action", "outcome"],
        )
        self.queries = self.counter(
            "consent_queries",
            "Closed questions answered, by purpose, decision and basis.",
            ["purpose", "decision", "basis"],
        )
        self.view_lag = self.gauge(
            "consent_registry_view_lag", "Registry records on Kafka the API view has not applied."
        )
        self.view_patients = self.gauge(
            "consent_registry_view_patients", "Patients with a registry in the API view."
        )
        self.view_skipped = self.gauge(
            "consent_registry_view_skipped", "Registry records the API view skipped as poison."
        )
        self.view_caught_up = self.gauge(
            "consent_registry_view_caught_up", "1 when the API view holds the topics' history."
        )
        _initialise_decisions(self.queries)
        initialise(self.notifications, NOTIFICATION_OUTCOMES)

    def watch_view(self, view: ViewState) -> None:
        """Read the view's state at every scrape."""
        self.view_lag.set_function(lambda: float(view.lag()))
        self.view_patients.set_function(lambda: float(view.patients))
        self.view_skipped.set_function(lambda: float(view.skipped))
        self.view_caught_up.set_function(lambda: float(view.is_caught_up))

    def request(self, route: str, status: int) -> None:
        self.requests.labels(safe_label(route), str(status)).inc()

    def notification(self, outcome: str) -> None:
        self.notifications.labels(safe_label(outcome)).inc()

    def relationship_write(self, action: str, outcome: str) -> None:
        self.relationship_writes.labels(safe_label(action), safe_label(outcome)).inc()

    def query(self, purpose: str, decision: str, basis: str) -> None:
        self.queries.labels(safe_label(purpose), safe_label(decision), safe_label(basis)).inc()


class DecisionMetrics(ServiceMetrics):
    """The decision worker's (``beeldportaal consent decide``)."""

    def __init__(self, *, registry: Any = None, version: str = "0.1.0") -> None:
        super().__init__("consent", version, registry=registry)
        self.decisions = self.counter(
            "consent_decisions",
            "consent-checked events, by purpose, decision and basis.",
            ["purpose", "decision", "basis"],
        )
        self.flagged = self.counter(
            "consent_decisions_flagged", "Decisions flagged for an operator, by basis.", ["basis"]
        )
        self.decision_latency = self.histogram(
            "consent_decision_latency_seconds",
            "From a study's announcement (study-received) to its decision.",
            buckets=DURATION_BUCKETS,
        )
        self.registry_patients = self.gauge(
            "consent_decisions_registry_patients", "Patients in the worker's registry view."
        )
        _initialise_decisions(self.decisions)
        initialise(self.flagged, [b.value for b in FLAGGED_BASES])
        # Label children by (purpose, decision, basis): two decisions per study version, and
        # prometheus_client's labels() costs microseconds each time.
        self._decided: dict[tuple[str, str, str], Any] = {}
        self._flagged: dict[str, Any] = {}

    def decided(self, purpose: str, decision: str, basis: str, flagged: bool) -> None:
        key = (purpose, decision, basis)
        child = self._decided.get(key)
        if child is None:
            child = self._decided[key] = self.decisions.labels(*key)
        child.inc()
        if flagged:
            child = self._flagged.get(basis)
            if child is None:
                child = self._flagged[basis] = self.flagged.labels(basis)
            child.inc()
