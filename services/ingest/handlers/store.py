"""Store one received instance: check its header, keep its exact bytes in S3, announce it.

Both front doors (STOW-RS and the C-STORE SCP) call :meth:`InstanceStore.store`. An instance is
reported stored only once its bytes are durable in S3 *and* Kafka acknowledged its
``instance-stored`` event; every other outcome is a DICOM status with a reason, never an
exception, and never leaves an announcement for bytes that are not stored.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from services.ingest.domain.dicom import InstanceHeader, Rejected, read_header
from services.ingest.domain.keys import object_key
from services.ingest.domain.status import Status
from services.ingest.metrics import IngestMetrics
from shared.errors import TransientError
from shared.events import IngestChannel, InstanceRef, InstanceStored, PatientRef, Urgency
from shared.identifiers import Pseudonymizer
from shared.kafka import EventPublisher
from shared.logging import get_logger
from shared.storage.port import (
    ChecksumMismatch,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailable,
)

log = get_logger(__name__)

# Event ids of instance-stored are derived from what was stored, so a re-announcement after a
# crash is recognisably the same event.
_EVENT_NAMESPACE = uuid.UUID("6f1d7c8e-5b7a-4c1e-9a53-2f0c7a1b9e11")


@dataclass(frozen=True)
class Submission:
    """Who sends, to whom, and what they said about it: the same for every instance of a request."""

    sender_ura: str
    recipient_ura: str
    channel: IngestChannel
    correlation_id: str
    sender_user: str | None = None
    # The calling AE title (C-STORE) or the token's client id (STOW-RS).
    sender_endpoint: str | None = None
    urgency: Urgency = Urgency.ROUTINE
    sender_note: str | None = None
    completes_study: bool = False
    # STOW-RS `.../studies/{uid}`: every instance must belong to this study.
    expected_study_uid: str | None = None


@dataclass(frozen=True)
class Received:
    """The exact bytes of one received instance (a Part 10 file), already hashed."""

    file: BinaryIO
    size: int
    sha256: str


@dataclass(frozen=True)
class Outcome:
    status: Status
    reason: str
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    stored: InstanceRef | None = None
    # False for an identical resend that had been announced before.
    announced: bool = False

    @property
    def ok(self) -> bool:
        return self.stored is not None


class InstanceStore:
    def __init__(
        self,
        objects: ObjectStore,
        publisher: EventPublisher,
        pseudonymizer: Pseudonymizer,
        metrics: IngestMetrics,
        *,
        producer: str = "ingest",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._objects = objects
        self._publisher = publisher
        self._pseudonymizer = pseudonymizer
        self._metrics = metrics
        self._producer = producer
        self._clock = clock

    async def store(self, received: Received, submission: Submission) -> Outcome:
        outcome = await self._store(received, submission)
        channel = submission.channel.value
        self._metrics.instance_size.observe(received.size)
        if outcome.ok:
            kind = "stored" if outcome.announced else "duplicate"
            self._metrics.instances_received.labels(channel, kind).inc()
            if outcome.announced:
                self._metrics.bytes_received.labels(channel).inc(received.size)
        else:
            kind = "failed" if outcome.status == Status.OUT_OF_RESOURCES else "rejected"
            self._metrics.instances_received.labels(channel, kind).inc()
            self._metrics.instances_rejected.labels(channel, f"{outcome.status:04X}").inc()
            log.info(
                "instance not stored",
                status=f"{outcome.status:04X}",
                reason=outcome.reason,
                sop_instance_uid=outcome.sop_instance_uid,
                sender=submission.sender_ura,
                channel=channel,
            )
        return outcome

    async def _store(self, received: Received, submission: Submission) -> Outcome:
        try:
            header = await asyncio.to_thread(_read, received)
        except Rejected as exc:
            return Outcome(exc.status, exc.reason)

        def failed(status: Status, reason: str) -> Outcome:
            return Outcome(
                status,
                reason,
                header.sop_class_uid,
                header.sop_instance_uid,
                header.study_instance_uid,
            )

        if submission.expected_study_uid and header.study_instance_uid != (
            submission.expected_study_uid
        ):
            return failed(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "Study Instance UID does not match the study in the request URL",
            )

        key = object_key(submission.sender_ura, header)
        try:
            info, created = await asyncio.to_thread(
                self._objects.put_if_absent,
                key,
                received.file,
                received.size,
                sha256=received.sha256,
            )
        except ObjectStoreUnavailable:
            return failed(Status.OUT_OF_RESOURCES, "object storage is unavailable; retry later")
        except ChecksumMismatch:
            return failed(Status.PROCESSING_FAILURE, "bytes changed while being stored; resend")
        except ObjectStoreError as exc:
            log.error("object store refused an instance", error=str(exc), key=key)
            return failed(Status.OUT_OF_RESOURCES, "object storage refused the write; retry later")

        if not created and info.sha256 != received.sha256:
            return failed(
                Status.DUPLICATE_SOP_INSTANCE,
                "this sender already sent an instance with this SOP Instance UID and other "
                "content; it is kept and not overwritten",
            )

        ref = InstanceRef(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            series_instance_uid=header.series_instance_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            object_key=key,
            size=received.size,
            sha256=received.sha256,
        )
        receipt = _receipt_key(submission, header)
        if not created and await self._has_receipt(receipt):
            return Outcome(
                Status.SUCCESS,
                "already received",
                header.sop_class_uid,
                header.sop_instance_uid,
                header.study_instance_uid,
                stored=ref,
                announced=False,
            )

        event = self._event(header, ref, submission)
        try:
            await self._publisher.publish(event)
        except TransientError:
            # The bytes stay in S3 under their key; a retry finds them and announces them then.
            return failed(Status.OUT_OF_RESOURCES, "the event bus is unavailable; retry later")
        self._metrics.produced(InstanceStored.topic, InstanceStored.schema_name)
        await self._write_receipt(receipt, event)
        return Outcome(
            Status.SUCCESS,
            "stored",
            header.sop_class_uid,
            header.sop_instance_uid,
            header.study_instance_uid,
            stored=ref,
            announced=True,
        )

    def _event(self, header: InstanceHeader, ref: InstanceRef, sub: Submission) -> InstanceStored:
        finding = header.patient
        pseudonym = self._pseudonymizer.pseudonym(finding.bsn) if finding.bsn is not None else None
        event_id = uuid.uuid5(
            _EVENT_NAMESPACE, f"{sub.sender_ura}|{sub.recipient_ura}|{ref.object_key}|{ref.sha256}"
        )
        return InstanceStored(
            event_id=event_id,
            occurred_at=self._clock(),
            correlation_id=sub.correlation_id,
            producer=self._producer,
            study_instance_uid=header.study_instance_uid,
            instance=ref,
            channel=sub.channel,
            sender_ura=sub.sender_ura,
            sender_user=sub.sender_user,
            sender_endpoint=sub.sender_endpoint,
            recipient_ura=sub.recipient_ura,
            patient=PatientRef(pseudonym=pseudonym, bsn_status=finding.status),
            accession_number=header.accession_number,
            study_date=header.study_date,
            study_time=header.study_time,
            study_description=header.study_description,
            institution_name=header.institution_name,
            modality=header.modality,
            series_number=header.series_number,
            series_description=header.series_description,
            urgency=sub.urgency,
            sender_note=sub.sender_note,
            completes_study=sub.completes_study,
        )

    async def _has_receipt(self, key: str) -> bool:
        try:
            return await asyncio.to_thread(self._objects.exists, key)
        except ObjectStoreError:
            return False  # unknown: announce again; study assembly ignores a repeat

    async def _write_receipt(self, key: str, event: InstanceStored) -> None:
        body = json.dumps({"event_id": str(event.event_id), "sha256": event.instance.sha256})
        try:
            await asyncio.to_thread(
                self._objects.put_if_absent, key, body.encode(), None, "application/json"
            )
        except ObjectStoreError as exc:
            # Stored and announced all the same; without a receipt a resend re-announces it.
            log.warning("could not write receipt", key=key, error=str(exc))


def _read(received: Received) -> InstanceHeader:
    received.file.seek(0)
    try:
        return read_header(received.file, received.size)
    finally:
        received.file.seek(0)


def _receipt_key(sub: Submission, header: InstanceHeader) -> str:
    # One receipt per (sender, recipient, instance): the same bytes sent to a second recipient
    # are stored once but announced for each recipient.
    return f"receipts/{sub.sender_ura}/{sub.recipient_ura}/{header.sop_instance_uid}"
