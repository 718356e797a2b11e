"""Reading a received instance's header: every pydicom sample classified, every rule checked."""

from __future__ import annotations

import dataclasses
import io
import struct
import tracemalloc
import warnings
import zlib
from datetime import date
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    HEVCMP51,
    JPEG2000,
    MPEG2MPML,
    MPEG4HP41,
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EncapsulatedPDFStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from services.ingest.domain import dicom as dicom_module
from services.ingest.domain.dicom import (
    MAX_ATTRIBUTE_BYTES,
    InstanceHeader,
    Rejected,
    read_header,
)
from services.ingest.domain.status import Status
from shared.events import ReportKind
from tests.dicom_samples import (
    MALFORMED,
    PYDICOM_DATA,
    WELL_FORMED_NAMES,
    bsn_item,
    encode_file_meta,
    is_well_formed,
    lenient_writing,
    make_dataset,
    make_dicom_bytes,
    malformed_samples,
    patient_id_item,
    shipped_files,
    unparsable,
    well_formed_samples,
    write_large_dicom,
)
from tests.factories import make_instance_ref, make_instance_stored

A900 = Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
C000 = Status.CANNOT_UNDERSTAND


def read(data: bytes) -> InstanceHeader:
    return read_header(io.BytesIO(data), len(data))


def rejection(data: bytes) -> Rejected:
    with pytest.raises(Rejected) as caught:
        read(data)
    return caught.value


# --- Every file pydicom ships --------------------------------------------------------------------


def test_the_classification_table_names_every_shipped_file_exactly_once() -> None:
    shipped = set(shipped_files())
    assert not set(MALFORMED) - shipped, "table names files pydicom no longer ships"
    assert not set(WELL_FORMED_NAMES) - shipped, "table names files pydicom no longer ships"
    unclassified = {name for name in shipped if name not in MALFORMED and not is_well_formed(name)}
    assert not unclassified, "pydicom ships files the table does not classify"
    assert not {name for name in MALFORMED if is_well_formed(name)}


def test_the_sample_helpers_cover_every_shipped_file() -> None:
    paths = [path for path, _ in well_formed_samples() + malformed_samples()]
    assert sorted(path.relative_to(PYDICOM_DATA).as_posix() for path in paths) == shipped_files()
    assert {status for _, status in well_formed_samples()} == {Status.SUCCESS}
    assert Status.SUCCESS not in {status for _, status in malformed_samples()}


@pytest.mark.parametrize("name", shipped_files())
def test_each_shipped_file_gets_the_outcome_in_the_table(name: str) -> None:
    path = PYDICOM_DATA / name
    with path.open("rb") as fp:
        if name not in MALFORMED:
            header = read_header(fp, path.stat().st_size)
            assert header.sop_instance_uid
            return
        with pytest.raises(Rejected) as caught:
            read_header(fp, path.stat().st_size)
    status, reason = MALFORMED[name]
    assert (caught.value.status, reason in caught.value.reason) == (status, True), caught.value


def test_known_defects_of_pydicom_samples_are_named_in_the_reason() -> None:
    def reason(name: str) -> str:
        path = PYDICOM_DATA / "test_files" / name
        with pytest.raises(Rejected) as caught, path.open("rb") as fp:
            read_header(fp, path.stat().st_size)
        return f"{caught.value.status.name}: {caught.value.reason}"

    assert reason("MR_truncated.dcm") == (
        "CANNOT_UNDERSTAND: the file is truncated: element (7FE0,0010) at 1488 runs past its end"
    )
    assert reason("no_meta.dcm").startswith("CANNOT_UNDERSTAND: not a DICOM Part 10 file")
    assert "invalid VR" in reason("SC_rgb_jpeg.dcm")


