"""Study assembly: collect instance-stored per study and decide when and what to announce.

DICOM has no "study complete" signal (design.md). A study is announced once it is *stable*: no
new instance for the stable age, or sooner when the sender said a request completes the study.
Instances that arrive after an announcement make a follow-up version listing which are new.

The same study sent by one sender to two recipients is assembled (and announced) twice: an
*assembly* is (study, sender, recipient). Its state lives in rows of a key-value table (the
assembly agent's faust table; a dict in tests), laid out so that taking in one instance reads
and writes a few small rows, never the whole study:

- the study row (key: the Study Instance UID): :class:`StudyAssemblies`, a summary per assembly:
  counts, clocks, the study-level attributes, what was announced. Its size does not grow with
  the number of instances.
- one record row per instance (key: study, assembly, arrival number): :class:`InstanceRecord`,
  what the snapshot lists. Instances are numbered 1, 2, 3 ... in the order the assembly took them
  in, so the rows of an assembly are found without a scan, and "announced" needs no per-instance
  mark: a version announces every instance numbered up to the count it listed.
- one seen row per instance (key: study, assembly, SOP Instance UID): :class:`Seen`, its number
  and hash, to recognise a duplicate or a conflict with one lookup.

Every key starts with the Study Instance UID, and the agent writes rows only while handling a
record of that study, so all of a study's rows stay in the study's partition (see the entrypoint).

Two clocks, on purpose: ``received_at`` of an instance is when ingest stored it (the event's
``occurred_at``) and is what ``study-received`` reports; stability is measured on the assembler's
own clock (``now`` when it first sees an instance), so consumer lag can never make a
half-consumed study look stable.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Literal, NamedTuple, Protocol

from pydantic import AwareDatetime, Field

from shared.events import (
    REPORT_SOP_CLASSES,
    BsnStatus,
    CompletingRequestStored,
    InstanceRef,
    InstanceStored,
    PatientRef,
    ReportRef,
    SeriesSummary,
    StudyReceived,
    StudySnapshot,
    Urgency,
)
from shared.events.base import Model
from shared.events.common import Sha256Hex

# A completes_study mark announces the study once no new instance came for this long (capped at
# the stable age). Ingest flags *every* instance of the completing request and publishes them as
# their bytes are stored, so without a short quiet period the first flagged instance would
# announce a partial study and the rest of the request would follow as version 2. When the
# request ends, ingest says so (CompletingRequestStored) and the study is due at once; the quiet
# period is what is left when that word never came (ingest stopped between the two). The worker
# passes its setting (IngestSettings.assembly_completion_quiet_seconds); this is its default.
COMPLETION_QUIET = timedelta(seconds=2)

# uuid5 namespace of study-received event ids: (study, sender, recipient, version) -> event id.
STUDY_RECEIVED_NAMESPACE = uuid.UUID("3b0f6e2a-9d51-4c7e-8a0c-5f7d1e2b9c44")

# Separates the parts of a row key; never part of a DICOM UID (digits and dots) or a URA.
KEY_SEPARATOR = "\x00"

_URGENCY_RANK = {Urgency.ROUTINE: 0, Urgency.URGENT: 1, Urgency.EMERGENCY: 2}


class AssemblyKey(NamedTuple):
    """One assembly: a study as sent by one sender to one recipient."""

    study_instance_uid: str
    sender_ura: str
    recipient_ura: str

    @property
    def slot(self) -> str:
        """The assembly's key inside its study row (JSON object keys are strings)."""
        return f"{self.sender_ura}>{self.recipient_ura}"


class Added(StrEnum):
    """What adding one instance-stored did to the state."""

    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing changes
    CONFLICT = "conflict"  # same SOP Instance UID, other bytes: the first is kept, counted


class InstanceRecord(Model):
    """One instance of an assembly with the per-instance attributes the snapshot needs."""

    # Its arrival number in the assembly: 1 for the first instance taken in, then 2, 3, ...
    number: int = Field(ge=1)
    instance: InstanceRef
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    # When ingest stored it (the instance-stored event's occurred_at).
    received_at: AwareDatetime


class Seen(Model):
    """That an assembly has taken in a SOP Instance UID: under which number, with which bytes."""

    number: int = Field(ge=1)
    sha256: Sha256Hex


