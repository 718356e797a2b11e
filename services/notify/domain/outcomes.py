"""What a receiving PACS made of a batch: one outcome per instance, or one error for the batch.

Two levels of failure, because a receiver answers at two levels:

* The **batch** fails as a whole when the receiver never judged the instances: it could not be
  reached, the association or HTTP request was refused, it answered 5xx. That is an exception:
  :class:`TransientDeliveryError` (retry the batch later) or :class:`PermanentDeliveryError`
  (retrying the same request cannot help: dead-letter it with the reason). An association
  aborted mid-batch is a TransientDeliveryError that carries the answers received before it.
* Otherwise each instance has an :class:`InstanceOutcome` from the receiver's own status code
  (C-STORE Status, STOW-RS FailureReason/WarningReason), gathered in a :class:`BatchResult`.
  A FAILED outcome says whether it is worth sending that instance again (``transient``).

An instance the receiver says it holds already (C-STORE 0111, STOW-RS FailureReason B00E) is
ALREADY_PRESENT, not a failure: beeldportaal resends what an abort or a timeout left unanswered,
so the copy the receiver holds is almost always our own earlier one. Its code is kept on the
outcome, so a real content conflict (another system's instance under the same UID) stays
traceable.

Codes are written as four upper-case hex digits (``"A700"``), as PS3.4/PS3.18 print them.
Reasons are short fixed phrases, never text from the receiver or the data set: they end up in
events and logs, which must never carry patient data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from shared.errors import PoisonEvent, TransientError

__all__ = [
    "BatchResult",
    "InstanceOutcome",
    "InstanceStatus",
    "OutgoingInstance",
    "PermanentDeliveryError",
    "TransientDeliveryError",
    "classify_failure_reason",
    "classify_status",
    "describe_status",
    "format_code",
    "is_transient_failure",
    "outcome_for_failure_reason",
    "outcome_for_status",
]


@dataclass(frozen=True, slots=True, repr=False)
class OutgoingInstance:
    """One instance to deliver: its identity and its Part 10 file bytes as stored (or coerced)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    data: bytes

    def __repr__(self) -> str:
        # Never the bytes: they are large and hold patient data.
        return (
            f"OutgoingInstance(sop_instance_uid={self.sop_instance_uid!r}, "
            f"sop_class_uid={self.sop_class_uid!r}, "
            f"transfer_syntax_uid={self.transfer_syntax_uid!r}, size={len(self.data)})"
        )


class InstanceStatus(StrEnum):
    """What became of one instance at the receiver.

    ALREADY_PRESENT: the receiver answered that it holds this SOP Instance UID already (C-STORE
    0111 "duplicate SOP instance", STOW-RS FailureReason B00E); many receivers answer plain
    success instead (Orthanc does), which is STORED.
    """

    STORED = "stored"
    ALREADY_PRESENT = "already-present"
    WARNING = "warning"  # stored, but not quite as sent (e.g. B000 coercion, B006 discarded)
    FAILED = "failed"


_CODE_DIGITS = frozenset("0123456789ABCDEF")


@dataclass(frozen=True)
class InstanceOutcome:
    """The receiver's verdict on one instance. ``transient`` is only ever True for FAILED."""

    sop_instance_uid: str
    status: InstanceStatus
    code: str | None = None
    reason: str | None = None
    transient: bool = False

    def __post_init__(self) -> None:
        if self.code is not None and (len(self.code) != 4 or not set(self.code) <= _CODE_DIGITS):
            raise ValueError("a status code is four upper-case hex digits, e.g. 'A700'")
        if self.transient and self.status is not InstanceStatus.FAILED:
            raise ValueError("only a failed instance can be a transient failure")

    @property
    def failed(self) -> bool:
        return self.status is InstanceStatus.FAILED