@pytest.mark.parametrize("path", [path for path, _ in well_formed_samples()], ids=str)
def test_header_values_agree_with_pydicom_reading_the_whole_file(path: Path) -> None:
    with path.open("rb") as fp:
        header = read_header(fp, path.stat().st_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own complaints about sample values
        ds = pydicom.dcmread(path)

        def text(keyword: str, limit: int) -> str | None:
            value = str(ds.get(keyword) or "").strip()
            return value[:limit].rstrip() or None

        def number(keyword: str) -> int | None:
            return int(ds[keyword].value) if ds.get(keyword) not in (None, "") else None

        expected = {
            "sop_class_uid": ds.SOPClassUID,
            "sop_instance_uid": ds.SOPInstanceUID,
            "study_instance_uid": ds.StudyInstanceUID,
            "series_instance_uid": ds.SeriesInstanceUID,
            "transfer_syntax_uid": ds.file_meta.TransferSyntaxUID,
            "modality": text("Modality", 16),
            "accession_number": text("AccessionNumber", 16),
            "study_description": text("StudyDescription", 64),
            "institution_name": text("InstitutionName", 64),
            "series_description": text("SeriesDescription", 64),
            # In its standard form: without the colons of an ACR-NEMA time.
            "study_time": (text("StudyTime", 16) or "").replace(":", "") or None,
            "series_number": number("SeriesNumber"),
            "instance_number": number("InstanceNumber"),
        }
    assert {key: getattr(header, key) for key in expected} == expected


# --- What is read --------------------------------------------------------------------------------


def test_a_ct_instance_yields_its_identity_and_descriptive_attributes() -> None:
    data = make_dicom_bytes(
        SOPInstanceUID="1.2.3.4.5",
        StudyInstanceUID="1.2.3.4",
        SeriesInstanceUID="1.2.3.4.6",
        StudyDate="20240102",
        StudyTime="101500.25",
        AccessionNumber="ACC0001",
        Modality="CT",
        InstitutionName="Ziekenhuis Noord",
        StudyDescription="CT thorax",
        SeriesDescription="Axiaal 1 mm",
        SeriesNumber=2,
        InstanceNumber=7,
    )
    header = read(data)
    assert dataclasses.asdict(header) == {
        "sop_class_uid": CTImageStorage,
        "sop_instance_uid": "1.2.3.4.5",
        "study_instance_uid": "1.2.3.4",
        "series_instance_uid": "1.2.3.4.6",
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "patient": {"status": "absent", "bsn": None, "claims": frozenset()},
        "modality": "CT",
        "study_date": date(2024, 1, 2),
        "study_time": "101500.25",
        "accession_number": "ACC0001",
        "study_description": "CT thorax",
        "institution_name": "Ziekenhuis Noord",
        "series_number": 2,
        "series_description": "Axiaal 1 mm",
        "instance_number": 7,
        "report_kind": None,
        # preamble + "DICM" + the group length element (12 bytes) + the group it measures
        "data_set_offset": 132
        + 12
        + pydicom.dcmread(io.BytesIO(data)).file_meta.FileMetaInformationGroupLength,
    }


@pytest.mark.parametrize(
    ("sop_class", "kind"),
    [(BasicTextSRStorage, ReportKind.STRUCTURED_REPORT), (EncapsulatedPDFStorage, ReportKind.PDF)],
)
def test_reports_are_recognised_by_their_sop_class(sop_class: str, kind: ReportKind) -> None:
    assert read(make_dicom_bytes(sop_class_uid=sop_class)).report_kind is kind


def test_optional_attributes_that_are_absent_are_none() -> None:
    absent = ["StudyDate", "StudyTime", "AccessionNumber", "Modality", "InstitutionName"]
    absent += ["StudyDescription", "SeriesDescription", "SeriesNumber", "InstanceNumber"]
    header = read(make_dicom_bytes(**dict.fromkeys(absent)))
    assert (header.study_date, header.modality, header.series_number) == (None, None, None)
    assert header.accession_number is header.study_description is header.institution_name is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240229", date(2024, 2, 29)),
        ("2024.01.02", date(2024, 1, 2)),
        ("20230229", None),
        ("20241301", None),
        ("2024-01-02", None),
        ("01-02-2024", None),
        ("", None),
    ],
)
def test_an_invalid_study_date_becomes_none(value: str, expected: date | None) -> None:
    assert read(make_dicom_bytes(StudyDate=value)).study_date == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1015", "1015"),
        ("10:15:00", "101500"),  # the standard form: ordered as text
        ("101500.123456", "101500.123456"),
        ("10h15", None),
        ("101500.1234567", None),
        ("", None),
    ],
)
def test_a_study_time_is_kept_in_its_standard_form_and_an_invalid_one_becomes_none(
    value: str, expected: str | None
) -> None:
    assert read(make_dicom_bytes(StudyTime=value)).study_time == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("12", 12), (" +3 ", 3), ("-1", -1), ("1A", None), ("99999999999", None)],
)
def test_series_and_instance_numbers_are_integers_or_none(value: str, expected: int | None) -> None:
    data = make_dicom_bytes(
        SeriesNumber=unparsable("SeriesNumber", value),
        InstanceNumber=unparsable("InstanceNumber", value),
    )
    header = read(data)
    assert (header.series_number, header.instance_number) == (expected, expected)