class Assembly(Model):
    """The summary of one (study, sender, recipient); its instances are rows of their own."""

    study_instance_uid: str
    sender_ura: str
    recipient_ura: str
    # The correlation id of the first instance: follows every version of this assembly.
    correlation_id: str
    # Distinct patient references in first-seen order; two already make the patient conflicting,
    # so no more than two are kept (the row stays small whatever the instances say).
    patients: tuple[PatientRef, ...] = Field(min_length=1, max_length=2)
    # Study-level attributes: each from the first instance that has it.
    accession_number: str | None = None
    study_date: date | None = None
    study_time: str | None = None
    study_description: str | None = None
    institution_name: str | None = None
    urgency: Urgency = Urgency.ROUTINE
    # The latest non-empty note, in the order the instances were consumed.
    sender_note: str | None = None
    # Instances taken in: their record rows are numbered 1..instances.
    instances: int = Field(ge=0)
    first_received_at: AwareDatetime
    last_received_at: AwareDatetime
    # Assembler clock: when the last new instance was seen, and the last completes_study mark.
    last_new_at: AwareDatetime
    completion_marked_at: AwareDatetime | None = None
    # When a completing request was seen to have ended (CompletingRequestStored): due at once
    # unless a new instance came after it.
    request_completed_at: AwareDatetime | None = None
    # Same SOP Instance UID with other bytes (ingest refuses that, so this stays 0).
    conflicts: int = Field(default=0, ge=0)
    announced_version: int = Field(default=0, ge=0)
    # Instances 1..announced_instances were listed by an announced version.
    announced_instances: int = Field(default=0, ge=0)
    announced_at: AwareDatetime | None = None

    @property
    def key(self) -> AssemblyKey:
        return AssemblyKey(self.study_instance_uid, self.sender_ura, self.recipient_ura)

    @property
    def unannounced(self) -> int:
        return self.instances - self.announced_instances


class StudyAssemblies(Model):
    """The study row of one Study Instance UID: its assemblies by ``AssemblyKey.slot``."""

    # Version of this stored layout, for a migration when it ever changes. Layout 1 kept every
    # instance inside this row (rewritten in full per instance: quadratic in the study size).
    layout: Literal[2] = 2
    study_instance_uid: str
    assemblies: dict[str, Assembly] = Field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> StudyAssemblies:
        return cls.model_validate_json(raw)

    def assembly(self, key: AssemblyKey) -> Assembly | None:
        return self.assemblies.get(key.slot)


def key_of(event: InstanceStored | CompletingRequestStored) -> AssemblyKey:
    return AssemblyKey(event.study_instance_uid, event.sender_ura, event.recipient_ura)


def study_received_id(key: AssemblyKey, version: int) -> uuid.UUID:
    """Deterministic: announcing the same version again (after a crash) is the same event."""
    name = f"{key.study_instance_uid}|{key.sender_ura}|{key.recipient_ura}|{version}"
    return uuid.uuid5(STUDY_RECEIVED_NAMESPACE, name)


# --- row keys -------------------------------------------------------------------------------------


def study_row_key(study_instance_uid: str) -> bytes:
    """The study row's key: the Study Instance UID, exactly the message key of its events."""
    return study_instance_uid.encode()


def record_row_key(key: AssemblyKey, number: int) -> bytes:
    return KEY_SEPARATOR.join((key.study_instance_uid, key.slot, "n", str(number))).encode()


def seen_row_key(key: AssemblyKey, sop_instance_uid: str) -> bytes:
    return KEY_SEPARATOR.join((key.study_instance_uid, key.slot, "sop", sop_instance_uid)).encode()


def study_of_row_key(row_key: bytes) -> str:
    """The Study Instance UID a row belongs to (every row key starts with it)."""
    return row_key.split(KEY_SEPARATOR.encode(), 1)[0].decode()


# --- adding instances -----------------------------------------------------------------------------


class Addition(NamedTuple):
    """The outcome of taking in one instance-stored: what to store, and what it was."""

    # The study row afterwards; the very same object when nothing changed.
    state: StudyAssemblies
    outcome: Added
    # The record and seen rows to store for a new instance (None otherwise).
    record: InstanceRecord | None = None
    seen: Seen | None = None


