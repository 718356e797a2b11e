"""Each study's journey for its sender: received, consent, routes, deliveries; folded in memory.

A :class:`~shared.topic_view.TopicView` over ``study-received``, ``consent-checked``,
``route-resolved``, ``route-failed``, ``delivered`` and ``delivery-failed``, read from offset 0
by every API replica and kept per Study Instance UID, sender, recipient and version. It is an
in-memory projection of those topics, with what that honestly implies:

- **Retention.** ``study-received``, ``consent-checked`` and ``delivered`` are kept forever, but
  ``route-resolved``, ``route-failed`` and ``delivery-failed`` only 90 days (shared.topics). A
  process started later than that after a study was routed rebuilds it without its routes,
  route failure and failed attempts: the status still says received, the consent decision and
  what was delivered, but a route that never delivered is simply no longer known, and neither
  is the pickup manifest of a study routed to a pickup endpoint (its links expire long before).
- **Memory.** Every study ever received is held, so memory grows with the history. Only what
  the status needs is kept (no snapshot, no series, no patient reference), repeated short
  strings are interned, and the instance manifest and the patient's pseudonym are kept only
  for versions routed to a pickup endpoint (the pickup download needs the one, its NEN 7513
  record the other). Roughly a few hundred
  bytes per study version: a projection for millions of versions belongs in PostgreSQL.
- **Order.** The six topics are read side by side, so one study's events may be applied in any
  order across topics (a delivery before its route). Each fact is kept where it belongs and
  the state is derived when asked, never from the order records came in. Within one topic a
  study's events are in order (keyed by Study Instance UID), so a later failure replaces an
  earlier one.

A record that does not decode to the event its topic carries is poison: the view logs its
position and skips it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal, NamedTuple

from shared.codec import Codec
from shared.errors import PoisonEvent
from shared.events import (
    ConsentChecked,
    Decision,
    Delivered,
    DeliveryChannel,
    DeliveryFailed,
    InstanceOutcomes,
    Purpose,
    RouteFailed,
    RouteResolved,
    StudyReceived,
    StudySnapshot,
    Urgency,
)
from shared.events.consent import Basis
from shared.settings import KafkaSettings
from shared.topic_view import TopicView

State = Literal["received", "consent-checked", "routed", "delivered", "failed", "not-routed"]


@dataclass(frozen=True, slots=True)
class JourneyTopics:
    """Where a study's journey is told; tests name tagged copies."""

    study_received: str = StudyReceived.topic
    consent_checked: str = ConsentChecked.topic
    route_resolved: str = RouteResolved.topic
    route_failed: str = RouteFailed.topic
    delivered: str = Delivered.topic
    delivery_failed: str = DeliveryFailed.topic

    @property
    def names(self) -> tuple[str, ...]:
        return (
            self.study_received,
            self.consent_checked,
            self.route_resolved,
            self.route_failed,
            self.delivered,
            self.delivery_failed,
        )


# --- what is kept per study version ---------------------------------------------------------------


class PickupInstance(NamedTuple):
    """One instance of a pickup zip: where its bytes are and what they must hash to."""

    sop_instance_uid: str
    series_instance_uid: str
    object_key: str
    size: int
    sha256: str


class Pickup(NamedTuple):
    """A pickup zip: its instances, when the version's last instance was received, and what
    the download's audit record names: the patient's pseudonym (None when the sender's BSN was
    not verified) and the basis of the delivery's consent decision, when known."""

    instances: tuple[PickupInstance, ...]
    last_received_at: datetime | None
    patient: str | None = None
    consent_basis: Basis | None = None


@dataclass(slots=True)
class ConsentState:
    decision: Decision
    basis: Basis
    flagged: bool


@dataclass(slots=True)
class RouteFailure:
    reason_code: str | None
    reason: str
    failed_at: datetime


@dataclass(slots=True)
class DeliveredState:
    outcomes: InstanceOutcomes
    attempts: int
    delivered_at: datetime


@dataclass(slots=True)
class FailedAttempt:
    attempt: int
    reason: str
    final: bool
    next_attempt_at: datetime | None
    failed_at: datetime


