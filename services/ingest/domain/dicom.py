"""Check a received DICOM Part 10 file and read the header ingest needs, never its bulk data.

One forward pass walks every element of the file, File Meta to the last byte: values are seeked
over (or inflated and dropped, for a deflated data set), sequences and encapsulated Pixel Data
are followed item by item, so truncation, an invalid VR or a broken item structure is found
without loading pixel data or documents. Only the few top-level attributes ingest uses are kept
(each at most ``MAX_ATTRIBUTE_BYTES``) and decoded here, so memory stays bounded whatever the
file size. ``pydicom.dcmread(stop_before_pixels=True, defer_size=...)`` is not used because it
reads sequence contents in full (defer_size does not apply inside sequences), inflates a
deflated data set into memory in one go, and silently accepts a value cut short by the end of
the file. Nothing here calls pydicom's value converters either: they warn on odd values, and
``warnings.catch_warnings`` is process-global, so not safe in a threaded server.

Rejection reasons name tags, offsets, UIDs and counts only, never other header values.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from datetime import date
from typing import BinaryIO, NamedTuple

from pydantic import TypeAdapter, ValidationError
from pydicom.charset import CODES_TO_ENCODINGS, handled_encodings, python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, AllTransferSyntaxes
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from services.ingest.domain.patient import PATIENT_ID_TAGS, BsnFinding, find_bsn
from services.ingest.domain.status import Status
from shared.errors import BeeldportaalError
from shared.events import REPORT_SOP_CLASSES, ReportKind
from shared.events.common import DicomUid

# Limits of the event fields these values end up in (shared/events/ingest.py, common.py).
ACCESSION_NUMBER_MAX = 16
TEXT_MAX = 64
CODE_MAX = 16
# A kept attribute larger than this is not a plausible header value (a Patient ID, a sequence of
# other patient IDs): reject rather than hold it in memory.
MAX_ATTRIBUTE_BYTES = 1 << 20
MAX_FILE_META_BYTES = 1 << 16
# A deflated data set inflating beyond this is treated as a decompression bomb.
MAX_INFLATED_BYTES = 1 << 34
MAX_SEQUENCE_DEPTH = 64

# Transfer syntaxes pydicom knows, minus those whose pixel data is not in the file (JPIP
# referenced: a URL to the sender's JPIP server) or that exist only for real-time video
# streaming (SMPTE ST 2110, DICOM-RTV), never for storage. Accepted ones are stored as received.
_NOT_FOR_STORAGE = frozenset(
    {
        "1.2.840.10008.1.2.4.94",  # JPIP Referenced
        "1.2.840.10008.1.2.4.95",  # JPIP Referenced Deflate
        "1.2.840.10008.1.2.4.204",  # JPIP HTJ2K Referenced
        "1.2.840.10008.1.2.4.205",  # JPIP HTJ2K Referenced Deflate
        "1.2.840.10008.1.2.7.1",  # SMPTE ST 2110-20 progressive video
        "1.2.840.10008.1.2.7.2",  # SMPTE ST 2110-20 interlaced video
        "1.2.840.10008.1.2.7.3",  # SMPTE ST 2110-30 PCM audio
    }
)
ACCEPTED_TRANSFER_SYNTAXES = frozenset(str(ts) for ts in AllTransferSyntaxes) - _NOT_FOR_STORAGE

_DICOM_UID: TypeAdapter[str] = TypeAdapter(DicomUid)

# Tags.
_MEDIA_STORAGE_SOP_CLASS = 0x00020002
_MEDIA_STORAGE_SOP_INSTANCE = 0x00020003
_TRANSFER_SYNTAX = 0x00020010
_SPECIFIC_CHARACTER_SET = 0x00080005
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_STUDY_DATE = 0x00080020
_STUDY_TIME = 0x00080030
_ACCESSION_NUMBER = 0x00080050
_MODALITY = 0x00080060
_INSTITUTION_NAME = 0x00080080
_STUDY_DESCRIPTION = 0x00081030
_SERIES_DESCRIPTION = 0x0008103E
_STUDY_INSTANCE = 0x0020000D
_SERIES_INSTANCE = 0x0020000E
_SERIES_NUMBER = 0x00200011
_INSTANCE_NUMBER = 0x00200013
_SAMPLES_PER_PIXEL = 0x00280002
_PHOTOMETRIC_INTERPRETATION = 0x00280004
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS_ALLOCATED = 0x00280100
_PIXEL_DATA = 0x7FE00010
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF

# The top-level attributes kept while walking; everything else is only checked and skipped.
_KEPT = frozenset(
    {
        _SPECIFIC_CHARACTER_SET,
        _SOP_CLASS,
        _SOP_INSTANCE,
        _STUDY_DATE,
        _STUDY_TIME,
        _ACCESSION_NUMBER,
        _MODALITY,
        _INSTITUTION_NAME,
        _STUDY_DESCRIPTION,
        _SERIES_DESCRIPTION,
        _STUDY_INSTANCE,
        _SERIES_INSTANCE,
        _SERIES_NUMBER,
        _INSTANCE_NUMBER,
        _SAMPLES_PER_PIXEL,
        _PHOTOMETRIC_INTERPRETATION,
        _NUMBER_OF_FRAMES,
        _ROWS,
        _COLUMNS,
        _BITS_ALLOCATED,
        *PATIENT_ID_TAGS,
    }
)
_REQUIRED_UIDS = (
    (_SOP_INSTANCE, "SOP Instance UID"),
    (_STUDY_INSTANCE, "Study Instance UID"),
    (_SERIES_INSTANCE, "Series Instance UID"),
)
_VRS = frozenset(vr.value for vr in VR)
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_CHUNK = 1 << 16
_DA = re.compile(r"([0-9]{4})\.?([0-9]{2})\.?([0-9]{2})")
_TM = re.compile(r"[0-9]{2}(:?[0-9]{2}(:?[0-9]{2}(\.[0-9]{1,6})?)?)?")
_IS = re.compile(r"[+-]?[0-9]{1,12}")
_ESCAPED_FRAGMENTS = re.compile(rb"(^[^\x1b]+|\x1b[^\x1b]*)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Rejected(BeeldportaalError):
    """The instance cannot be stored: the DICOM status to answer with and a short reason."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"Rejected({self.status.name}, {self.reason!r})"


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """What ingest needs from one instance; every value fits the InstanceStored event fields."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient: BsnFinding
    modality: str | None = None
    study_date: date | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    institution_name: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    instance_number: int | None = None
    report_kind: ReportKind | None = None
    # Where the data set starts (after preamble and File Meta): the same instance sent twice,
    # e.g. once by STOW-RS and once by C-STORE, differs only in the bytes before this offset.
    data_set_offset: int = 0


def is_valid_uid(value: str) -> bool:
    """PS3.5 §9.1: dotted numeric components without leading zeros, at most 64 characters."""
    try:
        _DICOM_UID.validate_python(value)
    except ValidationError:
        return False
    return True


def is_storage_sop_class(uid: str) -> bool:
    """A patient-level Storage SOP Class (pynetdicom's list; not palettes or protocols)."""
    return uid_to_service_class(uid) is StorageServiceClass


def read_header(fp: BinaryIO, size: int) -> InstanceHeader:
    """Check the ``size`` bytes of ``fp`` (a Part 10 file, from offset 0) and read its header.

    Raises :class:`Rejected`. Leaves ``fp`` at offset 0 for whoever stores the bytes next.
    """
    try:
        fp.seek(0)
        return _read(fp, size)
    except _Malformed as exc:
        raise Rejected(Status.CANNOT_UNDERSTAND, str(exc)) from None
    finally:
        fp.seek(0)


# --- The checks in order: Part 10 framing, File Meta, transfer syntax, structure, attributes ---


def _read(fp: BinaryIO, size: int) -> InstanceHeader:
    raw = _FileStream(fp, size)
    try:
        prefix = raw.read(132)
    except _Truncated:
        raise _Malformed("not a DICOM Part 10 file: too short for the preamble") from None
    if prefix[128:] != b"DICM":
        raise _Malformed("not a DICOM Part 10 file: no 'DICM' prefix after the preamble")
    meta = _read_file_meta(raw)
    data_set_offset = raw.pos

    transfer_syntax = _required_uid(meta, _TRANSFER_SYNTAX, "Transfer Syntax UID")
    if transfer_syntax not in ACCEPTED_TRANSFER_SYNTAXES:
        raise Rejected(
            Status.TRANSFER_SYNTAX_NOT_SUPPORTED,
            f"transfer syntax {transfer_syntax} is not supported",
        )
    syntax = UID(transfer_syntax)
    if syntax.is_deflated:
        stream: _Stream = _InflatingStream(raw)
        encoding = _EXPLICIT_LE
    else:
        stream = raw
        encoding = _Encoding(syntax.is_implicit_VR, syntax.is_little_endian)
    walker = _Walker(stream, encapsulated=syntax.is_encapsulated)
    walker.data_set(encoding, end=None, depth=0, top=True)
    if isinstance(stream, _InflatingStream):
        stream.finish()
    raw.check_size()

    kept = walker.kept
    sop_class = _required_uid(kept, _SOP_CLASS, "SOP Class UID")
    if not is_storage_sop_class(sop_class):
        raise Rejected(
            Status.SOP_CLASS_NOT_SUPPORTED,
            f"SOP class {sop_class} is not a supported storage SOP class",
        )
    sop_instance, study, series = (_required_uid(kept, tag, name) for tag, name in _REQUIRED_UIDS)
    _check_media_storage(meta, sop_class, sop_instance)
    _check_pixel_description(kept, walker.pixel_data_length)

    encodings = _python_encodings(kept)
    return InstanceHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid=transfer_syntax,
        patient=_find_bsn(kept),
        modality=_limit(_ascii(kept.get(_MODALITY)), CODE_MAX),
        study_date=_date(_ascii(kept.get(_STUDY_DATE))),
        study_time=_time(_ascii(kept.get(_STUDY_TIME))),
        accession_number=_limit(
            _text(kept.get(_ACCESSION_NUMBER), encodings), ACCESSION_NUMBER_MAX
        ),
        study_description=_limit(_text(kept.get(_STUDY_DESCRIPTION), encodings), TEXT_MAX),
        institution_name=_limit(_text(kept.get(_INSTITUTION_NAME), encodings), TEXT_MAX),
        series_number=_integer_string(_ascii(kept.get(_SERIES_NUMBER))),
        series_description=_limit(_text(kept.get(_SERIES_DESCRIPTION), encodings), TEXT_MAX),
        instance_number=_integer_string(_ascii(kept.get(_INSTANCE_NUMBER))),
        report_kind=REPORT_SOP_CLASSES.get(sop_class),
        data_set_offset=data_set_offset,
    )


