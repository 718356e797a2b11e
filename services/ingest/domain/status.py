"""DICOM status codes ingest answers with (C-STORE Status, STOW-RS FailureReason/WarningReason)."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """Named codes from PS3.4 Annex B.2.3 (C-STORE) and PS3.18 §10.5.3 (STOW-RS)."""

    SUCCESS = 0x0000
    # Failures: the instance was not stored.
    OUT_OF_RESOURCES = 0xA700  # A7xx: refused for now; the sender may retry later
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # A9xx: an attribute the IOD requires is wrong
    CANNOT_UNDERSTAND = 0xC000  # Cxxx: the bytes could not be parsed as a DICOM file
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    # Warnings: the instance was stored, but not quite as sent or not quite conformant.
    WARNING_COERCION = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATASET_MISMATCH = 0xB007


def is_warning(status: int) -> bool:
    """B000, B006, B007 and the rest of the Bxxx range (PS3.7 Annex C: warning statuses)."""
    return 0xB000 <= status <= 0xBFFF


def is_failure(status: int) -> bool:
    """Anything that is neither success, a warning, nor a pending/cancel status."""
    return status != Status.SUCCESS and not is_warning(status) and status not in _NOT_FINAL


def is_transient(status: int) -> bool:
    """A7xx (out of resources): the only failure worth retrying unchanged."""
    return 0xA700 <= status <= 0xA7FF


# Pending (FF00, FF01) and Cancel (FE00) are not outcomes of a store.
_NOT_FINAL = frozenset({0xFE00, 0xFF00, 0xFF01})