@dataclass(slots=True)
class EndpointJourney:
    """One destination endpoint of a study version: its route, and how delivery went."""

    destination_ura: str
    endpoint_id: str
    channel: DeliveryChannel
    # None when only delivery events are known (route-resolved is kept 90 days, delivered forever).
    priority: Urgency | None = None
    routed: bool = False
    delivered: DeliveredState | None = None
    # The latest failed attempt (delivery-failed is ordered per study, so the last one applied).
    failure: FailedAttempt | None = None

    @property
    def state(self) -> Literal["delivered", "failed", "retrying", "pending"]:
        # Delivered is final: a failure applied later (its topic is read side by side with
        # delivered) is an earlier attempt's story, or one before a re-drive that then succeeded.
        if self.delivered is not None:
            return "delivered"
        if self.failure is not None:
            return "failed" if self.failure.final else "retrying"
        return "pending"


@dataclass(slots=True)
class VersionJourney:
    version: int
    # Sender and recipient, from its key; no sender for the facts of records that did not
    # name it.
    sender_ura: str | None
    recipient_ura: str
    # Known from any event carrying the snapshot (study-received, consent-checked,
    # route-resolved); None while only events without it (delivered, ...) have been applied.
    instances: int | None = None
    first_received_at: datetime | None = None
    last_received_at: datetime | None = None
    announced_at: datetime | None = None  # when study-received said the version was complete
    consent: ConsentState | None = None
    route_failure: RouteFailure | None = None
    endpoints: dict[tuple[str, str], EndpointJourney] = field(default_factory=dict)
    # Only for versions routed to a pickup endpoint: the zip's contents, by SOP Instance UID,
    # and the patient's pseudonym for the download's audit record.
    pickup: dict[str, PickupInstance] | None = None
    patient: str | None = None

    @property
    def state(self) -> State:
        endpoints = list(self.endpoints.values())
        if endpoints:
            states = [e.state for e in endpoints]
            if all(s == "delivered" for s in states):
                return "delivered"
            if "failed" in states:
                return "failed"
            return "routed"
        if self.route_failure is not None:
            return "not-routed"
        if self.consent is not None:
            # A denial is never routed (routing will say so with a route-failed).
            return "not-routed" if self.consent.decision is Decision.DENY else "consent-checked"
        return "received"

    @property
    def routed_to_pickup(self) -> bool:
        return any(
            e.channel is DeliveryChannel.PICKUP and e.routed for e in self.endpoints.values()
        )


# A study version's key: its sender's URA, its recipient's URA and its version number. Ingest
# numbers versions per sender and recipient: two organisations sending one Study Instance UID,
# or one sending it to two recipients, each have a version 1. No sender: a fact from a record
# written before route-failed, delivered and delivery-failed named it (2026-11-27); the
# recipient every event names (a delivery's destination is the study's recipient).
VersionKey = tuple[str | None, str, int]


@dataclass(slots=True)
class StudyJourney:
    """A Study Instance UID's versions, by sender, recipient and version number.

    A fact from a record that does not name its sender (written before 2026-11-27) is kept
    under ``(None, recipient, version)``. It belongs to the one sender that has that version
    for that recipient, and is shown with it when asked; while two senders have it, it could be
    either's, and only operators see it, as a version of unknown sender.
    """

    study_instance_uid: str
    versions: dict[VersionKey, VersionJourney] = field(default_factory=dict)

    def version(self, sender_ura: str | None, recipient_ura: str, version: int) -> VersionJourney:
        key = (sender_ura, recipient_ura, version)
        found = self.versions.get(key)
        if found is None:
            found = self.versions[key] = VersionJourney(version, sender_ura, recipient_ura)
        return found

    def all_versions(self) -> list[VersionJourney]:
        """Every version whatever its sender, by version, sender and recipient: for operators
        only."""
        return self._resolved(lambda _sender: True)

    def visible_to(self, ura: str) -> list[VersionJourney]:
        """The versions ``ura`` sent, oldest first: a UID reused by another sender shows each
        only their own."""
        return self._resolved(lambda sender: sender == ura)

    def _resolved(self, shown: Callable[[str | None], bool]) -> list[VersionJourney]:
        senders: dict[tuple[str, int], int] = {}
        for sender, recipient, number in self.versions:
            if sender is not None:
                senders[recipient, number] = senders.get((recipient, number), 0) + 1
        resolved = []
        # By version, then sender (the facts of an unknown sender last), then recipient.
        for (sender, recipient, number), journey in sorted(
            self.versions.items(),
            key=lambda item: (item[0][2], item[0][0] is None, item[0][0] or "", item[0][1]),
        ):
            attributable = senders.get((recipient, number)) == 1
            if sender is None:
                if not attributable and shown(None):
                    resolved.append(journey)
                continue
            if not shown(sender):
                continue
            unattributed = self.versions.get((None, recipient, number))
            if unattributed is not None and attributable:
                journey = _merged(journey, unattributed)
            resolved.append(journey)
        return resolved

    def pickup(
        self, version: int, recipient_ura: str, sender_ura: str | None
    ) -> VersionJourney | None:
        """The version sent to ``recipient_ura`` and routed to its pickup endpoint, of
        ``sender_ura`` (of the one sender that had it routed there, for None); None if there is
        none."""
        found = [
            journey
            for (sender, recipient, number), journey in self.versions.items()
            if (number, recipient) == (version, recipient_ura)
            and sender is not None
            and sender_ura in (None, sender)
            and journey.pickup is not None
            and journey.routed_to_pickup
        ]
        return found[0] if len(found) == 1 else None


