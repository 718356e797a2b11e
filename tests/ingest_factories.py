"""Factories for ingest tests: instance-stored events of one study, as a sender would split it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

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
                study_instance_uid=study,
                series_instance_uid=series,
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
