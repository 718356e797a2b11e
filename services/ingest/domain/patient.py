"""Find the patient's BSN where senders put it in a DICOM header, and say how sure we are."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from shared.events import BsnStatus
from shared.identifiers import (
    BSN_DICOM_ISSUER,
    BSN_OID,
    Bsn,
    InvalidBsn,
    mask_written_bsns,
    parse_bsn,
)

PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
ISSUER_OF_PATIENT_ID_QUALIFIERS = 0x00100024
OTHER_PATIENT_IDS_SEQUENCE = 0x00101002
UNIVERSAL_ENTITY_ID = 0x00400032

# The top-level attributes find_bsn reads; a caller building a partial dataset needs only these.
PATIENT_ID_TAGS = (
    PATIENT_ID,
    ISSUER_OF_PATIENT_ID,
    ISSUER_OF_PATIENT_ID_QUALIFIERS,
    OTHER_PATIENT_IDS_SEQUENCE,
)

_URN_OID = re.compile(r"^urn:oid:", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class BsnFinding:
    """What the header says about the BSN. ``bsn`` is set exactly when the status is VERIFIED."""

    status: BsnStatus
    bsn: Bsn | None = None
    # Every valid BSN the header claims (also when they conflict): none of them may be
    # published (``without_own_bsn``, ``uid_holds_bsn``).
    claims: frozenset[Bsn] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        if (self.bsn is None) == (self.status is BsnStatus.VERIFIED):
            raise ValueError("a BSN is present exactly when the status is verified")


def find_bsn(ds: Dataset) -> BsnFinding:
    """Collect every BSN claim (an ID whose issuer is the BSN register) and judge them together.

    A Patient ID without a BSN issuer is the sender's own number, even if it is nine digits.
    """
    valid: set[Bsn] = set()
    invalid = 0
    for claim in _bsn_claims(ds):
        try:
            valid.add(parse_bsn(claim))
        except InvalidBsn:
            invalid += 1
    if not valid:
        return BsnFinding(BsnStatus.INVALID if invalid else BsnStatus.ABSENT)
    claims = frozenset(valid)
    if len(valid) == 1 and not invalid:
        return BsnFinding(BsnStatus.VERIFIED, next(iter(valid)), claims)
    return BsnFinding(BsnStatus.CONFLICTING, claims=claims)


MASKED_BSN = "[BSN]"


def without_own_bsn(value: str | None, claims: Iterable[Bsn]) -> str | None:
    """An identifier from the header (an Accession Number) as it may be published: every BSN
    the header claims for the patient masked wherever it stands in it, nothing else changed
    (a 9-digit accession number passes the 11-proof one time in eleven, and reports are
    linked by it)."""
    if value is None:
        return None
    for bsn in claims:
        value = value.replace(bsn.value, MASKED_BSN)
    return value


def without_bsns(text: str | None, claims: Iterable[Bsn]) -> str | None:
    """Free text from the header or the sender (a description, a name, a note) as it may be
    published: the patient's own BSN masked wherever it stands, and any BSN a person wrote
    (``mask_written_bsns``: also in groups, "1234.56.782")."""
    if text is None:
        return None
    return mask_written_bsns(without_own_bsn(text, claims) or "", MASKED_BSN)


def uid_holds_bsn(uid: str, claims: Iterable[Bsn]) -> bool:
    """Whether a UID holds a BSN the header claims for the patient among its digits (a sender
    that builds UIDs from patient ids): the UIDs name the object keys, the events' keys and
    the DICOMweb URLs."""
    return any(bsn.value in uid for bsn in claims)


def _bsn_claims(ds: Dataset) -> Iterator[str]:
    # The patient's own identifier, then each item of Other Patient IDs Sequence, each of which
    # carries its own Patient ID, Issuer of Patient ID and Issuer Qualifiers.
    yield from _claim(ds)
    for item in _items(ds, OTHER_PATIENT_IDS_SEQUENCE):
        yield from _claim(item)


def _claim(ds: Dataset) -> Iterator[str]:
    value = _text(ds, PATIENT_ID)
    if value and _issued_by_bsn_register(ds):
        yield value


def _issued_by_bsn_register(ds: Dataset) -> bool:
    issuer = _text(ds, ISSUER_OF_PATIENT_ID)
    if issuer is not None and (_is_bsn_issuer_name(issuer) or _is_bsn_oid(issuer)):
        return True
    return any(
        _is_bsn_oid(_text(item, UNIVERSAL_ENTITY_ID) or "")
        for item in _items(ds, ISSUER_OF_PATIENT_ID_QUALIFIERS)
    )


def _is_bsn_issuer_name(value: str) -> bool:
    return _WHITESPACE.sub("", value).upper() == BSN_DICOM_ISSUER


def _is_bsn_oid(value: str) -> bool:
    return _URN_OID.sub("", _WHITESPACE.sub("", value)) == BSN_OID


def _text(ds: Dataset, tag: int) -> str | None:
    # get_item() hands back the element as read, so a raw value is decoded here instead of by
    # pydicom's converters: identifiers and OIDs are ASCII, and nothing here may warn or raise
    # on a sender's odd value. Multi-valued strings stay one string (and so fail the 11-proof).
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    elif value is not None and not isinstance(value, str):
        value = "\\".join(map(str, value)) if isinstance(value, Iterable) else str(value)
    text = (value or "").strip(" \x00")
    return text or None


def _items(ds: Dataset, tag: int) -> list[Dataset]:
    if ds.get_item(tag) is None:
        return []
    value = ds[tag].value
    return [item for item in value if isinstance(item, Dataset)] if value else []