def add_instance(
    state: StudyAssemblies | None, event: InstanceStored, now: datetime, seen: Seen | None
) -> Addition:
    """Take in ``event``, given the assembly's seen row for its SOP Instance UID (or None).

    A duplicate (redelivery, or a sender sending again) changes nothing at all, its flags
    included: it must not postpone stability, and what it says was said by the first copy.

    A seen row numbered beyond the summary's count is the trace of a crash after the instance's
    rows were stored but before its study row was: the instance is taken in again, under the
    number it already has (rows are written record, seen, study row, in one changelog, so a
    crash keeps a prefix of them and the replayed event finds exactly this).
    """
    if state is None:
        state = StudyAssemblies(study_instance_uid=event.study_instance_uid)
    elif state.study_instance_uid != event.study_instance_uid:
        raise ValueError("instance belongs to another study than this state")
    key = key_of(event)
    current = state.assembly(key)
    count = current.instances if current is not None else 0
    if seen is not None:
        if seen.sha256 != event.instance.sha256:
            if current is None:
                raise ValueError("a seen row without its assembly: the study row was lost")
            updated = current.model_copy(update={"conflicts": current.conflicts + 1})
            return Addition(_with(state, updated), Added.CONFLICT)
        if seen.number <= count:
            return Addition(state, Added.DUPLICATE)
        number = seen.number
    else:
        number = count + 1
    record = InstanceRecord(
        number=number,
        instance=event.instance,
        modality=event.modality,
        series_number=event.series_number,
        series_description=event.series_description,
        received_at=event.occurred_at,
    )
    if current is None:
        assembly = _new_assembly(key, event, number, now)
    else:
        assembly = _with_instance(current, event, number, now)
    marker = Seen(number=number, sha256=event.instance.sha256)
    return Addition(_with(state, assembly), Added.NEW, record, marker)


def complete_request(
    state: StudyAssemblies | None, event: CompletingRequestStored, now: datetime
) -> StudyAssemblies | None:
    """Take in the end of a completing request: its assembly is due at once, unless a new
    instance comes first. The state unchanged (the same object, or None) when no instance of
    that assembly was taken in: the request's instances precede it in the partition, so they
    were all duplicates of what an earlier version holds, or poison."""
    if state is None:
        return None
    current = state.assembly(key_of(event))
    if current is None:
        return state
    return _with(state, current.model_copy(update={"request_completed_at": now}))


def confirmed_completion(assembly: Assembly) -> datetime | None:
    """When a completing request ended after the assembly's newest instance came, or None."""
    completed = assembly.request_completed_at
    return completed if completed is not None and completed >= assembly.last_new_at else None


def _with(state: StudyAssemblies, assembly: Assembly) -> StudyAssemblies:
    return state.model_copy(
        update={"assemblies": {**state.assemblies, assembly.key.slot: assembly}}
    )


def _new_assembly(key: AssemblyKey, event: InstanceStored, number: int, now: datetime) -> Assembly:
    return Assembly(
        study_instance_uid=key.study_instance_uid,
        sender_ura=key.sender_ura,
        recipient_ura=key.recipient_ura,
        correlation_id=event.correlation_id,
        patients=(event.patient,),
        accession_number=event.accession_number,
        study_date=event.study_date,
        study_time=event.study_time,
        study_description=event.study_description,
        institution_name=event.institution_name,
        urgency=event.urgency,
        sender_note=event.sender_note or None,
        instances=number,
        first_received_at=event.occurred_at,
        last_received_at=event.occurred_at,
        last_new_at=now,
        completion_marked_at=now if event.completes_study else None,
    )


def _with_instance(
    current: Assembly, event: InstanceStored, number: int, now: datetime
) -> Assembly:
    patients = current.patients
    if len(patients) < 2 and event.patient not in patients:
        patients = (*patients, event.patient)
    update = {
        "patients": patients,
        "accession_number": current.accession_number or event.accession_number,
        "study_date": current.study_date or event.study_date,
        "study_time": current.study_time or event.study_time,
        "study_description": current.study_description or event.study_description,
        "institution_name": current.institution_name or event.institution_name,
        "urgency": max(current.urgency, event.urgency, key=_URGENCY_RANK.__getitem__),
        "sender_note": event.sender_note or current.sender_note,
        "instances": max(current.instances, number),
        "first_received_at": min(current.first_received_at, event.occurred_at),
        "last_received_at": max(current.last_received_at, event.occurred_at),
        "last_new_at": max(current.last_new_at, now),
        "completion_marked_at": now if event.completes_study else current.completion_marked_at,
    }
    return current.model_copy(update=update)


# --- stability ------------------------------------------------------------------------------------