def _merged(journey: VersionJourney, unattributed: VersionJourney) -> VersionJourney:
    """``journey`` with the facts of records that did not name its sender (route failure,
    deliveries, failed attempts), as asked: neither is changed."""
    endpoints = dict(journey.endpoints)
    for key, other in unattributed.endpoints.items():
        own = endpoints.get(key)
        if own is None:
            endpoints[key] = other
            continue
        failures = [f for f in (own.failure, other.failure) if f is not None]
        endpoints[key] = replace(
            own,
            delivered=own.delivered or other.delivered,
            failure=max(failures, key=lambda f: f.failed_at) if failures else None,
        )
    return replace(
        journey,
        route_failure=journey.route_failure or unattributed.route_failure,
        endpoints=endpoints,
    )


# --- the fold (pure) ------------------------------------------------------------------------------


def _short(text: str) -> str:
    # URAs, endpoint ids and reason codes repeat across every study: one copy each.
    return sys.intern(text)


def _sender(ura: str | None) -> str | None:
    return _short(ura) if ura is not None else None


class JourneyFold:
    """Study journeys built from records, one at a time; the part of the view without Kafka."""

    def __init__(self, codec: Codec | None = None) -> None:
        self._codec = codec or Codec()
        self._studies: dict[str, StudyJourney] = {}

    def __len__(self) -> int:
        return len(self._studies)

    def get(self, study_instance_uid: str) -> StudyJourney | None:
        return self._studies.get(study_instance_uid)

    def pickup(
        self, study_instance_uid: str, version: int, recipient_ura: str, sender_ura: str | None
    ) -> Pickup | None:
        """What a pickup of this version by ``recipient_ura`` contains; None when no version of
        that number (of ``sender_ura``; of one sender, for None) was routed to a pickup
        endpoint of that organisation."""
        study = self._studies.get(study_instance_uid)
        found = study.pickup(version, recipient_ura, sender_ura) if study is not None else None
        if found is None or found.pickup is None:
            return None
        consent = found.consent
        return Pickup(
            tuple(found.pickup.values()),
            found.last_received_at,
            found.patient,
            consent.basis if consent is not None else None,
        )

    def apply_record(self, record: Any) -> None:
        self.apply(self._codec.decode_record(record))

    def apply(self, event: Any) -> None:
        match event:
            case StudyReceived():
                journey = self._version_of(event.study)
                journey.announced_at = event.occurred_at
            case ConsentChecked():
                if event.purpose is not Purpose.DELIVERY:
                    return  # the timeline decision is not part of a send's journey
                journey = self._version_of(event.study)
                journey.consent = ConsentState(event.decision, event.basis, event.flagged)
            case RouteResolved():
                self._route(event)
            case RouteFailed():
                study = self._study(event.study_instance_uid)
                journey = study.version(
                    _sender(event.sender_ura), _short(event.recipient_ura), event.study_version
                )
                journey.route_failure = RouteFailure(
                    _short(event.reason_code.value) if event.reason_code else None,
                    event.reason,
                    event.occurred_at,
                )
            case Delivered():
                endpoint = self._endpoint(
                    event.study_instance_uid,
                    _sender(event.sender_ura),
                    event.study_version,
                    event.destination_ura,
                    event.endpoint_id,
                    event.channel,
                )
                endpoint.delivered = DeliveredState(
                    event.outcomes, event.attempts, event.delivered_at
                )
            case DeliveryFailed():
                endpoint = self._endpoint(
                    event.study_instance_uid,
                    _sender(event.sender_ura),
                    event.study_version,
                    event.destination_ura,
                    event.endpoint_id,
                    event.channel,
                )
                endpoint.failure = FailedAttempt(
                    event.attempt,
                    event.reason,
                    event.final,
                    event.next_attempt_at,
                    event.occurred_at,
                )
            case _:
                name = getattr(type(event), "schema_name", type(event).__name__)
                raise PoisonEvent(f"{name} is not part of a study's journey")

    # --- internals --------------------------------------------------------------------------

    def _study(self, study_instance_uid: str) -> StudyJourney:
        study = self._studies.get(study_instance_uid)
        if study is None:
            study = self._studies[study_instance_uid] = StudyJourney(study_instance_uid)
        return study

    def _version_of(self, snapshot: StudySnapshot) -> VersionJourney:
        study = self._study(snapshot.study_instance_uid)
        journey = study.version(
            _short(snapshot.sender_ura), _short(snapshot.recipient_ura), snapshot.version
        )
        if journey.instances is None:
            journey.instances = snapshot.number_of_instances
            journey.first_received_at = snapshot.first_received_at
            journey.last_received_at = snapshot.last_received_at
        return journey

    def _endpoint(
        self,
        study_instance_uid: str,
        sender_ura: str | None,
        version: int,
        destination_ura: str,
        endpoint_id: str,
        channel: DeliveryChannel,
    ) -> EndpointJourney:
        # A delivery's destination is the study's recipient (routing routes to its endpoints).
        recipient = _short(destination_ura)
        journey = self._study(study_instance_uid).version(sender_ura, recipient, version)
        key = (recipient, _short(endpoint_id))
        endpoint = journey.endpoints.get(key)
        if endpoint is None:
            endpoint = journey.endpoints[key] = EndpointJourney(*key, channel)
        return endpoint

    def _route(self, event: RouteResolved) -> None:
        journey = self._version_of(event.study)
        destination = event.destination
        endpoint = self._endpoint(
            event.study.study_instance_uid,
            journey.sender_ura,
            event.study.version,
            destination.organisation_ura,
            destination.endpoint_id,
            destination.channel,
        )
        endpoint.channel = destination.channel
        endpoint.priority = event.priority
        endpoint.routed = True
        if destination.channel is DeliveryChannel.PICKUP:
            # The route carries the snapshot, so the manifest comes with it whatever the order
            # the topics are read in. The whole study as of this version goes in the zip (a
            # person downloading version 2 may never have fetched version 1), minus the SOP
            # classes the receiver excludes.
            excluded = set(event.excluded_sop_classes)
            if journey.pickup is None:
                journey.pickup = {}
            journey.patient = event.study.patient.pseudonym
            manifest = journey.pickup
            for ref in event.study.instances:
                if ref.sop_class_uid not in excluded:
                    manifest[ref.sop_instance_uid] = PickupInstance(
                        ref.sop_instance_uid,
                        ref.series_instance_uid,
                        ref.object_key,
                        ref.size,
                        ref.sha256,
                    )


# --- the view -------------------------------------------------------------------------------------


class JourneyView(TopicView):
    """Every study's journey, as far as the view has read the six topics."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: JourneyTopics | None = None,
        *,
        codec: Codec | None = None,
        name: str = "notify-journeys",
        poll_timeout_ms: int = 200,
    ) -> None:
        self.topics = topics or JourneyTopics()
        self._fold = JourneyFold(codec)
        super().__init__(
            kafka,
            self.topics.names,
            self._fold.apply_record,
            name=name,
            poll_timeout_ms=poll_timeout_ms,
        )

    @property
    def studies(self) -> int:
        return len(self._fold)

    def get(self, study_instance_uid: str) -> StudyJourney | None:
        return self._fold.get(study_instance_uid)

    def pickup(
        self, study_instance_uid: str, version: int, recipient_ura: str, sender_ura: str | None
    ) -> Pickup | None:
        return self._fold.pickup(study_instance_uid, version, recipient_ura, sender_ura)
