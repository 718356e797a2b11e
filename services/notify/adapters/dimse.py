"""DIMSE C-STORE SCU: one batch of instances over one association to the receiver's SCP.

Presentation contexts come from the batch itself: per SOP class, each stored transfer syntax
exactly as stored. An uncompressed little-endian instance (Explicit/Implicit VR LE, Deflated)
gets one context per SOP class that also offers Explicit and Implicit VR Little Endian, because
pynetdicom can re-encode between those without touching a value; a compressed (or big-endian)
one gets a context of its stored syntax alone.

Many PACS accept a SOP class only uncompressed, and dcm4chee and Orthanc decompress for them
when they send; so does beeldportaal. A compressed instance whose syntax this process can
decode (``transcode.decodable_syntaxes``: what the installed pydicom plugins decode) also has
a fallback: its SOP class is offered in Explicit and Implicit VR Little Endian too, in a
context apart from the stored syntax's (or in the one its SOP class has for native instances),
so that the receiver accepts or refuses the stored syntax on its own. Accepted, the instance
goes as stored, byte for byte as ever. Refused while a native context was accepted, the
instance is decoded (``transcode.decompress``: same SOP Instance UID, Lossy Image Compression
"01" when its stored encoding was lossy) and sent in the accepted syntax. A syntax nothing here
decodes goes as stored or not at all. Fallback contexts only take the room that the stored
ones leave of the 128, so they never make a batch too large for one association.

Each instance is read with pydicom (encapsulated Pixel Data stays the stored fragments) and
pynetdicom encodes the data set in the accepted transfer syntax: element values and Pixel Data
go out unchanged; only the encoding around them can differ (no retired group lengths, and the
VR encoding when the receiver chose Implicit for an Explicit instance or the reverse). A
decompressed instance is decoded whole before its C-STORE, in the batch's worker thread; one
that cannot be decoded fails alone, unsent. An image that decodes to more than
:data:`DECODE_WITH_ASSOCIATION_OPEN` is sent after the rest of the batch, each on an
association of its own: the one open is released before the decode (a receiver may close an
association idle for long, Orthanc after 30 s), a new one with the same contexts opened after.

Answers:

* per instance, the C-STORE Status (see ``outcomes.classify_status``); an instance whose
  presentation context the receiver rejected is FAILED with ``0122`` (SOP class not supported)
  or ``C122`` (transfer syntax not supported, the STOW-RS code for the same refusal; also when
  the receiver took the SOP class in another context); one whose Pixel Data could not be
  decoded for the fallback is FAILED without a code (no DICOM status was exchanged) and
  permanently (the same bytes fail the same way), or transiently when memory ran out;
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
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
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
from services.notify.domain.transcode import (
    MAX_DECODED_BYTES,
    UndecodablePixelData,
    decodable_syntaxes,
    decoded_size,
    decompress,
)
from services.notify.worker_metrics import NotifyWorkerMetrics
from services.routing.domain.directory import DimseEndpoint
from shared.events import Urgency
from shared.logging import get_logger

__all__ = [
    "DECODE_WITH_ASSOCIATION_OPEN",
    "MAX_PRESENTATION_CONTEXTS",
    "PRIORITY_HIGH",
    "PRIORITY_LOW",
    "PRIORITY_MEDIUM",
    "DimseSender",
    "DimseTimeouts",
    "c_store_priority",
    "presentation_contexts",
]

log = get_logger(__name__)

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
# How an instance is sent: in an accepted context as stored (or natively re-encoded), or
# decompressed into an accepted native one.
_AS_STORED = "as-stored"
_DECOMPRESSED = "decompressed"
# An image decoding to more than this is decoded with no association open (released before,
# a new one after): at the tens of MB/s that JPEG 2000 decodes at here, a second or two of
# silence at most on an open association, well inside any receiver's idle timeout.
DECODE_WITH_ASSOCIATION_OPEN = 32 * 2**20


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


def presentation_contexts(
    instances: Sequence[OutgoingInstance], decodable: Collection[str] = frozenset()
) -> list[PresentationContext]:
    """The contexts to request for a batch (see the module docstring); at most 128.

    ``decodable``: the compressed transfer syntaxes this process can decode; their instances'
    SOP classes are also offered uncompressed, after every stored syntax and only while fewer
    than 128 contexts are asked for (a batch that fits without them fits with them).
    """
    convertible: dict[str, list[str]] = {}
    exact: dict[tuple[str, str], None] = {}
    fallback: dict[str, None] = {}
    for instance in instances:
        syntax = UID(instance.transfer_syntax_uid)
        if _convertible(syntax):
            stored = convertible.setdefault(instance.sop_class_uid, [])
            if syntax not in stored:
                stored.append(syntax)
        else:
            exact[(instance.sop_class_uid, syntax)] = None
            if syntax in decodable:
                fallback[instance.sop_class_uid] = None
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
    # A SOP class with native instances in the batch has its native context already.
    wanted = [sop_class for sop_class in fallback if sop_class not in convertible]
    room = MAX_PRESENTATION_CONTEXTS - len(contexts)
    contexts += [build_context(s, list(_NATIVE_LITTLE_ENDIAN)) for s in wanted[:room]]
    return contexts


def c_store_priority(urgency: Urgency) -> int:
    """HIGH for urgent and emergency studies, MEDIUM for routine ones (never LOW: a routine
    study is not less than the receiver's ordinary work)."""
    return PRIORITY_MEDIUM if urgency is Urgency.ROUTINE else PRIORITY_HIGH


class DimseSender:
    """C-STOREs batches to receivers' SCPs, calling each as its endpoint's calling AE title.

    ``decodable`` (default: what the installed pydicom plugins decode) are the compressed
    transfer syntaxes sent decompressed to a receiver that refuses them; ``metrics`` counts
    those instances.
    """

    def __init__(
        self,
        *,
        timeouts: DimseTimeouts = DimseTimeouts(),
        decodable: Collection[str] | None = None,
        metrics: NotifyWorkerMetrics | None = None,
    ) -> None:
        self._timeouts = timeouts
        self._decodable = (
            decodable_syntaxes() if decodable is None else frozenset(map(UID, decodable))
        )
        self._metrics = metrics

    async def send(
        self,
        endpoint: DimseEndpoint,
        instances: Sequence[OutgoingInstance],
        *,
        priority: int = PRIORITY_MEDIUM,
    ) -> BatchResult:
        """C-STORE ``instances`` over one association (and one more for each image decoded
        with none open, see the module docstring), each with ``priority``; one outcome per
        instance, in order.

        Raises TransientDeliveryError or PermanentDeliveryError when the association fails
        (see the module docstring).
        """
        if priority not in (PRIORITY_MEDIUM, PRIORITY_HIGH, PRIORITY_LOW):
            raise ValueError("a C-STORE priority is 0 (medium), 1 (high) or 2 (low)")
        if not instances:
            return BatchResult(())
        contexts = presentation_contexts(instances, self._decodable)
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
        decompressed = _Decompressed()
        # By the instance's place in the batch: what ``send`` returns keeps the batch's order,
        # also when a large decode sent an instance after those behind it.
        outcomes: dict[int, InstanceOutcome] = {}

        def answered() -> BatchResult:
            return BatchResult(tuple(outcomes[i] for i in sorted(outcomes)))

        def aborted() -> TransientDeliveryError:
            return TransientDeliveryError(
                f"association aborted or no C-STORE response after {len(outcomes)} of "
                f"{len(instances)} instances",
                answered=answered(),
            )

        try:
            if not assoc.is_established:
                return self._not_established(assoc, endpoint, instances)
            large: list[int] = []
            for index, instance in enumerate(instances):
                if cancelled.is_set():
                    assoc.abort()
                    raise TransientDeliveryError("C-STORE batch cancelled", answered=answered())
                try:
                    outcome = _store(
                        assoc, instance, index + 1, priority, self._decodable, decompressed
                    )
                except _Aborted:
                    raise aborted() from None
                if outcome is None:
                    large.append(index)
                else:
                    outcomes[index] = outcome
            for index in large:
                if cancelled.is_set():
                    assoc.abort()
                    raise TransientDeliveryError("C-STORE batch cancelled", answered=answered())
                # Decoding an image this large takes seconds: not while the receiver holds an
                # association open and idle for us, which it may close (Orthanc after 30 s).
                _release(assoc)
                outcome, fresh = self._send_decoded(
                    endpoint, contexts, instances[index], index + 1, priority, decompressed,
                    cancelled,
                )  # fmt: skip
                assoc = fresh or assoc  # released or aborted when the batch ends
                if outcome is None and cancelled.is_set():
                    raise TransientDeliveryError("C-STORE batch cancelled", answered=answered())
                if outcome is None:
                    raise aborted()
                outcomes[index] = outcome
            return answered()
        finally:
            _release(assoc)
            self._report(endpoint, len(instances), decompressed)

    def _send_decoded(
        self,
        endpoint: DimseEndpoint,
        contexts: list[PresentationContext],
        instance: OutgoingInstance,
        message_id: int,
        priority: int,
        decompressed: _Decompressed,
        cancelled: threading.Event,
    ) -> tuple[InstanceOutcome | None, Association | None]:
        """Decode ``instance`` with no association open, then C-STORE it over a new one with
        the same contexts: its outcome and that association (to release), or None for the
        outcome when the batch broke off (cancelled, or aborted). The decoded image lives only
        here: the next one is not decoded while it is still held."""
        dataset = _decoded(instance, decompressed)
        if isinstance(dataset, InstanceOutcome):
            return dataset, None
        if cancelled.is_set():
            return None, None
        assoc = self._associate(endpoint, contexts)
        if not assoc.is_established:
            # Rejected permanently now (raised as such), or refusing the contexts (a verdict
            # on this instance), or not there: transient, raised by the caller's ``aborted``.
            try:
                return self._not_established(assoc, endpoint, [instance]).outcomes[0], assoc
            except TransientDeliveryError:
                return None, assoc
        uid = instance.sop_instance_uid
        how = _how(assoc, instance, self._decodable)
        try:
            if how == _DECOMPRESSED:
                outcome = _c_store(assoc, uid, dataset, message_id, priority)
                decompressed.add("sent", instance.transfer_syntax_uid)
            elif how is None:
                outcome = _refused(assoc, instance)
            else:  # this association takes the stored syntax after all
                del dataset
                stored = _read(instance)
                outcome = (
                    stored
                    if isinstance(stored, InstanceOutcome)
                    else _c_store(assoc, uid, stored, message_id, priority)
                )
        except _Aborted:
            return None, assoc
        return outcome, assoc

    def _report(self, endpoint: DimseEndpoint, size: int, decompressed: _Decompressed) -> None:
        """One log line per batch that decompressed anything (never one per instance)."""
        if not decompressed.outcomes:
            return
        if self._metrics is not None:
            for outcome, count in decompressed.outcomes.items():
                self._metrics.instances_decompressed.labels(outcome).inc(count)
        sent, failed = decompressed.outcomes["sent"], decompressed.outcomes["failed"]
        (log.warning if failed else log.info)(
            "instances sent decompressed: the receiver accepts their SOP class only uncompressed",
            endpoint=endpoint.id,
            sent=sent,
            failed=failed,
            batch=size,
            transfer_syntaxes=sorted(decompressed.syntaxes),
        )

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


class _Decompressed:
    """A batch's instances sent decompressed: how many per metric outcome (``sent``: a C-STORE
    response came; ``failed``: not decodable, not sent) and their stored syntaxes' keywords."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.syntaxes: set[str] = set()

    def add(self, outcome: str, syntax: str) -> None:
        self.outcomes[outcome] += 1
        self.syntaxes.add(UID(syntax).keyword or syntax)


def _release(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
    if assoc.is_established:  # the release went unanswered
        assoc.abort()


def _store(
    assoc: Association,
    instance: OutgoingInstance,
    message_id: int,
    priority: int,
    decodable: Collection[str],
    decompressed: _Decompressed,
) -> InstanceOutcome | None:
    """C-STORE ``instance`` over ``assoc``: as stored, or decoded when the receiver accepts its
    SOP class only uncompressed; None, unsent, for an image too large to decode with the
    association open (see ``DimseSender._send_decoded``)."""
    how = _how(assoc, instance, decodable)
    if how is None:
        return _refused(assoc, instance)
    dataset = _read(instance)
    if isinstance(dataset, InstanceOutcome):
        return dataset
    if how == _DECOMPRESSED:
        # (One past MAX_DECODED_BYTES is refused at once, by ``_decompress``.)
        if DECODE_WITH_ASSOCIATION_OPEN < decoded_size(dataset) <= MAX_DECODED_BYTES:
            return None
        failed = _decompress(dataset, instance)
        if failed is not None:
            decompressed.add("failed", instance.transfer_syntax_uid)
            return failed
    outcome = _c_store(assoc, instance.sop_instance_uid, dataset, message_id, priority)
    if how == _DECOMPRESSED:
        decompressed.add("sent", instance.transfer_syntax_uid)
    return outcome


def _c_store(
    assoc: Association, uid: str, dataset: Dataset, message_id: int, priority: int
) -> InstanceOutcome:
    """The C-STORE of ``dataset`` and the receiver's answer; raises _Aborted when none came."""
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


def _read(instance: OutgoingInstance) -> Dataset | InstanceOutcome:
    """The instance's data set (encapsulated Pixel Data as stored), or its FAILED outcome."""
    try:
        return pydicom.dcmread(io.BytesIO(instance.data))
    except MemoryError:
        # Another attempt may have the memory this one lacked.
        return InstanceOutcome(
            instance.sop_instance_uid,
            InstanceStatus.FAILED,
            reason="not enough memory to read it, not sent",
            transient=True,
        )
    except Exception as exc:
        # pydicom raises many types on a corrupt file; the message may quote header values.
        return InstanceOutcome(
            instance.sop_instance_uid,
            InstanceStatus.FAILED,
            reason=f"not a readable DICOM file ({type(exc).__name__}), not sent",
        )


def _decoded(instance: OutgoingInstance, decompressed: _Decompressed) -> Dataset | InstanceOutcome:
    """``instance`` read and decoded, with no association open; or its FAILED outcome."""
    dataset = _read(instance)
    if isinstance(dataset, InstanceOutcome):
        return dataset
    failed = _decompress(dataset, instance)
    if failed is not None:
        decompressed.add("failed", instance.transfer_syntax_uid)
        return failed
    return dataset


def _decompress(dataset: Dataset, instance: OutgoingInstance) -> InstanceOutcome | None:
    """Decompress ``dataset`` in place; the instance's FAILED outcome when it cannot be."""
    try:
        decompress(dataset)
    except UndecodablePixelData as exc:
        # The same bytes fail the same way every time: permanent, like an unreadable file.
        return InstanceOutcome(
            instance.sop_instance_uid,
            InstanceStatus.FAILED,
            reason=f"{exc}; the receiver accepts it only uncompressed, not sent",
        )
    except MemoryError:
        return InstanceOutcome(
            instance.sop_instance_uid,
            InstanceStatus.FAILED,
            reason="not enough memory to decompress it for the receiver, not sent",
            transient=True,
        )
    return None


def _how(assoc: Association, instance: OutgoingInstance, decodable: Collection[str]) -> str | None:
    """``_AS_STORED`` when a context accepts the stored syntax (or one pynetdicom re-encodes it
    to), ``_DECOMPRESSED`` when only a native one is accepted and the syntax is decodable."""
    syntax = UID(instance.transfer_syntax_uid)
    native = False
    for context in assoc.accepted_contexts:
        if context.abstract_syntax != instance.sop_class_uid:
            continue
        accepted = UID(context.transfer_syntax[0])
        if accepted == syntax or (_convertible(syntax) and _convertible(accepted)):
            return _AS_STORED
        native = native or _convertible(accepted)
    return _DECOMPRESSED if native and syntax in decodable else None


def _refused(assoc: Association, instance: OutgoingInstance) -> InstanceOutcome:
    results = {
        context.result
        for context in assoc.rejected_contexts
        if context.abstract_syntax == instance.sop_class_uid
    }
    # A SOP class accepted in another context (e.g. the uncompressed fallback) is supported,
    # whatever was answered for this one: dcmtk-based SCPs such as Orthanc answer "abstract
    # syntax not supported" for a context none of whose transfer syntaxes they take.
    supported = any(c.abstract_syntax == instance.sop_class_uid for c in assoc.accepted_contexts)
    if _ABSTRACT_SYNTAX_NOT_SUPPORTED in results and not supported:
        code, reason = "0122", "SOP class not supported by the receiver"
    elif supported or _TRANSFER_SYNTAXES_NOT_SUPPORTED in results:
        code, reason = "C122", "stored transfer syntax not accepted by the receiver"
    else:
        code, reason = None, "presentation context rejected by the receiver"
    return InstanceOutcome(
        instance.sop_instance_uid, InstanceStatus.FAILED, code=code, reason=reason
    )