def ready_at(
    assembly: Assembly, stable_age: timedelta, completion_quiet: timedelta = COMPLETION_QUIET
) -> datetime | None:
    """When the assembly becomes due, or None while it has nothing new to announce."""
    if assembly.unannounced <= 0:
        return None
    completed = confirmed_completion(assembly)
    if completed is not None:
        return completed
    wait = stable_age
    marked = assembly.completion_marked_at
    if marked is not None and marked >= assembly.last_new_at:
        wait = min(completion_quiet, stable_age)
    return assembly.last_new_at + wait


def next_due_at(
    state: StudyAssemblies, stable_age: timedelta, completion_quiet: timedelta = COMPLETION_QUIET
) -> datetime | None:
    """The earliest moment one of the study's assemblies becomes due (None: nothing pending)."""
    times = [ready_at(a, stable_age, completion_quiet) for a in state.assemblies.values()]
    pending = [t for t in times if t is not None]
    return min(pending) if pending else None


def due(
    state: StudyAssemblies,
    now: datetime,
    stable_age: timedelta,
    completion_quiet: timedelta = COMPLETION_QUIET,
) -> list[AssemblyKey]:
    """Assemblies ready to announce: unannounced instances, and stable or marked complete.

    Stable: the last new instance is at least ``stable_age`` old. Marked complete: the newest
    instance came with ``completes_study`` and nothing new came for ``completion_quiet``, or a
    completing request was seen to end (:func:`complete_request`) after the newest instance.
    """
    ready = []
    for assembly in state.assemblies.values():
        at = ready_at(assembly, stable_age, completion_quiet)
        if at is not None and at <= now:
            ready.append(assembly.key)
    return sorted(ready)


# --- announcing -----------------------------------------------------------------------------------


def announce(
    state: StudyAssemblies,
    key: AssemblyKey,
    records: Sequence[InstanceRecord],
    now: datetime,
    producer: str,
) -> tuple[StudyReceived, StudyAssemblies]:
    """The next version's ``study-received`` and the state once it is announced.

    ``records`` are the assembly's record rows, numbered 1 to its count. The event id is derived
    from (study, sender, recipient, version): announcing again after a crash, before the new
    state was stored, produces recognisably the same event.
    """
    assembly = state.assembly(key)
    if assembly is None:
        raise KeyError(f"no assembly {key.slot} for this study")
    if assembly.unannounced <= 0:
        raise ValueError("nothing new to announce")
    study = snapshot(assembly, records, assembly.announced_version + 1)
    event = StudyReceived(
        event_id=study_received_id(key, study.version),
        occurred_at=now,
        correlation_id=assembly.correlation_id,
        producer=producer,
        study=study,
    )
    return event, record_announced(state, study, now)


def record_announced(
    state: StudyAssemblies, study: StudySnapshot, announced_at: datetime
) -> StudyAssemblies:
    """``state`` once ``study`` is announced; an older or repeated version changes nothing.

    Only the first announcement of a version counts: if a version was (re)announced twice with
    different manifests, consumers deduplicating by event id kept the first, so instances only
    the second one listed stay unannounced and go into the next version. A version lists
    instances 1..n of its assembly, so recording it is recording n.
    """
    key = AssemblyKey(study.study_instance_uid, study.sender_ura, study.recipient_ura)
    assembly = state.assembly(key)
    if assembly is None or study.version <= assembly.announced_version:
        return state
    updated = assembly.model_copy(
        update={
            "announced_version": study.version,
            "announced_instances": max(assembly.announced_instances, len(study.instances)),
            "announced_at": announced_at,
        }
    )
    return _with(state, updated)


def snapshot(assembly: Assembly, records: Sequence[InstanceRecord], version: int) -> StudySnapshot:
    """The study as of ``version``: full manifest, what is new, series, reports, the patient."""
    if [r.number for r in records] != list(range(1, assembly.instances + 1)):
        raise ValueError(f"the record rows of {assembly.key.slot} are not 1..{assembly.instances}")
    ordered = sorted(records, key=_manifest_order)
    announced = assembly.announced_instances
    new = [r.instance.sop_instance_uid for r in ordered if r.number > announced]
    return StudySnapshot(
        study_instance_uid=assembly.study_instance_uid,
        version=version,
        sender_ura=assembly.sender_ura,
        recipient_ura=assembly.recipient_ura,
        patient=combined_patient(assembly.patients),
        accession_number=assembly.accession_number,
        study_date=assembly.study_date,
        study_time=assembly.study_time,
        study_description=assembly.study_description,
        institution_name=assembly.institution_name,
        modalities=tuple(sorted({r.modality for r in ordered if r.modality})),
        series=_series(ordered),
        instances=tuple(r.instance for r in ordered),
        new_sop_instance_uids=tuple(new),
        reports=tuple(
            ReportRef(
                sop_instance_uid=r.instance.sop_instance_uid,
                series_instance_uid=r.instance.series_instance_uid,
                kind=REPORT_SOP_CLASSES[r.instance.sop_class_uid],
            )
            for r in ordered
            if r.instance.sop_class_uid in REPORT_SOP_CLASSES
        ),
        urgency=assembly.urgency,
        sender_note=assembly.sender_note,
        first_received_at=assembly.first_received_at,
        last_received_at=assembly.last_received_at,
    )


