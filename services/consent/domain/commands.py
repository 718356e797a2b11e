"""Writes to the consent registry as the API receives them, turned into events (pure).

Every event id is derived from the content (uuid5), never random: a client that repeats a
request after a timeout (a Mitz retry, a provider re-posting) produces the *same* event, which
the registry fold applies once (registry.py). Ids are computed over the patient pseudonym, never
the BSN: a uuid5 of a BSN could be reversed by trying all ~10^8 of them.

Free text that ends up on Kafka (consent ids, relationship ids, sources, category codes) is
refused when it holds what looks like a BSN, so a careless client cannot put one on the bus.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import date
from typing import Generic, TypeVar

from services.consent.domain.mitz import MitzNotification
from services.consent.domain.registry import PatientRegistry
from shared.events.consent import (
    ConsentRegistered,
    ConsentRevoked,
    TreatmentRelationshipEnded,
    TreatmentRelationshipRegistered,
)
from shared.identifiers import contains_written_bsn

REGISTRY_NAMESPACE = uuid.UUID("3f0c6a52-7d1e-4b8a-9c27-51e8d40b6f93")

E = TypeVar("E")


class CommandRefused(ValueError):
    """The request cannot become an event; the message names no patient data."""


class LooksLikeBsn(CommandRefused):
    def __init__(self, field: str) -> None:
        super().__init__(f"{field} looks like a BSN; it would be published in clear")
        self.field = field


class NotOwner(CommandRefused):
    """An organisation tried to write a treatment relationship of another organisation."""


class UnknownRelationship(CommandRefused):
    pass


class InvalidPeriod(CommandRefused):
    pass


@dataclass(frozen=True, slots=True)
class Planned(Generic[E]):
    """The event a request becomes; ``already_applied`` when the registry holds it already."""

    event: E
    already_applied: bool


def _uuid(*parts: object) -> uuid.UUID:
    text = json.dumps([None if p is None else str(p) for p in parts], separators=(",", ":"))
    return uuid.uuid5(REGISTRY_NAMESPACE, text)


def refuse_bsn_lookalikes(**fields: str | None) -> None:
    for name, value in fields.items():
        if value is not None and contains_written_bsn(value):
            raise LooksLikeBsn(name)


def _applied(registry: PatientRegistry | None, event_id: uuid.UUID) -> bool:
    return registry is not None and event_id in registry.applied_event_ids


def notification_event_id(notification: MitzNotification, patient: str) -> uuid.UUID:
    """The same notification (consent id, status and terms) always gives the same event id."""
    n = notification
    return _uuid(
        "mitz",
        n.kind.value,
        n.consent_id,
        patient,
        n.provision.value if n.provision else None,
        n.data_category,
        n.provider_category,
        n.period_start,
        n.period_end,
    )


def plan_notification(
    notification: MitzNotification,
    registry: PatientRegistry | None,
    *,
    patient: str,
    correlation_id: str,
    producer: str,
) -> Planned[ConsentRegistered | ConsentRevoked]:
    refuse_bsn_lookalikes(
        consent_id=notification.consent_id,
        data_category=notification.data_category,
        provider_category=notification.provider_category,
    )
    event = notification.to_event(patient, correlation_id=correlation_id, producer=producer)
    event_id = notification_event_id(notification, patient)
    return Planned(event.model_copy(update={"event_id": event_id}), _applied(registry, event_id))


def derived_relationship_id(patient: str, organisation_ura: str, start: date, source: str) -> str:
    """A relationship registered without an id is known by its organisation, start and source."""
    return "tr-" + _uuid("relationship", patient, organisation_ura, start, source).hex


def plan_relationship_registration(
    registry: PatientRegistry | None,
    *,
    principal_ura: str,
    patient: str,
    organisation_ura: str,
    start: date,
    end: date | None,
    source: str,
    relationship_id: str | None,
    correlation_id: str,
    producer: str,
) -> Planned[TreatmentRelationshipRegistered]:
    """An organisation registers its own treatment relationship with the patient."""
    if organisation_ura != principal_ura:
        raise NotOwner("an organisation may only register its own treatment relationships")
    if end is not None and end < start:
        raise InvalidPeriod("the relationship ends before it starts")
    refuse_bsn_lookalikes(relationship_id=relationship_id, source=source)
    rid = relationship_id or derived_relationship_id(patient, organisation_ura, start, source)
    existing = registry.relationship(rid) if registry is not None else None
    if existing is not None and existing.organisation_ura != organisation_ura:
        # Registering under that id would replace another organisation's relationship.
        raise NotOwner("the relationship id belongs to another organisation")
    event_id = _uuid("relationship-registered", rid, patient, organisation_ura, start, end, source)
    event = TreatmentRelationshipRegistered(
        event_id=event_id,
        relationship_id=rid,
        patient=patient,
        organisation_ura=organisation_ura,
        start=start,
        end=end,
        source=source,
        correlation_id=correlation_id,
        producer=producer,
    )
    return Planned(event, _applied(registry, event_id))


def plan_relationship_end(
    registry: PatientRegistry | None,
    *,
    principal_ura: str,
    patient: str,
    relationship_id: str,
    end: date,
    correlation_id: str,
    producer: str,
) -> Planned[TreatmentRelationshipEnded]:
    """The organisation that registered a relationship ends it."""
    existing = registry.relationship(relationship_id) if registry is not None else None
    if existing is None:
        raise UnknownRelationship("no such treatment relationship for this patient")
    if existing.organisation_ura != principal_ura:
        raise NotOwner("an organisation may only end its own treatment relationships")
    if end < existing.start:
        raise InvalidPeriod("the relationship would end before it started")
    event_id = _uuid("relationship-ended", relationship_id, patient, end)
    event = TreatmentRelationshipEnded(
        event_id=event_id,
        relationship_id=relationship_id,
        patient=patient,
        organisation_ura=existing.organisation_ura,
        end=end,
        correlation_id=correlation_id,
        producer=producer,
    )
    return Planned(event, _applied(registry, event_id))
