"""Routing: where a consent-checked study version must go, or why it cannot go anywhere.

``route`` is a pure function of the consent decision and the directory. Only the delivery purpose
is routed; the timeline decision is for the timeline service. A deny, an unknown recipient, a
recipient without a usable endpoint or one whose object filters exclude every instance of the
study is a ``route-failed`` naming the reason, so the sender can be told: a study is never
dropped silently.

Event ids are uuid5 over (study, version, sender, recipient[, endpoint]) and ``occurred_at`` is
taken from the decision unless ``now`` is given, so replaying a consent-checked record yields the
same events, which downstream handlers recognise as duplicates.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from services.routing.domain.directory import (
    BsnAsPatientId,
    DicomWebEndpoint,
    DimseEndpoint,
    PickupEndpoint,
    Provider,
    ProviderLookup,
    ReceiverPreferences,
)
from shared.events.base import uuid5_text
from shared.events.common import DeliveryChannel, InstanceRef, StudySnapshot, Urgency
from shared.events.consent import Basis, ConsentChecked, Decision, Purpose
from shared.events.routing import (
    BatchLimits,
    Coercion,
    Destination,
    RouteFailed,
    RouteFailureReason,
    RouteResolved,
)

PRODUCER = "routing"
K = TypeVar("K")
V = TypeVar("V")

# uuid5 namespaces: (study, version, sender, recipient, endpoint) -> route-resolved event id,
# (study, version, sender, recipient) -> route-failed event id.
ROUTE_RESOLVED_NAMESPACE = uuid.UUID("0d7b5c1e-2f4a-4e8b-9c36-7a1f5e2d8b90")
ROUTE_FAILED_NAMESPACE = uuid.UUID("5a2e9f64-8c1d-4b7a-b3e0-1f6d4c9a7e25")

# Delivery takes higher ranks first.
_RANK = {Urgency.ROUTINE: 0, Urgency.URGENT: 1, Urgency.EMERGENCY: 2}


def route(
    checked: ConsentChecked,
    directory: ProviderLookup,
    *,
    producer: str = PRODUCER,
    now: datetime | None = None,
) -> list[RouteResolved] | RouteFailed:
    """One route-resolved per usable endpoint of the recipient, or the route-failed saying why.

    A timeline decision is not routed: the result is an empty list.
    """
    planned = plan(checked, directory, producer=producer, now=now)
    if planned is None:
        return []
    if isinstance(planned, RouteFailed):
        return planned
    return planned.events(producer)


@dataclass(frozen=True, slots=True)
class Routes:
    """Where a permitted delivery decision goes: one route per endpoint, alike but for the
    destination. :meth:`events` are its route-resolved events; the routing worker writes the
    same records without building them (``services.routing.adapters.route_records``)."""

    checked: ConsentChecked
    occurred_at: datetime
    priority: Urgency
    parts: ReceiverParts
    endpoint_ids: tuple[str, ...]
    # The SOP Instance UIDs of this version to deliver (``RouteResolved.sop_instance_uids``).
    selected: tuple[str, ...]

    def event_id(self, endpoint_id: str) -> str:
        return route_resolved_id_text(self.checked.study, endpoint_id)

    def events(self, producer: str) -> list[RouteResolved]:
        checked, parts = self.checked, self.parts
        return [
            RouteResolved(
                event_id=self.event_id(endpoint_id),
                occurred_at=self.occurred_at,
                correlation_id=checked.correlation_id,
                producer=producer,
                study=checked.study,
                destination=parts.destinations[endpoint_id],
                priority=self.priority,
                consent_basis=checked.basis,
                flagged=checked.flagged,
                sop_instance_uids=self.selected,
                excluded_sop_classes=parts.excluded,
                coercion=parts.coercion,
                batch_limits=parts.limits,
            )
            for endpoint_id in self.endpoint_ids
        ]


def plan(
    checked: ConsentChecked,
    directory: ProviderLookup,
    *,
    producer: str = PRODUCER,
    now: datetime | None = None,
) -> Routes | RouteFailed | None:
    """The routes of a permitted delivery decision, the route-failed saying why there are none,
    or None for a timeline decision (not routed)."""
    if checked.purpose is not Purpose.DELIVERY:
        return None
    study = checked.study
    occurred_at = checked.occurred_at if now is None else now
    if checked.decision is not Decision.PERMIT:
        reason = (
            f"consent denies delivery: basis {checked.basis.value}, decided by {checked.decided_by}"
        )
        return _failed(checked, RouteFailureReason.CONSENT_DENIED, reason, producer, occurred_at)
    provider = directory.get(study.recipient_ura)
    if provider is None:
        reason = f"recipient {study.recipient_ura} is not in the provider directory"
        code = RouteFailureReason.UNKNOWN_RECIPIENT
        return _failed(checked, code, reason, producer, occurred_at)
    endpoints = provider.usable_endpoints()
    if not endpoints:
        if provider.endpoints:
            code = RouteFailureReason.NO_USABLE_ENDPOINT
            reason = f"recipient {provider.ura} ({provider.name}) has no usable delivery endpoint"
        else:
            code = RouteFailureReason.NO_ENDPOINT
            reason = f"recipient {provider.ura} ({provider.name}) has no delivery endpoint"
        return _failed(checked, code, reason, producer, occurred_at)
    parts = receiver_parts(provider)
    selected = _select(study, parts.excluded_set)
    excluded = parts.excluded_set
    if (
        not selected
        and study.instances
        and all(i.sop_class_uid in excluded for i in study.instances)
    ):
        # Not a delivery of nothing: the receiver would hold none of the study, and the
        # sender would read "delivered". (A later version with nothing new it accepts is
        # routed with an empty selection: the receiver holds the earlier ones.)
        code = RouteFailureReason.NOTHING_ACCEPTED
        reason = (
            f"recipient {provider.ura} ({provider.name}) accepts none of this study's "
            f"{len(study.instances)} instance(s): its directory entry's object filters exclude "
            "their SOP classes"
        )
        return _failed(checked, code, reason, producer, occurred_at)
    return Routes(
        checked=checked,
        occurred_at=occurred_at,
        priority=priority_of(checked),
        parts=parts,
        endpoint_ids=tuple(endpoint.id for endpoint in endpoints),
        selected=tuple(i.sop_instance_uid for i in selected),
    )


@dataclass(frozen=True, slots=True)
class ReceiverParts:
    """What a route takes from a directory entry, the same for every study to that receiver."""

    excluded_set: frozenset[str]
    excluded: tuple[str, ...]
    coercion: Coercion
    limits: BatchLimits
    destinations: dict[str, Destination]


class PerEntry(Generic[K, V]):
    """``build(entry)`` remembered per directory entry by identity (the view replaces an entry
    when it changes, so a changed entry is a new key); the entry is held with its value, so
    its id is not reused while remembered. Forgets everything past ``limit`` entries."""

    def __init__(self, build: Callable[[K], V], limit: int = 4096) -> None:
        self._build = build
        self._limit = limit
        self._values: dict[int, tuple[K, V]] = {}

    def __call__(self, entry: K) -> V:
        remembered = self._values.get(id(entry))
        if remembered is not None and remembered[0] is entry:
            return remembered[1]
        value = self._build(entry)
        if len(self._values) >= self._limit:
            self._values.clear()
        self._values[id(entry)] = (entry, value)
        return value


def _receiver_parts(provider: Provider) -> ReceiverParts:
    preferences = provider.preferences
    excluded_set = frozenset(preferences.excluded_sop_classes())
    return ReceiverParts(
        excluded_set=excluded_set,
        excluded=tuple(sorted(excluded_set)),
        coercion=coercion_of(preferences),
        limits=BatchLimits(
            max_instances=preferences.batch_limits.max_instances,
            max_bytes=preferences.batch_limits.max_bytes,
        ),
        destinations={e.id: destination_of(provider.ura, e) for e in provider.endpoints},
    )


# Built once per directory entry instead of once per study (four models validated each time, a
# tenth of a routing decision).
receiver_parts = PerEntry(_receiver_parts)


def priority_of(checked: ConsentChecked) -> Urgency:
    """The study's urgency as its sender marked it. Consent permits an urgent send on the
    emergency basis too (flagged: it is not checked against a consent), which does not make it
    an emergency; only a send of a study marked routine that consent let through as an
    emergency goes as one."""
    urgency = checked.study.urgency
    if checked.basis is Basis.EMERGENCY and urgency is Urgency.ROUTINE:
        return Urgency.EMERGENCY
    return urgency


def priority_rank(priority: Urgency) -> int:
    """Higher goes first: delivery orders its work by this."""
    return _RANK[priority]


def destination_of(
    ura: str, endpoint: DicomWebEndpoint | DimseEndpoint | PickupEndpoint
) -> Destination:
    return Destination(
        organisation_ura=ura, endpoint_id=endpoint.id, channel=DeliveryChannel(endpoint.channel)
    )


def select_instances(
    study: StudySnapshot, preferences: ReceiverPreferences
) -> tuple[InstanceRef, ...]:
    """The instances this version must deliver: the new ones the receiver accepts.

    Carried by RouteResolved as ``sop_instance_uids``, so delivery never re-reads the directory.
    """
    return _select(study, preferences.excluded_sop_classes())


def _select(study: StudySnapshot, excluded: frozenset[str]) -> tuple[InstanceRef, ...]:
    new = set(study.new_sop_instance_uids)
    if not new and study.version == 1:  # every instance is new in version 1
        new = {i.sop_instance_uid for i in study.instances}
    return tuple(
        i for i in study.instances if i.sop_instance_uid in new and i.sop_class_uid not in excluded
    )


def coercion_of(preferences: ReceiverPreferences) -> Coercion:
    """The event's copy of the receiver's coercion profile."""
    profile = preferences.coercion
    if isinstance(profile, BsnAsPatientId):
        return Coercion(
            profile="bsn-as-patient-id",
            issuer_of_patient_id=profile.issuer,
            universal_entity_id=profile.universal_entity_id,
            keep_originals=profile.keep_originals,
        )
    return Coercion()


def route_resolved_id(study: StudySnapshot, endpoint_id: str) -> uuid.UUID:
    return uuid.UUID(route_resolved_id_text(study, endpoint_id))


def route_resolved_id_text(study: StudySnapshot, endpoint_id: str) -> str:
    return uuid5_text(ROUTE_RESOLVED_NAMESPACE, f"{_study_key(study)}|{endpoint_id}")


def route_failed_id(study: StudySnapshot) -> uuid.UUID:
    return uuid.uuid5(ROUTE_FAILED_NAMESPACE, _study_key(study))


def _study_key(study: StudySnapshot) -> str:
    # The sender is part of it: ingest assembles per (study, sender, recipient).
    return f"{study.study_instance_uid}|{study.version}|{study.sender_ura}|{study.recipient_ura}"


def _failed(
    checked: ConsentChecked,
    code: RouteFailureReason,
    reason: str,
    producer: str,
    occurred_at: datetime,
) -> RouteFailed:
    study = checked.study
    return RouteFailed(
        event_id=route_failed_id(study),
        occurred_at=occurred_at,
        correlation_id=checked.correlation_id,
        producer=producer,
        study_instance_uid=study.study_instance_uid,
        study_version=study.version,
        recipient_ura=study.recipient_ura,
        reason=reason,
        reason_code=code,
        sender_ura=study.sender_ura,
    )
