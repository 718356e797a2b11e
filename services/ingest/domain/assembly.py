"""Study assembly: collect instance-stored per study and decide when and what to announce.

DICOM has no "study complete" signal (design.md). A study is announced once it is *stable*: no
new instance for the stable age, or sooner when the sender said a request completes the study.
Instances that arrive after an announcement make a follow-up version listing which are new.

Pure rules, no faust: the state is a frozen pydantic value that the assembly agent keeps as JSON
in a faust table keyed by Study Instance UID. One table value holds every assembly of the study,
because the same study sent by one sender to two recipients is assembled (and announced) twice.

Two clocks, on purpose: ``received_at`` of an instance is when ingest stored it (the event's
``occurred_at``) and is what ``study-received`` reports; stability is measured on the assembler's
own clock (``now`` when it first sees an instance), so consumer lag can never make a
half-consumed study look stable.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Literal, NamedTuple

from pydantic import AwareDatetime, Field

from shared.events import (
    REPORT_SOP_CLASSES,
    BsnStatus,
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

# A completes_study mark announces the study once no new instance came for this long (capped at
# the stable age). Ingest flags *every* instance of the completing request and publishes them as
# their bytes are stored, so without a short quiet period the first flagged instance would
# announce a partial study and the rest of the request would follow as version 2.
COMPLETION_QUIET = timedelta(seconds=2)

# uuid5 namespace of study-received event ids: (study, sender, recipient, version) -> event id.
STUDY_RECEIVED_NAMESPACE = uuid.UUID("3b0f6e2a-9d51-4c7e-8a0c-5f7d1e2b9c44")

_URGENCY_RANK = {Urgency.ROUTINE: 0, Urgency.URGENT: 1, Urgency.EMERGENCY: 2}


class AssemblyKey(NamedTuple):
    """One assembly: a study as sent by one sender to one recipient."""

    study_instance_uid: str
    sender_ura: str
    recipient_ura: str

    @property
    def slot(self) -> str:
        """The assembly's key inside its study's table value (JSON object keys are strings)."""
        return f"{self.sender_ura}>{self.recipient_ura}"


class Added(StrEnum):
    """What adding one instance-stored did to the state."""

    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing changes
    CONFLICT = "conflict"  # same SOP Instance UID, other bytes: the first is kept, counted


class ReceivedInstance(Model):
    """One instance of an assembly with the per-instance attributes the snapshot needs."""

    instance: InstanceRef
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    # When ingest stored it (the instance-stored event's occurred_at).
    received_at: AwareDatetime
    # The version that first listed it; None while it is not announced yet.
    announced_in: int | None = None


class Assembly(Model):
    """The state of one (study, sender, recipient): everything needed to build the snapshot."""

    study_instance_uid: str
    sender_ura: str
    recipient_ura: str
    # The correlation id of the first instance: follows every version of this assembly.
    correlation_id: str
    # Distinct patient references in first-seen order (more than one is a conflict).
    patients: tuple[PatientRef, ...]
    # Study-level attributes: each from the first instance that has it.
    accession_number: str | None = None
    study_date: date | None = None
    study_time: str | None = None
    study_description: str | None = None
    institution_name: str | None = None
    urgency: Urgency = Urgency.ROUTINE
    # The latest non-empty note, in the order the instances were consumed.
    sender_note: str | None = None
    # By SOP Instance UID, in the order they were consumed.
    instances: dict[str, ReceivedInstance]
    first_received_at: AwareDatetime
    last_received_at: AwareDatetime
    # Assembler clock: when the last new instance was seen, and the last completes_study mark.
    last_new_at: AwareDatetime
    completion_marked_at: AwareDatetime | None = None
    # Same SOP Instance UID with other bytes (ingest refuses that, so this stays 0).
    conflicts: int = Field(default=0, ge=0)
    announced_version: int = Field(default=0, ge=0)
    announced_at: AwareDatetime | None = None

    @property
    def key(self) -> AssemblyKey:
        return AssemblyKey(self.study_instance_uid, self.sender_ura, self.recipient_ura)

    @property
    def unannounced(self) -> list[str]:
        return [uid for uid, inst in self.instances.items() if inst.announced_in is None]


class StudyAssemblies(Model):
    """The table value of one Study Instance UID: its assemblies by ``AssemblyKey.slot``."""

    # Version of this stored layout, for a migration when it ever changes.
    layout: Literal[1] = 1
    study_instance_uid: str
    assemblies: dict[str, Assembly] = Field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> StudyAssemblies:
        return cls.model_validate_json(raw)

    def assembly(self, key: AssemblyKey) -> Assembly | None:
        return self.assemblies.get(key.slot)


def key_of(event: InstanceStored) -> AssemblyKey:
    return AssemblyKey(event.study_instance_uid, event.sender_ura, event.recipient_ura)


def study_received_id(key: AssemblyKey, version: int) -> uuid.UUID:
    """Deterministic: announcing the same version again (after a crash) is the same event."""
    name = f"{key.study_instance_uid}|{key.sender_ura}|{key.recipient_ura}|{version}"
    return uuid.uuid5(STUDY_RECEIVED_NAMESPACE, name)


# --- adding instances -----------------------------------------------------------------------------


def add(state: StudyAssemblies | None, event: InstanceStored, now: datetime) -> StudyAssemblies:
    """``state`` with ``event`` taken in; a duplicate returns ``state`` itself, unchanged."""
    return add_instance(state, event, now)[0]


def add_instance(
    state: StudyAssemblies | None, event: InstanceStored, now: datetime
) -> tuple[StudyAssemblies, Added]:
    """Like :func:`add`, also saying whether the instance was new, a duplicate or a conflict.

    A duplicate (redelivery, or a sender sending again) changes nothing at all, its flags
    included: it must not postpone stability, and what it says was said by the first copy.
    """
    if state is None:
        state = StudyAssemblies(study_instance_uid=event.study_instance_uid)
    elif state.study_instance_uid != event.study_instance_uid:
        raise ValueError("instance belongs to another study than this state")
    key = key_of(event)
    current = state.assembly(key)
    received = ReceivedInstance(
        instance=event.instance,
        modality=event.modality,
        series_number=event.series_number,
        series_description=event.series_description,
        received_at=event.occurred_at,
    )
    if current is None:
        assembly = _new_assembly(key, event, received, now)
        outcome = Added.NEW
    else:
        known = current.instances.get(event.instance.sop_instance_uid)
        if known is not None:
            if known.instance.sha256 == event.instance.sha256:
                return state, Added.DUPLICATE
            assembly = current.model_copy(update={"conflicts": current.conflicts + 1})
            outcome = Added.CONFLICT
        else:
            assembly = _with_instance(current, event, received, now)
            outcome = Added.NEW
    assemblies = {**state.assemblies, key.slot: assembly}
    return state.model_copy(update={"assemblies": assemblies}), outcome


def _new_assembly(
    key: AssemblyKey, event: InstanceStored, received: ReceivedInstance, now: datetime
) -> Assembly:
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
        instances={event.instance.sop_instance_uid: received},
        first_received_at=event.occurred_at,
        last_received_at=event.occurred_at,
        last_new_at=now,
        completion_marked_at=now if event.completes_study else None,
    )


def _with_instance(
    current: Assembly, event: InstanceStored, received: ReceivedInstance, now: datetime
) -> Assembly:
    patients = current.patients
    if event.patient not in patients:
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
        "instances": {**current.instances, event.instance.sop_instance_uid: received},
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
    if not assembly.unannounced:
        return None
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
    instance came with ``completes_study`` and nothing new came for ``completion_quiet``.
    """
    ready = []
    for assembly in state.assemblies.values():
        at = ready_at(assembly, stable_age, completion_quiet)
        if at is not None and at <= now:
            ready.append(assembly.key)
    return sorted(ready)


