"""DIMSE C-STORE SCU: one batch of instances over one association to the receiver's SCP.

Presentation contexts come from the batch itself: per SOP class, each stored transfer syntax
exactly as stored. An uncompressed little-endian instance (Explicit/Implicit VR LE, Deflated)
gets one context per SOP class that also offers Explicit and Implicit VR Little Endian, because
pynetdicom can re-encode between those without touching a value; a compressed (or big-endian)
one gets a context of its stored syntax alone: it is sent as stored or not at all, never
decompressed.

Each instance is read with pydicom (encapsulated Pixel Data stays the stored fragments) and
pynetdicom encodes the data set in the accepted transfer syntax: element values and Pixel Data
go out unchanged; only the encoding around them can differ (no retired group lengths, and the
VR encoding when the receiver chose Implicit for an Explicit instance or the reverse).

Answers:

* per instance, the C-STORE Status (see ``outcomes.classify_status``); an instance whose
  presentation context the receiver rejected is FAILED with ``0122`` (SOP class not supported)
  or ``C122`` (transfer syntax not supported, the STOW-RS code for the same refusal);
* for the whole batch: connection refused or timed out, association rejected-transient,
  aborted, or no C-STORE response: TransientDeliveryError; association rejected-permanent
  (e.g. an unknown called AE title): PermanentDeliveryError. An abort (or a lost connection,
  or a C-STORE response that never came) after some instances were answered keeps their
  answers in the error's ``answered``: a C-STORE response is final (PS3.7 §9.1.1), so only
  the instance in flight and those after it are sent again.

Each C-STORE-RQ carries the delivery's Priority (0000,0700): HIGH for an urgent or emergency
study, MEDIUM for a routine one (:func:`c_store_priority`; pynetdicom's own default is LOW). A
receiver may use it to order its import work; most ignore it, none refuse it.

pynetdicom blocks, so each batch runs in a worker thread (``asyncio.to_thread``). Cancelling
:meth:`DimseSender.send` lets the thread finish the C-STORE in flight, then abort the
association. The association is always released (or aborted) before ``send`` returns.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from services.notify.domain.outcomes import (
    BatchResult,
    InstanceOutcome,
    InstanceStatus,
    OutgoingInstance,
    PermanentDeliveryError,
    TransientDeliveryError,
    outcome_for_status,
)
from services.routing.domain.directory import DimseEndpoint
from shared.events import Urgency

__all__ = [
    "MAX_PRESENTATION_CONTEXTS",
    "PRIORITY_HIGH",
    "PRIORITY_LOW",
    "PRIORITY_MEDIUM",
    "DimseSender",
    "DimseTimeouts",
    "c_store_priority",
    "presentation_contexts",
]

# PS3.8 §9.3.2.2: presentation context ids are the odd numbers 1..255.
MAX_PRESENTATION_CONTEXTS = 128
_NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# A-ASSOCIATE-RJ (PS3.8 §9.3.4): result 1 is rejected-permanent, 2 rejected-transient.
_REJECTED_PERMANENT = 0x01
_REJECT_DIAGNOSTICS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
# Presentation context results (PS3.8 §9.3.3.2): 3 and 4 name what the receiver refused.
_ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
_TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04
# Priority (0000,0700) of a C-STORE-RQ (PS3.7 Table 9.3-1): not in the order of their values.
PRIORITY_MEDIUM = 0x0000
PRIORITY_HIGH = 0x0001
PRIORITY_LOW = 0x0002


@dataclass(frozen=True, slots=True)
class DimseTimeouts:
    """Seconds: TCP connect, association request/release answers, each C-STORE response, and
    an idle connection."""

    connection: float = 10.0
    acse: float = 30.0
    dimse: float = 300.0
    network: float = 300.0


def _convertible(syntax: UID) -> bool:
    """Whether pynetdicom may re-encode an instance stored in ``syntax`` (see module doc)."""
    try:
        return not syntax.is_compressed and syntax.is_little_endian
    except ValueError:  # a transfer syntax pydicom does not know: send it as stored only
        return False


def presentation_contexts(instances: Sequence[OutgoingInstance]) -> list[PresentationContext]:
    """The contexts to request for a batch (see the module docstring); at most 128."""
    convertible: dict[str, list[str]] = {}
    exact: dict[tuple[str, str], None] = {}
    for instance in instances:
        syntax = UID(instance.transfer_syntax_uid)
        if _convertible(syntax):
            stored = convertible.setdefault(instance.sop_class_uid, [])
            if syntax not in stored:
                stored.append(syntax)
        else:
            exact[(instance.sop_class_uid, syntax)] = None
    contexts = [
        build_context(sop_class, [*stored, *(s for s in _NATIVE_LITTLE_ENDIAN if s not in stored)])
        for sop_class, stored in convertible.items()
    ]
    contexts += [build_context(sop_class, [syntax]) for sop_class, syntax in exact]
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(
            f"a batch needs {len(contexts)} presentation contexts, one association takes at most "
            f"{MAX_PRESENTATION_CONTEXTS}: split it"
        )
    return contexts


def c_store_priority(urgency: Urgency) -> int:
    """HIGH for urgent and emergency studies, MEDIUM for routine ones (never LOW: a routine
    study is not less than the receiver's ordinary work)."""
    return PRIORITY_MEDIUM if urgency is Urgency.ROUTINE else PRIORITY_HIGH


class DimseSender:
    """C-STOREs batches to receivers' SCPs, calling each as its endpoint's calling AE title."""

    def __init__(self, *, timeouts: DimseTimeouts = DimseTimeouts()) -> None:
        self._timeouts = timeouts

    async def send(
        self,
        endpoint: DimseEndpoint,
        instances: Sequence[OutgoingInstance],
        *,
        priority: int = PRIORITY_MEDIUM,
    ) -> BatchResult:
        """C-STORE ``instances`` over one association, each with ``priority``; one outcome per
        instance, in order.

        Raises TransientDeliveryError or PermanentDeliveryError when the association fails
        (see the module docstring).
        """
        if priority not in (PRIORITY_MEDIUM, PRIORITY_HIGH, PRIORITY_LOW):
            raise ValueError("a C-STORE priority is 0 (medium), 1 (high) or 2 (low)")
        if not instances:
            return BatchResult(())
        contexts = presentation_contexts(instances)
        cancelled = threading.Event()
        try:
            return await asyncio.to_thread(
                self._send_blocking, endpoint, list(instances), contexts, cancelled, priority
            )
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def _send_blocking(
        self,
        endpoint: DimseEndpoint,
        instances: list[OutgoingInstance],
        contexts: list[PresentationContext],
        cancelled: threading.Event,
        priority: int,
    ) -> BatchResult:
        assoc = self._associate(endpoint, contexts)
        try:
            if not assoc.is_established:
                return self._not_established(assoc, endpoint, instances)
            outcomes: list[InstanceOutcome] = []
            for message_id, instance in enumerate(instances, start=1):
                if cancelled.is_set():
                    assoc.abort()
                    raise TransientDeliveryError(
                        "C-STORE batch cancelled", answered=BatchResult(tuple(outcomes))
                    )
                try:
                    outcomes.append(_store(assoc, instance, message_id, priority))
                except _Aborted:
                    raise TransientDeliveryError(
                        f"association aborted or no C-STORE response after {len(outcomes)} of "
                        f"{len(instances)} instances",
                        answered=BatchResult(tuple(outcomes)),
                    ) from None
            return BatchResult(tuple(outcomes))
        finally:
            if assoc.is_established:
                assoc.release()
            if assoc.is_established:  # the release went unanswered
                assoc.abort()

    def _associate(
        self, endpoint: DimseEndpoint, contexts: list[PresentationContext]
    ) -> Association:
        ae = AE(ae_title=endpoint.calling_ae_title)
        ae.connection_timeout = self._timeouts.connection
        ae.acse_timeout = self._timeouts.acse
        ae.dimse_timeout = self._timeouts.dimse
        ae.network_timeout = self._timeouts.network
        return ae.associate(
            endpoint.host, endpoint.port, contexts=contexts, ae_title=endpoint.ae_title
        )

    @staticmethod
    def _not_established(
        assoc: Association, endpoint: DimseEndpoint, instances: list[OutgoingInstance]
    ) -> BatchResult:
        peer = f"{endpoint.ae_title} at {endpoint.host}:{endpoint.port}"
        answer = assoc.acceptor.primitive
        if assoc.is_rejected and answer is not None:
            diagnostic = _REJECT_DIAGNOSTICS.get(
                (answer.result_source, answer.diagnostic), "reason not given"
            )
            if answer.result == _REJECTED_PERMANENT:
                raise PermanentDeliveryError(
                    f"association rejected permanently by {peer}: {diagnostic}"
                )
            raise TransientDeliveryError(f"association rejected by {peer}: {diagnostic}")
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # The receiver answered, but accepts none of the batch's SOP class / transfer
            # syntax pairs: pynetdicom aborts such an association. A per-instance verdict.
            return BatchResult(tuple(_refused(assoc, i) for i in instances))
        raise TransientDeliveryError(
            f"no association with {peer} (connection refused, timed out or aborted)"
        )


class _Aborted(Exception):
    """The association broke off before the instance's C-STORE response arrived."""


def _store(
    assoc: Association, instance: OutgoingInstance, message_id: int, priority: int
) -> InstanceOutcome:
    uid = instance.sop_instance_uid
    if not _accepted(assoc, instance):
        return _refused(assoc, instance)
    try:
        dataset = pydicom.dcmread(io.BytesIO(instance.data))
    except Exception as exc:
        # pydicom raises many types on a corrupt file; the message may quote header values.
        return InstanceOutcome(
            uid,
            InstanceStatus.FAILED,
            reason=f"not a readable DICOM file ({type(exc).__name__}), not sent",
        )
    try:
        status = assoc.send_c_store(dataset, msg_id=message_id % 0x10000 or 1, priority=priority)
    except (ValueError, AttributeError) as exc:
        if not assoc.is_established:
            raise _Aborted from None
        # The data set disagrees with what it was announced as, or cannot be encoded.
        return InstanceOutcome(
            uid, InstanceStatus.FAILED, reason=f"cannot be sent as stored ({type(exc).__name__})"
        )
    except RuntimeError:
        raise _Aborted from None
    if "Status" not in status:
        # pynetdicom's answer to an abort, a DIMSE timeout or an invalid response.
        raise _Aborted
    return outcome_for_status(uid, int(status.Status))


def _accepted(assoc: Association, instance: OutgoingInstance) -> bool:
    syntax = UID(instance.transfer_syntax_uid)
    for context in assoc.accepted_contexts:
        if context.abstract_syntax != instance.sop_class_uid:
            continue
        accepted = UID(context.transfer_syntax[0])
        if accepted == syntax or (_convertible(syntax) and _convertible(accepted)):
            return True
    return False


def _refused(assoc: Association, instance: OutgoingInstance) -> InstanceOutcome:
    results = {
        context.result
        for context in assoc.rejected_contexts
        if context.abstract_syntax == instance.sop_class_uid
    }
    if _ABSTRACT_SYNTAX_NOT_SUPPORTED in results:
        code, reason = "0122", "SOP class not supported by the receiver"
    elif _TRANSFER_SYNTAXES_NOT_SUPPORTED in results or any(
        c.abstract_syntax == instance.sop_class_uid for c in assoc.accepted_contexts
    ):
        code, reason = "C122", "stored transfer syntax not accepted by the receiver"
    else:
        code, reason = None, "presentation context rejected by the receiver"
    return InstanceOutcome(
        instance.sop_instance_uid, InstanceStatus.FAILED, code=code, reason=reason
    )