def test_text_is_stripped_and_cut_to_the_event_field_limits() -> None:
    header = read(
        make_dicom_bytes(
            AccessionNumber="  A" + "1" * 30,
            StudyDescription="S" * 100,
            InstitutionName=" " + "I" * 63 + " x",
            SeriesDescription="  padded  ",
            Modality="  MR ",
        )
    )
    assert header.accession_number == "A" + "1" * 15
    assert header.study_description == "S" * 64
    assert header.institution_name == "I" * 63
    assert header.series_description == "padded"
    assert header.modality == "MR"


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 100", "Sint Maartenskliniek Nijmegen-Süd"),
        ("ISO_IR 192", "Ziekenhuis Gelderse Vallei — Ede"),
        (None, "Amsterdam UMC"),
    ],
)
def test_text_is_decoded_in_the_declared_character_set(charset: str | None, name: str) -> None:
    header = read(make_dicom_bytes(SpecificCharacterSet=charset, InstitutionName=name))
    assert header.institution_name == name


def test_header_values_fit_the_instance_stored_event() -> None:
    header = read(
        make_dicom_bytes(
            AccessionNumber="A" * 16,
            StudyDescription="S" * 64,
            InstitutionName="I" * 64,
            SeriesDescription="D" * 64,
        )
    )
    ref = make_instance_ref(
        series_instance_uid=header.series_instance_uid,
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        transfer_syntax_uid=header.transfer_syntax_uid,
    )
    event = make_instance_stored(
        instance=ref,
        study_instance_uid=header.study_instance_uid,
        accession_number=header.accession_number,
        study_date=header.study_date,
        study_time=header.study_time,
        study_description=header.study_description,
        institution_name=header.institution_name,
        modality=header.modality,
        series_number=header.series_number,
        series_description=header.series_description,
    )
    assert event.study_description == "S" * 64


def test_the_file_is_left_at_its_start_for_whoever_stores_it_next() -> None:
    data = make_dicom_bytes()
    fp = io.BytesIO(data)
    fp.seek(100)
    read_header(fp, len(data))
    assert fp.tell() == 0
    fp.seek(50)
    with pytest.raises(Rejected):
        read_header(fp, 10)
    assert fp.tell() == 0


# --- Transfer syntaxes ---------------------------------------------------------------------------

ACCEPTED = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    RLELossless,
    MPEG2MPML,
    MPEG4HP41,
    HEVCMP51,
]


def test_control_characters_inside_a_text_become_spaces() -> None:
    # Not allowed in LO or SH, and a NUL cannot be stored in a PostgreSQL text column at all.
    with lenient_writing():
        data = make_dicom_bytes(
            StudyDescription="CT\x00thorax\x07",
            InstitutionName="\x01Oost",
            AccessionNumber="A\x7f1",
        )
    header = read(data)
    assert (header.study_description, header.institution_name, header.accession_number) == (
        "CT thorax",
        "Oost",
        "A 1",
    )