def _find_bsn(kept: dict[int, RawDataElement]) -> BsnFinding:
    patient = Dataset({BaseTag(tag): kept[tag] for tag in PATIENT_ID_TAGS if tag in kept})
    try:
        return find_bsn(patient)
    except Exception:
        # pydicom parses the kept sequences itself and sniffs each item's VR encoding. The walk
        # has checked them in the declared encoding, so this is not expected; should pydicom
        # still disagree with untrusted bytes, refuse them rather than crash. The cause is
        # dropped on purpose: pydicom's messages may quote values.
        raise Rejected(
            Status.CANNOT_UNDERSTAND, "the patient identification sequences cannot be parsed"
        ) from None


def _read_file_meta(raw: _FileStream) -> dict[int, RawDataElement]:
    # PS3.10 §7.1: group 0002, always Explicit VR Little Endian, before the data set.
    meta: dict[int, RawDataElement] = {}
    start = raw.pos
    try:
        while len(peeked := raw.peek(2)) == 2 and struct.unpack("<H", peeked)[0] == 0x0002:
            tag, vr, length = _element_header(raw, _EXPLICIT_LE)
            if length == _UNDEFINED_LENGTH or raw.pos + length - start > MAX_FILE_META_BYTES:
                raise _Malformed("the File Meta Information is malformed or implausibly large")
            meta[tag] = RawDataElement(BaseTag(tag), vr, length, raw.read(length), 0, False, True)
    except _Truncated:
        raise _Malformed("the file ends inside its File Meta Information") from None
    return meta


