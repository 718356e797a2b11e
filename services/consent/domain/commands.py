"""Writes to the consent registry as the API receives them, turned into events (pure).

A request the registry already holds (applying its event would change nothing) is answered as
such and publishes nothing: a Mitz retry, a provider re-posting. Any other becomes an event whose
id is derived (uuid5) from its content and the registry's version it was planned on, never
random: a client that repeats it before the registry shows it produces the *same* event, which
the fold applies once (registry.py), while the same terms asked again after something changed
(deny, permit, deny again) are a new event. Until 2026-11-27 the id was the content's alone,
and the second deny got the first's id: "already recorded", the objection lost. Ids are computed
over the patient pseudonym, never the BSN: a uuid5 of a BSN could be reversed by trying all
~10^8 of them.

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
from services.consent.domain.registry import PatientRegistry, RegistryEvent, apply
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


class RevokedForGood(CommandRefused):
    """A consent id once revoked is revoked for good (registry.py): registering it again would
    be answered as done and never be in force."""


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


def _applied(registry: PatientRegistry | None, event: RegistryEvent) -> bool:
    """Whether ``registry`` holds ``event`` already: applied before, or applying it would change
    none of the registry's facts."""
    if registry is None:
        return False
    if event.event_id in registry.applied_event_ids:
        return True
    after = apply(registry, event)
    return (after.consents, after.relationships, after.revoked_ids) == (
        registry.consents,
        registry.relationships,
        registry.revoked_ids,
    )


def _version(registry: PatientRegistry | None) -> int:
    return registry.version if registry is not None else 0


def notification_event_id(
    notification: MitzNotification, patient: str, version: int = 0
) -> uuid.UUID:
    """The same notification (consent id, status and terms) planned on the same registry
    ``version`` always gives the same event id."""
    n = notification
    return _uuid(
        "mitz",
        version,
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
    event = event.model_copy(
        update={"event_id": notification_event_id(notification, patient, _version(registry))}
    )
    applied = _applied(registry, event)
    if (
        not applied  # a late resend of the registration is answered as done, as it was
        and isinstance(event, ConsentRegistered)
        and registry is not None
        and event.consent_id in registry.revoked_ids
        # Registered before with other terms; a registration that comes after its revocation
        # (out of order) is taken, and kept revoked, as the fold's rule says.
        and registry.consent(event.consent_id) is not None
    ):
        raise RevokedForGood(
            "this consent was revoked, and a revoked consent is revoked for good: register the "
            "renewed consent under a new id"
        )
    return Planned(event, applied)


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
    event_id = _uuid(
        "relationship-registered", _version(registry), rid, patient, organisation_ura, start, end,
        source,
    )  # fmt: skip
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
    return Planned(event, _applied(registry, event))


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
    event_id = _uuid("relationship-ended", _version(registry), relationship_id, patient, end)
    event = TreatmentRelationshipEnded(
        event_id=event_id,
        relationship_id=relationship_id,
        patient=patient,
        organisation_ura=existing.organisation_ura,
        end=end,
        correlation_id=correlation_id,
        producer=producer,
    )
    return Planned(event, _applied(registry, event))