@dataclass(frozen=True)
class BatchResult:
    """The outcomes of one batch, in the order the instances were given."""

    outcomes: tuple[InstanceOutcome, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcomes", tuple(self.outcomes))

    @property
    def counts(self) -> Mapping[InstanceStatus, int]:
        """How many instances ended in each status (every status present, zeros included)."""
        counted = Counter(o.status for o in self.outcomes)
        return {status: counted[status] for status in InstanceStatus}

    @property
    def stored(self) -> tuple[InstanceOutcome, ...]:
        """Every instance the receiver now holds: STORED, WARNING and ALREADY_PRESENT."""
        return tuple(o for o in self.outcomes if not o.failed)

    @property
    def failed(self) -> tuple[InstanceOutcome, ...]:
        return tuple(o for o in self.outcomes if o.failed)

    @property
    def transient_failures(self) -> tuple[InstanceOutcome, ...]:
        """Failed instances worth sending again later (e.g. A7xx, out of resources)."""
        return tuple(o for o in self.outcomes if o.failed and o.transient)

    @property
    def permanent_failures(self) -> tuple[InstanceOutcome, ...]:
        """Failed instances the receiver will refuse however often they are sent."""
        return tuple(o for o in self.outcomes if o.failed and not o.transient)

    @property
    def all_stored(self) -> bool:
        return not self.failed

    def outcome(self, sop_instance_uid: str) -> InstanceOutcome:
        for outcome in self.outcomes:
            if outcome.sop_instance_uid == sop_instance_uid:
                return outcome
        raise KeyError(sop_instance_uid)

    @classmethod
    def merge(cls, results: Iterable[BatchResult]) -> BatchResult:
        """One result for several batches of one delivery, in order."""
        return cls(tuple(o for result in results for o in result.outcomes))


# --- whole-batch errors ---------------------------------------------------------------------------


class TransientDeliveryError(TransientError):
    """The batch did not reach the receiver's judgement but may later: unreachable, timed out,
    HTTP 5xx/408/429, association rejected-transient or aborted. Retry the whole batch, less
    ``answered``.

    ``retry_after`` is the receiver's own Retry-After (seconds) when it sent one. ``answered``
    holds the outcomes of the instances the receiver did answer before the batch broke off (an
    association aborted mid-batch): each C-STORE response is final (PS3.7 §9.1.1), so those
    are settled and only the rest is sent again.
    """

    def __init__(
        self,
        reason: str,
        retry_after: float | None = None,
        *,
        answered: BatchResult | None = None,
    ) -> None:
        super().__init__(reason, retry_after)
        self.reason = reason
        self.answered = answered or BatchResult()


class PermanentDeliveryError(PoisonEvent):
    """The receiver refused the batch in a way no retry of the same request can change:
    credentials refused (HTTP 401/403), another 4xx, association rejected-permanent (e.g. an
    unknown called AE title). Dead-letter it with ``reason`` and tell the sender."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- DICOM status codes ---------------------------------------------------------------------------

SUCCESS = 0x0000

# PS3.4 Annex B.2.3 (Storage), PS3.7 Annex C (general DIMSE statuses), PS3.18 §10.5.3 (STOW-RS
# FailureReason/WarningReason). Exact codes first; ranges in _RANGES.
_DESCRIPTIONS: dict[int, str] = {
    0x0000: "success",
    0x0001: "requested optional attributes are not supported",
    0x0107: "attribute list error",
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance (the receiver may hold it already)",
    0x0116: "attribute value out of range",
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0x0210: "duplicate invocation",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
    0x0213: "resource limitation",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
    0xC122: "transfer syntax not supported",
}
# STOW-RS FailureReasons of the Azure DICOM service (45070, 45071): only meaningful in a
# FailedSOPSequence, where a Bxxx code is otherwise a warning the receiver contradicts.
_STOW_DESCRIPTIONS: dict[int, str] = {
    0xB00E: "instance already stored",
    0xB00F: "instance being stored by another process",
}
_RANGES: tuple[tuple[int, int, str], ...] = (
    (0xA700, 0xA7FF, "out of resources"),
    (0xA900, 0xA9FF, "data set does not match SOP class"),
    (0xB000, 0xBFFF, "warning"),
    (0xC000, 0xCFFF, "cannot understand"),
)
# Warnings of PS3.7 Annex C besides the Bxxx range: the instance was stored.
_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})
# Pending and Cancel are not final answers to a C-STORE: a broken peer, worth another try.
_NOT_FINAL = frozenset({0xFE00, 0xFF00, 0xFF01})
# Failures that say "not now" rather than "not this": resource limitation, and processing
# failure, which dcm4chee and the Azure DICOM service answer for their own internal errors.
_TRANSIENT_CODES = frozenset({0x0110, 0x0213})
# "The receiver holds this SOP Instance UID already": C-STORE duplicate SOP instance. The Azure
# DICOM service says it in a FailedSOPSequence as B00E (and "not yet, being stored" as B00F).
_ALREADY_PRESENT_CODES = frozenset({0x0111})
_STOW_ALREADY_PRESENT = 0xB00E
_STOW_BEING_CREATED = 0xB00F


def format_code(status: int) -> str:
    """``0xA700`` -> ``"A700"``."""
    if not 0 <= status <= 0xFFFF:
        raise ValueError("a DICOM status is an unsigned 16-bit number")
    return f"{status:04X}"


def describe_status(status: int) -> str:
    """A short fixed phrase for a status code, e.g. ``"out of resources"`` for A7xx."""
    if status in _DESCRIPTIONS:
        return _DESCRIPTIONS[status]
    for low, high, text in _RANGES:
        if low <= status <= high:
            return text
    if status in _NOT_FINAL:
        return "not a final status"
    return f"status {format_code(status)}"


def is_transient_failure(status: int) -> bool:
    """A7xx (out of resources), 0110 (processing failure), 0213 (resource limitation), or a
    non-final status."""
    return 0xA700 <= status <= 0xA7FF or status in _TRANSIENT_CODES or status in _NOT_FINAL


def classify_status(status: int) -> tuple[InstanceStatus, bool]:
    """``(status, transient)`` for a C-STORE Status or a STOW-RS Failure/WarningReason.

    0000 is STORED; 0111 (duplicate SOP instance) is ALREADY_PRESENT; Bxxx and the general
    warnings 0001/0107/0116 are WARNING (stored); anything else is FAILED, transient only for
    A7xx/0110/0213 (and a non-final Pending/Cancel, which no SCP should answer to a C-STORE).
    A9xx, Cxxx, 0122, 0124, 0211 ... are permanent.
    """
    format_code(status)  # range check
    if status == SUCCESS:
        return InstanceStatus.STORED, False
    if status in _ALREADY_PRESENT_CODES:
        return InstanceStatus.ALREADY_PRESENT, False
    if 0xB000 <= status <= 0xBFFF or status in _WARNINGS:
        return InstanceStatus.WARNING, False
    return InstanceStatus.FAILED, is_transient_failure(status)


def classify_failure_reason(reason: int) -> tuple[InstanceStatus, bool]:
    """``(status, transient)`` for a STOW-RS FailureReason, i.e. an instance the receiver listed
    in FailedSOPSequence (0008,1198).

    As :func:`classify_status`, except: B00E (instance already stored) is ALREADY_PRESENT and
    B00F (being stored by another process) a transient failure; any other code that would mean
    stored (0000, a warning) is a permanent failure, the receiver having listed it as failed.
    """
    format_code(reason)  # range check
    if reason == _STOW_ALREADY_PRESENT:
        return InstanceStatus.ALREADY_PRESENT, False
    if reason == _STOW_BEING_CREATED:
        return InstanceStatus.FAILED, True
    kind, transient = classify_status(reason)
    if kind in (InstanceStatus.STORED, InstanceStatus.WARNING):
        return InstanceStatus.FAILED, False
    return kind, transient


def outcome_for_status(sop_instance_uid: str, status: int) -> InstanceOutcome:
    """The outcome of one instance the receiver answered ``status`` for."""
    kind, transient = classify_status(status)
    if kind is InstanceStatus.STORED:
        return InstanceOutcome(sop_instance_uid, kind)
    return InstanceOutcome(
        sop_instance_uid,
        kind,
        code=format_code(status),
        reason=describe_status(status),
        transient=transient,
    )


def outcome_for_failure_reason(sop_instance_uid: str, reason: int) -> InstanceOutcome:
    """The outcome of one instance a STOW-RS receiver listed as failed with ``reason``."""
    kind, transient = classify_failure_reason(reason)
    if reason in _STOW_DESCRIPTIONS:
        description = _STOW_DESCRIPTIONS[reason]
    elif classify_status(reason)[0] is kind:
        description = describe_status(reason)
    else:  # a code that means stored, listed as failed: the receiver contradicts itself
        description = "listed as failed"
    return InstanceOutcome(
        sop_instance_uid,
        kind,
        code=format_code(reason),
        reason=description,
        transient=transient,
    )
