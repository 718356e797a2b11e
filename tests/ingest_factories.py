"""Factories for ingest tests: a study's instance-stored events as a sender splits them, tables."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from services.ingest.domain.assembly import (
    KEY_SEPARATOR,
    Seen,
    StudyAssemblies,
    key_of,
    seen_row_key,
    study_row_key,
)
from shared.events import InstanceStored, PatientRef
from tests.factories import (
    RECIPIENT_URA,
    SENDER_URA,
    T0,
    make_envelope,
    make_instance_ref,
    make_instance_stored,
    make_patient,
    make_uid,
)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


def make_study_instances(
    count: int,
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    patient: PatientRef | None = None,
    correlation_id: str | None = None,
    occurred_at: datetime = T0,
    sender_ura: str = SENDER_URA,
    recipient_ura: str = RECIPIENT_URA,
    sop_class_uid: str | None = None,
    **overrides: Any,
) -> list[InstanceStored]:
    """``count`` instance-stored events of one study and series, one patient, one request.

    Each instance has its own bytes (so its own sha256); ``overrides`` go to every event.
    """
    study = make_uid() if study_instance_uid is None else study_instance_uid
    series = make_uid() if series_instance_uid is None else series_instance_uid
    patient = make_patient() if patient is None else patient
    correlation_id = correlation_id or make_envelope()["correlation_id"]
    ref_fields = {} if sop_class_uid is None else {"sop_class_uid": sop_class_uid}
    return [
        make_instance_stored(
            study_instance_uid=study,
            instance=make_instance_ref(
                series_instance_uid=series,
                sender_ura=sender_ura,
                data=f"{series} instance {i}".encode(),
                **ref_fields,
            ),
            patient=patient,
            correlation_id=correlation_id,
            occurred_at=occurred_at,
            sender_ura=sender_ura,
            recipient_ura=recipient_ura,
            **overrides,
        )
        for i in range(count)
    ]


def copy_of(event: InstanceStored, **overrides: Any) -> InstanceStored:
    """The same instance announced again (a redelivery or a resend), with a fresh event id."""
    fields = event.model_dump()
    fields.pop("event_id")
    fields.update(overrides)
    return InstanceStored(**fields)


class AssemblyTable(dict[bytes, bytes]):
    """The assembly agent's table as a dict that keeps its writes in order: its changelog."""

    def __init__(self) -> None:
        super().__init__()
        self.changelog: list[tuple[bytes, bytes]] = []

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.changelog.append((key, value))
        super().__setitem__(key, value)

    @classmethod
    def restored(cls, changelog: Iterable[tuple[bytes, bytes]]) -> AssemblyTable:
        """What recovery rebuilds from ``changelog`` (e.g. the prefix a crash left)."""
        table = cls()
        for key, value in changelog:
            table[key] = value
        return table

    def state(self, study_instance_uid: str | None = None) -> StudyAssemblies:
        """The study row of ``study_instance_uid``, or of the only study in the table."""
        if study_instance_uid is None:
            [study_instance_uid] = {k.decode() for k in self if KEY_SEPARATOR.encode() not in k}
        raw = self[study_row_key(study_instance_uid)]
        return StudyAssemblies.from_bytes(raw)

    def written_since(self, mark: int) -> int:
        """Bytes (keys and values) written to the changelog since it had ``mark`` records."""
        return sum(len(k) + len(v) for k, v in self.changelog[mark:])

    def seen(self, event: InstanceStored) -> Seen | None:
        """The seen row of ``event``'s instance in its assembly, if any."""
        raw = self.get(seen_row_key(key_of(event), event.instance.sop_instance_uid))
        return Seen.model_validate_json(raw) if raw is not None else None
