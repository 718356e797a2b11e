"""Value types that several event families share: UIDs, patient reference, study snapshot."""

from __future__ import annotations

from datetime import date
from enum import StrEnum
from typing import Annotated

from pydantic import AwareDatetime, Field, StringConstraints

from shared.events.base import Model
from shared.identifiers import Pseudonym, Ura
from shared.storage.port import MAX_KEY_LENGTH, OBJECT_KEY_PATTERN

# PS3.5 §9.1: dotted numeric components without leading zeros, at most 64 characters.
DicomUid = Annotated[
    str, StringConstraints(pattern=r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$", max_length=64)
]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# One definition of a valid key: the object store's own (no empty, '.' or '..' segments), as a
# pattern pydantic-core matches natively (a Python validator per instance cost a third of the
# decoding time of a study's events); tests/unit/test_object_keys.py holds the two to each other.
ObjectKey = Annotated[
    str, StringConstraints(pattern=rf"^{OBJECT_KEY_PATTERN}$", max_length=MAX_KEY_LENGTH)
]


class BsnStatus(StrEnum):
    """What ingest could establish about the patient's BSN in the received headers."""

    VERIFIED = "verified"  # found with a BSN issuer and passes the 11-proof
    ABSENT = "absent"  # no BSN anywhere in the headers
    INVALID = "invalid"  # claimed to be a BSN but fails the 11-proof or is malformed
    CONFLICTING = "conflicting"  # instances or attributes of one study name different BSNs


class PatientRef(Model):
    """The patient as events may name them: a pseudonym and how sure we are of the BSN."""

    pseudonym: Pseudonym | None = None
    bsn_status: BsnStatus

    def model_post_init(self, _context: object) -> None:
        if (self.pseudonym is None) == (self.bsn_status is BsnStatus.VERIFIED):
            raise ValueError("a pseudonym is present exactly when the BSN is verified")


class Urgency(StrEnum):
    ROUTINE = "routine"
    URGENT = "urgent"
    EMERGENCY = "emergency"


class IngestChannel(StrEnum):
    STOW_RS = "stow-rs"
    C_STORE = "c-store"


class DeliveryChannel(StrEnum):
    DICOMWEB = "dicomweb"
    DIMSE = "dimse"
    PICKUP = "pickup"


class InstanceRef(Model):
    """One stored DICOM instance: where its exact received bytes are (claim check), their hash."""

    sop_instance_uid: DicomUid
    sop_class_uid: DicomUid
    series_instance_uid: DicomUid
    transfer_syntax_uid: DicomUid
    object_key: ObjectKey
    size: int = Field(ge=0)
    sha256: Sha256Hex


class SeriesSummary(Model):
    series_instance_uid: DicomUid
    modality: str | None = Field(default=None, max_length=16)
    series_number: int | None = None
    series_description: str | None = Field(default=None, max_length=64)
    number_of_instances: int = Field(ge=0)


class ReportKind(StrEnum):
    STRUCTURED_REPORT = "sr"
    PDF = "pdf"


# SOP classes that are reports rather than images (shown as their own timeline entry).
REPORT_SOP_CLASSES: dict[str, ReportKind] = {
    "1.2.840.10008.5.1.4.1.1.88.11": ReportKind.STRUCTURED_REPORT,  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22": ReportKind.STRUCTURED_REPORT,  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33": ReportKind.STRUCTURED_REPORT,  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34": ReportKind.STRUCTURED_REPORT,  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.104.1": ReportKind.PDF,  # Encapsulated PDF
}


class ReportRef(Model):
    """A report instance in a study (DICOM SR or Encapsulated PDF)."""

    sop_instance_uid: DicomUid
    series_instance_uid: DicomUid
    kind: ReportKind


class StudySnapshot(Model):
    """A study as assembled by ingest at one version: what later stages carry forward.

    Carrying the snapshot in every downstream event (event-carried state transfer) keeps each
    stage free of joins and lets any projection be rebuilt from one topic.
    """

    study_instance_uid: DicomUid
    # 1 for the first announcement; +1 each time new instances arrive after it was announced.
    version: int = Field(ge=1)
    sender_ura: Ura
    recipient_ura: Ura
    patient: PatientRef
    accession_number: str | None = Field(default=None, max_length=16)
    study_date: date | None = None
    study_time: str | None = Field(default=None, max_length=16)
    study_description: str | None = Field(default=None, max_length=64)
    institution_name: str | None = Field(default=None, max_length=64)
    modalities: tuple[str, ...] = ()
    series: tuple[SeriesSummary, ...] = ()
    # The manifest: every instance of the study so far (claim checks into S3).
    instances: tuple[InstanceRef, ...] = ()
    # The instances this version adds (all of them in version 1).
    new_sop_instance_uids: tuple[DicomUid, ...] = ()
    reports: tuple[ReportRef, ...] = ()
    urgency: Urgency = Urgency.ROUTINE
    # A free-text note from the sender to the recipient; never shown on the timeline.
    sender_note: str | None = Field(default=None, max_length=2000)
    first_received_at: AwareDatetime
    last_received_at: AwareDatetime

    @property
    def number_of_instances(self) -> int:
        return len(self.instances)
