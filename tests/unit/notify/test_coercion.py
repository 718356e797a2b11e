"""Coercing a stored instance for a receiver that imports under the BSN (IHE Import
Reconciliation): where the BSN goes, what is recorded of the original, what never changes."""

import io
from datetime import UTC, datetime

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from services.notify.domain.coercion import CoercionImpossible, coerce
from shared.events import BsnStatus
from shared.events.routing import Coercion
from shared.identifiers import BSN_DICOM_ISSUER, BSN_OID, is_valid_bsn
from tests.dicom_samples import bsn_item, make_dicom_bytes, patient_id_item
from tests.factories import TEST_BSN

OTHER_BSN = "999991772"
BSN_AS_PATIENT_ID = Coercion(
    profile="bsn-as-patient-id", issuer_of_patient_id=BSN_DICOM_ISSUER, universal_entity_id=BSN_OID
)
WHEN = datetime(2025, 3, 14, 9, 26, 53, 123456, tzinfo=UTC)
PIXEL_DATA = 0x7FE00010


def hospital_instance(transfer_syntax: str = ExplicitVRLittleEndian, **attrs: object) -> bytes:
    """The usual case: the hospital's own number as Patient ID, the BSN in Other Patient IDs."""
    attrs.setdefault("patient", patient_id_item("H1234567", "ZNOORD", qualifiers_oid="1.2.3.4"))
    attrs.setdefault("other_patient_ids", [bsn_item(TEST_BSN)])
    return make_dicom_bytes(transfer_syntax=transfer_syntax, **attrs)


def read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def raw_pixel_data(data: bytes) -> bytes:
    """The Pixel Data value exactly as encoded in the file, never decoded."""
    return bytes(read(data).get_item(PIXEL_DATA).value)


