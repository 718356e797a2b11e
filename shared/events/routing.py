"""Events of routing: where a permitted study must go, or why it cannot go anywhere."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar, Literal

from pydantic import Field

from shared.events.base import Event, Model, event
from shared.events.common import DeliveryChannel, DicomUid, StudySnapshot, Urgency
from shared.events.consent import Basis
from shared.identifiers import Ura


class Destination(Model):
    """A delivery endpoint from the provider directory; credentials stay in the directory."""

    organisation_ura: Ura
    endpoint_id: str = Field(min_length=1, max_length=128)
    channel: DeliveryChannel
    mailbox: str | None = Field(default=None, max_length=128)


class Coercion(Model):
    """How the receiver wants the header changed before import (IHE Import Reconciliation).

    A copy of the directory entry's coercion profile at routing time, so delivery never has to
    read the directory (which holds secrets) to know it. ``none`` sends the instances as stored.
    ``bsn-as-patient-id`` puts the BSN (read by delivery from the stored instance, never from an
    event) in Patient ID with these issuer values, recording the sender's values in Original
    Attributes Sequence (0400,0561).
    """

    profile: Literal["none", "bsn-as-patient-id"] = "none"
    issuer_of_patient_id: str | None = Field(default=None, max_length=64)
    universal_entity_id: DicomUid | None = None
    keep_originals: bool = True


class BatchLimits(Model):
    """At most this much per request to the receiver; one larger instance still goes alone."""

    max_instances: int = Field(ge=1)
    max_bytes: int = Field(ge=1)


@event
class RouteResolved(Event):
    """Emitted by routing for each destination a consent-permitted study version must reach.

    Everything delivery needs is on the event, so it never re-reads the directory: which
    instances to send, the receiver's coercion profile and batch limits. Fields added after the
    first release have defaults, and ``None`` there means "not stated" (an older record), which is
    not the same as an empty selection.
    """

    schema_name: ClassVar[str] = "route.resolved.v1"
    topic: ClassVar[str] = "route-resolved"

    study: StudySnapshot
    destination: Destination
    priority: Urgency
    consent_basis: Basis
    flagged: bool = False
    # The instances of this version to deliver: the new ones, minus the SOP classes the
    # receiver excludes. None = not stated (older record): the new instances of the snapshot.
    # Empty = nothing this receiver accepts is new in this version.
    sop_instance_uids: tuple[DicomUid, ...] | None = None
    # The SOP classes the receiver's object filters exclude (groups expanded), sorted.
    excluded_sop_classes: tuple[DicomUid, ...] = ()
    coercion: Coercion = Coercion()
    batch_limits: BatchLimits | None = None

    def partition_key(self) -> str:
        return self.study.study_instance_uid


class RouteFailureReason(StrEnum):
    """Why a study could not be routed, as a code (metrics, the sender's UI); ``reason`` says it
    in words."""

    CONSENT_DENIED = "consent-denied"
    UNKNOWN_RECIPIENT = "unknown-recipient"
    NO_ENDPOINT = "no-endpoint"
    NO_USABLE_ENDPOINT = "no-usable-endpoint"
    # The receiver's object filters exclude every instance of the study (all its versions).
    NOTHING_ACCEPTED = "nothing-accepted"


@event
class RouteFailed(Event):
    """Emitted by routing when a study cannot go anywhere: consent denied delivery, the recipient is
    unknown, has no usable endpoint, or accepts none of the study's instances. The sender is
    told why."""

    schema_name: ClassVar[str] = "route.failed.v1"
    topic: ClassVar[str] = "route-failed"

    study_instance_uid: DicomUid
    study_version: int = Field(ge=1)
    recipient_ura: Ura
    reason: str = Field(min_length=1, max_length=512)
    # None in records written before the code existed.
    reason_code: RouteFailureReason | None = None
    # The study's sender: two organisations may send one Study Instance UID, each numbering
    # its own versions. None in records written before 2026-11-27.
    sender_ura: Ura | None = None

    def partition_key(self) -> str:
        return self.study_instance_uid
