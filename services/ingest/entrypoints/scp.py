"""The C-STORE SCP: ingest's DIMSE front door; each peer AE is bound to a sending organisation.

pynetdicom runs every association in threads of its own. The handlers here only spool what was
received into a Part 10 file (without decoding the data set) and hand it to the one async
:class:`~services.ingest.handlers.store.InstanceStore` on the service's event loop, so both front
doors share one Kafka producer and one S3 client.

Who may connect: the calling AE title *and* the peer's address must belong to a sending
organisation and the called AE title to a receiving one (:class:`PeerDirectory`); anything else
gets an A-ASSOCIATE-RJ (permanent, service user, "calling/called AE title not recognised").
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Iterable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from tempfile import SpooledTemporaryFile
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from services.ingest.bootstrap import Ingest
from services.ingest.domain.dicom import ACCEPTED_TRANSFER_SYNTAXES, is_storage_sop_class
from services.ingest.domain.status import Status, is_warning
from services.ingest.handlers.store import Outcome, Received, Submission
from shared.events import IngestChannel
from shared.logging import correlation_context, get_logger, new_correlation_id

log = get_logger(__name__)

# Storage SOP classes the domain stores, plus Verification (C-ECHO).
SUPPORTED_ABSTRACT_SYNTAXES: tuple[str, ...] = (
    str(Verification),
    *(
        str(cx.abstract_syntax)
        for cx in AllStoragePresentationContexts
        if is_storage_sop_class(str(cx.abstract_syntax))
    ),
)
# Every transfer syntax the domain accepts (JPIP and real-time video ones are not storable), in
# pynetdicom's order; a context is accepted in the syntax the peer proposed.
STORABLE_TRANSFER_SYNTAXES: list[str] = [
    str(ts) for ts in ALL_TRANSFER_SYNTAXES if str(ts) in ACCEPTED_TRANSFER_SYNTAXES
]
_SUPPORTED = frozenset(SUPPORTED_ABSTRACT_SYNTAXES)
_STORABLE = frozenset(STORABLE_TRANSFER_SYNTAXES)

# A-ASSOCIATE-RJ (PS3.8 §9.3.4): rejected-permanent, by the DICOM UL service user.
_REJECTED_PERMANENT = 0x01
_SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07

# Written into the File Meta Information of every file we build (PS3.10 §7.1). Fixed, not
# pynetdicom's version-stamped UID: a resend after a library upgrade must give identical bytes
# (and so the same sha256), or the store would take it for other content under the same UID.
IMPLEMENTATION_CLASS_UID = "2.25.146053862049180938931372127409563012797"
IMPLEMENTATION_VERSION_NAME = "BEELDPORTAAL_1"
_PREAMBLE = b"\x00" * 128 + b"DICM"
# PS3.7 C.4.2.1.4: Error Comment is LO, at most 64 characters.
_ERROR_COMMENT_MAX = 64


@dataclass
class _Session:
    """One accepted association: who sends, to whom, and how it went."""

    correlation_id: str
    calling_ae: str
    called_ae: str
    host: str
    sender_ura: str
    recipient_ura: str
    started: float
    stored: int = 0
    failed: int = 0


class StoreSCP:
    """Storage SCP (all storage SOP classes, every transfer syntax as proposed) plus Verification.

    ``start`` binds the listening socket and returns; associations run in pynetdicom's threads
    until ``await stop()``, which stops accepting, lets open associations finish for up to
    ``shutdown_timeout`` seconds and aborts what is left. ``store_timeout`` bounds the wait for
    one instance's store (S3 write + Kafka acknowledgement); past it the peer gets A700.
    ``quickack`` acknowledges every read at once, so peers that leave Nagle's algorithm on do
    not stall on our delayed ACKs (see :class:`_QuickAckSocket`).
    """

    def __init__(
        self,
        *,
        ae_title: str = "BEELDPORTAAL",
        store_timeout: float = 120.0,
        shutdown_timeout: float = 30.0,
        maximum_pdu_size: int = 256 * 1024,
        quickack: bool = True,
    ) -> None:
        self._quickack = quickack
        self._ae_title = ae_title
        self._store_timeout = store_timeout
        self._shutdown_timeout = shutdown_timeout
        self._maximum_pdu_size = maximum_pdu_size
        self._ingest: Ingest | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ThreadedAssociationServer | None = None
        self._sessions: dict[Association, _Session] = {}
        self._lock = threading.Lock()

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self, ingest: Ingest, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Listen on ``settings.dimse_host:dimse_port`` (port 0: any free port, see ``address``).

        ``loop`` is the running loop that owns ``ingest`` (its publisher and store); the store
        coroutines of every association are run on it.
        """
        if self._server is not None:
            raise RuntimeError("the C-STORE SCP is already running")
        self._ingest = ingest
        self._loop = loop or asyncio.get_running_loop()
        settings = ingest.settings
        ae = AE(ae_title=self._ae_title)
        # pynetdicom's 128-context limit applies to *requested* contexts only: an SCP may support
        # every storage SOP class with every transfer syntax the domain accepts. These are the
        # defaults; each association gets contexts ordered by its own proposal (_on_requested).
        for abstract_syntax in SUPPORTED_ABSTRACT_SYNTAXES:
            ae.add_supported_context(abstract_syntax, STORABLE_TRANSFER_SYNTAXES)
        ae.maximum_associations = settings.dimse_max_associations
        ae.maximum_pdu_size = self._maximum_pdu_size
        # Called AE titles are checked against the directory in _on_requested, per recipient.
        ae.require_called_aet = False
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_ended),
            (evt.EVT_C_STORE, self._on_c_store),
        ]
        server = ae.start_server(
            (settings.dimse_host, settings.dimse_port), block=False, evt_handlers=handlers
        )
        assert server is not None  # block=False always returns the server
        self._server = server
        log.info(
            "C-STORE SCP listening",
            address=f"{self.address[0]}:{self.address[1]}",
            max_associations=settings.dimse_max_associations,
        )

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the C-STORE SCP is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def running(self) -> bool:
        return self._server is not None

    async def stop(self) -> None:
        """Stop accepting; wait (bounded) for open associations; abort the rest.

        Must be awaited on the service loop while it still runs: associations that are storing
        an instance wait for coroutines on that loop.
        """
        server, self._server = self._server, None
        if server is None:
            return
        # Blocking calls (they join pynetdicom threads) go to a worker thread so the loop keeps
        # serving the stores those threads are waiting for.
        await asyncio.to_thread(server.shutdown)
        remaining = await asyncio.to_thread(
            _join, server.active_associations, self._shutdown_timeout
        )
        for assoc in remaining:
            session = self._session(assoc)
            log.warning(
                "aborting an association still open at shutdown",
                correlation_id=session.correlation_id if session else None,
                calling_ae=session.calling_ae if session else None,
            )
            await asyncio.to_thread(assoc.abort)
        with self._lock:
            self._sessions.clear()
        log.info("C-STORE SCP stopped", aborted=len(remaining))

    # --- association handlers (run in pynetdicom threads) ---------------------------------------

    def _on_conn_open(self, event: Event) -> None:
        # Runs before the association thread starts reading, so the socket may still be swapped.
        sock = event.assoc.dul.socket
        if sock is None or sock.socket is None:
            return
        raw = sock.socket
        try:
            # Our PDUs then leave at once (pynetdicom does not set it; platform.md).
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._quickack and _HAS_QUICKACK and type(raw) is socket.socket:
                sock.socket = _QuickAckSocket.adopt(raw)
        except OSError as exc:  # e.g. the peer already hung up
            log.debug("could not tune the DIMSE socket", error=str(exc))

    def _on_requested(self, event: Event) -> None:
        ingest = self._require_ingest()
        assoc = event.assoc
        # Set by pynetdicom before EVT_REQUESTED: the peer's A-ASSOCIATE-RQ.
        request = cast(A_ASSOCIATE, assoc.requestor.primitive)
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        host = str(assoc.requestor.address)
        self._forget_finished()

        sender = ingest.peers.sender_for(calling, host)
        if sender is None:
            known = calling in ingest.peers.senders
            self._reject(
                assoc,
                CALLING_AE_NOT_RECOGNISED,
                "rejected-calling-ae",
                "calling AE title not allowed from this address"
                if known
                else "calling AE title not recognised",
                calling=calling,
                called=called,
                host=host,
            )
            return
        recipient = ingest.peers.recipient_for_called_ae(called)
        if recipient is None:
            self._reject(
                assoc,
                CALLED_AE_NOT_RECOGNISED,
                "rejected-called-ae",
                "called AE title not recognised",
                calling=calling,
                called=called,
                host=host,
            )
            return
        session = _Session(
            correlation_id=new_correlation_id(),
            calling_ae=calling,
            called_ae=called,
            host=host,
            sender_ura=sender,
            recipient_ura=recipient,
            started=time.perf_counter(),
        )
        # pynetdicom accepts, per proposed context, the first transfer syntax of *our* list that
        # the peer proposed. Ordering ours like the peer's proposal makes it the peer's first
        # choice instead: the syntax its data is in, so it never has to transcode for us.
        assoc.acceptor.supported_contexts = negotiable_contexts(
            request.presentation_context_definition_list
        )
        with self._lock:
            self._sessions[assoc] = session

    def _reject(
        self,
        assoc: Association,
        diagnostic: int,
        outcome: str,
        reason: str,
        **context: str,
    ) -> None:
        self._require_ingest().metrics.associations.labels(outcome).inc()
        log.warning("association rejected", reason=reason, **context)
        assoc.acse.send_reject(_REJECTED_PERMANENT, _SERVICE_USER, diagnostic)
        # As pynetdicom does after its own rejections: wait for the DUL to send the A-ASSOCIATE-RJ
        # and the peer to close (or the ARTIM timer), so the reject is not lost to a closed socket.
        assoc.kill()

    def _on_accepted(self, event: Event) -> None:
        session = self._session(event.assoc)
        self._require_ingest().metrics.associations.labels("accepted").inc()
        if session is not None:
            log.info(
                "association accepted",
                correlation_id=session.correlation_id,
                calling_ae=session.calling_ae,
                called_ae=session.called_ae,
                host=session.host,
                sender=session.sender_ura,
                recipient=session.recipient_ura,
            )

    def _on_rejected(self, event: Event) -> None:
        # Only pynetdicom's own rejections get here (ours do not trigger EVT_REJECTED): with our
        # configuration that is the association limit (transient, local limit exceeded).
        self._require_ingest().metrics.associations.labels("rejected-limit").inc()
        with self._lock:
            session = self._sessions.pop(event.assoc, None)
        log.warning(
            "association rejected: too many associations",
            correlation_id=session.correlation_id if session else None,
            limit=event.assoc.ae.maximum_associations,
        )

    def _on_ended(self, event: Event) -> None:
        with self._lock:
            session = self._sessions.pop(event.assoc, None)
        if session is None:
            return  # rejected, or already counted by an earlier end event
        duration = time.perf_counter() - session.started
        self._require_ingest().metrics.request_duration.labels(IngestChannel.C_STORE.value).observe(
            duration
        )
        log.info(
            "association ended",
            how=event.event.name.removeprefix("EVT_").lower(),
            correlation_id=session.correlation_id,
            calling_ae=session.calling_ae,
            stored=session.stored,
            failed=session.failed,
            seconds=round(duration, 3),
        )

    def _on_c_store(self, event: Event) -> Dataset | int:
        session = self._session(event.assoc)
        if session is None:  # cannot happen for an accepted association; never raise to a peer
            log.error("C-STORE on an association without a session")
            return _response(Status.PROCESSING_FAILURE, "association state lost")
        with correlation_context(session.correlation_id):
            status, reason, uid = self._store(event, session)
        if status == Status.SUCCESS or is_warning(status):
            session.stored += 1
        else:
            session.failed += 1
            # The UID as ingest read and checked it, never the request's: a UID refused for
            # holding the patient's BSN is not named (None).
            log.info(
                "C-STORE refused",
                correlation_id=session.correlation_id,
                status=f"{status:04X}",
                sop_instance_uid=uid,
            )
        return _response(status, reason)

    def _store(self, event: Event, session: _Session) -> tuple[int, str, str | None]:
        """The instance's status and reason, and its SOP Instance UID once ingest read it and
        found it fit to be named (else None)."""
        ingest = self._require_ingest()
        loop = self._loop
        request = cast(C_STORE, event.request)
        try:
            received = spool_part10(
                request.AffectedSOPClassUID,
                request.AffectedSOPInstanceUID,
                event.context.transfer_syntax,
                request.DataSet,
                memory=ingest.settings.spool_memory_bytes,
                spool_dir=str(ingest.settings.spool_dir) if ingest.settings.spool_dir else None,
            )
        except OSError as exc:  # disk full or the spool directory is gone
            log.error("could not spool a received instance", error=str(exc))
            return Status.OUT_OF_RESOURCES, "cannot buffer the instance; retry later", None
        except Exception as exc:
            log.exception("could not spool a received instance", error=repr(exc))
            return Status.PROCESSING_FAILURE, "internal error", None
        submission = Submission(
            sender_ura=session.sender_ura,
            recipient_ura=session.recipient_ura,
            channel=IngestChannel.C_STORE,
            correlation_id=session.correlation_id,
            sender_endpoint=session.calling_ae,
        )
        try:
            if loop is None or loop.is_closed():
                return Status.OUT_OF_RESOURCES, "ingest is shutting down; retry later", None
            future = asyncio.run_coroutine_threadsafe(
                ingest.store.store(received, submission), loop
            )
            try:
                outcome: Outcome = future.result(self._store_timeout)
            except FutureTimeout:
                future.cancel()
                log.error("storing an instance timed out", seconds=self._store_timeout)
                return Status.OUT_OF_RESOURCES, "storing timed out; retry later", None
            return outcome.status, outcome.reason, outcome.sop_instance_uid
        except Exception as exc:
            log.exception("storing a received instance failed unexpectedly", error=repr(exc))
            return Status.PROCESSING_FAILURE, "internal error", None
        finally:
            received.file.close()

    # --- helpers --------------------------------------------------------------------------------

    def _require_ingest(self) -> Ingest:
        if self._ingest is None:
            raise RuntimeError("the C-STORE SCP was not started")
        return self._ingest

    def _session(self, assoc: Association) -> _Session | None:
        with self._lock:
            return self._sessions.get(assoc)

    def _forget_finished(self) -> None:
        # An association that ended without any end event (killed by a crash in pynetdicom's
        # reactor) leaves its session behind; drop those so the map stays bounded.
        with self._lock:
            for assoc in [a for a in self._sessions if not a.is_alive()]:
                del self._sessions[assoc]


