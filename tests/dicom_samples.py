"""DICOM test material: every file pydicom ships, classified, and factories for fresh instances.

``well_formed_samples()`` and ``malformed_samples()`` give ``(path, expected Status)`` for each
file in pydicom's wheel (``pydicom/data``: test_files, charset_files, palettes; nothing is
downloaded), so any test that sends files (unit, STOW-RS or C-STORE end to end) can send all of
them and know the answer. ``MALFORMED`` is the table of what is wrong with each rejected file.

``make_dicom_bytes(**attrs)`` builds a valid Part 10 CT instance (fresh UIDs, 4x4 pixels) with
any attribute overridden, removed (``None``) or added; ``write_large_dicom`` writes one of
hundreds of megabytes to disk without holding it in memory (a sparse file).
"""

from __future__ import annotations

import copy
import io
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom.data
from pydicom import config, dcmwrite
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from services.ingest.domain.status import Status
from shared.identifiers import BSN_OID

PYDICOM_DATA = Path(pydicom.data.__file__).parent
_SAMPLE_FOLDERS = ("test_files", "charset_files", "palettes")

_NO_DICM = (Status.CANNOT_UNDERSTAND, "no 'DICM' prefix")
_MEDIA_UID = (Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Media Storage SOP Instance UID (0002,0003)")
_NO_SOP_CLASS = (Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID (0008,0016) is missing")
_NO_STUDY = (Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Study Instance UID (0020,000D) is missing")
_PALETTE = (Status.SOP_CLASS_NOT_SUPPORTED, "1.2.840.10008.5.1.4.39.1")

# Every shipped file that must be rejected: path under pydicom/data -> (status, reason fragment),
# with what is really wrong with it.
MALFORMED: dict[str, tuple[Status, str]] = {
    # Not DICOM at all: text, JSON, an ICC profile, a gzip file.
    "charset_files/FileInfo.txt": _NO_DICM,
    "palettes/README.md": _NO_DICM,
    "test_files/README.txt": _NO_DICM,
    "test_files/crayons.icc": _NO_DICM,
    "test_files/dicomdirtests/README.txt": _NO_DICM,
    "test_files/dicomdirtests/TINY_ALPHA/README": _NO_DICM,
    "test_files/rtplan.dump": _NO_DICM,
    "test_files/rtstruct.dump": _NO_DICM,
    "test_files/test1.json": _NO_DICM,
    "test_files/test_PN.json": _NO_DICM,
    "test_files/zipMR.gz": _NO_DICM,
    # Bare data sets without preamble and File Meta: STOW-RS application/dicom is a Part 10 file.
    "test_files/no_meta.dcm": _NO_DICM,
    "test_files/ExplVR_BigEndNoMeta.dcm": _NO_DICM,
    "test_files/ExplVR_LitEndNoMeta.dcm": _NO_DICM,
    "test_files/rtstruct.dcm": _NO_DICM,
    # Pixel Data declares 8192 bytes; the file ends 8130 bytes into it.
    "test_files/MR_truncated.dcm": (Status.CANNOT_UNDERSTAND, "truncated: element (7FE0,0010)"),
    # Cut off inside the Beam Sequence: a nested element runs past the end of the file.
    "test_files/rtplan_truncated.dcm": (Status.CANNOT_UNDERSTAND, "truncated: element (300A,012C)"),
    # Offsets removed but the enclosing sequence lengths kept: the file ends inside an item.
    "test_files/dicomdirtests/DICOMDIR-nooffset": (
        Status.CANNOT_UNDERSTAND,
        "truncated: it ends inside a sequence item",
    ),
    # File Meta says JPEG Baseline (explicit VR) but the data set is written in implicit VR.
    "test_files/SC_rgb_jpeg.dcm": (Status.CANNOT_UNDERSTAND, "(0008,0008) at offset 356 has an"),
    # File Meta without Transfer Syntax UID (and empty Media Storage UIDs).
    "test_files/meta_missing_tsyntax.dcm": (
        Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        "Transfer Syntax UID (0002,0010) is missing",
    ),
    # "badVR" holds bad *values*, not a bad VR encoding: Number of Frames '1A', a UID component
    # with a leading zero in a reference, and an SOP Instance UID differing from the File Meta's.
    "test_files/badVR.dcm": _MEDIA_UID,
    # Edited copies whose SOP Instance UID no longer matches Media Storage SOP Instance UID.
    "charset_files/chrJapMulti.dcm": _MEDIA_UID,
    "charset_files/chrJapMultiExplicitIR6.dcm": _MEDIA_UID,
    "test_files/rtdose.dcm": _MEDIA_UID,
    "test_files/rtdose_1frame.dcm": _MEDIA_UID,
    "test_files/rtdose_expb.dcm": _MEDIA_UID,
    "test_files/rtdose_expb_1frame.dcm": _MEDIA_UID,
    "test_files/rtplan.dcm": _MEDIA_UID,
    # Fragments kept for one pydicom feature: no SOP Class UID at all.
    "charset_files/chrSQEncoding.dcm": _NO_SOP_CLASS,
    "charset_files/chrSQEncoding1.dcm": _NO_SOP_CLASS,
    "test_files/UN_sequence.dcm": _NO_SOP_CLASS,
    "test_files/empty_charset_LEI.dcm": _NO_SOP_CLASS,
    "test_files/nested_priv_SQ.dcm": _NO_SOP_CLASS,
    "test_files/no_meta_group_length.dcm": _NO_SOP_CLASS,
    "test_files/priv_SQ.dcm": _NO_SOP_CLASS,
    # DICOMDIRs (Media Storage Directory) are not instances: no SOP Class UID in the data set.
    "test_files/dicomdirtests/DICOMDIR": _NO_SOP_CLASS,
    "test_files/dicomdirtests/DICOMDIR-bigEnd": _NO_SOP_CLASS,
    "test_files/dicomdirtests/DICOMDIR-empty.dcm": _NO_SOP_CLASS,
    "test_files/dicomdirtests/DICOMDIR-implicit": _NO_SOP_CLASS,
    "test_files/dicomdirtests/DICOMDIR-nopatient": _NO_SOP_CLASS,
    "test_files/dicomdirtests/DICOMDIR-reordered": _NO_SOP_CLASS,
    "test_files/dicomdirtests/TINY_ALPHA/DICOMDIR": _NO_SOP_CLASS,
    # Pixel-codec samples stripped of their study and series.
    "test_files/JPEGLSNearLossless_08.dcm": _NO_STUDY,
    "test_files/JPEGLSNearLossless_16.dcm": _NO_STUDY,
    "test_files/SC_rgb_jls_lossy_line.dcm": _NO_STUDY,
    "test_files/SC_rgb_jls_lossy_sample.dcm": _NO_STUDY,
    # Color Palette Storage is a non-patient object, not an exchangeable image.
    **{f"palettes/{name}.dcm": _PALETTE for name in ("fall", "hotiron", "hotmetalblue", "pet")},
    **{f"palettes/{name}.dcm": _PALETTE for name in ("pet20step", "spring", "summer", "winter")},
}

# Every other shipped file is a well-formed instance; named here so a new or vanished file in a
# pydicom upgrade fails the classification test instead of passing unnoticed.
WELL_FORMED_NAMES = [
    "charset_files/chrArab.dcm",
    "charset_files/chrFren.dcm",
    "charset_files/chrFrenMulti.dcm",
    "charset_files/chrGerm.dcm",
    "charset_files/chrGreek.dcm",
    "charset_files/chrH31.dcm",
    "charset_files/chrH32.dcm",
    "charset_files/chrHbrw.dcm",
    "charset_files/chrI2.dcm",
    "charset_files/chrKoreanMulti.dcm",
    "charset_files/chrRuss.dcm",
    "charset_files/chrX1.dcm",
    "charset_files/chrX2.dcm",
    "test_files/693_J2KI.dcm",
    "test_files/CT_small.dcm",
    "test_files/ExplVR_BigEnd.dcm",
    "test_files/GDCMJ2K_TextGBR.dcm",
    "test_files/J2K_pixelrep_mismatch.dcm",
    "test_files/JPEG-lossy.dcm",
    "test_files/JPEG2000-embedded-sequence-delimiter.dcm",
    "test_files/JPEG2000.dcm",
    "test_files/JPGExtended.dcm",
    "test_files/MR_small.dcm",
    "test_files/MR_small_RLE.dcm",
    "test_files/MR_small_bigendian.dcm",
    "test_files/MR_small_expb.dcm",
    "test_files/MR_small_implicit.dcm",
    "test_files/MR_small_jp2klossless.dcm",
    "test_files/MR_small_jpeg_ls_lossless.dcm",
    "test_files/MR_small_padded.dcm",
    "test_files/SC_jpeg_no_color_transform.dcm",
    "test_files/SC_jpeg_no_color_transform_2.dcm",
    "test_files/SC_rgb_dcmtk_+eb+cr.dcm",
    "test_files/SC_rgb_dcmtk_+eb+cy+n1.dcm",
    "test_files/SC_rgb_dcmtk_+eb+cy+n2.dcm",
    "test_files/SC_rgb_dcmtk_+eb+cy+np.dcm",
    "test_files/SC_rgb_dcmtk_+eb+cy+s2.dcm",
    "test_files/SC_rgb_dcmtk_+eb+cy+s4.dcm",
    "test_files/SC_rgb_gdcm_KY.dcm",
    "test_files/SC_rgb_jpeg_app14_dcmd.dcm",
    "test_files/SC_rgb_jpeg_dcmd.dcm",
    "test_files/SC_rgb_jpeg_dcmtk.dcm",
    "test_files/SC_rgb_jpeg_gdcm.dcm",
    "test_files/SC_rgb_jpeg_lossy_gdcm.dcm",
    "test_files/SC_rgb_rle.dcm",
    "test_files/SC_rgb_rle_16bit.dcm",
    "test_files/SC_rgb_rle_16bit_2frame.dcm",
    "test_files/SC_rgb_rle_2frame.dcm",
    "test_files/SC_rgb_rle_32bit.dcm",
    "test_files/SC_rgb_rle_32bit_2frame.dcm",
    "test_files/SC_rgb_small_odd.dcm",
    "test_files/SC_rgb_small_odd_big_endian.dcm",
    "test_files/SC_rgb_small_odd_jpeg.dcm",
    "test_files/SC_ybr_full_422_uncompressed.dcm",
    "test_files/examples_jpeg2k.dcm",
    "test_files/examples_overlay.dcm",
    "test_files/examples_palette.dcm",
    "test_files/examples_rgb_color.dcm",
    "test_files/examples_ybr_color.dcm",
    "test_files/image_dfl.dcm",
    "test_files/liver_1frame.dcm",
    "test_files/liver_expb_1frame.dcm",
    "test_files/reportsi.dcm",
    "test_files/reportsi_with_empty_number_tags.dcm",
    "test_files/rtdose_rle.dcm",
    "test_files/rtdose_rle_1frame.dcm",
    "test_files/test-SR.dcm",
    "test_files/waveform_ecg.dcm",
]
# The images referenced by the DICOMDIR samples (no extension): 25 + 30 of them.
WELL_FORMED_PATTERN = re.compile(
    r"test_files/dicomdirtests/(77654033|98892001|98892003)/[A-Z0-9]+/[0-9]+"
    r"|test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM0000[0-9A-Z]{2}"
)


def shipped_files() -> list[str]:
    """Every file in pydicom's data folders, as a path relative to ``PYDICOM_DATA``."""
    return sorted(
        path.relative_to(PYDICOM_DATA).as_posix()
        for folder in _SAMPLE_FOLDERS
        for path in (PYDICOM_DATA / folder).rglob("*")
        if path.is_file()
    )


def is_well_formed(name: str) -> bool:
    return name in WELL_FORMED_NAMES or WELL_FORMED_PATTERN.fullmatch(name) is not None


def well_formed_samples() -> list[tuple[Path, Status]]:
    """Shipped files every check accepts: ``(path, Status.SUCCESS)``."""
    return [
        (PYDICOM_DATA / name, Status.SUCCESS) for name in shipped_files() if is_well_formed(name)
    ]


def malformed_samples() -> list[tuple[Path, Status]]:
    """Shipped files that must be rejected, with the status to answer."""
    return [(PYDICOM_DATA / name, status) for name, (status, _) in sorted(MALFORMED.items())]


# --- Factories --------------------------------------------------------------------------------

PDF_BYTES = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def patient_id_item(
    patient_id: str | None,
    issuer: str | None = None,
    *,
    qualifiers_oid: str | None = None,
    qualifiers_type: str = "ISO",
) -> Dataset:
    """A Patient ID with its issuer, as the data set's own or as an Other Patient IDs item."""
    item = Dataset()
    with lenient_writing():
        if patient_id is not None:
            item.PatientID = patient_id
        if issuer is not None:
            item.IssuerOfPatientID = issuer
        if qualifiers_oid is not None:
            qualifier = Dataset()
            qualifier.UniversalEntityID = qualifiers_oid
            qualifier.UniversalEntityIDType = qualifiers_type
            item.IssuerOfPatientIDQualifiersSequence = Sequence([qualifier])
    return item


def bsn_item(bsn: str) -> Dataset:
    """The most common way to carry a BSN: Patient ID with Issuer 'NLMINBIZA' and the BSN OID."""
    return patient_id_item(bsn, "NLMINBIZA", qualifiers_oid=BSN_OID)


@contextmanager
def lenient_writing() -> Iterator[None]:
    """Let pydicom take and write invalid values (tests build malformed instances on purpose).

    Both modes: pydicom validates a value assigned in code with the *reading* mode.
    """
    settings = config.settings
    previous = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = previous


def make_dataset(
    *,
    sop_class_uid: str = CTImageStorage,
    patient: Dataset | None = None,
    other_patient_ids: Iterable[Dataset] = (),
    **attrs: Any,
) -> Dataset:
    """A valid instance of ``sop_class_uid`` with fresh UIDs; ``attrs`` by keyword (None removes,
    a DataElement from ``unparsable`` is set as is).

    ``patient`` replaces the default hospital Patient ID (see ``patient_id_item``/``bsn_item``).
    Values are not validated, so ``attrs`` may be invalid on purpose.
    """
    with lenient_writing():
        return _make_dataset(sop_class_uid, patient, other_patient_ids, attrs)


def _make_dataset(
    sop_class_uid: str,
    patient: Dataset | None,
    other_patient_ids: Iterable[Dataset],
    attrs: Mapping[str, Any],
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.InstitutionName = "Ziekenhuis Noord"
    ds.StudyDescription = "CT thorax"
    ds.SeriesDescription = "Axiaal 1 mm"
    ds.PatientName = "Proef^Pieter"
    ds.PatientBirthDate = "19700101"
    ds.SeriesNumber = 2
    ds.InstanceNumber = 7
    ds.update(patient if patient is not None else patient_id_item("H1234567", "ZNOORD"))
    others = list(other_patient_ids)
    if others:
        ds.OtherPatientIDsSequence = Sequence(others)
    if sop_class_uid == BasicTextSRStorage:
        ds.Modality = "SR"
        ds.ValueType = "CONTAINER"
        text = Dataset()
        text.RelationshipType = "CONTAINS"
        text.ValueType = "TEXT"
        text.TextValue = "Geen afwijkingen."
        ds.ContentSequence = Sequence([text])
    elif sop_class_uid == EncapsulatedPDFStorage:
        ds.Modality = "DOC"
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.EncapsulatedDocument = PDF_BYTES + b"\0" * (len(PDF_BYTES) % 2)
    else:
        ds.Modality = "CT"
        ds.Rows = 4
        ds.Columns = 4
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = bytes(range(32))
        ds["PixelData"].VR = "OW"
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                del ds[keyword]
        elif isinstance(value, DataElement):
            ds[value.tag] = value
        else:
            setattr(ds, keyword, value)
    return ds


def unparsable(keyword: str, text: str) -> DataElement:
    """An element holding ``text`` as is, where pydicom would refuse it (an IS of '1A')."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return DataElement(tag, dictionary_VR(tag), text, already_converted=True)


def make_dicom_bytes(
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    file_meta: Mapping[str, Any] | None = None,
    **attrs: Any,
) -> bytes:
    """A Part 10 file (preamble, File Meta, data set) of ``make_dataset(**attrs)``.

    Under an encapsulated transfer syntax the 4x4 Pixel Data becomes one (fake) fragment: the
    bytes are structurally right, not a decodable codestream. ``file_meta`` overrides File Meta
    attributes by keyword (None removes).
    """
    ds = make_dataset(**attrs)
    with lenient_writing():
        return _encode(ds, UID(transfer_syntax), file_meta)


def _encode(ds: Dataset, syntax: UID, file_meta: Mapping[str, Any] | None) -> bytes:
    if "PixelData" in ds and syntax.is_encapsulated:
        ds.PixelData = encapsulate([bytes(ds.PixelData)])
        ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    # Placeholders where the data set lacks them (on purpose), so pydicom writes a Part 10 file.
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or generate_uid()
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    if not file_meta:
        return buffer.getvalue()
    # Rewrite the File Meta as asked without re-encoding the data set after it.
    data = buffer.getvalue()
    meta_end = 132 + 12 + struct.unpack_from("<L", data, 140)[0]
    patched = copy.deepcopy(ds.file_meta)
    for keyword, value in file_meta.items():
        if value is None:
            if keyword in patched:
                del patched[keyword]
        else:
            setattr(patched, keyword, value)
    return data[:132] + encode_file_meta(patched) + data[meta_end:]


def encode_file_meta(meta: FileMetaDataset) -> bytes:
    """File Meta elements as written in a Part 10 file, with a recomputed group length."""
    meta.FileMetaInformationGroupLength = 0
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=False)
    return buffer.getvalue()


def write_large_dicom(path: Path, *, frames: int, encapsulated: bool = False) -> int:
    """Write a 512x512 16-bit CT of ``frames`` frames to ``path``; return its size in bytes.

    The Pixel Data is a sparse hole (native) or sparse fragments behind real item headers
    (encapsulated, one fragment per frame), so hundreds of megabytes cost neither memory nor
    disk. 600 frames make 314,572,800 bytes of pixel data.
    """
    frame_bytes = 512 * 512 * 2
    syntax = JPEG2000Lossless if encapsulated else ExplicitVRLittleEndian
    ds = make_dataset(Rows=512, Columns=512, NumberOfFrames=frames, PixelData=None)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    header = io.BytesIO()
    dcmwrite(header, ds, enforce_file_format=True)
    with path.open("wb") as fp:
        fp.write(header.getvalue())
        if not encapsulated:
            fp.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, frame_bytes * frames))
            size = fp.tell() + frame_bytes * frames
            fp.truncate(size)
            return size
        fp.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        fp.write(struct.pack("<HHL", 0xFFFE, 0xE000, 0))  # empty Basic Offset Table
        offset = fp.tell()
        for _ in range(frames):
            fp.seek(offset)
            fp.write(struct.pack("<HHL", 0xFFFE, 0xE000, frame_bytes))
            offset += 8 + frame_bytes
        fp.seek(offset)
        fp.write(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
        return fp.tell()
