"""Change one stored instance's header the way its receiver imports it (IHE Import Reconciliation).

Profile ``none`` sends the stored bytes untouched. Profile ``bsn-as-patient-id`` puts the BSN
found in the instance itself in Patient ID (0010,0020), with the receiver's Issuer of Patient ID
(0010,0021) and Issuer of Patient ID Qualifiers Sequence (0010,0024), and records what it
replaced in Original Attributes Sequence (0400,0561), PS3.3 C.12.1.1.9: one new item with
Attribute Modification DateTime, Modifying System ``BEELDPORTAAL``, Source of Previous Values,
Reason ``COERCE``, and a Modified Attributes Sequence (0400,0550) of one item holding the
*original* values (an attribute that was absent is recorded with an empty value, the way
dcm4chee records an insertion). An existing Original Attributes Sequence is appended to.

An issuer the profile does not state is removed rather than kept: the sender's issuer
describes the sender's own patient number, and left next to the BSN it would misname it.

Everything else stays as stored: the SOP Instance UID, the transfer syntax, and every other
element, which pydicom writes back from the bytes it read without decoding them, so Pixel Data
(native or encapsulated) is byte-identical. Nothing here logs, and no error names a value: the
header holds the BSN.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from copy import deepcopy
from datetime import UTC, datetime

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from services.ingest.domain.patient import (
    ISSUER_OF_PATIENT_ID,
    ISSUER_OF_PATIENT_ID_QUALIFIERS,
    PATIENT_ID,
    UNIVERSAL_ENTITY_ID,
    find_bsn,
)
from shared.errors import PoisonEvent
from shared.events import BsnStatus
from shared.events.routing import Coercion

__all__ = ["MODIFYING_SYSTEM", "REASON_COERCE", "CoercionImpossible", "coerce"]

MODIFYING_SYSTEM = "BEELDPORTAAL"
REASON_COERCE = "COERCE"

UNIVERSAL_ENTITY_ID_TYPE = 0x00400033
ORIGINAL_ATTRIBUTES_SEQUENCE = 0x04000561
MODIFIED_ATTRIBUTES_SEQUENCE = 0x04000550
ATTRIBUTE_MODIFICATION_DATETIME = 0x04000562
MODIFYING_SYSTEM_TAG = 0x04000563
SOURCE_OF_PREVIOUS_VALUES = 0x04000564
REASON_FOR_THE_ATTRIBUTE_MODIFICATION = 0x04000565

_VR = {
    PATIENT_ID: "LO",
    ISSUER_OF_PATIENT_ID: "LO",
    ISSUER_OF_PATIENT_ID_QUALIFIERS: "SQ",
}


class CoercionImpossible(PoisonEvent):
    """The instance cannot be coerced as the receiver asks: no single valid BSN in its header
    (``bsn_status`` says why), or it is not a readable DICOM file.

    Poison on purpose: the stored instance never changes, so retrying cannot help. The caller
    decides what the receiver gets instead: this instance FAILED (the rest of the study may
    still go), and the delivery flagged. It must not send the instance uncoerced: the receiver
    would file it under the sender's patient number, i.e. possibly under another patient.
    """

    def __init__(self, reason: str, bsn_status: BsnStatus | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.bsn_status = bsn_status


def coerce(
    data: bytes,
    coercion: Coercion,
    *,
    source_of_previous_values: str = "",
    modified_at: datetime | None = None,
) -> bytes:
    """The Part 10 bytes to send for one stored instance under the receiver's ``coercion``.

    Returns ``data`` itself when the profile is ``none``, or when the header already says what
    the profile wants (nothing is replaced, so there is nothing to record).
    ``source_of_previous_values`` names the sending organisation when known (LO, at most 64
    characters); it is empty otherwise, as PS3.3 allows. ``modified_at`` is recorded as the
    Attribute Modification DateTime (the clock when not given): a sender passes one time per
    delivery, so that every attempt coerces to the same bytes under the same SOP Instance UID.
    """
    if coercion.profile == "none":
        return data
    _check_lo(source_of_previous_values)
    ds = _read(data)
    wanted = _bsn_as_patient_id(_verified_bsn(ds), coercion)
    changes = {tag: elem for tag, elem in wanted.items() if not _already(ds, tag, elem)}
    if not changes:
        return data
    originals = _originals(ds, changes)
    for tag, elem in changes.items():
        if elem is None:
            del ds[tag]
        else:
            ds[tag] = elem
    if coercion.keep_originals:
        _record_originals(
            ds, originals, source_of_previous_values, modified_at or datetime.now(UTC)
        )
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _check_lo(value: str) -> None:
    if len(value) > 64 or "\\" in value or any(ord(c) < 0x20 for c in value):
        raise ValueError("Source of Previous Values is an LO: at most 64 characters, no '\\'")


def _read(data: bytes) -> Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        # pydicom raises many types on a corrupt file (InvalidDicomError, EOFError, ValueError,
        # struct.error, ...): all mean the same here. No message: it may quote the header.
        raise CoercionImpossible(
            f"the stored instance is not a readable DICOM file ({type(exc).__name__})"
        ) from None


def _verified_bsn(ds: Dataset) -> str:
    finding = find_bsn(ds)
    if finding.bsn is None:
        raise CoercionImpossible(
            f"the receiver imports under the BSN, and the instance has no single valid BSN "
            f"(BSN {finding.status.value})",
            bsn_status=finding.status,
        )
    return finding.bsn.value


def _bsn_as_patient_id(bsn: str, coercion: Coercion) -> dict[int, DataElement | None]:
    """Tag -> the element the header must hold (None: must not hold it)."""
    wanted: dict[int, DataElement | None] = {PATIENT_ID: DataElement(PATIENT_ID, "LO", bsn)}
    issuer = coercion.issuer_of_patient_id
    wanted[ISSUER_OF_PATIENT_ID] = (
        DataElement(ISSUER_OF_PATIENT_ID, "LO", issuer) if issuer else None
    )
    if coercion.universal_entity_id:
        qualifier = Dataset()
        qualifier.add_new(UNIVERSAL_ENTITY_ID, "UT", coercion.universal_entity_id)
        qualifier.add_new(UNIVERSAL_ENTITY_ID_TYPE, "CS", "ISO")
        wanted[ISSUER_OF_PATIENT_ID_QUALIFIERS] = DataElement(
            ISSUER_OF_PATIENT_ID_QUALIFIERS, "SQ", Sequence([qualifier])
        )
    else:
        wanted[ISSUER_OF_PATIENT_ID_QUALIFIERS] = None
    return wanted


def _already(ds: Dataset, tag: int, wanted: DataElement | None) -> bool:
    """Whether the header already holds ``wanted`` at ``tag`` (compared without decoding)."""
    current = ds.get_item(tag)
    if wanted is None or current is None:
        return wanted is None and current is None
    if wanted.VR != "SQ":
        return _text(current) == wanted.value
    items = [item for item in (ds[tag].value or ()) if isinstance(item, Dataset)]
    if len(items) != 1:
        return False
    [want] = wanted.value
    return all(_text(items[0].get_item(elem.tag)) == elem.value for elem in want)


def _text(elem: DataElement | RawDataElement | None) -> str | None:
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value).strip(" \x00") if value is not None else None


def _originals(
    ds: Dataset, changes: Mapping[int, DataElement | None]
) -> dict[int, DataElement | RawDataElement]:
    """The replaced elements as they were, undecoded; an absent one as an empty element."""
    originals: dict[int, DataElement | RawDataElement] = {}
    for tag in changes:
        current = ds.get_item(tag)
        if current is None:
            empty = Sequence() if _VR[tag] == "SQ" else None
            originals[tag] = DataElement(tag, _VR[tag], empty)
        elif isinstance(current, RawDataElement):
            originals[tag] = current  # an immutable tuple, written back as the bytes it holds
        else:
            originals[tag] = deepcopy(current)
    return originals


def _record_originals(
    ds: Dataset,
    originals: Mapping[int, DataElement | RawDataElement],
    source: str,
    modified_at: datetime,
) -> None:
    modified = _item_like(ds)
    for tag, elem in originals.items():
        modified[tag] = elem
    record = _item_like(ds)
    record.add_new(MODIFIED_ATTRIBUTES_SEQUENCE, "SQ", Sequence([modified]))
    record.add_new(ATTRIBUTE_MODIFICATION_DATETIME, "DT", _dicom_datetime(modified_at))
    record.add_new(MODIFYING_SYSTEM_TAG, "LO", MODIFYING_SYSTEM)
    record.add_new(SOURCE_OF_PREVIOUS_VALUES, "LO", source or None)
    record.add_new(REASON_FOR_THE_ATTRIBUTE_MODIFICATION, "CS", REASON_COERCE)
    if ds.get_item(ORIGINAL_ATTRIBUTES_SEQUENCE) is None:
        ds.add_new(ORIGINAL_ATTRIBUTES_SEQUENCE, "SQ", Sequence([record]))
    else:
        ds[ORIGINAL_ATTRIBUTES_SEQUENCE].value.append(record)


def _item_like(ds: Dataset) -> Dataset:
    # Encoded like the data set it goes into, so the undecoded elements it carries are written
    # back as they are instead of being decoded (and, on an odd value, warned about) by pydicom.
    item = Dataset()
    item.set_original_encoding(
        ds.original_encoding[0], ds.original_encoding[1], ds.original_character_set
    )
    return item


def _dicom_datetime(moment: datetime) -> str:
    """DT with the UTC offset: ``YYYYMMDDHHMMSS.FFFFFF+ZZXX``."""
    if moment.tzinfo is None:
        raise ValueError("the modification time must be timezone-aware")
    return moment.strftime("%Y%m%d%H%M%S.%f%z")