@pytest.mark.parametrize("syntax", ACCEPTED, ids=lambda uid: UID(uid).name)
def test_common_transfer_syntaxes_are_accepted_as_received(syntax: str) -> None:
    header = read(make_dicom_bytes(transfer_syntax=syntax, StudyDescription="CT thorax"))
    assert header.transfer_syntax_uid == syntax
    assert header.study_description == "CT thorax"


@pytest.mark.parametrize(
    "syntax",
    [
        "1.2.840.10008.1.2.4.94",  # JPIP Referenced: the pixels are elsewhere
        "1.2.840.10008.1.2.4.204",  # JPIP HTJ2K Referenced
        "1.2.840.10008.1.2.7.1",  # SMPTE ST 2110-20: real-time video only
        "1.2.840.113619.5.2",  # GE private implicit big endian
        "1.2.3.4.5",
    ],
)
def test_unknown_or_unstorable_transfer_syntaxes_are_not_supported(syntax: str) -> None:
    error = rejection(make_dicom_bytes(file_meta={"TransferSyntaxUID": syntax}))
    assert error.status is Status.TRANSFER_SYNTAX_NOT_SUPPORTED
    assert syntax in error.reason


def test_a_missing_transfer_syntax_is_named() -> None:
    error = rejection(make_dicom_bytes(file_meta={"TransferSyntaxUID": None}))
    assert (error.status, error.reason) == (A900, "Transfer Syntax UID (0002,0010) is missing")


def test_a_transfer_syntax_that_is_not_a_uid_is_named_but_not_echoed() -> None:
    error = rejection(make_dicom_bytes(file_meta={"TransferSyntaxUID": "1.2.840.10008.1.2.01"}))
    assert (error.status, error.reason) == (
        A900,
        "Transfer Syntax UID (0002,0010) is not a valid UID",
    )


# --- Required attributes and their consistency -----------------------------------------------

REQUIRED = [
    ("SOPClassUID", "SOP Class UID (0008,0016)"),
    ("SOPInstanceUID", "SOP Instance UID (0008,0018)"),
    ("StudyInstanceUID", "Study Instance UID (0020,000D)"),
    ("SeriesInstanceUID", "Series Instance UID (0020,000E)"),
]


@pytest.mark.parametrize(("keyword", "name"), REQUIRED)
def test_a_missing_required_uid_is_named(keyword: str, name: str) -> None:
    error = rejection(make_dicom_bytes(**{keyword: None}))
    assert (error.status, error.reason) == (A900, f"{name} is missing")


@pytest.mark.parametrize(("keyword", "name"), REQUIRED)
@pytest.mark.parametrize(
    "bad_uid",
    ["1.2.03", "12345", "1.2.abc", "1.2.", "1..2", ".1.2", "1.2 .3", "1." + "2" * 63],
)
def test_a_required_uid_with_invalid_syntax_is_named_but_not_echoed(
    keyword: str, name: str, bad_uid: str
) -> None:
    # File Meta copies removed: a mismatch must not be what rejects it.
    meta = {"MediaStorageSOPClassUID": None, "MediaStorageSOPInstanceUID": None}
    error = rejection(make_dicom_bytes(file_meta=meta, **{keyword: bad_uid}))
    assert (error.status, error.reason) == (A900, f"{name} is not a valid UID")


def test_uid_padding_with_a_trailing_nul_is_not_part_of_the_uid() -> None:
    header = read(make_dicom_bytes(StudyInstanceUID="1.2.3"))  # written as "1.2.3\0"
    assert header.study_instance_uid == "1.2.3"


@pytest.mark.parametrize(
    "sop_class",
    [
        "1.2.840.10008.1.1",  # Verification: not storage
        "1.2.840.10008.5.1.4.39.1",  # Color Palette Storage: a non-patient object
        "1.2.840.10008.1.3.10",  # Media Storage Directory (DICOMDIR)
        "1.2.826.0.1.3680043.2.1.999",  # a private class nobody registered
    ],
)
def test_a_sop_class_that_is_not_patient_storage_is_not_supported(sop_class: str) -> None:
    error = rejection(make_dicom_bytes(SOPClassUID=sop_class))
    assert error.status is Status.SOP_CLASS_NOT_SUPPORTED
    assert sop_class in error.reason


