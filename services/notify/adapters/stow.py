"""DICOMweb STOW-RS client: one batch of a study in one ``POST {base_url}/studies/{study}``.

The body is ``multipart/related; type="application/dicom"``, one part per instance, streamed
from an async generator: the file bytes are handed to the connection as they are, never joined
into one body. By default it goes with chunked transfer encoding; ``chunked=False`` sends the
same stream with a Content-Length (computed from the parts) for receivers without chunked
request support.

How the answer is read (PS3.18 §10.5.3, and how real servers behave):

* The Store Instances Response Module names instances in ReferencedSOPSequence (0008,1199)
  (stored, maybe with a WarningReason) or FailedSOPSequence (0008,1198) with a FailureReason
  (``outcomes.classify_failure_reason``: mostly a failure, but the Azure DICOM service lists an
  instance it holds already there, B00E, which is ALREADY_PRESENT).
* 200, 202 and 409 carry it; so may 400: Orthanc answers 409 for a batch where one instance
  was refused and the others stored, and 400 when a part was unreadable, in both cases with the
  module listing what it did store. A 400/409 is therefore read per instance rather than
  failing the whole batch.
* An instance in neither sequence: stored on a 2xx other than 202 (200 means "all stored");
  on a 202 unknown, so FAILED transient (sending it again is harmless); on a 400/409 FAILED
  permanent, the receiver refused the request without naming it. So a 400/409 that names no
  instance sent (or has no readable body) refuses the batch's instances one by one: the
  receiver judged this request, not the endpoint, and the delivery's other batches still go.
* A body that cannot be read (not JSON, not a module): on 200/204 every instance counts as
  stored, because the status itself says so; on 202 the batch is a TransientDeliveryError
  (which part was stored is unknown, resending all is harmless); on 4xx the status decides.
* 408, 429, 5xx, timeouts and connection errors: TransientDeliveryError (with the receiver's
  Retry-After). 401/403 (the endpoint's credentials) and every other 4xx/3xx but 400/409:
  PermanentDeliveryError, for the whole delivery.

An instance refused with FailureReason C122 (its transfer syntax is not supported) in a syntax
this process decodes (``transcode.decodable_syntaxes``) is stowed once more, decoded into
Explicit VR Little Endian (``transcode.decompressed_file``: same SOP Instance UID, marked lossy
after a lossy encoding), in a request of its own; that answer is its outcome. One that cannot be
decoded keeps the C122, permanently.

Reasons name HTTP statuses and DICOM codes only, never the receiver's text or URL path (which
may hold a token), so they can go into events and logs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from pydicom.uid import UID, ExplicitVRLittleEndian

from services.notify.domain.outcomes import (
    BatchResult,
    InstanceOutcome,
    InstanceStatus,
    OutgoingInstance,
    PermanentDeliveryError,
    TransientDeliveryError,
    outcome_for_failure_reason,
    outcome_for_status,
)
from services.notify.domain.transcode import (
    UndecodablePixelData,
    decodable_syntaxes,
    decompressed_file,
)
from services.notify.worker_metrics import NotifyWorkerMetrics
from services.routing.domain.directory import BasicAuth, BearerAuth, DicomWebEndpoint, NoAuth
from shared.logging import get_logger

__all__ = ["StoreResponse", "StowSender", "StowTimeouts", "parse_store_response"]

log = get_logger(__name__)

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
WARNING_REASON = "00081196"
FAILURE_REASON = "00081197"
# FailureReason of an instance whose transfer syntax the receiver does not take (PS3.18).
REFERENCED_TRANSFER_SYNTAX_NOT_SUPPORTED = "C122"

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_DICOM_PART_HEADERS = b"Content-Type: application/dicom\r\n\r\n"
_TRANSIENT_HTTP = frozenset({408, 429})
# Statuses whose body may carry per-instance results (see the module docstring).
_PER_INSTANCE_REFUSALS = frozenset({400, 409})


@dataclass(frozen=True, slots=True)
class StowTimeouts:
    """Seconds. ``read`` is the wait for the answer once the body is sent: a receiver may
    store a large batch before it answers."""

    connect: float = 10.0
    write: float = 60.0
    read: float = 300.0
    pool: float = 30.0

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, write=self.write, read=self.read, pool=self.pool)


@dataclass(frozen=True, slots=True)
class StoreResponse:
    """What a Store Instances Response Module says, by SOP Instance UID."""

    referenced: Mapping[str, int | None]  # uid -> WarningReason (None: none)
    failed: Mapping[str, int | None]  # uid -> FailureReason (None: none given)

    def names_any(self, uids: Sequence[str]) -> bool:
        return any(uid in self.referenced or uid in self.failed for uid in uids)


class StowSender:
    """Stows batches to any number of receivers over one connection pool.

    The httpx client is made on first use (never at import or construction) and closed by
    :meth:`aclose` or ``async with``. ``transport`` replaces the network, for tests.
    """

    def __init__(
        self,
        *,
        timeouts: StowTimeouts = StowTimeouts(),
        chunked: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        decodable: Collection[str] | None = None,
        metrics: NotifyWorkerMetrics | None = None,
    ) -> None:
        self._timeouts = timeouts
        self._chunked = chunked
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._decodable = (
            decodable_syntaxes() if decodable is None else frozenset(map(UID, decodable))
        )
        self._metrics = metrics

    async def __aenter__(self) -> StowSender:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self._timeouts.to_httpx(),
                transport=self._transport,
                follow_redirects=False,  # a redirected POST would lose or resend the body
                headers={"User-Agent": "beeldportaal-notify"},
            )
        return self._client

    async def send(
        self,
        endpoint: DicomWebEndpoint,
        study_instance_uid: str,
        instances: Sequence[OutgoingInstance],
    ) -> BatchResult:
        """Stow ``instances`` (all of one study) to ``endpoint``; one outcome per instance.

        Raises TransientDeliveryError or PermanentDeliveryError when the receiver did not judge
        the instances one by one (see the module docstring).
        """
        if not _UID.match(study_instance_uid) or len(study_instance_uid) > 64:
            raise ValueError("the Study Instance UID is not a valid UID")
        if not instances:
            return BatchResult(())
        result = await self._post(endpoint, study_instance_uid, instances)
        refused = [i for i in instances if self._refused_syntax(result, i)]
        if not refused:
            return result
        return await self._send_decompressed(
            endpoint, study_instance_uid, instances, result, refused
        )

    async def _post(
        self,
        endpoint: DicomWebEndpoint,
        study_instance_uid: str,
        instances: Sequence[OutgoingInstance],
    ) -> BatchResult:
        """One STOW-RS request of ``instances``, read as the module docstring says."""
        boundary = uuid.uuid4().hex
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            **_auth_headers(endpoint.auth),
        }
        if not self._chunked:
            headers["Content-Length"] = str(_body_length(boundary, instances))
        url = f"{endpoint.base_url}/studies/{study_instance_uid}"
        for attempt in (1, 2):
            try:
                response = await self._http().post(
                    url, content=_body(boundary, instances), headers=headers
                )
                break
            except httpx.TimeoutException as exc:
                raise TransientDeliveryError(f"STOW-RS timed out ({type(exc).__name__})") from None
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
                # A kept-alive connection the receiver had closed meanwhile fails like this
                # (measured against Orthanc under load): one fresh try before it counts as a
                # failed attempt, which would wait for the first retry tier.
                if attempt == 2:
                    raise TransientDeliveryError(
                        f"STOW-RS receiver unreachable ({type(exc).__name__})"
                    ) from None
            except httpx.TransportError as exc:
                raise TransientDeliveryError(
                    f"STOW-RS receiver unreachable ({type(exc).__name__})"
                ) from None
        return _result(response, [i.sop_instance_uid for i in instances])

    def _refused_syntax(self, result: BatchResult, instance: OutgoingInstance) -> bool:
        """Whether the receiver refused ``instance``'s transfer syntax (C122), one this process
        decodes."""
        outcome = result.outcome(instance.sop_instance_uid)
        return outcome.code == REFERENCED_TRANSFER_SYNTAX_NOT_SUPPORTED and (
            UID(instance.transfer_syntax_uid) in self._decodable
        )

    async def _send_decompressed(
        self,
        endpoint: DicomWebEndpoint,
        study_instance_uid: str,
        instances: Sequence[OutgoingInstance],
        result: BatchResult,
        refused: Sequence[OutgoingInstance],
    ) -> BatchResult:
        """Stow each instance whose transfer syntax the receiver refused again, decoded into
        Explicit VR Little Endian: one request each (decoded, an image is several times its
        stored size, which the receiver's batch limits did not foresee)."""
        outcomes = {o.sop_instance_uid: o for o in result.outcomes}
        pending = {i.sop_instance_uid for i in refused}
        counts: Counter[str] = Counter()
        try:
            for instance in refused:
                try:
                    outcome, sent = await self._resend_decoded(
                        endpoint, study_instance_uid, instance
                    )
                except TransientDeliveryError as exc:
                    # What the receiver judged stays settled; the rest goes again.
                    settled = (i for i in instances if i.sop_instance_uid not in pending)
                    raise TransientDeliveryError(
                        exc.reason,
                        exc.retry_after,
                        answered=BatchResult(tuple(outcomes[i.sop_instance_uid] for i in settled)),
                    ) from None
                counts["sent" if sent else "failed"] += 1
                outcomes[instance.sop_instance_uid] = outcome
                pending.discard(instance.sop_instance_uid)
        finally:
            self._report(endpoint, len(instances), counts)
        return BatchResult(tuple(outcomes[i.sop_instance_uid] for i in instances))

    async def _resend_decoded(
        self, endpoint: DicomWebEndpoint, study_instance_uid: str, instance: OutgoingInstance
    ) -> tuple[InstanceOutcome, bool]:
        """``instance`` decoded and stowed alone: the receiver's outcome and True, or FAILED
        and False when it cannot be decoded. The decoded file lives only here, so the next is
        not decoded while it is still held."""
        uid = instance.sop_instance_uid
        try:
            data = await asyncio.to_thread(decompressed_file, instance.data)
        except UndecodablePixelData as exc:
            return InstanceOutcome(
                uid, InstanceStatus.FAILED, code=REFERENCED_TRANSFER_SYNTAX_NOT_SUPPORTED,
                reason=f"{exc}; the receiver refused its transfer syntax, not sent",
            ), False  # fmt: skip
        except MemoryError:
            return InstanceOutcome(
                uid, InstanceStatus.FAILED, transient=True,
                reason="not enough memory to decompress it for the receiver, not sent",
            ), False  # fmt: skip
        decoded = OutgoingInstance(uid, instance.sop_class_uid, ExplicitVRLittleEndian, data)
        try:
            return (await self._post(endpoint, study_instance_uid, [decoded])).outcome(uid), True
        except PermanentDeliveryError as exc:
            # Refused outright (413: too large decoded for the receiver; 415 ...): a verdict on
            # this instance, not on the delivery, whose other instances went as before.
            return InstanceOutcome(
                uid, InstanceStatus.FAILED, code=REFERENCED_TRANSFER_SYNTAX_NOT_SUPPORTED,
                reason=f"transfer syntax refused, and sent decoded: {exc.reason}",
            ), True  # fmt: skip

    def _report(self, endpoint: DicomWebEndpoint, size: int, counts: Counter[str]) -> None:
        if not counts:
            return
        if self._metrics is not None:
            for outcome, count in counts.items():
                self._metrics.instances_decompressed.labels(outcome).inc(count)
        (log.warning if counts["failed"] else log.info)(
            "instances stowed decompressed: the receiver refused their transfer syntax",
            endpoint=endpoint.id,
            sent=counts["sent"],
            failed=counts["failed"],
            batch=size,
        )


def _auth_headers(auth: NoAuth | BearerAuth | BasicAuth) -> dict[str, str]:
    if isinstance(auth, BearerAuth):
        return {"Authorization": f"Bearer {auth.token.get_secret_value()}"}
    if isinstance(auth, BasicAuth):
        # RFC 7617 with UTF-8; the username cannot hold a colon (the directory refuses one).
        pair = f"{auth.username}:{auth.password.get_secret_value()}".encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode('ascii')}"}
    return {}


