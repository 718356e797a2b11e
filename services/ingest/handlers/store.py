"""Store one received instance: check its header, keep its exact bytes in S3, announce it.

Both front doors (STOW-RS and the C-STORE SCP) call :meth:`InstanceStore.store`. An instance is
reported stored only once its bytes are durable in S3 *and* Kafka acknowledged its
``instance-stored`` event; every other outcome is a DICOM status with a reason, never an
exception, and never leaves an announcement for bytes that are not stored.

Resends: the object key is derived from the UIDs, so identical bytes find their object already
there. The event id is derived from what was stored, so announcing them again is announcing the
*same* event; study assembly ignores it. A bounded memory of recent announcements spares even
that for the usual case (a client retrying the same request). Nothing per instance is written
besides the object itself: on these machines every extra S3 PUT costs as much as the instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO, TypeVar

from services.ingest.domain.dicom import InstanceHeader, Rejected, read_header
from services.ingest.domain.keys import object_key
from services.ingest.domain.patient import uid_holds_bsn, without_bsns, without_own_bsn
from services.ingest.domain.status import Status
from services.ingest.metrics import IngestMetrics
from shared.errors import TransientError
from shared.events import (
    CompletingRequestStored,
    IngestChannel,
    InstanceRef,
    InstanceStored,
    PatientRef,
    Urgency,
)
from shared.identifiers import Pseudonymizer
from shared.kafka import EventPublisher
from shared.logging import get_logger
from shared.storage.port import (
    ChecksumMismatch,
    ObjectInfo,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailable,
)

log = get_logger(__name__)
T = TypeVar("T")

# S3 user metadata: sha256 of the data set alone (the bytes after the File Meta).
DATA_SET_SHA256 = "dataset-sha256"

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
        large_threshold: int = 8 * 1024 * 1024,
        large_uploads: int = 2,
        inline_threshold: int = 1024 * 1024,
    ) -> None:
        self._objects = objects
        self._publisher = publisher
        self._pseudonymizer = pseudonymizer
        self._metrics = metrics
        self._producer = producer
        self._clock = clock
        self._announced = _BoundedSet(100_000)
        self._key_turns = [asyncio.Lock() for _ in range(256)]
        # A large instance travels to S3 in multipart chunks of 8 MiB or more held in memory:
        # only a few at a time, so a request of big instances cannot add up to gigabytes.
        self._large_threshold = large_threshold
        self._large_uploads = asyncio.Semaphore(large_uploads)
        # Instances up to this size are read, hashed and stored on the event loop.
        self._inline_threshold = inline_threshold

    async def store(self, received: Received, submission: Submission) -> Outcome:
        try:
            outcome = await self._store(received, submission)
        except Exception:  # the contract: a status for the peer, never an exception
            log.exception("storing an instance failed unexpectedly", channel=submission.channel)
            outcome = Outcome(Status.PROCESSING_FAILURE, "internal error while storing")
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
        persisted = await self._persist(received, submission)
        if isinstance(persisted, Outcome):
            return persisted
        header, key, info, created = persisted

        def failed(status: Status, reason: str) -> Outcome:
            return _refused(header, status, reason)

        # What is stored is what the claim check names: for a resend, the first copy.
        ref = InstanceRef(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            series_instance_uid=header.series_instance_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            object_key=key,
            size=info.size,
            sha256=info.sha256 or received.sha256,
        )
        memory_key = (submission.sender_ura, submission.recipient_ura, key, ref.sha256)
        if not created and memory_key in self._announced:
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
        self._announced.add(memory_key)
        return Outcome(
            Status.SUCCESS,
            "stored",
            header.sop_class_uid,
            header.sop_instance_uid,
            header.study_instance_uid,
            stored=ref,
            announced=True,
        )

    async def request_ended(self, submission: Submission, stored: Mapping[str, int]) -> bool:
        """After a request the sender marked as completing its study, once every instance of
        it was handled: announce per study (Study Instance UID -> instances of it stored) that
        the request is in, so study assembly announces the study at once.

        False when Kafka did not take it. Nothing is lost then: the instances are stored and
        announced, and assembly announces the study once it is stable instead.
        """
        if not submission.completes_study or not stored:
            return True
        events = [
            CompletingRequestStored(
                occurred_at=self._clock(),
                correlation_id=submission.correlation_id,
                producer=self._producer,
                study_instance_uid=uid,
                channel=submission.channel,
                sender_ura=submission.sender_ura,
                recipient_ura=submission.recipient_ura,
                instances=count,
            )
            for uid, count in sorted(stored.items())
        ]
        try:
            await self._publisher.publish_many(events)
        except TransientError as exc:
            log.warning(
                "the end of a completing request was not announced; assembly waits for its "
                "quiet period instead",
                error=str(exc),
                studies=len(events),
            )
            return False
        for event in events:
            self._metrics.produced(event.topic, event.schema_name)
        return True

    async def _persist(
        self, received: Received, submission: Submission
    ) -> Outcome | tuple[InstanceHeader, str, ObjectInfo, bool]:
        """Check the header and store the bytes: (header, key, what is stored, created now).

        A small instance is checked and stored on the event loop itself: a trip to a worker
        thread per instance cost more CPU than the work (see shared.storage.s3_async). A large
        one is checked in a worker thread and streamed to S3 from one.

        S3 servers differ in how atomic a conditional write is under a race (versitygw checks
        at the start of an upload, not at its end), so writers of one key in this process take
        turns, so that "never overwrite" does not depend on the server. The turns are taken on
        the event loop, never by a worker thread, so that a thread the store needs can never be
        one waiting for a turn; and a write that has started is waited for, even when the
        request is cancelled, before the next writer of its key goes.
        """
        inline = received.size <= self._inline_threshold
        body = _body(received) if inline else None
        checked = (
            self._check(received, submission, body)
            if inline
            else await asyncio.to_thread(self._check, received, submission, None)
        )
        if isinstance(checked, Outcome):
            return checked
        header, key, data_set_sha256 = checked
        metadata = {DATA_SET_SHA256: data_set_sha256}
        try:
            async with self._key_turns[hash(key) % len(self._key_turns)]:
                if body is not None:
                    write = self._objects.aput_if_absent(
                        key, body, metadata=metadata, sha256=received.sha256
                    )
                    info, created = await _finish_even_if_cancelled(write)
                else:
                    large = received.size > self._large_threshold
                    async with self._large_uploads if large else _NO_LIMIT:
                        write = asyncio.to_thread(
                            self._objects.put_if_absent,
                            key,
                            received.file,
                            received.size,
                            metadata=metadata,
                            sha256=received.sha256,
                        )
                        info, created = await _finish_even_if_cancelled(write)
        except ObjectStoreError as exc:
            return _store_failed(header, key, exc)
        return self._judge(header, key, info, created, received, data_set_sha256)

    def _check(
        self, received: Received, submission: Submission, body: bytes | None
    ) -> Outcome | tuple[InstanceHeader, str, str]:
        """(header, object key, sha256 of the data set), or why the instance is refused.
        ``body``: the instance's bytes when already read, else the data set is read again."""
        try:
            header = _read(received)
        except Rejected as exc:
            return Outcome(exc.status, exc.reason)
        claims = header.patient.claims
        uids = (header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
        if any(uid_holds_bsn(uid, claims) for uid in uids):
            # Not stored: the key, the events and the URLs would carry the BSN. The outcome
            # names no UID of it, so neither the log line nor the response does.
            return Outcome(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "a Study, Series or SOP Instance UID holds the patient's BSN; it would be "
                "published in object keys, events and URLs: give the instances new UIDs",
                header.sop_class_uid,
            )
        if submission.expected_study_uid and header.study_instance_uid != (
            submission.expected_study_uid
        ):
            return _refused(
                header,
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "Study Instance UID does not match the study in the request URL",
            )
        key = object_key(submission.sender_ura, header)
        if body is not None:
            data_set = hashlib.sha256(memoryview(body)[header.data_set_offset :]).hexdigest()
        else:
            data_set = _data_set_sha256(received, header.data_set_offset)
        return header, key, data_set

    @staticmethod
    def _judge(
        header: InstanceHeader,
        key: str,
        info: ObjectInfo,
        created: bool,
        received: Received,
        data_set_sha256: str,
    ) -> Outcome | tuple[InstanceHeader, str, ObjectInfo, bool]:
        # Other bytes under this key: the same instance with another File Meta (another channel
        # or toolkit wrapped it) is still the same instance; anything else is not.
        if (
            not created
            and info.sha256 != received.sha256
            and info.metadata.get(DATA_SET_SHA256) != data_set_sha256
        ):
            return _refused(
                header,
                Status.DUPLICATE_SOP_INSTANCE,
                "this sender already sent an instance with this SOP Instance UID and other "
                "content (in this or another series or study); the first is kept and not "
                "overwritten: a changed instance needs a new SOP Instance UID",
            )
        return header, key, info, created

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
            # The header's texts as they may be published: no BSN in clear on the bus.
            accession_number=without_own_bsn(header.accession_number, finding.claims),
            study_date=header.study_date,
            study_time=header.study_time,
            study_description=without_bsns(header.study_description, finding.claims),
            institution_name=without_bsns(header.institution_name, finding.claims),
            modality=header.modality,
            series_number=header.series_number,
            series_description=without_bsns(header.series_description, finding.claims),
            urgency=sub.urgency,
            sender_note=without_bsns(sub.sender_note, finding.claims),
            # The request's claim to complete its study holds only once the whole request is
            # in (``request_ended``): one that breaks off completes nothing, so no instance
            # carries it (the field stays for records written before 2026-11-27).
            completes_study=False,
        )


