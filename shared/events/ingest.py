"""Events of ingest: one instance stored, and a study announced once it is stable."""

from __future__ import annotations

from datetime import date
from typing import ClassVar

from pydantic import Field

from shared.events.base import Event, event
from shared.events.common import (
    DicomUid,
    IngestChannel,
    InstanceRef,
    PatientRef,
    StudySnapshot,
    Urgency,
)
from shared.identifiers import Ura, UziNumber

# The longest sender endpoint recorded (a token's client id, an AE title).
MAX_SENDER_ENDPOINT = 128


@event
class InstanceStored(Event):
    """Emitted by ingest once an instance's exact bytes are durably in S3.

    Study assembly consumes these (keyed by Study Instance UID) and announces the study when no
    new instance arrived for the stable age, or when the sender said the request completes it.
    """

    schema_name: ClassVar[str] = "instance.stored.v1"
    topic: ClassVar[str] = "instance-stored"

    study_instance_uid: DicomUid
    instance: InstanceRef
    channel: IngestChannel
    sender_ura: Ura
    sender_user: UziNumber | None = None
    # Calling AE title for C-STORE, or the token's client id for STOW-RS.
    sender_endpoint: str | None = Field(default=None, max_length=MAX_SENDER_ENDPOINT)
    recipient_ura: Ura
    patient: PatientRef
    accession_number: str | None = Field(default=None, max_length=16)
    study_date: date | None = None
    study_time: str | None = Field(default=None, max_length=16)
    study_description: str | None = Field(default=None, max_length=64)
    institution_name: str | None = Field(default=None, max_length=64)
    modality: str | None = Field(default=None, max_length=16)
    series_number: int | None = None
    series_description: str | None = Field(default=None, max_length=64)
    urgency: Urgency = Urgency.ROUTINE
    sender_note: str | None = Field(default=None, max_length=2000)
    # The sender said this request completes the study: announce without waiting. Written
    # False since 2026-11-27 (a request's claim counts once the request is whole, by
    # CompletingRequestStored); assembly still honours it on older records.
    completes_study: bool = False

    def partition_key(self) -> str:
        return self.study_instance_uid


@event
class CompletingRequestStored(Event):
    """Emitted by ingest once a request the sender marked as completing the study has ended,
    for each study in it that had an instance stored: after every one of that request's
    instance-stored events of the study was acknowledged, on the same topic and key, so it
    follows them in their partition.

    Study assembly announces the study on it at once: no quiet period to wait for the rest of
    the request (its ``completes_study`` instances alone leave that question open, since
    ingest publishes each as soon as its bytes are stored).
    """

    schema_name: ClassVar[str] = "ingest.completing-request-stored.v1"
    topic: ClassVar[str] = "instance-stored"

    study_instance_uid: DicomUid
    channel: IngestChannel
    sender_ura: Ura
    recipient_ura: Ura
    # Instances of this study the request had stored (resends of stored ones included).
    instances: int = Field(ge=1)

    def partition_key(self) -> str:
        return self.study_instance_uid


@event
class StudyReceived(Event):
    """Emitted by ingest's study assembly for each version of a stable study."""

    schema_name: ClassVar[str] = "study.received.v1"
    topic: ClassVar[str] = "study-received"

    study: StudySnapshot

    def partition_key(self) -> str:
        return self.study.study_instance_uid
