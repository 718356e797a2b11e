"""NEN 7513 access logging: one record per access attempt to patient data, kept at least 5 years."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

from pydantic import Field

from shared.events.base import Event, event, registry
from shared.events.common import DicomUid
from shared.identifiers import Pseudonym, Ura, UziNumber


class AuditAction(StrEnum):
    READ = "read"  # retrieve images/metadata (WADO-RS)
    QUERY = "query"  # search (timeline, QIDO-RS, access log)


class AuditOutcome(StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"
    EMERGENCY = "emergency"  # break-the-glass: allowed outside the normal rules, reported


@event
class AccessLogged(Event):
    """Emitted for every access attempt to patient data, allowed or not (append-only audit
    trail): by the timeline (its searches, DICOMweb, the access log) and by notify (portal
    pickup downloads); the timeline archives them all in ``access_log``."""

    # v2 (2026-11-27) added purpose_of_use; a v1 record reads as one that did not record it.
    schema_name: ClassVar[str] = "access.logged.v2"
    topic: ClassVar[str] = "access-logged"

    event_type: str = Field(min_length=1, max_length=64)  # e.g. "timeline-search", "wado-rs"
    action: AuditAction
    outcome: AuditOutcome
    patient: Pseudonym | None = None
    user_uzi: UziNumber | None = None
    user_role: str | None = Field(default=None, max_length=32)
    on_behalf_of_uzi: UziNumber | None = None
    organisation_ura: Ura
    access_point: str = Field(min_length=1, max_length=256)  # API route / client address
    authorisation_basis: str | None = Field(default=None, max_length=128)
    consent_profile: str | None = Field(default=None, max_length=128)
    emergency: bool = False
    reason: str | None = Field(default=None, max_length=1024)
    study_instance_uids: tuple[DicomUid, ...] = ()
    # The purpose of use the requester's token stated (HL7 PurposeOfUse: TREAT, ETREAT, ...),
    # whether or not it was one access is given for.
    purpose_of_use: str | None = Field(default=None, max_length=32)

    def partition_key(self) -> str:
        return self.patient or self.organisation_ura


registry.register_upcaster("access.logged.v1", AccessLogged.schema_name, dict)
