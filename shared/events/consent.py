"""Events of the consent registry and of the consent decision taken for every study version."""

from __future__ import annotations

from datetime import date
from enum import StrEnum
from typing import ClassVar

from pydantic import Field

from shared.events.base import Event, event
from shared.events.common import StudySnapshot
from shared.identifiers import Pseudonym, Ura


class Provision(StrEnum):
    PERMIT = "permit"
    DENY = "deny"


@event
class ConsentRegistered(Event):
    """A patient's explicit consent (permit) or objection (deny) as notified by Mitz or a provider.

    Keyed by the patient pseudonym so the registry for one patient lives in one partition.
    """

    schema_name: ClassVar[str] = "consent.registered.v1"
    topic: ClassVar[str] = "consent-registered"

    consent_id: str = Field(min_length=1, max_length=128)
    patient: Pseudonym
    provision: Provision
    # Mitz data category, e.g. GGC002 "Behandelgegevens".
    data_category: str = Field(min_length=1, max_length=32)
    # Mitz requesting provider category, e.g. RPZAC104 (hospitals); None = every category.
    provider_category: str | None = Field(default=None, max_length=32)
    # A specific organisation the consent or objection names; None = any organisation.
    organisation_ura: Ura | None = None
    period_start: date | None = None
    period_end: date | None = None
    source: str = Field(default="mitz", max_length=32)

    def partition_key(self) -> str:
        return self.patient


@event
class ConsentRevoked(Event):
    """A registered consent or objection is no longer in force (Mitz status inactive)."""

    schema_name: ClassVar[str] = "consent.revoked.v1"
    topic: ClassVar[str] = "consent-revoked"

    consent_id: str = Field(min_length=1, max_length=128)
    patient: Pseudonym
    reason: str | None = Field(default=None, max_length=256)

    def partition_key(self) -> str:
        return self.patient


@event
class TreatmentRelationshipRegistered(Event):
    """An organisation declares it treats the patient (referral, admission, ...)."""

    schema_name: ClassVar[str] = "treatment-relationship.registered.v1"
    topic: ClassVar[str] = "treatment-relationships"

    relationship_id: str = Field(min_length=1, max_length=128)
    patient: Pseudonym
    organisation_ura: Ura
    start: date
    end: date | None = None
    source: str = Field(max_length=32)

    def partition_key(self) -> str:
        return self.patient


@event
class TreatmentRelationshipEnded(Event):
    schema_name: ClassVar[str] = "treatment-relationship.ended.v1"
    topic: ClassVar[str] = "treatment-relationships"

    relationship_id: str = Field(min_length=1, max_length=128)
    patient: Pseudonym
    organisation_ura: Ura
    end: date

    def partition_key(self) -> str:
        return self.patient


# The Kafka header that repeats ConsentChecked.purpose (see Event.filter_headers): routing
# passes over timeline decisions and the timeline over delivery decisions without decoding them.
PURPOSE_HEADER = "purpose"


class Purpose(StrEnum):
    DELIVERY = "delivery"  # targeted send to the named recipient
    TIMELINE = "timeline"  # inclusion in the patient's cross-institution timeline


class Decision(StrEnum):
    PERMIT = "permit"
    DENY = "deny"


class Basis(StrEnum):
    """The legal basis a decision rests on (see design.md, "Two flows, two legal bases")."""

    PRESUMED_REFERRAL = "presumed-referral"
    EMERGENCY = "emergency"
    PRESUMED_UNVERIFIED_IDENTITY = "presumed-unverified-identity"
    EXPLICIT_CONSENT = "explicit-consent"
    EXPLICIT_OBJECTION = "explicit-objection"
    NO_EXPLICIT_CONSENT = "no-explicit-consent"
    UNVERIFIED_IDENTITY = "unverified-identity"


@event
class ConsentChecked(Event):
    """Emitted by consent for every study version, once per purpose: the auditable decision."""

    schema_name: ClassVar[str] = "consent.checked.v1"
    topic: ClassVar[str] = "consent-checked"

    study: StudySnapshot
    purpose: Purpose
    decision: Decision
    basis: Basis
    # The consent/objection id (or built-in rule name) that decided.
    decided_by: str = Field(min_length=1, max_length=128)
    # Number of registry events the decision saw for this patient: replaying gives the same answer.
    registry_version: int = Field(ge=0)
    # Needs an operator's eye: emergency sends and sends on unverified identity.
    flagged: bool = False

    def partition_key(self) -> str:
        return self.study.study_instance_uid

    def filter_headers(self) -> tuple[tuple[str, bytes], ...]:
        return ((PURPOSE_HEADER, self.purpose.value.encode()),)