@pytest.mark.parametrize(
    "keyword", ["MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"], ids=str
)
def test_file_meta_uids_disagreeing_with_the_data_set_are_rejected(keyword: str) -> None:
    other = "1.2.840.10008.5.1.4.1.1.4" if keyword == "MediaStorageSOPClassUID" else generate_uid()
    error = rejection(make_dicom_bytes(file_meta={keyword: other}))
    assert error.status is A900
    assert "(0002,000" in error.reason


def test_file_meta_without_media_storage_uids_is_tolerated() -> None:
    meta = {"MediaStorageSOPClassUID": None, "MediaStorageSOPInstanceUID": None}
    assert read(make_dicom_bytes(file_meta=meta)).sop_class_uid == CTImageStorage


@pytest.mark.parametrize("frames", ["1A", "0", "-2", "1.5"])
def test_a_number_of_frames_that_is_not_a_positive_integer_is_rejected(frames: str) -> None:
    error = rejection(make_dicom_bytes(NumberOfFrames=unparsable("NumberOfFrames", frames)))
    assert (error.status, error.reason) == (
        A900,
        "Number of Frames (0028,0008) is not a positive integer",
    )


def test_native_pixel_data_shorter_than_its_description_is_rejected() -> None:
    error = rejection(make_dicom_bytes(PixelData=bytes(30)))  # 4 x 4 x 2 bytes needed
    assert error.status is A900
    assert "holds 30 bytes, fewer than the 32" in error.reason


def test_native_pixel_data_for_fewer_frames_than_declared_is_rejected() -> None:
    assert rejection(make_dicom_bytes(NumberOfFrames=2)).status is A900


def test_native_pixel_data_padded_beyond_its_description_is_accepted() -> None:
    assert read(make_dicom_bytes(PixelData=bytes(34))).sop_class_uid == CTImageStorage


# --- Structure -----------------------------------------------------------------------------------


def test_a_file_without_the_dicm_prefix_is_not_a_part_10_file() -> None:
    ds = make_dataset()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=False, little_endian=True)
    error = rejection(buffer.getvalue())
    assert (error.status, error.reason) == (
        C000,
        "not a DICOM Part 10 file: no 'DICM' prefix after the preamble",
    )


@pytest.mark.parametrize("data", [b"", b"DICM", bytes(131), b"%PDF-1.7" + bytes(200)])
def test_garbage_and_empty_bodies_cannot_be_understood(data: bytes) -> None:
    assert rejection(data).status is C000


@pytest.mark.parametrize("cut", [1, 2, 7, 31])
def test_a_file_cut_inside_its_pixel_data_is_truncated(cut: int) -> None:
    error = rejection(make_dicom_bytes()[:-cut])
    assert error.status is C000
    assert "truncated" in error.reason


def test_a_file_cut_inside_a_sequence_is_truncated() -> None:
    data = make_dicom_bytes(other_patient_ids=[bsn_item("999990019")] * 3)
    cut = data.index(b"NLMINBIZA", data.index(b"NLMINBIZA") + 1)
    error = rejection(data[:cut])
    # The innermost element the file ends in is named: the Issuer of Patient ID of item two.
    assert (error.status, "truncated: element (0010,0021)" in error.reason) == (C000, True)


def test_a_file_cut_inside_its_file_meta_cannot_be_understood() -> None:
    error = rejection(make_dicom_bytes()[:150])
    assert (error.status, error.reason) == (C000, "the file ends inside its File Meta Information")


def test_bytes_after_the_last_element_are_rejected() -> None:
    error = rejection(make_dicom_bytes() + b"\x00\x01\x02")
    assert (error.status, "truncated" in error.reason) == (C000, True)


def test_a_file_shorter_than_its_declared_size_is_rejected() -> None:
    data = make_dicom_bytes()
    error = read_header_error(io.BytesIO(data), len(data) + 100)
    assert error.status is C000


