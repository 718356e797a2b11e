"""Events of notify: a study version reached a destination, or failed to (for now or for good)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import AwareDatetime, Field

from shared.events.base import Event, Model, event
from shared.events.common import DeliveryChannel, DicomUid
from shared.identifiers import Ura


class InstanceOutcomes(Model):
    """Per-instance outcome counts of one delivery, from the receiver's own answer."""

    sent: int = Field(ge=0)
    already_present: int = Field(ge=0)
    warnings: int = Field(ge=0, default=0)
    failed: int = Field(ge=0, default=0)


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
    # From the first instance received by ingest to the receiver's last acknowledgement.
    seconds_since_first_received: float = Field(ge=0)
    delivered_at: AwareDatetime

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

    def partition_key(self) -> str:
        return self.study_instance_uid