async def _finish_even_if_cancelled(write: Awaitable[T]) -> T:
    """Await ``write``; if the waiter is cancelled meanwhile, let the write end before the
    cancellation goes on, so its key's turn is not handed on while S3 may still apply it."""
    task = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await asyncio.wait({task})
        raise


class _NoLimit:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_LIMIT = _NoLimit()


def _store_failed(header: InstanceHeader, key: str, exc: ObjectStoreError) -> Outcome:
    if isinstance(exc, ObjectStoreUnavailable):
        # The sender is told only "retry later"; the operator needs the cause (an outage, or a
        # connection error of one request).
        log.warning("object store unavailable for an instance", error=str(exc), key=key)
        return _refused(
            header, Status.OUT_OF_RESOURCES, "object storage is unavailable; retry later"
        )
    if isinstance(exc, ChecksumMismatch):
        return _refused(
            header, Status.PROCESSING_FAILURE, "bytes changed while being stored; resend"
        )
    log.error("object store refused an instance", error=str(exc), key=key)
    return _refused(
        header, Status.OUT_OF_RESOURCES, "object storage refused the write; retry later"
    )


def _refused(header: InstanceHeader, status: Status, reason: str) -> Outcome:
    return Outcome(
        status, reason, header.sop_class_uid, header.sop_instance_uid, header.study_instance_uid
    )


class _BoundedSet:
    """Remembers the most recent ``size`` keys (insertion order; oldest forgotten first)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._keys: OrderedDict[object, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: object) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self._size:
            self._keys.popitem(last=False)


def _body(received: Received) -> bytes:
    received.file.seek(0)
    body = received.file.read(received.size)
    received.file.seek(0)
    return body


def _data_set_sha256(received: Received, offset: int) -> str:
    digest = hashlib.sha256()
    received.file.seek(offset)
    while chunk := received.file.read(1024 * 1024):
        digest.update(chunk)
    received.file.seek(0)
    return digest.hexdigest()


def _read(received: Received) -> InstanceHeader:
    received.file.seek(0)
    try:
        return read_header(received.file, received.size)
    finally:
        received.file.seek(0)