def read_header_error(fp: io.BytesIO, size: int) -> Rejected:
    with pytest.raises(Rejected) as caught:
        read_header(fp, size)
    return caught.value


def test_an_invalid_vr_in_an_explicit_vr_data_set_is_named() -> None:
    data = bytearray(make_dicom_bytes())
    at = data.index(b"\x08\x00\x20\x00DA")  # Study Date
    data[at + 4 : at + 6] = b"\x00\x01"
    error = rejection(bytes(data))
    assert error.status is C000
    assert error.reason.startswith("element (0008,0020) at offset")
    assert "invalid VR" in error.reason


def test_an_implicit_vr_data_set_under_an_explicit_transfer_syntax_is_refused() -> None:
    data = make_dicom_bytes(transfer_syntax=ImplicitVRLittleEndian)
    patched = make_dicom_bytes(file_meta={"TransferSyntaxUID": ExplicitVRLittleEndian})
    meta_end = 132 + 12 + struct.unpack_from("<L", patched, 140)[0]
    implicit_body = data[132 + 12 + struct.unpack_from("<L", data, 140)[0] :]
    assert rejection(patched[:meta_end] + implicit_body).status is C000


def test_native_pixel_data_under_a_compressed_transfer_syntax_is_refused() -> None:
    error = rejection(make_dicom_bytes(file_meta={"TransferSyntaxUID": JPEGBaseline8Bit}))
    assert (error.status, error.reason) == (
        C000,
        "Pixel Data is not encapsulated, as its transfer syntax requires",
    )


def test_encapsulated_pixel_data_under_a_native_transfer_syntax_is_refused() -> None:
    data = make_dicom_bytes(
        transfer_syntax=JPEGBaseline8Bit, file_meta={"TransferSyntaxUID": ExplicitVRLittleEndian}
    )
    assert rejection(data).reason == "Pixel Data is encapsulated under a native transfer syntax"


def test_a_broken_fragment_item_in_encapsulated_pixel_data_is_refused() -> None:
    data = bytearray(make_dicom_bytes(transfer_syntax=JPEGBaseline8Bit))
    last_item = data.rindex(b"\xfe\xff\x00\xe0")
    data[last_item : last_item + 4] = b"\xfe\xff\x0d\xe0"  # an Item Delimitation Item instead
    error = rejection(bytes(data))
    assert (error.status, "not an item" in error.reason) == (C000, True)


def test_sequences_nested_absurdly_deep_are_refused() -> None:
    inner = Dataset()
    for _ in range(70):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    error = rejection(make_dicom_bytes(ContentSequence=inner.ContentSequence))
    assert (error.status, "nested deeper" in error.reason) == (C000, True)


def test_sequences_of_undefined_length_are_walked_item_by_item() -> None:
    ds = make_dataset(other_patient_ids=[bsn_item("999990019")])
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds["OtherPatientIDsSequence"].is_undefined_length = True
    ds.OtherPatientIDsSequence[0].is_undefined_length_sequence_item = True
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    assert b"\xfe\xff\xdd\xe0" in buffer.getvalue()
    assert read(buffer.getvalue()).patient.status.value == "verified"


def test_a_kept_attribute_larger_than_the_limit_is_refused() -> None:
    # Implicit VR: an explicit LO cannot even declare more than 64 KiB.
    huge = "x" * (MAX_ATTRIBUTE_BYTES + 2)
    data = make_dicom_bytes(transfer_syntax=ImplicitVRLittleEndian, StudyDescription=huge)
    error = rejection(data)
    assert (error.status, "(0008,1030) exceeds" in error.reason) == (C000, True)