def _part_header(boundary: str) -> bytes:
    return b"--" + boundary.encode() + b"\r\n" + _DICOM_PART_HEADERS


def _closing(boundary: str) -> bytes:
    return b"--" + boundary.encode() + b"--\r\n"


async def _body(boundary: str, instances: Sequence[OutgoingInstance]) -> AsyncIterator[bytes]:
    head = _part_header(boundary)
    for instance in instances:
        yield head
        yield instance.data
        yield b"\r\n"
    yield _closing(boundary)


def _body_length(boundary: str, instances: Sequence[OutgoingInstance]) -> int:
    per_part = len(_part_header(boundary)) + 2
    return sum(per_part + len(i.data) for i in instances) + len(_closing(boundary))


# --- the answer -----------------------------------------------------------------------------------


def _result(response: httpx.Response, uids: Sequence[str]) -> BatchResult:
    status = response.status_code
    if status in _TRANSIENT_HTTP or status >= 500:
        raise TransientDeliveryError(
            f"STOW-RS answered HTTP {status}", retry_after=_retry_after(response)
        )
    module = parse_store_response(response.content)
    if 200 <= status < 300:
        if module is None:
            if status == 202:
                raise TransientDeliveryError(
                    "STOW-RS answered HTTP 202 with an unreadable response: which instances "
                    "were stored is unknown"
                )
            return BatchResult(tuple(InstanceOutcome(uid, InstanceStatus.STORED) for uid in uids))
        return BatchResult(tuple(_outcome(uid, module, status) for uid in uids))
    if status in _PER_INSTANCE_REFUSALS:
        if module is None or not module.names_any(uids):
            # Refused without naming an instance: this request was judged, not the endpoint
            # (that is 401/403/404 ...), so this batch's instances fail and the others go on.
            module = StoreResponse(referenced={}, failed={})
        return BatchResult(tuple(_outcome(uid, module, status) for uid in uids))
    if status in (401, 403):
        raise PermanentDeliveryError(
            f"STOW-RS answered HTTP {status}: the receiver refused our credentials"
        )
    if status == 413:
        raise PermanentDeliveryError(
            "STOW-RS answered HTTP 413: the batch is too large for the receiver "
            "(lower its batch limits)"
        )
    raise PermanentDeliveryError(f"STOW-RS answered HTTP {status}")


