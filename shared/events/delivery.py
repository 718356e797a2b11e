"""Events of notify: a study version reached a destination, or failed to (for now or for good)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import AwareDatetime, Field

from shared.events.base import Event, Model, event
from shared.events.common import DeliveryChannel, DicomUid
from shared.events.routing import RouteResolved
from shared.identifiers import Ura


class InstanceOutcomes(Model):
    """Per-instance outcome counts of one delivery, from the receiver's own answer.

    ``sent``: stored by the receiver (``warnings`` of them not quite as sent);
    ``already_present``: the receiver answered it holds them already (C-STORE 0111, STOW-RS
    B00E), as a rule from an earlier attempt whose answer was lost; ``failed``: refused.
    """

    sent: int = Field(ge=0)
    already_present: int = Field(ge=0)
    warnings: int = Field(ge=0, default=0)
    failed: int = Field(ge=0, default=0)


class RefusedInstance(Model):
    """An instance the receiver refused for good (or that could not be sent), and why."""

    sop_instance_uid: DicomUid
    # The DICOM status / STOW-RS FailureReason as four hex digits (e.g. "A900", "0122"), or
    # None when it never reached the receiver (e.g. no verified BSN to coerce to).
    code: str | None = Field(default=None, max_length=8)
    reason: str = Field(min_length=1, max_length=256)


@event
class Delivered(Event):
    """Emitted by notify once per (study version, destination) when the receiver has the study.

    Public contract for downstream subscribers: additive changes only within v1.
    """

    schema_name: ClassVar[str] = "delivered.v1"
    topic: ClassVar[str] = "delivered"

    study_instance_uid: DicomUid
    study_version: int = Field(ge=1)
    destination_ura: Ura
    endpoint_id: str = Field(min_length=1, max_length=128)
    channel: DeliveryChannel
    outcomes: InstanceOutcomes
    attempts: int = Field(ge=1)
    # The instances counted in ``outcomes.failed``: refused by the receiver, or not sendable.
    refused: tuple[RefusedInstance, ...] = ()
    # From the first instance received by ingest to the receiver's last acknowledgement.
    seconds_since_first_received: float = Field(ge=0)
    delivered_at: AwareDatetime
    # The study's sender: two organisations may send one Study Instance UID, each numbering
    # its own versions. None in records written before 2026-11-27.
    sender_ura: Ura | None = None

    def partition_key(self) -> str:
        return self.study_instance_uid


@event
class DeliveryFailed(Event):
    """Emitted by notify when an attempt failed; ``final`` means dead-lettered, no more retries."""

    schema_name: ClassVar[str] = "delivery.failed.v1"
    topic: ClassVar[str] = "delivery-failed"

    study_instance_uid: DicomUid
    study_version: int = Field(ge=1)
    destination_ura: Ura
    endpoint_id: str = Field(min_length=1, max_length=128)
    channel: DeliveryChannel
    reason: str = Field(min_length=1, max_length=1024)
    attempt: int = Field(ge=1)
    final: bool
    next_attempt_at: AwareDatetime | None = None
    # As on Delivered: None in records written before 2026-11-27.
    sender_ura: Ura | None = None

    def partition_key(self) -> str:
        return self.study_instance_uid


def delivery_key(
    study_instance_uid: str, version: int, sender_ura: str, destination_ura: str, endpoint_id: str
) -> str:
    """One delivery: a study version from its sender to one endpoint of its destination.

    All five: versions are numbered per (study, sender, recipient), so two senders of one Study
    Instance UID, or one sender's study to two recipients, each have a version 1; and an
    endpoint id is unique only within its provider (two hospitals may both call theirs "pacs").
    """
    return f"{study_instance_uid}|{version}|{sender_ura}|{destination_ura}|{endpoint_id}"


@event
class DeliveryQueued(Event):
    """Internal to notify: a delivery waiting for its attempt, or dead-lettered.

    It lives on notify's own topics: the priority queues (``delivery-urgent``,
    ``delivery-routine``), the retry tiers (``delivery-retry-<delay>``, where ``not_before``
    says when the attempt is due) and the compacted ``delivery-dead-letter`` (``last_failure``
    says why it gave up; a re-drive replaces it with a tombstone). Keyed by the delivery, so
    every attempt of one delivery is in order and the dead letter is one record per delivery.
    """

    schema_name: ClassVar[str] = "delivery.queued.v1"
    topic: ClassVar[str] = "delivery-routine"

    route: RouteResolved
    attempt: int = Field(ge=1)
    not_before: AwareDatetime | None = None
    first_queued_at: AwareDatetime
    last_failure: str | None = Field(default=None, max_length=1024)
    # What earlier attempts settled: instances the receiver stored, and ones it refused for
    # good. The next attempt sends the rest.
    stored: tuple[DicomUid, ...] = ()
    refused: tuple[RefusedInstance, ...] = ()
    # Instances the receiver answered it holds already (our own earlier copy, as a rule: an
    # abort left its answer unread), settled like the stored ones. Added within v1: a record
    # written before it decodes with none.
    already_present: tuple[DicomUid, ...] = ()

    @property
    def key(self) -> str:
        route = self.route
        study = route.study
        destination = route.destination
        return delivery_key(
            study.study_instance_uid,
            study.version,
            study.sender_ura,
            destination.organisation_ura,
            destination.endpoint_id,
        )

    def partition_key(self) -> str:
        return self.key