def sample_with_bsn(name: str) -> bytes:
    """A pydicom sample file (real compressed pixel data) with fresh UIDs and a BSN."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.update(bsn_item(TEST_BSN))
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def test_the_test_bsns_pass_the_11_proof() -> None:
    assert is_valid_bsn(TEST_BSN)
    assert is_valid_bsn(OTHER_BSN)


def test_profile_none_sends_the_stored_bytes_themselves() -> None:
    data = hospital_instance()

    assert coerce(data, Coercion()) is data


def test_the_bsn_becomes_the_patient_id_with_the_receivers_issuer() -> None:
    data = hospital_instance()

    coerced = read(coerce(data, BSN_AS_PATIENT_ID, modified_at=WHEN))

    assert coerced.PatientID == TEST_BSN
    assert coerced.IssuerOfPatientID == BSN_DICOM_ISSUER
    [qualifier] = coerced.IssuerOfPatientIDQualifiersSequence
    assert (qualifier.UniversalEntityID, qualifier.UniversalEntityIDType) == (BSN_OID, "ISO")
    original = read(data)
    assert coerced.SOPInstanceUID == original.SOPInstanceUID
    assert coerced.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert coerced.OtherPatientIDsSequence == original.OtherPatientIDsSequence
    assert coerced.PatientName == original.PatientName


def test_the_original_attributes_sequence_records_the_replaced_values() -> None:
    coerced = read(
        coerce(
            hospital_instance(),
            BSN_AS_PATIENT_ID,
            source_of_previous_values="Ziekenhuis Noord",
            modified_at=WHEN,
        )
    )

    [record] = coerced.OriginalAttributesSequence
    assert record.AttributeModificationDateTime == "20250314092653.123456+0000"
    assert record.ModifyingSystem == "BEELDPORTAAL"
    assert record.SourceOfPreviousValues == "Ziekenhuis Noord"
    assert record.ReasonForTheAttributeModification == "COERCE"
    [modified] = record.ModifiedAttributesSequence
    assert modified.PatientID == "H1234567"
    assert modified.IssuerOfPatientID == "ZNOORD"
    assert modified.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == "1.2.3.4"
    assert sorted(modified.keys()) == [0x00100020, 0x00100021, 0x00100024]


def test_an_unknown_source_is_recorded_empty_and_absent_originals_as_empty_values() -> None:
    data = hospital_instance(patient=patient_id_item("H7"))  # no issuer, no qualifiers

    [record] = read(coerce(data, BSN_AS_PATIENT_ID)).OriginalAttributesSequence

    assert "SourceOfPreviousValues" in record
    assert record.SourceOfPreviousValues in (None, "")
    [modified] = record.ModifiedAttributesSequence
    assert modified.PatientID == "H7"
    assert modified.IssuerOfPatientID in (None, "")
    assert list(modified.IssuerOfPatientIDQualifiersSequence) == []


def test_an_existing_original_attributes_sequence_is_appended_to() -> None:
    earlier = Dataset()
    earlier.ModifyingSystem = "SENDER-PACS"
    earlier.ReasonForTheAttributeModification = "CORRECT"
    earlier.ModifiedAttributesSequence = Sequence([Dataset()])
    data = hospital_instance(OriginalAttributesSequence=Sequence([earlier]))

    records = read(coerce(data, BSN_AS_PATIENT_ID)).OriginalAttributesSequence

    assert [r.ModifyingSystem for r in records] == ["SENDER-PACS", "BEELDPORTAAL"]
    assert records[0].ReasonForTheAttributeModification == "CORRECT"


def test_a_bsn_already_in_place_leaves_the_bytes_untouched() -> None:
    data = make_dicom_bytes(patient=bsn_item(TEST_BSN))

    assert coerce(data, BSN_AS_PATIENT_ID) is data


def test_coercing_twice_records_once() -> None:
    once = coerce(hospital_instance(), BSN_AS_PATIENT_ID)

    assert coerce(once, BSN_AS_PATIENT_ID) is once


def test_issuer_values_the_profile_does_not_state_are_removed_and_recorded() -> None:
    bare = Coercion(profile="bsn-as-patient-id")

    coerced = read(coerce(hospital_instance(), bare))

    assert coerced.PatientID == TEST_BSN
    assert "IssuerOfPatientID" not in coerced
    assert "IssuerOfPatientIDQualifiersSequence" not in coerced
    [modified] = coerced.OriginalAttributesSequence[0].ModifiedAttributesSequence
    assert modified.IssuerOfPatientID == "ZNOORD"


def test_without_keep_originals_nothing_is_recorded() -> None:
    profile = BSN_AS_PATIENT_ID.model_copy(update={"keep_originals": False})

    coerced = read(coerce(hospital_instance(), profile))

    assert coerced.PatientID == TEST_BSN
    assert "OriginalAttributesSequence" not in coerced


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        RLELossless,
    ],
    ids=lambda s: s.name,
)
def test_pixel_data_and_transfer_syntax_stay_as_stored(syntax: str) -> None:
    data = hospital_instance(syntax)

    coerced = coerce(data, BSN_AS_PATIENT_ID)

    assert read(coerced).file_meta.TransferSyntaxUID == syntax
    assert raw_pixel_data(coerced) == raw_pixel_data(data)
    if syntax != DeflatedExplicitVRLittleEndian:
        # Pixel Data is the last element: the files end in the same bytes from its value on.
        old = read(data).get_item(PIXEL_DATA).value_tell
        new = read(coerced).get_item(PIXEL_DATA).value_tell
        assert coerced[new:] == data[old:]


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"])
def test_real_compressed_pixel_data_is_byte_identical(name: str) -> None:
    data = sample_with_bsn(name)

    coerced = coerce(data, BSN_AS_PATIENT_ID)

    assert read(coerced).PatientID == TEST_BSN
    assert raw_pixel_data(coerced) == raw_pixel_data(data)
    assert read(coerced).file_meta.TransferSyntaxUID == read(data).file_meta.TransferSyntaxUID


@pytest.mark.parametrize(
    ("patient", "others", "status"),
    [
        (patient_id_item("H1234567", "ZNOORD"), [], BsnStatus.ABSENT),
        (patient_id_item("999990071", BSN_DICOM_ISSUER), [], BsnStatus.INVALID),
        (bsn_item(TEST_BSN), [bsn_item(OTHER_BSN)], BsnStatus.CONFLICTING),
    ],
    ids=["absent", "fails-11-proof", "two-bsns"],
)
def test_without_one_valid_bsn_coercion_is_impossible_and_says_so_without_digits(
    patient: Dataset, others: list[Dataset], status: BsnStatus
) -> None:
    data = make_dicom_bytes(patient=patient, other_patient_ids=others)

    with pytest.raises(CoercionImpossible) as caught:
        coerce(data, BSN_AS_PATIENT_ID)

    assert caught.value.bsn_status is status
    assert status.value in caught.value.reason
    assert not any(digits in caught.value.reason for digits in (TEST_BSN, OTHER_BSN, "999990071"))


def test_bytes_that_are_not_dicom_cannot_be_coerced() -> None:
    with pytest.raises(CoercionImpossible, match="not a readable DICOM file"):
        coerce(b"\0" * 128 + b"NOPE", BSN_AS_PATIENT_ID)


def test_profile_none_does_not_even_read_the_bytes() -> None:
    assert coerce(b"not dicom at all", Coercion()) == b"not dicom at all"


def test_a_source_of_previous_values_must_fit_an_lo() -> None:
    with pytest.raises(ValueError):
        coerce(hospital_instance(), BSN_AS_PATIENT_ID, source_of_previous_values="x" * 65)


def test_a_naive_modification_time_is_refused() -> None:
    with pytest.raises(ValueError):
        coerce(hospital_instance(), BSN_AS_PATIENT_ID, modified_at=datetime(2025, 1, 1))