def _outcome(uid: str, module: StoreResponse, http_status: int) -> InstanceOutcome:
    if uid in module.failed:
        code = module.failed[uid]
        if code is None:
            return InstanceOutcome(
                uid, InstanceStatus.FAILED, reason="refused by the receiver without a reason"
            )
        # Mostly FAILED; ALREADY_PRESENT for "instance already stored" (0111, B00E).
        return outcome_for_failure_reason(uid, code)
    if uid in module.referenced:
        warning = module.referenced[uid]
        if not warning:
            return InstanceOutcome(uid, InstanceStatus.STORED)
        outcome = outcome_for_status(uid, warning)
        if outcome.status is InstanceStatus.FAILED:
            # Stored (it is referenced) with an odd reason code: keep it as a warning.
            return InstanceOutcome(
                uid, InstanceStatus.WARNING, code=outcome.code, reason=outcome.reason
            )
        return outcome
    if http_status == 202:
        return InstanceOutcome(
            uid,
            InstanceStatus.FAILED,
            reason="not acknowledged by the receiver (HTTP 202)",
            transient=True,
        )
    if http_status >= 400:
        return InstanceOutcome(
            uid,
            InstanceStatus.FAILED,
            reason=f"refused by the receiver without naming it (HTTP {http_status})",
        )
    return InstanceOutcome(uid, InstanceStatus.STORED)


