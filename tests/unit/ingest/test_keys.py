"""Object keys for received instances: sender and SOP Instance UID, and nothing personal."""

import dataclasses
import io

import pytest
from pydantic import TypeAdapter

from services.ingest.domain.dicom import InstanceHeader, read_header
from services.ingest.domain.keys import object_key
from shared.events.common import ObjectKey
from tests.dicom_samples import bsn_item, make_dicom_bytes

SENDER_URA = "12345678"


def header(**attrs: object) -> InstanceHeader:
    data = make_dicom_bytes(**attrs)
    return read_header(io.BytesIO(data), len(data))


def test_the_key_is_sender_and_instance() -> None:
    h = header()
    assert object_key(SENDER_URA, h) == f"{SENDER_URA}/{h.sop_instance_uid}.dcm"


def test_an_instance_named_in_another_series_or_study_has_the_same_key() -> None:
    # So that the same SOP Instance UID with other content finds the first copy and is refused.
    h = header()
    moved = dataclasses.replace(h, series_instance_uid="1.2.3.4", study_instance_uid="1.2.3.5")
    assert object_key(SENDER_URA, moved) == object_key(SENDER_URA, h)


def test_the_key_is_a_valid_object_key_for_the_events() -> None:
    key = object_key(SENDER_URA, header())
    assert TypeAdapter(ObjectKey).validate_python(key) == key


def test_the_key_holds_no_patient_data() -> None:
    h = header(patient=bsn_item("999990019"), PatientName="Jansen^Anna")
    key = object_key(SENDER_URA, h)
    assert "999990019" not in key
    assert "Jansen" not in key


def test_two_senders_reusing_a_uid_get_different_keys() -> None:
    h = header()
    assert object_key("12345678", h) != object_key("87654321", h)


def test_uids_of_the_maximum_length_fit_in_a_key() -> None:
    uid = "1." + "2" * 62
    h = dataclasses.replace(
        header(), study_instance_uid=uid, series_instance_uid=uid, sop_instance_uid=uid
    )
    assert object_key(SENDER_URA, h) == f"{SENDER_URA}/{uid}.dcm"


@pytest.mark.parametrize("ura", ["1234567", "123456789", "abcdefgh", "1234567/", "../12345"])
def test_a_sender_ura_that_is_not_eight_digits_is_refused(ura: str) -> None:
    with pytest.raises(ValueError, match="URA"):
        object_key(ura, header())


@pytest.mark.parametrize(
    ("field", "uid"),
    [
        ("sop_instance_uid", "../../etc"),
        ("sop_instance_uid", "1.2/3.4"),
        ("sop_instance_uid", ".."),
        ("sop_instance_uid", "1.2.03"),
        ("sop_instance_uid", "1." + "2" * 63),
    ],
)
def test_a_uid_that_is_not_valid_never_becomes_part_of_a_key(field: str, uid: str) -> None:
    h = dataclasses.replace(header(), **{field: uid})
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        object_key(SENDER_URA, h)