def negotiable_contexts(proposed: Iterable[PresentationContext]) -> list[PresentationContext]:
    """The contexts to support for one association: those of ``proposed`` we can store, each
    with the transfer syntaxes we accept in the order the peer proposed them."""
    syntaxes: dict[str, dict[str, None]] = {}
    for cx in proposed:
        abstract = str(cx.abstract_syntax)
        if abstract not in _SUPPORTED:
            continue
        accepted = syntaxes.setdefault(abstract, {})
        for syntax in cx.transfer_syntax:
            if str(syntax) in _STORABLE:
                accepted.setdefault(str(syntax), None)
    return [build_context(abstract, list(ts)) for abstract, ts in syntaxes.items() if ts]


_HAS_QUICKACK = hasattr(socket, "TCP_QUICKACK")  # Linux


class _QuickAckSocket(socket.socket):
    """An accepted DIMSE socket that acknowledges every read at once (Linux TCP_QUICKACK).

    A peer with Nagle's algorithm on (dcmtk and Orthanc unless ``TCP_NODELAY=1`` is in their
    environment, and other PACS) sends the second half of each C-STORE only after the first is
    acknowledged; a receiver's delayed ACK makes that ~40 ms per instance. The kernel drops
    quick-ack mode again after a while, hence re-arming it after each read.
    """

    @classmethod
    def adopt(cls, raw: socket.socket) -> _QuickAckSocket:
        timeout = raw.gettimeout()
        sock = cls(raw.family, raw.type, raw.proto, fileno=raw.detach())
        sock.settimeout(timeout)
        sock._quickack()
        return sock

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if data:
            self._quickack()
        return data

    def _quickack(self) -> None:
        with contextlib.suppress(OSError):
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _join(associations: Iterable[Association], timeout: float) -> list[Association]:
    deadline = time.monotonic() + timeout
    for assoc in associations:
        assoc.join(max(0.0, deadline - time.monotonic()))
    return [a for a in associations if a.is_alive()]