def parse_store_response(body: bytes) -> StoreResponse | None:
    """The Store Instances Response Module of a DICOM JSON body; None if it is not one.

    Accepts the data set as an object or as a one-element array (both occur), a sequence
    without ``Value`` (Orthanc writes empty sequences so), and codes as numbers or text
    (:func:`_code`).
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(document, list) and len(document) == 1:
        document = document[0]
    if not isinstance(document, dict):
        return None
    if REFERENCED_SOP_SEQUENCE not in document and FAILED_SOP_SEQUENCE not in document:
        return None
    referenced = _items(document, REFERENCED_SOP_SEQUENCE, WARNING_REASON)
    failed = _items(document, FAILED_SOP_SEQUENCE, FAILURE_REASON)
    if referenced is None or failed is None:
        return None
    return StoreResponse(referenced=referenced, failed=failed)


def _items(
    document: Mapping[str, Any], sequence: str, reason_tag: str
) -> dict[str, int | None] | None:
    element = document.get(sequence)
    if element is None:
        return {}
    if not isinstance(element, dict):
        return None
    items = element.get("Value", [])
    if not isinstance(items, list):
        return None
    found: dict[str, int | None] = {}
    for item in items:
        if not isinstance(item, dict):
            return None
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if not isinstance(uid, str):
            continue  # an unnamed item cannot be matched to what was sent
        found[uid.strip()] = _code(_first(item, reason_tag))
    return found


def _first(item: Mapping[str, Any], tag: str) -> Any:
    element = item.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    return values[0] if isinstance(values, list) and values else None


_HEX_CODE = re.compile(r"^(0[xX])?[0-9A-Fa-f]{4}$")
_DIGITS = re.compile(r"^[0-9]{1,5}$")
# The failure codes below 1000 hex (PS3.4 C.4.2.1.4, PS3.7 C), whose text may be unpadded:
# "110" is 0110 in hex, "272" is 0110 in decimal. Their hex and decimal spellings never meet.
_SHORT_CODES = frozenset(
    {0x0107, 0x0110, 0x0111, 0x0112, 0x0116, 0x0117, 0x0122, 0x0124}
    | {0x0210, 0x0211, 0x0212, 0x0213}
)


def _code(value: Any) -> int | None:
    """A status code as the JSON model writes a US value (a number), or as some servers write
    it: text, then as a status code is printed (four hex digits, ``0110``, ``A700``, maybe
    ``0x``-prefixed), unpadded hex (``110``) or the number in decimal (``272``, ``43264``).
    No status code's decimal form has four digits, so four digits are hex; fewer are the
    reading that is a status code of those below 1000 hex, hex when neither is."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if _HEX_CODE.match(text):
            value = int(text.removeprefix("0x").removeprefix("0X"), 16)
        elif _DIGITS.match(text) and len(text) == 5:
            value = int(text)
        elif _DIGITS.match(text):
            as_hex, as_decimal = int(text, 16), int(text)
            decimal = as_decimal in _SHORT_CODES and as_hex not in _SHORT_CODES
            value = as_decimal if decimal else as_hex
        else:
            return None
    if isinstance(value, int):
        return value if 0 <= value <= 0xFFFF else None
    return None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
