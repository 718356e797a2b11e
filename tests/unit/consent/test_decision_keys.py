"""The decision worker's re-key reads the patient from a record without decoding the event."""

from __future__ import annotations

import json

from services.consent.entrypoints.decisions import patient_key, patient_key_of_record
from shared.codec import Codec
from shared.events.common import BsnStatus
from tests.factories import make_study, make_study_received


def test_the_key_read_from_a_record_is_the_key_of_the_decoded_event() -> None:
    for status in (BsnStatus.VERIFIED, BsnStatus.INVALID):
        event = make_study_received(study=make_study(bsn_status=status))
        record = Codec().encode(event)
        assert patient_key_of_record(record.value) == patient_key(event)


def test_a_patient_without_pseudonym_is_keyed_by_the_study() -> None:
    event = make_study_received(study=make_study(bsn_status=BsnStatus.ABSENT))
    assert patient_key(event) == event.study.study_instance_uid.encode()


def test_a_record_that_is_not_a_study_has_no_key() -> None:
    for value in (None, b"", b"not json", b"[]", json.dumps({"study": {}}).encode()):
        assert patient_key_of_record(value) is None