def _response(status: int, reason: str) -> Dataset | int:
    if status == Status.SUCCESS:
        return int(status)
    rsp = Dataset()
    rsp.Status = int(status)
    comment = reason.encode("ascii", "replace").decode("ascii").replace("\\", "/")
    rsp.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return rsp


# --- Part 10 file from what was received --------------------------------------------------------


def encode_file_meta(
    sop_class_uid: str | None, sop_instance_uid: str | None, transfer_syntax_uid: str | None
) -> bytes:
    """File Meta Information (explicit VR little endian), group length first, as PS3.10 §7.1.

    Encoded here rather than via pydicom: values come from the peer's request as received
    (checking them is the domain's job, on the whole file), and the bytes must be reproducible.
    """
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _ui(sop_class_uid)),
            _element(0x0003, b"UI", _ui(sop_instance_uid)),
            _element(0x0010, b"UI", _ui(transfer_syntax_uid)),
            _element(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _element(0x0013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")),
        )
    )
    return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _ui(value: str | None) -> bytes:
    return _pad(str(value or "").encode("ascii", "replace"), b"\x00")


def _pad(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":  # long form: 2 reserved bytes and a 4-byte length
        return (
            struct.pack("<HH", 0x0002, element)
            + vr
            + b"\x00\x00"
            + struct.pack("<I", len(value))
            + value
        )
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def spool_part10(
    sop_class_uid: str | None,
    sop_instance_uid: str | None,
    transfer_syntax_uid: str | None,
    dataset: Any,
    *,
    memory: int,
    spool_dir: str | None = None,
) -> Received:
    """Preamble + 'DICM' + File Meta + the data set exactly as received, hashed while spooled.

    ``dataset`` is pynetdicom's ``C_STORE.DataSet`` (a BytesIO of the encoded data set) or bytes.
    Kept in memory up to ``memory`` bytes, then in a temporary file in ``spool_dir``.
    """
    spool = SpooledTemporaryFile(max_size=memory, dir=spool_dir)  # noqa: SIM115 - caller closes
    digest = hashlib.sha256()
    try:
        for chunk in (
            _PREAMBLE,
            encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid),
        ):
            spool.write(chunk)
            digest.update(chunk)
        if isinstance(dataset, bytes | bytearray | memoryview):
            spool.write(dataset)
            digest.update(dataset)
        elif dataset is not None:
            with dataset.getbuffer() as view:  # no copy of a possibly large data set
                spool.write(view)
                digest.update(view)
        size = spool.tell()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return Received(spool, size, digest.hexdigest())  # type: ignore[arg-type]