# --- announcing -----------------------------------------------------------------------------------


def announce(
    state: StudyAssemblies, key: AssemblyKey, now: datetime, producer: str
) -> tuple[StudyReceived, StudyAssemblies]:
    """The next version's ``study-received`` and the state once it is announced.

    The event id is derived from (study, sender, recipient, version): announcing again after a
    crash, before the new state was stored, produces recognisably the same event.
    """
    assembly = state.assembly(key)
    if assembly is None:
        raise KeyError(f"no assembly {key.slot} for this study")
    if not assembly.unannounced:
        raise ValueError("nothing new to announce")
    study = snapshot(assembly, assembly.announced_version + 1)
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
    the second one listed stay unannounced and go into the next version.
    """
    key = AssemblyKey(study.study_instance_uid, study.sender_ura, study.recipient_ura)
    assembly = state.assembly(key)
    if assembly is None or study.version <= assembly.announced_version:
        return state
    listed = {ref.sop_instance_uid for ref in study.instances}
    instances = {
        uid: (
            inst.model_copy(update={"announced_in": study.version})
            if inst.announced_in is None and uid in listed
            else inst
        )
        for uid, inst in assembly.instances.items()
    }
    updated = assembly.model_copy(
        update={
            "instances": instances,
            "announced_version": study.version,
            "announced_at": announced_at,
        }
    )
    return state.model_copy(update={"assemblies": {**state.assemblies, key.slot: updated}})


def snapshot(assembly: Assembly, version: int) -> StudySnapshot:
    """The study as of ``version``: full manifest, what is new, series, reports, the patient."""
    ordered = sorted(assembly.instances.values(), key=_manifest_order)
    new = [r.instance.sop_instance_uid for r in ordered if r.announced_in is None]
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


def _series_order(received: ReceivedInstance) -> tuple[bool, int, str]:
    number = received.series_number
    return (number is None, number or 0, received.instance.series_instance_uid)


def _manifest_order(received: ReceivedInstance) -> tuple[tuple[bool, int, str], str]:
    # Series by number (unnumbered last), then by UID; instances by SOP Instance UID.
    return (_series_order(received), received.instance.sop_instance_uid)


def _series(ordered: list[ReceivedInstance]) -> tuple[SeriesSummary, ...]:
    groups: dict[str, list[ReceivedInstance]] = {}
    for received in ordered:
        groups.setdefault(received.instance.series_instance_uid, []).append(received)
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
