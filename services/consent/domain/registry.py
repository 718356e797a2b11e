"""One patient's consent registry as an immutable value: the fold of their registry events.

``apply(registry, event)`` is the only way state changes, so replaying a patient's events always
rebuilds the same registry and ``version`` (how many distinct events it took in) lets every
decision name exactly the state it was taken on.

Idempotency, because delivery is at-least-once:

- an event whose ``event_id`` was already applied changes nothing, not even ``version``;
- registering a consent id again replaces its terms (a Mitz update), unless it was revoked;
- revocation is final for a consent id. ``consent-registered`` and ``consent-revoked`` are two
  topics, so a revocation can be consumed before the registration it revokes: revoking an unknown
  id leaves a tombstone (it changes no decision, but counts in ``version``) and a registration
  that arrives later for that id is kept as revoked. A re-given consent needs a new id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import date
from enum import IntEnum, StrEnum
from uuid import UUID

from shared.events.consent import (
    ConsentRegistered,
    ConsentRevoked,
    Provision,
    TreatmentRelationshipEnded,
    TreatmentRelationshipRegistered,
)

RegistryEvent = (
    ConsentRegistered
    | ConsentRevoked
    | TreatmentRelationshipRegistered
    | TreatmentRelationshipEnded
)


class ConsentStatus(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class Specificity(IntEnum):
    """How narrowly a consent names its requester; the more specific consent wins a conflict."""

    GENERAL = 0
    PROVIDER_CATEGORY = 1
    ORGANISATION = 2


@dataclass(frozen=True, slots=True)
class Consent:
    """An explicit consent (permit) or objection (deny) for one data category."""

    consent_id: str
    provision: Provision
    data_category: str
    # None = every provider category / every organisation.
    provider_category: str | None
    organisation_ura: str | None
    period_start: date | None
    period_end: date | None
    source: str
    status: ConsentStatus = ConsentStatus.ACTIVE

    @property
    def specificity(self) -> Specificity:
        if self.organisation_ura is not None:
            return Specificity.ORGANISATION
        if self.provider_category is not None:
            return Specificity.PROVIDER_CATEGORY
        return Specificity.GENERAL

    def in_force_on(self, day: date) -> bool:
        """Active and within its period; both period ends are inclusive."""
        return (
            self.status is ConsentStatus.ACTIVE
            and (self.period_start is None or self.period_start <= day)
            and (self.period_end is None or day <= self.period_end)
        )

    @classmethod
    def from_event(cls, event: ConsentRegistered) -> Consent:
        return cls(
            consent_id=event.consent_id,
            provision=event.provision,
            data_category=event.data_category,
            provider_category=event.provider_category,
            organisation_ura=event.organisation_ura,
            period_start=event.period_start,
            period_end=event.period_end,
            source=event.source,
        )


@dataclass(frozen=True, slots=True)
class TreatmentRelationship:
    relationship_id: str
    organisation_ura: str
    start: date
    end: date | None
    source: str

    def active_on(self, day: date) -> bool:
        return self.start <= day and (self.end is None or day <= self.end)


@dataclass(frozen=True, slots=True)
class PatientRegistry:
    """Everything the consent service knows about one patient (by pseudonym).

    Collections are tuples sorted by id, so two registries holding the same facts are equal
    whatever order the facts arrived in.
    """

    patient: str
    consents: tuple[Consent, ...] = ()
    relationships: tuple[TreatmentRelationship, ...] = ()
    # Consent ids revoked before (or without) their registration: see the module docstring.
    revoked_ids: frozenset[str] = frozenset()
    applied_event_ids: frozenset[UUID] = field(default=frozenset(), repr=False)
    version: int = 0

    @classmethod
    def empty(cls, patient: str) -> PatientRegistry:
        return cls(patient=patient)

    def consent(self, consent_id: str) -> Consent | None:
        return next((c for c in self.consents if c.consent_id == consent_id), None)

    def relationship(self, relationship_id: str) -> TreatmentRelationship | None:
        return next((r for r in self.relationships if r.relationship_id == relationship_id), None)

    def consents_in_force(self, data_category: str, day: date) -> tuple[Consent, ...]:
        return tuple(
            c for c in self.consents if c.data_category == data_category and c.in_force_on(day)
        )

    def has_treatment_relationship(self, organisation_ura: str, day: date) -> bool:
        return any(
            r.organisation_ura == organisation_ura and r.active_on(day) for r in self.relationships
        )


def apply(registry: PatientRegistry, event: RegistryEvent) -> PatientRegistry:
    """The registry after ``event``; the same registry when the event was already applied."""
    if event.patient != registry.patient:
        raise ValueError(f"{type(event).__name__} is for another patient than this registry")
    if event.event_id in registry.applied_event_ids:
        return registry
    match event:
        case ConsentRegistered():
            registry = _register_consent(registry, event)
        case ConsentRevoked():
            registry = _revoke_consent(registry, event.consent_id)
        case TreatmentRelationshipRegistered():
            registry = _register_relationship(registry, event)
        case TreatmentRelationshipEnded():
            registry = _end_relationship(registry, event)
        case _:
            raise TypeError(f"not a registry event: {type(event).__name__}")
    return replace(
        registry,
        applied_event_ids=registry.applied_event_ids | {event.event_id},
        version=registry.version + 1,
    )


def replay(patient: str, events: Iterable[RegistryEvent]) -> PatientRegistry:
    registry = PatientRegistry.empty(patient)
    for event in events:
        registry = apply(registry, event)
    return registry


def _register_consent(registry: PatientRegistry, event: ConsentRegistered) -> PatientRegistry:
    consent = Consent.from_event(event)
    if event.consent_id in registry.revoked_ids:
        consent = replace(consent, status=ConsentStatus.REVOKED)
    others = [c for c in registry.consents if c.consent_id != event.consent_id]
    return replace(registry, consents=_sorted_consents([*others, consent]))


def _revoke_consent(registry: PatientRegistry, consent_id: str) -> PatientRegistry:
    consents = tuple(
        replace(c, status=ConsentStatus.REVOKED) if c.consent_id == consent_id else c
        for c in registry.consents
    )
    return replace(registry, consents=consents, revoked_ids=registry.revoked_ids | {consent_id})


def _register_relationship(
    registry: PatientRegistry, event: TreatmentRelationshipRegistered
) -> PatientRegistry:
    relationship = TreatmentRelationship(
        relationship_id=event.relationship_id,
        organisation_ura=event.organisation_ura,
        start=event.start,
        end=event.end,
        source=event.source,
    )
    others = [r for r in registry.relationships if r.relationship_id != event.relationship_id]
    return replace(registry, relationships=_sorted_relationships([*others, relationship]))


def _end_relationship(
    registry: PatientRegistry, event: TreatmentRelationshipEnded
) -> PatientRegistry:
    # Ending an unknown relationship is a no-op (still counted): both events share one topic
    # and key, so an end never overtakes its registration.
    relationships = tuple(
        replace(r, end=event.end) if r.relationship_id == event.relationship_id else r
        for r in registry.relationships
    )
    return replace(registry, relationships=relationships)


def _sorted_consents(consents: Iterable[Consent]) -> tuple[Consent, ...]:
    return tuple(sorted(consents, key=lambda c: c.consent_id))


def _sorted_relationships(
    relationships: Iterable[TreatmentRelationship],
) -> tuple[TreatmentRelationship, ...]:
    return tuple(sorted(relationships, key=lambda r: r.relationship_id))


# --- the table row -----------------------------------------------------------------------------
#
# A registry is stored as one JSON row per patient in the decision worker's faust table. The row
# carries the applied event ids (idempotency must survive a restart) and a format number, so a
# later layout can read this one.

_ROW_FORMAT = 1


def to_row(registry: PatientRegistry) -> bytes:
    return json.dumps(
        {
            "format": _ROW_FORMAT,
            "patient": registry.patient,
            "version": registry.version,
            "consents": [_consent_row(c) for c in registry.consents],
            "relationships": [_relationship_row(r) for r in registry.relationships],
            "revoked_ids": sorted(registry.revoked_ids),
            "applied_event_ids": sorted(str(e) for e in registry.applied_event_ids),
        },
        separators=(",", ":"),
    ).encode()


def from_row(row: bytes) -> PatientRegistry:
    data = json.loads(row)
    if data.get("format") != _ROW_FORMAT:
        raise ValueError(f"unknown registry row format {data.get('format')!r}")
    return PatientRegistry(
        patient=data["patient"],
        consents=tuple(
            Consent(
                consent_id=c["consent_id"],
                provision=Provision(c["provision"]),
                data_category=c["data_category"],
                provider_category=c["provider_category"],
                organisation_ura=c["organisation_ura"],
                period_start=_day(c["period_start"]),
                period_end=_day(c["period_end"]),
                source=c["source"],
                status=ConsentStatus(c["status"]),
            )
            for c in data["consents"]
        ),
        relationships=tuple(
            TreatmentRelationship(
                relationship_id=r["relationship_id"],
                organisation_ura=r["organisation_ura"],
                start=date.fromisoformat(r["start"]),
                end=_day(r["end"]),
                source=r["source"],
            )
            for r in data["relationships"]
        ),
        revoked_ids=frozenset(data["revoked_ids"]),
        applied_event_ids=frozenset(UUID(e) for e in data["applied_event_ids"]),
        version=data["version"],
    )


def _consent_row(c: Consent) -> dict[str, object]:
    return {
        "consent_id": c.consent_id,
        "provision": c.provision.value,
        "data_category": c.data_category,
        "provider_category": c.provider_category,
        "organisation_ura": c.organisation_ura,
        "period_start": _iso(c.period_start),
        "period_end": _iso(c.period_end),
        "source": c.source,
        "status": c.status.value,
    }


def _relationship_row(r: TreatmentRelationship) -> dict[str, object]:
    return {
        "relationship_id": r.relationship_id,
        "organisation_ura": r.organisation_ura,
        "start": r.start.isoformat(),
        "end": _iso(r.end),
        "source": r.source,
    }


def _iso(day: date | None) -> str | None:
    return None if day is None else day.isoformat()


def _day(text: str | None) -> date | None:
    return None if text is None else date.fromisoformat(text)