def combined_patient(patients: Iterable[PatientRef]) -> PatientRef:
    """One reference if every instance agrees; any disagreement (other pseudonyms, or verified
    next to absent/invalid) is CONFLICTING without a pseudonym: someone must look at it."""
    distinct = list(dict.fromkeys(patients))
    if len(distinct) == 1:
        return distinct[0]
    return PatientRef(pseudonym=None, bsn_status=BsnStatus.CONFLICTING)


def _series_order(record: InstanceRecord) -> tuple[bool, int, str]:
    number = record.series_number
    return (number is None, number or 0, record.instance.series_instance_uid)


def _manifest_order(record: InstanceRecord) -> tuple[tuple[bool, int, str], str]:
    # Series by number (unnumbered last), then by UID; instances by SOP Instance UID.
    return (_series_order(record), record.instance.sop_instance_uid)


def _series(ordered: list[InstanceRecord]) -> tuple[SeriesSummary, ...]:
    groups: dict[str, list[InstanceRecord]] = {}
    for record in ordered:
        groups.setdefault(record.instance.series_instance_uid, []).append(record)
    summaries = []
    for uid, members in groups.items():
        summaries.append(
            SeriesSummary(
                series_instance_uid=uid,
                modality=next((m.modality for m in members if m.modality), None),
                series_number=next(
                    (m.series_number for m in members if m.series_number is not None), None
                ),
                series_description=next(
                    (m.series_description for m in members if m.series_description), None
                ),
                number_of_instances=len(members),
            )
        )
    return tuple(summaries)


# --- the rows in a key-value table ----------------------------------------------------------------


class Rows(Protocol):
    """The port to where the rows live: the agent's faust table, or a dict in tests."""

    def get(self, key: bytes, /) -> bytes | None: ...

    def __setitem__(self, key: bytes, value: bytes, /) -> None: ...


def read_state(rows: Rows, study_instance_uid: str) -> StudyAssemblies | None:
    raw = rows.get(study_row_key(study_instance_uid))
    return StudyAssemblies.from_bytes(raw) if raw is not None else None


def take_in(rows: Rows, event: InstanceStored, now: datetime) -> Addition:
    """:func:`add_instance` on ``rows``: reads two rows, writes three (none on a duplicate).

    What is written is the same few hundred bytes for the first and the five-thousandth
    instance of a study: the record, the seen mark and the study row of summaries. The order
    is what the replay rule in :func:`add_instance` relies on.
    """
    key = key_of(event)
    seen_key = seen_row_key(key, event.instance.sop_instance_uid)
    raw_seen = rows.get(seen_key)
    seen = Seen.model_validate_json(raw_seen) if raw_seen is not None else None
    state = read_state(rows, event.study_instance_uid)
    addition = add_instance(state, event, now, seen)
    if addition.record is not None and addition.seen is not None:
        rows[record_row_key(key, addition.record.number)] = (
            addition.record.model_dump_json().encode()
        )
        rows[seen_key] = addition.seen.model_dump_json().encode()
    if addition.state is not state:
        rows[study_row_key(event.study_instance_uid)] = addition.state.to_bytes()
    return addition


def read_records(rows: Rows, assembly: Assembly) -> list[InstanceRecord]:
    """The assembly's record rows 1..count, by key: no scan, whatever else the table holds."""
    key = assembly.key
    records = []
    for number in range(1, assembly.instances + 1):
        raw = rows.get(record_row_key(key, number))
        if raw is None:
            raise LookupError(f"record row {number} of {key.slot} is missing")
        records.append(InstanceRecord.model_validate_json(raw))
    return records
