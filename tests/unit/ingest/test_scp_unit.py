"""The C-STORE SCP's pure parts: the Part 10 file it builds, its negotiation, its responses."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from services.ingest.domain.dicom import read_header
from services.ingest.domain.status import Status
from services.ingest.entrypoints.scp import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    STORABLE_TRANSFER_SYNTAXES,
    SUPPORTED_ABSTRACT_SYNTAXES,
    _response,
    encode_file_meta,
    negotiable_contexts,
    spool_part10,
)

JPIP_REFERENCED = "1.2.840.10008.1.2.4.94"
PRIVATE_SOP_CLASS = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def encoded_ct(uid: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "X1"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def test_file_meta_is_encoded_like_pydicom_does_it() -> None:
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    expected = DicomBytesIO()
    expected.is_little_endian, expected.is_implicit_VR = True, False
    write_file_meta_info(expected, meta, enforce_standard=True)

    assert encode_file_meta(CTImageStorage, uid, JPEGBaseline8Bit) == expected.getvalue()


def test_the_spooled_file_is_preamble_meta_and_the_data_set_exactly_as_received() -> None:
    uid = generate_uid()
    data_set = encoded_ct(uid)

    received = spool_part10(
        CTImageStorage, uid, ExplicitVRLittleEndian, io.BytesIO(data_set), memory=1 << 20
    )

    body = received.file.read()
    assert received.size == len(body)
    assert received.sha256 == hashlib.sha256(body).hexdigest()
    assert body[:128] == bytes(128) and body[128:132] == b"DICM"
    assert body.endswith(data_set)
    ds = dcmread(io.BytesIO(body))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == uid == ds.SOPInstanceUID
    # And the domain reads it as the store will.
    header = read_header(io.BytesIO(body), len(body))
    assert header.sop_instance_uid == uid
    received.file.close()


def test_a_large_data_set_spools_to_disk_with_the_same_bytes(tmp_path: Path) -> None:
    uid = generate_uid()
    data_set = encoded_ct(uid)

    small = spool_part10(CTImageStorage, uid, ExplicitVRLittleEndian, data_set, memory=1 << 20)
    big = spool_part10(
        CTImageStorage, uid, ExplicitVRLittleEndian, data_set, memory=16, spool_dir=str(tmp_path)
    )

    assert big.file._rolled  # type: ignore[attr-defined]
    assert not small.file._rolled  # type: ignore[attr-defined]
    assert big.file.read() == small.file.read()
    assert (big.size, big.sha256) == (small.size, small.sha256)
    big.file.close()
    small.file.close()


def test_the_same_instance_gives_the_same_bytes_every_time() -> None:
    # A resend must hash the same, or the store takes it for other content under the same UID.
    uid = generate_uid()
    data_set = encoded_ct(uid)
    first = spool_part10(CTImageStorage, uid, ExplicitVRLittleEndian, data_set, memory=1 << 20)
    again = spool_part10(CTImageStorage, uid, ExplicitVRLittleEndian, data_set, memory=1 << 20)
    first.file.close()
    again.file.close()
    assert first.sha256 == again.sha256


def test_negotiation_follows_the_order_the_peer_proposed() -> None:
    proposed = [
        build_context(CTImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian]),
        build_context(MR_IMAGE_STORAGE, [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]),
        build_context(Verification),
    ]

    contexts = {str(cx.abstract_syntax): cx.transfer_syntax for cx in negotiable_contexts(proposed)}

    assert contexts[CTImageStorage] == [JPEG2000Lossless, ExplicitVRLittleEndian]
    assert contexts[MR_IMAGE_STORAGE] == [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
    assert str(Verification) in contexts


def test_negotiation_leaves_out_what_cannot_be_stored() -> None:
    proposed = [
        build_context(PRIVATE_SOP_CLASS, [ExplicitVRLittleEndian]),
        build_context(CTImageStorage, [JPIP_REFERENCED]),
    ]

    assert negotiable_contexts(proposed) == []


def test_every_storage_class_and_common_transfer_syntax_is_supported() -> None:
    assert len(SUPPORTED_ABSTRACT_SYNTAXES) > 128  # more than a requestor may propose at once
    for syntax in (
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        "1.2.840.10008.1.2.2",  # explicit VR big endian (retired, still sent)
        JPEGBaseline8Bit,
        "1.2.840.10008.1.2.4.51",  # JPEG extended
        "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
        JPEG2000Lossless,
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
        "1.2.840.10008.1.2.4.203",  # HTJ2K
        "1.2.840.10008.1.2.5",  # RLE
        "1.2.840.10008.1.2.4.100",  # MPEG2 MP@ML
        "1.2.840.10008.1.2.4.102",  # H.264 HP@4.1
        "1.2.840.10008.1.2.4.107",  # HEVC
    ):
        assert syntax in STORABLE_TRANSFER_SYNTAXES, syntax
    assert JPIP_REFERENCED not in STORABLE_TRANSFER_SYNTAXES


def test_success_is_a_bare_status_and_failures_carry_a_short_ascii_comment() -> None:
    assert _response(Status.SUCCESS, "stored") == 0x0000
    rsp = _response(Status.OUT_OF_RESOURCES, "opslag is niet beschikbaar — probeer het later " * 3)
    assert isinstance(rsp, Dataset)
    assert rsp.Status == 0xA700
    assert len(rsp.ErrorComment) <= 64
    assert rsp.ErrorComment.isascii()