def test_a_kept_sequence_growing_beyond_the_limit_is_refused() -> None:
    items = [patient_id_item("H" + "1" * 60, "ZNOORD") for _ in range(MAX_ATTRIBUTE_BYTES // 80)]
    data = make_dicom_bytes(other_patient_ids=items)
    assert len(data) > MAX_ATTRIBUTE_BYTES
    assert "exceeds" in rejection(data).reason


def test_a_large_attribute_that_is_not_kept_is_only_skipped() -> None:
    huge = "x" * (4 * MAX_ATTRIBUTE_BYTES)
    data = make_dicom_bytes(transfer_syntax=ImplicitVRLittleEndian, ImageComments=huge)
    assert read(data).sop_class_uid == CTImageStorage


def test_no_prefix_of_a_file_and_no_single_byte_change_makes_the_reader_crash() -> None:
    data = make_dicom_bytes(
        patient=bsn_item("999990019"), other_patient_ids=[bsn_item("111222333")]
    )
    outcomes: set[str] = set()
    for end in range(len(data)):
        try:
            read(data[:end])
            outcomes.add("read")
        except Rejected as error:
            outcomes.add(error.status.name)
    for at in range(132, len(data)):
        changed = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
        try:
            read(changed)
        except Rejected as error:
            outcomes.add(error.status.name)
    assert "CANNOT_UNDERSTAND" in outcomes


# --- Deflate -------------------------------------------------------------------------------------


def deflated_parts() -> tuple[bytes, bytes]:
    data = make_dicom_bytes(transfer_syntax=DeflatedExplicitVRLittleEndian)
    meta_end = 132 + 12 + struct.unpack_from("<L", data, 140)[0]
    return data[:meta_end], data[meta_end:]


def test_a_deflated_data_set_that_is_cut_short_is_truncated() -> None:
    head, body = deflated_parts()
    error = rejection(head + body[: len(body) // 2])
    assert error.status is C000


def test_a_corrupt_deflated_data_set_cannot_be_understood() -> None:
    head, body = deflated_parts()
    error = rejection(head + b"\xff" * len(body))
    assert error.status is C000


def test_a_deflated_data_set_may_end_with_one_nul_but_not_more() -> None:
    head, body = deflated_parts()
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    stream = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bitstream = stream.compress(inflater.decompress(body)) + stream.flush()
    assert read(head + bitstream).transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert read(head + bitstream + b"\x00").transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    for junk in (b"\x00\x00", b"junk"):
        assert rejection(head + bitstream + junk).reason == (
            "bytes follow the end of the deflated data set"
        )


# --- Large files, bounded memory ----------------------------------------------------------------

FRAMES_300_MB = 600  # 600 x 512 x 512 x 2 bytes = 314,572,800 bytes of pixel data
PEAK_LIMIT = 20 * 1024 * 1024


def read_with_peak(path: Path, size: int) -> tuple[InstanceHeader | Rejected, int]:
    tracemalloc.start()
    try:
        with path.open("rb") as fp:
            try:
                outcome: InstanceHeader | Rejected = read_header(fp, size)
            except Rejected as error:
                outcome = error
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("encapsulated", [False, True], ids=["native", "encapsulated"])
def test_a_300_mb_file_is_checked_end_to_end_with_bounded_memory(
    tmp_path: Path, encapsulated: bool
) -> None:
    path = tmp_path / "large.dcm"
    size = write_large_dicom(path, frames=FRAMES_300_MB, encapsulated=encapsulated)
    assert size > 300 * 1024 * 1024
    header, peak = read_with_peak(path, size)
    assert isinstance(header, InstanceHeader), header
    assert header.transfer_syntax_uid == (
        JPEG2000Lossless if encapsulated else ExplicitVRLittleEndian
    )
    assert peak < PEAK_LIMIT


@pytest.mark.parametrize("encapsulated", [False, True], ids=["native", "encapsulated"])
def test_the_same_300_mb_file_one_byte_short_is_truncated(
    tmp_path: Path, encapsulated: bool
) -> None:
    path = tmp_path / "large.dcm"
    size = write_large_dicom(path, frames=FRAMES_300_MB, encapsulated=encapsulated)
    with path.open("r+b") as fp:
        fp.truncate(size - 1)
    error, peak = read_with_peak(path, size - 1)
    assert isinstance(error, Rejected)
    assert (error.status, "truncated" in error.reason) == (C000, True)
    assert peak < PEAK_LIMIT


def test_a_deflated_data_set_inflating_to_200_mb_is_walked_with_bounded_memory(
    tmp_path: Path,
) -> None:
    frames = 400  # 200 MiB of zeros, a few hundred KiB deflated
    ds = make_dataset(Rows=512, Columns=512, NumberOfFrames=frames, PixelData=None)
    body = io.BytesIO()
    pydicom.dcmwrite(body, ds, implicit_vr=False, little_endian=True)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    pixel_bytes = 512 * 512 * 2 * frames
    with path.open("wb") as fp:
        fp.write(bytes(128) + b"DICM" + encode_file_meta(meta))
        fp.write(deflater.compress(body.getvalue()))
        fp.write(deflater.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)))
        zeros = bytes(1 << 20)
        for _ in range(pixel_bytes // len(zeros)):
            fp.write(deflater.compress(zeros))
        fp.write(deflater.flush())
        size = fp.tell()
    assert size < 1024 * 1024
    header, peak = read_with_peak(path, size)
    assert isinstance(header, InstanceHeader), header
    assert peak < PEAK_LIMIT


# --- Reasons -------------------------------------------------------------------------------------


def test_no_rejection_reason_ever_contains_patient_data() -> None:
    patient = {"patient": bsn_item("999990019"), "PatientName": "Jansen^Anna"}
    cases = [
        make_dicom_bytes(**patient, SOPInstanceUID="999990019"),
        make_dicom_bytes(**patient, StudyInstanceUID="Jansen^Anna"),
        make_dicom_bytes(**patient, NumberOfFrames=unparsable("NumberOfFrames", "999990019x")),
        make_dicom_bytes(**patient, file_meta={"TransferSyntaxUID": "999990019"}),
        make_dicom_bytes(**patient)[:-3],
    ]
    for data in cases:
        reason = rejection(data).reason
        assert "999990019" not in reason
        assert "Jansen" not in reason


def test_a_rejection_carries_its_status_and_a_readable_repr() -> None:
    error = Rejected(Status.CANNOT_UNDERSTAND, "not a DICOM Part 10 file")
    assert (error.status, error.reason, str(error)) == (C000, *["not a DICOM Part 10 file"] * 2)
    assert repr(error) == "Rejected(CANNOT_UNDERSTAND, 'not a DICOM Part 10 file')"


def test_patient_sequences_pydicom_cannot_parse_are_refused_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unparsable_sequences(ds: Dataset) -> None:
        raise ValueError("Invalid value '999990019'")

    monkeypatch.setattr(dicom_module, "find_bsn", unparsable_sequences)
    error = rejection(make_dicom_bytes(patient=bsn_item("999990019")))
    assert (error.status, error.reason) == (
        C000,
        "the patient identification sequences cannot be parsed",
    )
    assert error.__cause__ is None


def _outcome(data: bytes) -> tuple[object, ...]:
    try:
        return ("read", read_header(io.BytesIO(data), len(data)))
    except Rejected as exc:
        return ("rejected", exc.status, exc.reason)


def test_the_fast_path_reads_every_file_and_mangled_copy_as_the_general_walk_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # _skim takes the plain top-level elements of explicit VR little endian data sets; with it
    # turned off, the general walk reads everything. Both must agree on every shipped file and
    # on truncated and byte-flipped copies of the well-formed ones.
    import random

    rng = random.Random(20261126)
    corpus = [(PYDICOM_DATA / name).read_bytes() for name in shipped_files()]
    well_formed = [path.read_bytes() for path, _ in well_formed_samples()]
    for _ in range(600):
        data = bytearray(rng.choice(well_formed))
        if rng.random() < 0.5:
            data = data[: rng.randrange(132, len(data))]
        else:
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(132, len(data))] = rng.randrange(256)
        corpus.append(bytes(data))

    fast = [_outcome(data) for data in corpus]
    monkeypatch.setattr(dicom_module, "_skim", lambda stream, kept: None)
    general = [_outcome(data) for data in corpus]

    assert fast == general
    assert sum(kind == "read" for kind, *_ in fast) > 100
    assert sum(kind == "rejected" for kind, *_ in fast) > 100