def _required_uid(elements: dict[int, RawDataElement], tag: int, name: str) -> str:
    value = _ascii(elements.get(tag))
    if value is None:
        raise Rejected(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{name} {_tag(tag)} is missing")
    if not is_valid_uid(value):
        # Not echoed: an invalid value is not known to be a UID rather than something personal.
        raise Rejected(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{name} {_tag(tag)} is not a valid UID"
        )
    return value


def _check_media_storage(
    meta: dict[int, RawDataElement], sop_class: str, sop_instance: str
) -> None:
    # Absent or empty File Meta copies are tolerated; copies that disagree are not: a receiver
    # indexing by either would file the instance under the wrong identity.
    for tag, name, expected in (
        (_MEDIA_STORAGE_SOP_CLASS, "Media Storage SOP Class UID", sop_class),
        (_MEDIA_STORAGE_SOP_INSTANCE, "Media Storage SOP Instance UID", sop_instance),
    ):
        value = _ascii(meta.get(tag))
        if value is not None and value != expected:
            raise Rejected(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"{name} {_tag(tag)} in the File Meta Information does not match the data set",
            )


def _check_pixel_description(kept: dict[int, RawDataElement], pixel_bytes: int | None) -> None:
    # Number of Frames is what a recipient (and WADO-RS frame retrieval) needs to split Pixel
    # Data; native Pixel Data shorter than its description cannot be displayed.
    frames = 1
    text = _ascii(kept.get(_NUMBER_OF_FRAMES))
    if text is not None:
        number = _integer_string(text)
        if number is None or number < 1:
            raise Rejected(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"Number of Frames {_tag(_NUMBER_OF_FRAMES)} is not a positive integer",
            )
        frames = number
    if pixel_bytes is None:
        return
    rows, columns, bits = (_unsigned_short(kept.get(t)) for t in (_ROWS, _COLUMNS, _BITS_ALLOCATED))
    if not rows or not columns or not bits or (bits != 1 and bits % 8):
        return
    samples = _unsigned_short(kept.get(_SAMPLES_PER_PIXEL)) or 1
    values = rows * columns * frames * samples
    expected = (values + 7) // 8 if bits == 1 else values * (bits // 8)
    if _ascii(kept.get(_PHOTOMETRIC_INTERPRETATION)) == "YBR_FULL_422":
        expected = expected // 3 * 2  # two chroma samples shared by two pixels (PS3.3 C.7.6.3)
    if pixel_bytes < expected:
        raise Rejected(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"Pixel Data {_tag(_PIXEL_DATA)} holds {pixel_bytes} bytes, fewer than the "
            f"{expected} its rows, columns, frames, samples and bits allocated require",
        )


# --- Decoding the kept values (no pydicom converters: they warn, see the module docstring) -----


def _ascii(elem: RawDataElement | None) -> str | None:
    if elem is None or not isinstance(elem.value, bytes):
        return None
    return elem.value.decode("ascii", errors="replace").strip(" \x00") or None


def _python_encodings(kept: dict[int, RawDataElement]) -> list[str]:
    terms = (_ascii(kept.get(_SPECIFIC_CHARACTER_SET)) or "").split("\\")
    terms = [term.strip() or "ISO_IR 6" for term in terms]
    return [python_encoding.get(term, "iso8859") for term in terms]


def _text(elem: RawDataElement | None, encodings: list[str]) -> str | None:
    if elem is None or not isinstance(elem.value, bytes):
        return None
    value: bytes = elem.value
    if b"\x1b" not in value:
        text = value.decode(encodings[0], errors="replace")
    else:
        # ISO 2022 code extensions (PS3.5 §6.1.2.5): each escape sequence selects the charset of
        # the bytes that follow it.
        parts = []
        for fragment in _ESCAPED_FRAGMENTS.findall(value):
            size = 4 if fragment.startswith((b"\x1b$(", b"\x1b$)")) else 3
            codec = CODES_TO_ENCODINGS.get(fragment[:size]) if fragment[:1] == b"\x1b" else None
            if codec is None:
                parts.append(fragment.decode(encodings[0], errors="replace"))
            elif codec in handled_encodings:  # Python's codec reads the escape itself
                parts.append(fragment.decode(codec, errors="replace"))
            else:
                parts.append(fragment[size:].decode(codec, errors="replace"))
        text = "".join(parts)
    # Control characters have no place in these VRs (PS3.5 §6.1.2.3: only ESC, consumed
    # above); a NUL inside would stop PostgreSQL storing the text at all.
    return _CONTROL.sub(" ", text).strip(" ") or None


def _limit(text: str | None, length: int) -> str | None:
    return (text[:length].rstrip() or None) if text else None


def _date(text: str | None) -> date | None:
    match = _DA.fullmatch(text or "")
    if not match:
        return None
    try:
        return date(*(int(part) for part in match.groups()))
    except ValueError:
        return None


def _time(text: str | None) -> str | None:
    """A valid TM, in its standard form: the ACR-NEMA colons ("10:15:00") dropped, so that the
    timeline, which orders study times as text, orders them by time."""
    return text.replace(":", "") if text and _TM.fullmatch(text) else None


def _integer_string(text: str | None) -> int | None:
    # IS (PS3.5 table 6.2-1): an integer of at most 12 characters in [-2^31, 2^31 - 1].
    if not text or not _IS.fullmatch(text):
        return None
    number = int(text)
    return number if -(2**31) <= number < 2**31 else None


def _unsigned_short(elem: RawDataElement | None) -> int | None:
    if elem is None or not isinstance(elem.value, bytes) or len(elem.value) != 2:
        return None
    return int(struct.unpack("<H" if elem.is_little_endian else ">H", elem.value)[0])


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# --- The structural walk ---------------------------------------------------------------------


class _Malformed(Exception):
    """Not a well-formed DICOM file; the message says where, in tags and offsets only."""


class _Truncated(Exception):
    """The bytes ran out; the element being walked turns this into a _Malformed."""


class _Encoding(NamedTuple):
    implicit_vr: bool
    little_endian: bool


_EXPLICIT_LE = _Encoding(implicit_vr=False, little_endian=True)
_IMPLICIT_LE = _Encoding(implicit_vr=True, little_endian=True)


class _Stream:
    """Forward-only bytes with a position; can record what passes while one element is kept."""

    def __init__(self, pos: int = 0) -> None:
        self.pos = pos
        self._recording: bytearray | None = None

    def read(self, n: int) -> bytes:
        data = self._read(n)
        if len(data) < n:
            raise _Truncated
        self.pos += n
        if self._recording is not None:
            self._recording += data
            if len(self._recording) > MAX_ATTRIBUTE_BYTES:
                raise _Malformed(f"a kept header attribute exceeds {MAX_ATTRIBUTE_BYTES} bytes")
        return data

    def skip(self, n: int) -> None:
        if self._recording is None:
            self._skip(n)
            self.pos += n
            return
        while n:
            step = min(n, _CHUNK)
            self.read(step)
            n -= step

    def record(self) -> None:
        self._recording = bytearray()

    def recorded(self) -> bytes:
        data, self._recording = bytes(self._recording or b""), None
        return data

    def _read(self, n: int) -> bytes:
        raise NotImplementedError

    def _skip(self, n: int) -> None:
        raise NotImplementedError

    def peek(self, n: int) -> bytes:
        raise NotImplementedError

    def at_end(self) -> bool:
        raise NotImplementedError


class _FileStream(_Stream):
    """The file itself, read through a small buffer: a header is hundreds of 2- to 8-byte reads,
    which cost more as file calls than as slices. Skipping past the buffer is a seek, checked
    against the size the sender declared."""

    _BLOCK = 64 * 1024

    def __init__(self, fp: BinaryIO, size: int) -> None:
        super().__init__(fp.tell())
        self._fp = fp
        self._end = size
        self._buf = b""
        self._buf_start = self.pos

    def remaining(self) -> int:
        return self._end - self.pos

    def read(self, n: int) -> bytes:
        # Fast path, most reads: within the buffer (which never extends past the declared size)
        # and nothing being recorded.
        offset = self.pos - self._buf_start
        if self._recording is None and offset >= 0 and offset + n <= len(self._buf):
            self.pos += n
            return self._buf[offset : offset + n]
        return super().read(n)

    def _read(self, n: int) -> bytes:
        if not n:
            return b""
        n = min(n, self.remaining())
        offset = self.pos - self._buf_start
        if offset >= 0 and offset + n <= len(self._buf):
            return self._buf[offset : offset + n]
        self._fp.seek(self.pos)
        if n >= self._BLOCK:
            return self._fp.read(n)
        self._buf = self._fp.read(min(self._BLOCK, self.remaining()))
        self._buf_start = self.pos
        return self._buf[:n]

    def _skip(self, n: int) -> None:
        if n > self.remaining():
            raise _Truncated
        # Nothing to do: the next read starts at the new position (from the buffer or a seek).

    def peek(self, n: int) -> bytes:
        return self._read(n)

    def at_end(self) -> bool:
        return self.pos >= self._end

    def check_size(self) -> None:
        # Skipping is seeking, which succeeds past the real end of a file that is shorter than
        # the size it was declared with: make sure the last byte is really there.
        if self._end:
            self._fp.seek(self._end - 1)
            if len(self._fp.read(1)) != 1:
                raise _Malformed("the file is shorter than its declared size")


class _InflatingStream(_Stream):
    """A deflated data set (PS3.5 A.5), inflated in chunks as it is walked and then dropped."""

    def __init__(self, raw: _FileStream) -> None:
        super().__init__()
        self._raw = raw
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()

    def _fill(self, n: int) -> None:
        try:
            while len(self._buffer) < n and not self._inflater.eof:
                data = self._inflater.unconsumed_tail
                if not data:
                    if not self._raw.remaining():
                        return
                    data = self._raw.read(min(_CHUNK, self._raw.remaining()))
                self._buffer += self._inflater.decompress(data, _CHUNK)
                if self.pos + len(self._buffer) > MAX_INFLATED_BYTES:
                    raise _Malformed(f"the deflated data set inflates beyond {MAX_INFLATED_BYTES}")
        except zlib.error:
            raise _Malformed("the deflated data set is corrupt") from None

    def _read(self, n: int) -> bytes:
        self._fill(n)
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def _skip(self, n: int) -> None:
        while n:
            step = min(n, _CHUNK)
            if len(self._read(step)) < step:
                raise _Truncated
            n -= step

    def peek(self, n: int) -> bytes:
        self._fill(n)
        return bytes(self._buffer[:n])

    def at_end(self) -> bool:
        self._fill(1)
        return not self._buffer

    def finish(self) -> None:
        if not self._inflater.eof:
            raise _Malformed("the deflated data set is truncated")
        # Tolerated after the bitstream: one NUL padding it to an even length (PS3.5 A.5), or
        # the 8-byte gzip trailer (CRC-32, inflated size) some older writers append.
        unused = self._inflater.unused_data
        if len(unused) + self._raw.remaining() <= 8:
            rest = unused + self._raw.read(self._raw.remaining())
            size = struct.pack("<L", self.pos & 0xFFFFFFFF)
            if rest in (b"", b"\x00") or (len(rest) == 8 and rest[4:] == size):
                return
        raise _Malformed("bytes follow the end of the deflated data set")


# Every element header starts with 8 bytes: tag and a 32-bit length (implicit VR; items and
# delimiters in any encoding), or tag, VR and a 16-bit length (explicit VR), or tag, VR and two
# reserved bytes followed by a 32-bit length (explicit VR, long VRs). One read of 8 bytes, and
# 4 more for a long VR, instead of a read per field: a header is walked element by element, and
# the reads were most of the cost of reading one (PS3.5 §7.1).
_HEAD = {
    True: (struct.Struct("<HHL"), struct.Struct("<HH2sH"), struct.Struct("<L")),
    False: (struct.Struct(">HHL"), struct.Struct(">HH2sH"), struct.Struct(">L")),
}


def _element_header(stream: _Stream, encoding: _Encoding) -> tuple[int, str | None, int]:
    implicit, explicit, long_length = _HEAD[encoding.little_endian]
    head = stream.read(8)
    group, element, length = implicit.unpack(head)
    tag = group << 16 | element
    if group == 0xFFFE or encoding.implicit_vr:
        # Item and delimiter tags carry no VR in any encoding (PS3.5 §7.5).
        return tag, None, length
    _, _, raw_vr, short_length = explicit.unpack(head)
    vr = raw_vr.decode("latin-1")
    if vr not in _VRS:
        raise _Malformed(
            f"element {_tag(tag)} at offset {stream.pos - 8} has an invalid VR; the data set"
            " is not encoded as its transfer syntax says"
        )
    if vr in _LONG_VRS:
        return tag, vr, long_length.unpack(stream.read(4))[0]
    return tag, vr, short_length


_EXPLICIT_LE_HEAD = struct.Struct("<HH2sH")
_LE_LENGTH = struct.Struct("<L")
_SHORT_VR_BYTES = frozenset(vr.encode() for vr in _VRS - _LONG_VRS)
# Long-length VRs stepped over by _skim: every one but SQ, whose items are walked.
_LONG_VR_BYTES = frozenset(vr.encode() for vr in _LONG_VRS if vr != "SQ")


def _skim(stream: _FileStream, kept: dict[int, RawDataElement]) -> None:
    """Walk the plain top-level elements ahead in the buffer, in explicit VR little endian:
    those with a valid VR other than SQ and a defined length that ends within the file (for a
    kept one: within the buffer and the attribute limit), other than Pixel Data. Such an
    element needs nothing but its length (and, if kept, its value), exactly as the general
    walk would take it; _skim stops at the first element it cannot decide alone, which the
    general walk then handles (and refuses, if it is wrong). A header is mostly such elements,
    and taking them here costs far less than the general walk's calls per element."""
    buffer = stream._buf
    start = stream._buf_start
    buffered = start + len(buffer)
    limit = buffered - 12  # room for the longest element header
    end = stream._end
    pos = stream.pos
    head = _EXPLICIT_LE_HEAD.unpack_from
    long_length = _LE_LENGTH.unpack_from
    while start <= pos <= limit:
        offset = pos - start
        group, element, vr, length = head(buffer, offset)
        tag = group << 16 | element
        if group == 0xFFFE or tag == _PIXEL_DATA:
            break
        if vr in _SHORT_VR_BYTES:
            value_at = pos + 8
        elif vr in _LONG_VR_BYTES:
            length = long_length(buffer, offset + 8)[0]
            if length == _UNDEFINED_LENGTH:
                break
            value_at = pos + 12
        else:  # SQ, or not a VR
            break
        following = value_at + length
        if following > end:
            break
        if tag in _KEPT:
            if following > buffered or length > MAX_ATTRIBUTE_BYTES:
                break
            value = buffer[value_at - start : following - start]
            kept[tag] = RawDataElement(BaseTag(tag), vr.decode(), length, value, 0, False, True)
        pos = following
    stream.pos = pos


class _Walker:
    """Walks elements, items and fragments, keeping the top-level attributes in ``_KEPT``."""

    def __init__(self, stream: _Stream, *, encapsulated: bool) -> None:
        self._stream = stream
        self._encapsulated = encapsulated
        self.kept: dict[int, RawDataElement] = {}
        self.pixel_data_length: int | None = None  # native top-level Pixel Data only

    def data_set(self, encoding: _Encoding, *, end: int | None, depth: int, top: bool) -> None:
        """Walk to ``end``, to an Item Delimitation Item (``end`` None), or to EOF (``top``)."""
        stream = self._stream
        if depth > MAX_SEQUENCE_DEPTH:
            raise _Malformed(f"sequences are nested deeper than {MAX_SEQUENCE_DEPTH} levels")
        skim = top and isinstance(stream, _FileStream) and encoding == _EXPLICIT_LE
        while True:
            if skim:
                _skim(stream, self.kept)  # type: ignore[arg-type]
            if top and stream.at_end():
                return
            if end is not None and stream.pos >= end:
                if stream.pos > end:
                    raise _Malformed(f"an element overruns its sequence item ending at {end}")
                return
            offset = stream.pos
            try:
                tag, vr, length = _element_header(stream, encoding)
            except _Truncated:
                where = "a data set" if top else "a sequence item"
                raise _Malformed(
                    f"the file is truncated: it ends inside {where} at {offset}"
                ) from None
            if tag == _ITEM_END and end is None and not top:
                return
            if tag >> 16 == 0xFFFE:
                raise _Malformed(f"unexpected item tag {_tag(tag)} in a data set at {offset}")
            keep = top and tag in _KEPT
            if keep:
                if length != _UNDEFINED_LENGTH and length > MAX_ATTRIBUTE_BYTES:
                    raise _Malformed(f"header attribute {_tag(tag)} exceeds {MAX_ATTRIBUTE_BYTES}")
                stream.record()
            try:
                vr, value_encoding = self._value(tag, vr, length, encoding, depth)
            except _Truncated:
                raise _Malformed(
                    f"the file is truncated: element {_tag(tag)} at {offset} runs past its end"
                ) from None
            if keep:
                value = stream.recorded()
                self.kept[tag] = self._kept_element(tag, vr, length, value, value_encoding)
            if top and tag == _PIXEL_DATA:
                self._check_pixel_data_form(length)

    def _value(
        self, tag: int, vr: str | None, length: int, encoding: _Encoding, depth: int
    ) -> tuple[str | None, _Encoding]:
        stream = self._stream
        undefined = length == _UNDEFINED_LENGTH
        if vr == "SQ" or (vr is None and self._implicit_sequence(tag, encoding, undefined)):
            self._sequence(encoding, None if undefined else stream.pos + length, depth)
            return "SQ", encoding
        if not undefined:
            stream.skip(length)
            return vr, encoding
        if vr == "UN" and tag != _PIXEL_DATA:
            # PS3.5 §6.2.2: an undefined-length UN is a sequence in Implicit VR Little Endian.
            self._sequence(_IMPLICIT_LE, None, depth)
            return "SQ", _IMPLICIT_LE
        if vr in ("OB", "OW", "UN"):
            self._fragments(encoding)
            return vr, encoding
        raise _Malformed(f"element {_tag(tag)} has an undefined length its VR does not allow")

    def _implicit_sequence(self, tag: int, encoding: _Encoding, undefined: bool) -> bool:
        try:
            return bool(dictionary_VR(tag) == "SQ")
        except KeyError:  # private or unknown: a sequence if an item follows (as pydicom does)
            order = "<" if encoding.little_endian else ">"
            return undefined and self._stream.peek(4) == struct.pack(order + "HH", 0xFFFE, 0xE000)

    def _sequence(self, encoding: _Encoding, end: int | None, depth: int) -> None:
        stream = self._stream
        order = "<" if encoding.little_endian else ">"
        while True:
            if end is not None and stream.pos >= end:
                if stream.pos > end:
                    raise _Malformed(f"an item overruns its sequence ending at {end}")
                return
            offset = stream.pos
            group, element, length = struct.unpack(order + "HHL", stream.read(8))
            tag = group << 16 | element
            if tag == _SEQUENCE_END and end is None:
                return
            if tag != _ITEM:
                raise _Malformed(f"expected an item in a sequence at {offset}, found {_tag(tag)}")
            if length == _UNDEFINED_LENGTH:
                self.data_set(encoding, end=None, depth=depth + 1, top=False)
            else:
                self.data_set(encoding, end=stream.pos + length, depth=depth + 1, top=False)

    def _fragments(self, encoding: _Encoding) -> None:
        # Encapsulated Pixel Data (PS3.5 A.4): items of defined length (the Basic Offset Table,
        # then fragments), closed by a Sequence Delimitation Item. Fragments are seeked over.
        stream = self._stream
        order = "<" if encoding.little_endian else ">"
        while True:
            offset = stream.pos
            group, element, length = struct.unpack(order + "HHL", stream.read(8))
            tag = group << 16 | element
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM or length == _UNDEFINED_LENGTH:
                raise _Malformed(f"encapsulated data holds {_tag(tag)} at {offset}, not an item")
            stream.skip(length)

    def _check_pixel_data_form(self, length: int) -> None:
        if self._encapsulated and length != _UNDEFINED_LENGTH:
            raise _Malformed("Pixel Data is not encapsulated, as its transfer syntax requires")
        if not self._encapsulated:
            if length == _UNDEFINED_LENGTH:
                raise _Malformed("Pixel Data is encapsulated under a native transfer syntax")
            self.pixel_data_length = length

    @staticmethod
    def _kept_element(
        tag: int, vr: str | None, length: int, value: bytes, encoding: _Encoding
    ) -> RawDataElement:
        if length == _UNDEFINED_LENGTH:
            value = value[:-8]  # the Sequence Delimitation Item; pydicom reads items to the end
        return RawDataElement(
            BaseTag(tag),
            vr,
            len(value),
            value,
            0,
            encoding.implicit_vr,
            encoding.little_endian,
        )
