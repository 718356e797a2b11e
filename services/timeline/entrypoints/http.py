"""The timeline API: the FHIR timeline search, the patient's access log, and DICOMweb for viewers.

- ``POST /fhir/ImagingStudy/_search`` (role ``provider``), form body (FHIR ``_search``):
  ``patient.identifier=http://fhir.nl/fhir/NamingSystem/bsn|<BSN>`` (also ``patient:identifier``,
  ``subject.identifier``, ``subject:identifier``), ``date`` (repeatable, ``ge``/``gt``/``le``/
  ``lt``/``eq`` prefixes, AND-ed), ``modality`` (codes, comma = or), ``institution`` (URA, as
  ``http://fhir.nl/fhir/NamingSystem/ura|<URA>`` or 8 digits, or a name), ``_type``
  (ImagingStudy, DocumentReference) or ``kind`` (images, report), ``_count`` (1-100),
  ``_offset``. Unknown parameters are refused (400). Parameters in the URL are refused: the
  BSN goes in the body only.
- ``GET /fhir/ImagingStudy?_page=<token>``: the ``self``/``next``/``previous`` links of a
  searchset. The token is an opaque AES-GCM sealed cursor (no BSN, no pseudonym) bound to the
  organisation and token subject that searched, valid 15 minutes; every page is a new access
  (checked and audited again). ``_page`` is also accepted alone in the POST body. A ``next``
  page holds the entries after the last one shown, wherever they are by then: a study that
  arrives or leaves meanwhile neither repeats nor skips one (``previous`` goes by place).
- ``POST /access-log/_search`` (role ``patient-representative``: the portal acting for the
  authenticated patient or their legal representative), JSON body ``{"bsn", "since", "until",
  "limit"}``: who accessed the patient's data, as a FHIR Bundle of AuditEvents, only for a
  patient the token's ``represents`` claim names (``shared.auth``). Itself audited.
- DICOMweb on Study Instance UIDs a timeline returned, never by patient:
  QIDO-RS ``GET /dicomweb/studies?StudyInstanceUID=`` (required), ``.../studies/{study}/series``,
  ``.../series/{series}/instances``, ``.../studies/{study}/instances``; WADO-RS
  ``GET /dicomweb/studies/{study}[/series/{series}[/instances/{instance}]]`` (multipart/related;
  type="application/dicom", the exact stored bytes, sha256-checked while streaming: a mismatch
  breaks the response off) and ``.../metadata`` (application/dicom+json from the stored header,
  bulk data left out). Unknown or invisible study: 404. What holds for the requester
  whichever study they name (role, token, emergency reason, provider type) is refused with 403
  before the study is looked up; a study of a patient the requester does not treat answers
  404 like an unknown one (left out of a QIDO-RS answer): naming a UID tells nobody whether it
  is on someone's timeline. The audit record keeps the real reason.

Every attempt on patient data (allowed, denied, emergency) is audited (NEN 7513) before the
answer; when the record cannot be written the answer is 503 without the data. A refusal is a
FHIR OperationOutcome naming the condition that failed. Patient data is shown only to a token
that names the person (a UZI number) and states the purpose of use ``TREAT`` (or ``ETREAT``);
the audit record keeps the purpose the token stated.

Break the glass: a token with purpose of use ``ETREAT`` and the reason in the
``X-Break-The-Glass`` request header (a header, so GET requests of viewers can carry it too).
The reason is recorded in the audit with BSNs masked; ETREAT without a reason is refused.

A BSN is read from request bodies only, pseudonymised at once, and never logged, put in a URL,
a metric label, an event or a response header.
"""

from __future__ import annotations

import asyncio
import io
import math
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, TypeVar
from urllib.parse import parse_qsl

import pydicom
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.timeline.bootstrap import TimelineApi
from services.timeline.domain.access import (
    CONDITION_TREATMENT_RELATIONSHIP,
    AccessCheckUnavailable,
)
from services.timeline.domain.fhir import (
    FHIR_JSON,
    MAX_CURSOR_CHARS,
    ExpiredCursor,
    InvalidCursor,
    InvalidSearch,
    SearchRequest,
    audit_bundle,
    cursor_requester,
    operation_outcome,
    parse_search,
    search_bundle,
)
from services.timeline.domain.ports import (
    AccessDecision,
    AccessOutcome,
    EntryKey,
    EntryKind,
    InstanceRow,
    SeriesRow,
    TimelineEntry,
    TimelineQuery,
)
from shared.auth import Principal
from shared.events import AccessLogged, AuditAction, AuditOutcome
from shared.http import CorrelationMiddleware
from shared.identifiers import Bsn, mask_written_bsns
from shared.logging import SCRUBBED_BSN, get_logger
from shared.storage.port import ChecksumMismatch, ObjectNotFound, ObjectStoreError, read_verified

log = get_logger(__name__)

ROLE_PROVIDER: Final = "provider"
ROLE_PATIENT_REPRESENTATIVE: Final = "patient-representative"
CONDITION_ROLE: Final = "role"
# The access log is the patient's: shown to a token acting for that patient only.
CONDITION_REPRESENTED_PATIENT: Final = "represented-patient"
NO_SUCH_STUDY: Final = "no such study on any timeline"
T = TypeVar("T")
BREAK_THE_GLASS: Final = "X-Break-The-Glass"
MAX_REASON_CHARS: Final = 512
FORM: Final = "application/x-www-form-urlencoded"
DICOM: Final = "application/dicom"
DICOM_JSON: Final = "application/dicom+json"
MAX_FORM_BYTES: Final = 16 * 1024
MAX_FORM_FIELDS: Final = 64
MAX_QIDO_UIDS: Final = 100
MAX_QIDO_LIMIT: Final = 1000
# The header of one instance, read to answer /metadata; larger ones are answered with the
# attributes the read model holds.
MAX_HEADER_BYTES: Final = 32 * 1024 * 1024
UID_PATTERN: Final = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$"
_UID = re.compile(UID_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_READ_CHUNK = 1024 * 1024
_HEADER_CHUNK = 64 * 1024
_BULK_OMITTED = "urn:beeldportaal:bulk-data-omitted"

EVENT_TIMELINE: Final = "timeline-search"
EVENT_ACCESS_LOG: Final = "access-log-search"
EVENT_QIDO: Final = "qido-rs"
EVENT_WADO: Final = "wado-rs"

UidPath = Annotated[str, Path(pattern=UID_PATTERN, max_length=64)]
BreakTheGlass = Annotated[
    str | None,
    Header(
        alias=BREAK_THE_GLASS,
        max_length=MAX_REASON_CHARS,
        description="Emergency access: why (needs a token with purpose of use ETREAT).",
    ),
]


# --- refusals -------------------------------------------------------------------------------------


class Refusal(Exception):
    """An answer other than the data, as an OperationOutcome; ``diagnostics`` never quotes input."""

    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        *,
        conditions: Sequence[str] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.conditions = tuple(conditions)
        self.headers = headers


def unavailable(diagnostics: str) -> Refusal:
    return Refusal(503, "transient", diagnostics, headers={"Retry-After": "5"})


class Unaudited(Refusal):
    """The audit record could not be written: 503, nothing disclosed."""

    def __init__(self) -> None:
        super().__init__(
            503,
            "transient",
            "the access could not be audited; nothing was disclosed",
            headers={"Retry-After": "5"},
        )


def outcome_response(
    status: int,
    code: str,
    diagnostics: str,
    *,
    conditions: Sequence[str] = (),
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = operation_outcome(code, diagnostics, conditions=conditions)
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


_OUTCOME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "resourceType": {"type": "string", "enum": ["OperationOutcome"]},
        "issue": {"type": "array", "items": {"type": "object"}},
    },
}


def _outcome_doc(description: str) -> dict[str, Any]:
    return {"description": description, "content": {FHIR_JSON: {"schema": _OUTCOME_SCHEMA}}}


_COMMON: dict[int | str, dict[str, Any]] = {
    400: _outcome_doc("The request is malformed (the OperationOutcome says which parameter)."),
    401: _outcome_doc("No bearer token, or an invalid one."),
    403: _outcome_doc("Access refused: the OperationOutcome names the condition that failed."),
    503: _outcome_doc("The consent registry, the read model or the audit trail is unavailable."),
}


# --- the access check and the audit ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attempt:
    """One access attempt: who, from where, on what, for the audit record."""

    principal: Principal
    event_type: str
    action: AuditAction
    access_point: str
    correlation_id: str
    emergency_reason: str | None
    # Patients whose access was allowed (with the study UIDs asked for), and those of them the
    # answer's audit record was written for (``_grant``); see ``_answered``.
    allowed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    granted: set[str] = field(default_factory=set)


@asynccontextmanager
async def _answered(api: TimelineApi, attempt: Attempt) -> AsyncIterator[None]:
    """Answering ``attempt``: if the answer fails after a patient's access was allowed and
    before it was granted (the read model or the object store unavailable, an instance
    missing, another patient of the same request refused), that patient gets the audit record
    of an attempt allowed and not answered, before the failure goes on. An access check that
    passed is never left unrecorded."""
    try:
        yield
    except Unaudited:
        raise  # the audit trail is what failed: no second record is tried
    except Exception as exc:
        if not isinstance(exc, Refusal):
            why = "internal error"
        elif exc.status == 403:  # only ever another patient's, named in no record of this one
            why = "the same request asked for a study refused to this requester"
        else:
            why = exc.diagnostics
        for patient, study_uids in attempt.allowed.items():
            if patient not in attempt.granted:
                await _audit(
                    api, attempt, outcome=AuditOutcome.DENIED, patient=patient,
                    reason=f"allowed, not answered: {why}", study_uids=study_uids,
                )  # fmt: skip
        raise


def _attempt(
    request: Request,
    principal: Principal,
    event_type: str,
    action: AuditAction,
    reason_header: str | None,
) -> Attempt:
    route = request.scope.get("route")
    template = getattr(route, "path", request.url.path)
    client = request.client.host if request.client else "unknown"
    return Attempt(
        principal=principal,
        event_type=event_type,
        action=action,
        access_point=f"{request.method} {template} from {client}"[:256],
        correlation_id=getattr(request.state, "correlation_id", None) or uuid.uuid4().hex,
        emergency_reason=_emergency_reason(reason_header),
    )


def _emergency_reason(value: str | None) -> str | None:
    if value is None:
        return None
    text = _CONTROL.sub(" ", value).strip()
    if len(text) > MAX_REASON_CHARS:
        raise Refusal(400, "invalid", f"{BREAK_THE_GLASS} holds at most {MAX_REASON_CHARS} chars")
    # The reason goes into the audit event: a BSN typed into it (in groups too, as ID
    # documents print it: 1234.56.782) is masked on the way.
    return mask_written_bsns(text, SCRUBBED_BSN) or None


async def _audit(
    api: TimelineApi,
    attempt: Attempt,
    *,
    outcome: AuditOutcome,
    patient: str | None,
    basis: str | None = None,
    profile: str | None = None,
    reason: str | None = None,
    study_uids: Sequence[str] = (),
) -> None:
    principal = attempt.principal
    event = AccessLogged(
        correlation_id=attempt.correlation_id[:128],
        producer="timeline-api",
        event_type=attempt.event_type,
        action=attempt.action,
        outcome=outcome,
        patient=patient,
        user_uzi=principal.user_uzi,
        on_behalf_of_uzi=principal.on_behalf_of_uzi,
        user_role=principal.role[:32],
        organisation_ura=principal.organisation_ura,
        access_point=attempt.access_point,
        authorisation_basis=basis[:128] if basis else None,
        consent_profile=profile[:128] if profile else None,
        emergency=outcome is AuditOutcome.EMERGENCY,
        reason=reason[:1024] if reason else None,
        study_instance_uids=tuple(dict.fromkeys(study_uids)),
        purpose_of_use=principal.purpose_of_use[:32] if principal.purpose_of_use else None,
    )
    try:
        await api.audit.record(event)
    except Exception as exc:  # any audit failure: no answer but 503
        api.metrics.audited(False)
        log.error(
            "access not answered: the audit record could not be written",
            event_type=attempt.event_type,
            error=type(exc).__name__,
        )
        raise Unaudited() from None
    api.metrics.audited(True)


async def _refuse(
    api: TimelineApi,
    attempt: Attempt,
    patient: str | None,
    status: int,
    code: str,
    reason: str,
    *,
    conditions: Sequence[str] = (),
    profile: str | None = None,
    study_uids: Sequence[str] = (),
    told: tuple[str, Sequence[str]] | None = None,
) -> Refusal:
    """Audit a denied attempt; the caller raises the returned refusal, which names ``told``
    (reason and conditions) when the requester may learn less than the audit holds."""
    api.metrics.access(attempt.event_type, AccessOutcome.DENIED.value, tuple(conditions))
    await _audit(
        api,
        attempt,
        outcome=AuditOutcome.DENIED,
        patient=patient,
        profile=profile,
        reason=reason,
        study_uids=study_uids,
    )
    log.info(
        "access denied",
        event_type=attempt.event_type,
        caller_ura=attempt.principal.organisation_ura,
        conditions=list(conditions),
    )
    reason, conditions = told if told is not None else (reason, conditions)
    return Refusal(status, code, reason, conditions=conditions)


async def _check_access(
    api: TimelineApi,
    attempt: Attempt,
    patient: str,
    role: str,
    study_uids: Sequence[str] = (),
    *,
    unrelated_as_unknown: bool = False,
) -> AccessDecision:
    """The role, then the guard; a refusal is audited and raised, an allowance returned (to be
    audited by the caller together with what it disclosed).

    ``unrelated_as_unknown`` (DICOMweb, where the requester names a study, after
    :func:`_check_requester`): a requester who does not treat the study's patient is answered
    as for a study on no timeline (404), so the answer does not tell them the UID is on
    someone's timeline; the audit keeps why."""
    await _require_role(api, attempt, patient, role, study_uids)
    decision = await _consult(
        api,
        attempt,
        patient,
        study_uids,
        api.guard.check(
            attempt.principal,
            patient,
            emergency_reason=attempt.emergency_reason,
            # DICOMweb asked _check_requester first: the same checks, not the same time twice.
            requester_checked=unrelated_as_unknown,
        ),
    )
    if not decision.allowed:
        unrelated = CONDITION_TREATMENT_RELATIONSHIP in decision.failed_conditions
        as_unknown = unrelated_as_unknown and unrelated
        raise await _refused(api, attempt, patient, decision, study_uids, as_unknown=as_unknown)
    attempt.allowed[patient] = tuple(study_uids)
    return decision


async def _check_requester(api: TimelineApi, attempt: Attempt, study_uids: Sequence[str]) -> None:
    """What holds for the requester whichever study they name (the role, the token, the
    emergency reason, the provider type), refused with 403 before any study is looked up:
    the answer is the same whether the study is on a timeline or not."""
    await _require_role(api, attempt, None, ROLE_PROVIDER, study_uids)
    refused = await _consult(
        api,
        attempt,
        None,
        study_uids,
        api.guard.check_requester(attempt.principal, emergency_reason=attempt.emergency_reason),
    )
    if refused is not None:
        raise await _refused(api, attempt, None, refused, study_uids)


async def _require_role(
    api: TimelineApi, attempt: Attempt, patient: str | None, role: str, study_uids: Sequence[str]
) -> None:
    if not attempt.principal.has_role(role):
        raise await _refuse(
            api,
            attempt,
            patient,
            403,
            "forbidden",
            f"the token lacks the role {role}",
            conditions=(CONDITION_ROLE,),
            study_uids=study_uids,
        )


async def _consult(
    api: TimelineApi,
    attempt: Attempt,
    patient: str | None,
    study_uids: Sequence[str],
    check: Awaitable[T],
) -> T:
    """The guard's answer; when it cannot decide, the attempt is audited as such and 503."""
    try:
        return await check
    except AccessCheckUnavailable as exc:
        log.warning("access check unavailable", error=str(exc))
        await _audit(
            api,
            attempt,
            outcome=AuditOutcome.DENIED,
            patient=patient,
            reason=f"not decided: {exc}",
            study_uids=study_uids,
        )
        raise unavailable(str(exc)) from None


async def _refused(
    api: TimelineApi,
    attempt: Attempt,
    patient: str | None,
    decision: AccessDecision,
    study_uids: Sequence[str],
    *,
    as_unknown: bool = False,
) -> Refusal:
    """The guard's refusal, audited; answered 404 like an unknown study when ``as_unknown``."""
    return await _refuse(
        api,
        attempt,
        patient,
        404 if as_unknown else 403,
        "not-found" if as_unknown else "forbidden",
        decision.reason or "access refused",
        conditions=decision.failed_conditions,
        profile=decision.consent_profile,
        study_uids=study_uids,
        told=(NO_SUCH_STUDY, ()) if as_unknown else decision.told,
    )


async def _grant(
    api: TimelineApi,
    attempt: Attempt,
    patient: str,
    decision: AccessDecision,
    study_uids: Sequence[str],
) -> None:
    """Audit an allowed (or emergency) access, with what it disclosed, before answering."""
    outcome = (
        AuditOutcome.EMERGENCY
        if decision.outcome is AccessOutcome.EMERGENCY
        else AuditOutcome.ALLOWED
    )
    api.metrics.access(attempt.event_type, outcome.value)
    await _audit(
        api,
        attempt,
        outcome=outcome,
        patient=patient,
        basis=decision.authorisation_basis,
        profile=decision.consent_profile,
        reason=decision.reason if outcome is AuditOutcome.EMERGENCY else None,
        study_uids=study_uids,
    )
    attempt.granted.add(patient)
    if outcome is AuditOutcome.EMERGENCY:
        log.warning(
            "emergency access (break the glass)",
            event_type=attempt.event_type,
            caller_ura=attempt.principal.organisation_ura,
            caller_uzi=attempt.principal.user_uzi,
        )


async def _read(what: str, call: Any) -> Any:
    """A read-model call; any failure of it is a 503, never a 500."""
    try:
        return await call
    except Refusal:
        raise
    except Exception as exc:
        log.error("read model unavailable", reading=what, error=type(exc).__name__)
        raise unavailable("the timeline read model is unavailable") from None


# --- forms ----------------------------------------------------------------------------------------


async def _read_limited(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refusal(413, "too-costly", f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _form_pairs(body: bytes) -> list[tuple[str, str]]:
    try:
        text = body.decode("utf-8")
        return parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_FORM_FIELDS,
            errors="strict",
        )
    except (UnicodeDecodeError, ValueError):
        raise Refusal(400, "structure", "the body is not a valid form") from None


_SEARCH_FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "patient.identifier": {
            "type": "string",
            "description": "http://fhir.nl/fhir/NamingSystem/bsn|<BSN>",
            "pattern": r"^http://fhir\.nl/fhir/NamingSystem/bsn\|[0-9]{9}$",
        },
        "date": {
            "type": "array",
            "items": {"type": "string", "pattern": r"^(eq|ge|gt|le|lt)?[0-9]{4}(-[0-9]{2}){0,2}$"},
        },
        "modality": {"type": "string", "description": "DICOM modality codes, comma-separated"},
        "institution": {"type": "string", "description": "URA or institution name"},
        "_type": {"type": "string", "enum": ["ImagingStudy", "DocumentReference"]},
        "kind": {"type": "string", "enum": ["images", "report"]},
        "_count": {"type": "integer", "minimum": 1, "maximum": 100},
        "_offset": {"type": "integer", "minimum": 0},
        "_page": {"type": "string", "description": "a page token from a searchset link"},
    },
}


# --- DICOM JSON (QIDO-RS) -------------------------------------------------------------------------


def _element(vr: str, *values: Any) -> dict[str, Any]:
    present = [v for v in values if v is not None and v != ""]
    return {"vr": vr, "Value": present} if present else {"vr": vr}


def _dicom_date(entry: TimelineEntry) -> str | None:
    return entry.study_date.strftime("%Y%m%d") if entry.study_date else None


def _study_json(
    entry: TimelineEntry, series: Sequence[SeriesRow], retrieve_url: str
) -> dict[str, Any]:
    names = sorted({s.institution_name for s in entry.sources if s.institution_name})
    number_of_series = len(series) or max((s.number_of_series for s in entry.sources), default=0)
    number_of_instances = sum(s.number_of_instances for s in series) or max(
        (s.number_of_instances for s in entry.sources), default=0
    )
    return {
        "00080005": _element("CS", "ISO_IR 192"),
        "00080020": _element("DA", _dicom_date(entry)),
        "00080030": _element("TM", entry.study_time),
        "00080050": _element("SH", entry.accession_number),
        "00080061": _element("CS", *entry.modalities),
        "00080080": _element("LO", *names),
        "00081030": _element("LO", entry.description),
        "00081190": _element("UR", retrieve_url),
        "0020000D": _element("UI", entry.study_instance_uid),
        "00201206": _element("IS", number_of_series),
        "00201208": _element("IS", number_of_instances),
    }


def _series_json(row: SeriesRow, retrieve_url: str) -> dict[str, Any]:
    return {
        "00080060": _element("CS", row.modality),
        "0008103E": _element("LO", row.series_description),
        "00081190": _element("UR", retrieve_url),
        "0020000D": _element("UI", row.study_instance_uid),
        "0020000E": _element("UI", row.series_instance_uid),
        "00200011": _element("IS", row.series_number),
        "00201209": _element("IS", row.number_of_instances),
    }


def _instance_json(row: InstanceRow, retrieve_url: str) -> dict[str, Any]:
    return {
        "00080016": _element("UI", row.sop_class_uid),
        "00080018": _element("UI", row.sop_instance_uid),
        "00081190": _element("UR", retrieve_url),
        "00083002": _element("UI", row.transfer_syntax_uid),
        "0020000D": _element("UI", row.study_instance_uid),
        "0020000E": _element("UI", row.series_instance_uid),
    }


def _paged(items: list[Any], limit: int | None, offset: int) -> list[Any]:
    return items[offset : offset + limit] if limit is not None else items[offset:]


def _dicom_json(body: Any) -> JSONResponse:
    return JSONResponse(body, media_type=DICOM_JSON, headers={"Cache-Control": "no-store"})


def _refuse_extra_query(request: Request, allowed: set[str]) -> None:
    extra = set(request.query_params.keys()) - allowed
    if extra:
        raise Refusal(
            400,
            "not-supported",
            "unsupported query parameter; this server matches on UIDs only, never on patient "
            f"attributes (allowed: {', '.join(sorted(allowed)) or 'none'})",
        )


def _uid_list(values: Sequence[str] | None, name: str, *, required: bool) -> list[str]:
    uids: list[str] = []
    for value in values or ():
        for part in value.split(","):
            uid = part.strip()
            if not (0 < len(uid) <= 64 and _UID.fullmatch(uid)):
                raise Refusal(400, "invalid", f"{name} must be DICOM UIDs (digits and dots)")
            uids.append(uid)
    if required and not uids:
        raise Refusal(
            400, "required", f"{name} is required: QIDO-RS here matches studies by UID only"
        )
    if len(uids) > MAX_QIDO_UIDS:
        raise Refusal(400, "too-costly", f"at most {MAX_QIDO_UIDS} values of {name}")
    return list(dict.fromkeys(uids))


# --- WADO-RS --------------------------------------------------------------------------------------


def _acceptable_media_ranges(accept: str | None) -> list[tuple[str, dict[str, str]]]:
    ranges: list[tuple[str, dict[str, str]]] = []
    for item in (accept or "*/*").split(","):
        parts = [p.strip() for p in item.split(";") if p.strip()]
        if not parts:
            continue
        params: dict[str, str] = {}
        for param in parts[1:]:
            name, _, value = param.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        ranges.append((parts[0].lower(), params))
    return ranges


def _accepts_dicom(accept: str | None, syntaxes: set[str]) -> bool:
    """Does Accept allow multipart/related; type="application/dicom" of the stored bytes?

    Bytes are served as stored, never transcoded: a transfer-syntax parameter must be ``*`` or
    the stored one (of every instance); without one the stored syntax is served (as Orthanc
    and dcm4chee do for "as received").
    """
    for media, params in _acceptable_media_ranges(accept):
        if params.get("q") in ("0", "0.0", "0.00", "0.000"):
            continue
        if media in ("*/*", "multipart/*"):
            return True
        if media != "multipart/related":
            continue
        if params.get("type", DICOM).lower() not in (DICOM, "application/*", "*/*"):
            continue
        syntax = params.get("transfer-syntax")
        if syntax in (None, "*") or {syntax} >= syntaxes:
            return True
    return False


def _accepts_json(accept: str | None) -> bool:
    return any(
        media in (DICOM_JSON, "application/json", "application/*", "*/*")
        for media, _ in _acceptable_media_ranges(accept)
    )


def _verified_chunks(api: TimelineApi, row: InstanceRow) -> Iterator[bytes]:
    """The object's bytes as stored; the last chunk is held back until the whole object hashes
    to its recorded sha256, so a mismatch breaks the response off before it is complete."""
    for chunk in read_verified(api.objects, row.object_key, row.sha256, _READ_CHUNK):
        api.metrics.wado_bytes.inc(len(chunk))
        yield chunk


def _multipart(api: TimelineApi, rows: Sequence[InstanceRow], boundary: str) -> Iterator[bytes]:
    try:
        for row in rows:
            yield (
                f"--{boundary}\r\nContent-Type: {DICOM}; transfer-syntax={row.transfer_syntax_uid}"
                "\r\n\r\n"
            ).encode()
            yield from _verified_chunks(api, row)
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()
    except GeneratorExit:
        api.metrics.wado("aborted")  # the viewer went away
        raise
    except ChecksumMismatch as exc:
        api.metrics.wado("checksum-mismatch")
        log.error("WADO-RS broken off: stored bytes do not match their sha256", detail=str(exc))
        raise
    except Exception as exc:
        api.metrics.wado("aborted")
        log.error("WADO-RS broken off", error=type(exc).__name__, detail=str(exc))
        raise
    api.metrics.wado("ok")


class HeaderTooLarge(ValueError):
    pass


class _ChunkReader(io.RawIOBase):
    """A seekable file over an object's chunks, reading no further than the parser asks."""

    def __init__(self, chunks: Iterator[bytes], size: int, limit: int) -> None:
        self._chunks = chunks
        self._size = size
        self._limit = limit
        self._buffer = bytearray()
        self._position = 0
        self._exhausted = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _fill(self, upto: int) -> None:
        while len(self._buffer) < upto and not self._exhausted:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._exhausted = True
                break
            self._buffer += chunk
            if len(self._buffer) > self._limit:
                raise HeaderTooLarge(f"the header exceeds {self._limit} bytes")

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(self._size - self._position, 0)
        self._fill(self._position + size)
        data = bytes(self._buffer[self._position : self._position + size])
        self._position += len(data)
        return data

    def readinto(self, target: Any) -> int:
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._position
        elif whence == io.SEEK_END:
            offset += self._size
        self._position = max(offset, 0)
        return self._position

    def tell(self) -> int:
        return self._position


# How the DICOM JSON model writes a floating point value JSON has no number for (FL and FD
# may hold any IEEE 754 value): as a string, as dicom-rs and CP-2275 do.
_NON_FINITE = {"nan": "NaN", "inf": "inf", "-inf": "-inf"}


def _strip_bulk(value: Any) -> Any:
    """pydicom's DICOM JSON with the bulk data left out, and every non-finite float written as
    a string (JSON has no NaN or infinity: the response could not be rendered)."""
    if isinstance(value, dict):
        return {
            key: _strip_bulk(item)
            for key, item in value.items()
            if not (isinstance(item, dict) and item.get("BulkDataURI") == _BULK_OMITTED)
        }
    if isinstance(value, list):
        return [_strip_bulk(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return _NON_FINITE[repr(value)]
    return value


def _instance_metadata(api: TimelineApi, row: InstanceRow, retrieve_url: str) -> dict[str, Any]:
    """The stored header as DICOM JSON, bulk data (and pixel data) left out. Runs in a thread."""
    try:
        with api.objects.open(row.object_key, _HEADER_CHUNK) as chunks:
            reader = _ChunkReader(iter(chunks), row.size, MAX_HEADER_BYTES)
            dataset = pydicom.dcmread(reader, stop_before_pixels=True)
            body = dataset.to_json_dict(
                bulk_data_threshold=1024, bulk_data_element_handler=lambda _: _BULK_OMITTED
            )
    except ObjectNotFound:
        log.error("an instance is missing from the object store", object_key=row.object_key)
        return _instance_json(row, retrieve_url)
    except ObjectStoreError:
        raise
    except Exception as exc:  # an unreadable or huge header: what the read model knows
        log.warning(
            "stored header not readable; answering with the indexed attributes",
            sop_instance_uid=row.sop_instance_uid,
            error=type(exc).__name__,
        )
        return _instance_json(row, retrieve_url)
    metadata = _strip_bulk(body)
    metadata["00081190"] = _element("UR", retrieve_url)
    return metadata


# --- routes ---------------------------------------------------------------------------------------


class AccessLogSearch(BaseModel):
    """Who accessed this patient's data in a period (newest first)."""

    # A validation error's text leaves out the input: the body holds a BSN.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    bsn: Bsn
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    limit: int = Field(default=100, ge=1, le=1000)


def build_router(api: TimelineApi) -> APIRouter:
    router = APIRouter()
    authenticate = api.principal_dependency

    def requester(principal: Principal) -> str:
        return cursor_requester(principal.organisation_ura, principal.subject)

    def page_link(
        query: TimelineQuery, principal: Principal, offset: int, after: EntryKey | None = None
    ) -> str:
        token = api.cursors.seal(
            TimelineQuery(
                patient=query.patient,
                date_from=query.date_from,
                date_to=query.date_to,
                modalities=query.modalities,
                institution=query.institution,
                kind=query.kind,
                count=query.count,
                offset=offset,
                after=after,
            ),
            requester=requester(principal),
            now=api.clock(),
        )
        return f"{api.base_url}/fhir/ImagingStudy?_page={token}"

    async def answer_search(
        request: Request, principal: Principal, search: SearchRequest, reason: str | None
    ) -> Response:
        attempt = _attempt(request, principal, EVENT_TIMELINE, AuditAction.QUERY, reason)
        async with _answered(api, attempt):
            if search.page is not None:
                try:
                    query = api.cursors.open(
                        search.page, requester=requester(principal), now=api.clock()
                    )
                except ExpiredCursor as exc:
                    raise Refusal(410, "expired", str(exc)) from None
                except InvalidCursor as exc:
                    # Altered, or someone else's link: an attempt at another's search, on the
                    # record (whose patient it would have been, the token does not say).
                    raise await _refuse(api, attempt, None, 400, "invalid", str(exc)) from None
            else:
                assert search.bsn is not None
                query = search.query(api.pseudonymizer.pseudonym(search.bsn))
            decision = await _check_access(api, attempt, query.patient, ROLE_PROVIDER)
            page = await _read("search", api.reader.search(query))
            series: dict[str, list[SeriesRow]] = {}
            reports: dict[str, InstanceRow] = {}
            for entry in page.entries:
                uid = entry.study_instance_uid
                if entry.kind is EntryKind.IMAGES and uid not in series:
                    series[uid] = await _read("series", api.reader.series(uid))
                elif entry.kind is EntryKind.REPORT and entry.report_sop_instance_uid:
                    rows = await _read(
                        "instances",
                        api.reader.instances(uid, sop_instance_uid=entry.report_sop_instance_uid),
                    )
                    if rows:
                        reports[entry.report_sop_instance_uid] = rows[0]
            # Next: the entries after this page's last, wherever they are by then (a study
            # arriving meanwhile does not shift them). Previous: by place, as FHIR allows.
            links = {"self": page_link(query, principal, query.offset, query.after)}
            if page.last is not None and page.offset + len(page.entries) < page.total:
                links["next"] = page_link(
                    query, principal, page.offset + len(page.entries), page.last
                )
            if page.offset > 0:
                links["previous"] = page_link(query, principal, max(page.offset - query.count, 0))
            bundle = search_bundle(
                page,
                base_url=api.base_url,
                series=series,
                report_instances=reports,
                links=links,
                now=api.clock(),
            )
            await _grant(
                api, attempt, query.patient, decision, [e.study_instance_uid for e in page.entries]
            )
            return JSONResponse(bundle, media_type=FHIR_JSON, headers={"Cache-Control": "no-store"})

    @router.post(
        "/fhir/ImagingStudy/_search",
        tags=["FHIR"],
        summary="Search a patient's imaging timeline (FHIR _search; the BSN in the form body)",
        responses={
            200: {"description": "A searchset Bundle of ImagingStudy and DocumentReference."},
            **_COMMON,
            410: _outcome_doc("The page token expired; search again."),
            413: _outcome_doc("The body is too large."),
            415: _outcome_doc(f"Send {FORM}."),
        },
        openapi_extra={
            "requestBody": {"required": True, "content": {FORM: {"schema": _SEARCH_FORM_SCHEMA}}}
        },
    )
    async def search_timeline(
        request: Request,
        break_the_glass: BreakTheGlass = None,
        principal: Principal = Depends(authenticate),  # noqa: B008  (a local: see shared.auth)
    ) -> Response:
        if request.query_params:
            raise Refusal(
                400, "not-supported", "search parameters go in the form body, never in the URL"
            )
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != FORM:
            raise Refusal(415, "not-supported", f"send the search as {FORM}")
        pairs = _form_pairs(await _read_limited(request, MAX_FORM_BYTES))
        try:
            search = parse_search(pairs)
        except InvalidSearch as exc:
            raise Refusal(400, exc.code, str(exc)) from None
        with api.metrics.search_duration.time():
            return await answer_search(request, principal, search, break_the_glass)

    @router.get(
        "/fhir/ImagingStudy",
        tags=["FHIR"],
        summary="A page of an earlier search (the searchset's self/next/previous links)",
        responses={
            200: {"description": "A searchset Bundle."},
            **_COMMON,
            410: _outcome_doc("The page token expired; search again."),
        },
    )
    async def timeline_page(
        request: Request,
        page: Annotated[str, Query(alias="_page", min_length=1, max_length=MAX_CURSOR_CHARS)],
        break_the_glass: BreakTheGlass = None,
        principal: Principal = Depends(authenticate),  # noqa: B008
    ) -> Response:
        _refuse_extra_query(request, {"_page"})
        with api.metrics.search_duration.time():
            return await answer_search(
                request, principal, SearchRequest(page=page), break_the_glass
            )

    @router.post(
        "/access-log/_search",
        tags=["access log"],
        summary="Who accessed the patient's data (NEN 7513), for the patient's representative",
        responses={200: {"description": "A searchset Bundle of AuditEvent."}, **_COMMON},
    )
    async def access_log(
        body: AccessLogSearch,
        request: Request,
        principal: Principal = Depends(authenticate),  # noqa: B008
    ) -> Response:
        if body.since and body.until and body.since > body.until:
            raise Refusal(400, "invalid", "since is after until")  # malformed: no attempt yet
        patient = api.pseudonymizer.pseudonym(body.bsn)
        attempt = _attempt(request, principal, EVENT_ACCESS_LOG, AuditAction.QUERY, None)
        await _require_role(api, attempt, patient, ROLE_PATIENT_REPRESENTATIVE, ())
        if not principal.acts_for(body.bsn.value):
            raise await _refuse(
                api,
                attempt,
                patient,
                403,
                "forbidden",
                "the token does not act for this patient (its represents claim does not name them)",
                conditions=(CONDITION_REPRESENTED_PATIENT,),
            )
        attempt.allowed[patient] = ()
        async with _answered(api, attempt):
            try:
                events, total = await api.audit.search(patient, body.since, body.until, body.limit)
            except Exception as exc:
                log.error("access log unavailable", error=type(exc).__name__)
                raise unavailable("the access log is unavailable") from None
            decision = AccessDecision(
                AccessOutcome.ALLOWED,
                authorisation_basis=ROLE_PATIENT_REPRESENTATIVE,
                consent_profile=None,
            )
            await _grant(api, attempt, patient, decision, ())
            return JSONResponse(
                audit_bundle(events, total=total, now=api.clock()),
                media_type=FHIR_JSON,
                headers={"Cache-Control": "no-store"},
            )

    # --- DICOMweb -----------------------------------------------------------------------------

    dicomweb = f"{api.base_url}/dicomweb"

    def study_url(uid: str) -> str:
        return f"{dicomweb}/studies/{uid}"

    def series_url(study: str, series: str) -> str:
        return f"{study_url(study)}/series/{series}"

    def instance_url(row: InstanceRow) -> str:
        return (
            f"{series_url(row.study_instance_uid, row.series_instance_uid)}"
            f"/instances/{row.sop_instance_uid}"
        )

    async def study_access(attempt: Attempt, study: str) -> tuple[str, AccessDecision]:
        """The study's patient and the access decision; 404 for a study on no timeline, and
        for one of a patient the requester does not treat (the same answer)."""
        await _check_requester(api, attempt, (study,))
        patient = await _read("patient_of_study", api.reader.patient_of_study(study))
        if patient is None:
            raise await _refuse(
                api, attempt, None, 404, "not-found", NO_SUCH_STUDY, study_uids=(study,)
            )
        decision = await _check_access(
            api, attempt, patient, ROLE_PROVIDER, (study,), unrelated_as_unknown=True
        )
        return patient, decision

    dicomweb_responses: dict[int | str, dict[str, Any]] = {
        **_COMMON,
        404: _outcome_doc("The study is on no timeline (or the series/instance is not in it)."),
    }

    @router.get(
        "/dicomweb/studies",
        tags=["QIDO-RS"],
        summary="Studies by Study Instance UID (required; no patient-level query)",
        responses={200: {"description": "DICOM JSON study attributes."}, **dicomweb_responses},
    )
    async def search_studies(
        request: Request,
        study_uids: Annotated[
            list[str] | None, Query(alias="StudyInstanceUID", max_length=MAX_QIDO_UIDS * 65)
        ] = None,
        limit: Annotated[int | None, Query(ge=1, le=MAX_QIDO_LIMIT)] = None,
        offset: Annotated[int, Query(ge=0, le=MAX_QIDO_LIMIT)] = 0,
        includefield: Annotated[list[str] | None, Query(max_length=512)] = None,
        fuzzymatching: bool | None = None,
        break_the_glass: BreakTheGlass = None,
        principal: Principal = Depends(authenticate),  # noqa: B008
    ) -> Response:
        _refuse_extra_query(
            request, {"StudyInstanceUID", "limit", "offset", "includefield", "fuzzymatching"}
        )
        uids = _uid_list(study_uids, "StudyInstanceUID", required=True)
        attempt = _attempt(request, principal, EVENT_QIDO, AuditAction.QUERY, break_the_glass)
        async with _answered(api, attempt):
            await _check_requester(api, attempt, uids)
            by_patient: dict[str, list[str]] = {}
            for uid in uids:
                patient = await _read("patient_of_study", api.reader.patient_of_study(uid))
                if patient is not None:
                    by_patient.setdefault(patient, []).append(uid)
            if not by_patient:
                # An attempt all the same: recorded, answered like an empty search.
                await _audit(
                    api, attempt, outcome=AuditOutcome.DENIED, patient=None,
                    reason=NO_SUCH_STUDY, study_uids=uids,
                )  # fmt: skip
                return _dicom_json([])
            # Every patient's access decided (and a refusal audited) before answering: one
            # refused patient refuses the request, and the others' records say so. The studies
            # of a patient the requester does not treat are left out, as unknown ones are.
            decisions: dict[str, AccessDecision] = {}
            refused: Refusal | None = None
            for patient, found in by_patient.items():
                try:
                    decisions[patient] = await _check_access(
                        api, attempt, patient, ROLE_PROVIDER, found, unrelated_as_unknown=True
                    )
                except Refusal as refusal:
                    if refusal.status == 404:
                        continue
                    if refusal.status != 403:
                        raise
                    refused = refused or refusal
            if refused is not None:
                raise refused
            results: list[dict[str, Any]] = []
            for patient in decisions:
                for uid in by_patient[patient]:
                    entry = await _read("entry", api.reader.entry(uid))
                    if entry is None:
                        continue
                    rows = await _read("series", api.reader.series(uid))
                    results.append(_study_json(entry, rows, study_url(uid)))
            for patient, decision in decisions.items():
                await _grant(api, attempt, patient, decision, by_patient[patient])
            return _dicom_json(_paged(results, limit, offset))

    @router.get(
        "/dicomweb/studies/{study}/series",
        tags=["QIDO-RS"],
        summary="The series of a study",
        responses={200: {"description": "DICOM JSON series attributes."}, **dicomweb_responses},
    )
    async def search_series(
        request: Request,
        study: UidPath,
        modality: Annotated[
            str | None, Query(alias="Modality", pattern=r"^[A-Z0-9]{1,16}$")
        ] = None,
        series_uid: Annotated[
            str | None, Query(alias="SeriesInstanceUID", pattern=UID_PATTERN, max_length=64)
        ] = None,
        limit: Annotated[int | None, Query(ge=1, le=MAX_QIDO_LIMIT)] = None,
        offset: Annotated[int, Query(ge=0, le=100_000)] = 0,
        includefield: Annotated[list[str] | None, Query(max_length=512)] = None,
        break_the_glass: BreakTheGlass = None,
        principal: Principal = Depends(authenticate),  # noqa: B008
    ) -> Response:
        _refuse_extra_query(
            request, {"Modality", "SeriesInstanceUID", "limit", "offset", "includefield"}
        )
        attempt = _attempt(request, principal, EVENT_QIDO, AuditAction.QUERY, break_the_glass)
        async with _answered(api, attempt):
            patient, decision = await study_access(attempt, study)
            rows = await _read("series", api.reader.series(study))
            matched = [
                row
                for row in rows
                if (modality is None or row.modality == modality)
                and (series_uid is None or row.series_instance_uid == series_uid)
            ]
            await _grant(api, attempt, patient, decision, (study,))
            return _dicom_json(
                [
                    _series_json(r, series_url(study, r.series_instance_uid))
                    for r in _paged(matched, limit, offset)
                ]
            )

    async def instances_answer(
        request: Request,
        principal: Principal,
        study: str,
        series: str | None,
        filters: dict[str, str | None],
        limit: int | None,
        offset: int,
        reason: str | None,
    ) -> Response:
        attempt = _attempt(request, principal, EVENT_QIDO, AuditAction.QUERY, reason)
        async with _answered(api, attempt):
            patient, decision = await study_access(attempt, study)
            rows = await _read("instances", api.reader.instances(study, series))
            matched = [
                row
                for row in rows
                if (filters.get("sop") is None or row.sop_instance_uid == filters["sop"])
                and (filters.get("sop_class") is None or row.sop_class_uid == filters["sop_class"])
                and (filters.get("series") is None or row.series_instance_uid == filters["series"])
            ]
            await _grant(api, attempt, patient, decision, (study,))
            return _dicom_json(
                [_instance_json(r, instance_url(r)) for r in _paged(matched, limit, offset)]
            )

    instance_filters = {"SOPInstanceUID", "SOPClassUID", "limit", "offset", "includefield"}

    @router.get(
        "/dicomweb/studies/{study}/series/{series}/instances",
        tags=["QIDO-RS"],
        summary="The instances of a series",
        responses={200: {"description": "DICOM JSON instance attributes."}, **dicomweb_responses},
    )
    async def search_series_instances(
        request: Request,
        study: UidPath,
        series: UidPath,
        sop: Annotated[
            str | None, Query(alias="SOPInstanceUID", pattern=UID_PATTERN, max_length=64)
        ] = None,
        sop_class: Annotated[
            str | None, Query(alias="SOPClassUID", pattern=UID_PATTERN, max_length=64)
        ] = None,
        limit: Annotated[int | None, Query(ge=1, le=MAX_QIDO_LIMIT)] = None,
        offset: Annotated[int, Query(ge=0, le=100_000)] = 0,
        includefield: Annotated[list[str] | None, Query(max_length=512)] = None,
        break_the_glass: BreakTheGlass = None,
        principal: Principal = Depends(authenticate),  # noqa: B008
    ) -> Response:
        _refuse_extra_query(request, instance_filters)
        filters = {"sop": sop, "sop_class": sop_class}
        return await instances_answer(
            request, principal, study, series, filters, limit, offset, break_the_glass
        )

    @router.get(
        "/dicomweb/studies/{study}/instances",
        tags=["QIDO-RS"],
        summary="The instances of a study",
        responses={200: {"description": "DICOM JSON instance attributes."}, **dicomweb_responses},
    )
    async def search_study_instances(
        request: Request,
        study: UidPath,
        series_uid: Annotated[
            str | None, Query(alias="SeriesInstanceUID", pattern=UID_PATTERN, max_length=64)
        ] = None,
        sop: Annotated[
            str | None, Query(alias="SOPInstanceUID", pattern=UID_PATTERN, max_length=64)
        ] = None,
        sop_class: Annotated[
            str | None, Query(alias="SOPClassUID", pattern=UID_PATTERN, max_length=64)
        ] = None,
        limit: Annotated[int | None, Query(ge=1, le=MAX_QIDO_LIMIT)] = None,
        offset: Annotated[int, Query(ge=0, le=100_000)] = 0,
        includefield: Annotated[list[str] | None, Query(max_length=512)] = None,
        break_the_glass: BreakTheGlass = None,
        principal: Principal = Depends(authenticate),  # noqa: B008
    ) -> Response:
        _refuse_extra_query(request, instance_filters | {"SeriesInstanceUID"})
        filters = {"sop": sop, "sop_class": sop_class, "series": series_uid}
        return await instances_answer(
            request, principal, study, None, filters, limit, offset, break_the_glass
        )

    async def wado_rows(
        attempt: Attempt, study: str, series: str | None, instance: str | None
    ) -> tuple[str, AccessDecision, list[InstanceRow]]:
        """The instances a WADO-RS request names, once access to their study is decided. None
        is a 404, audited as granted: the requester may see the study, nothing was there."""
        patient, decision = await study_access(attempt, study)
        rows = await _read("instances", api.reader.instances(study, series, instance))
        if not rows:
            await _grant(api, attempt, patient, decision, (study,))
            raise Refusal(404, "not-found", "no such series or instance in this study")
        return patient, decision, rows

    async def retrieve(
        request: Request,
        principal: Principal,
        study: str,
        series: str | None,
        instance: str | None,
        reason: str | None,
    ) -> Response:
        attempt = _attempt(request, principal, EVENT_WADO, AuditAction.READ, reason)
        async with _answered(api, attempt):
            patient, decision, rows = await wado_rows(attempt, study, series, instance)
            stored = {r.transfer_syntax_uid for r in rows}
            if not _accepts_dicom(request.headers.get("accept"), stored):
                await _grant(api, attempt, patient, decision, (study,))
                raise Refusal(
                    406,
                    "not-supported",
                    'this server sends multipart/related; type="application/dicom" in the stored '
                    "transfer syntax (transfer-syntax=* or the stored one)",
                )
            try:
                # Before answering 200: can S3 serve it at all?
                info = await asyncio.to_thread(api.objects.stat, rows[0].object_key)
            except ObjectStoreError as exc:
                log.error("WADO-RS: object store unavailable", error=str(exc))
                raise unavailable("the images cannot be read now") from None
            if info is None:
                log.error(
                    "WADO-RS: an instance is missing from the object store",
                    study_instance_uid=study,
                    object_key=rows[0].object_key,
                )
                raise Refusal(404, "not-found", "the images of this study are not available")
            await _grant(api, attempt, patient, decision, (study,))
            boundary = uuid.uuid4().hex
            return StreamingResponse(
                _multipart(api, rows, boundary),
                media_type=f'multipart/related; type="{DICOM}"; boundary={boundary}',
                headers={"Cache-Control": "no-store"},
            )

    async def metadata(
        request: Request,
        principal: Principal,
        study: str,
        series: str | None,
        instance: str | None,
        reason: str | None,
    ) -> Response:
        if not _accepts_json(request.headers.get("accept")):
            raise Refusal(406, "not-supported", f"metadata is sent as {DICOM_JSON}")
        attempt = _attempt(request, principal, EVENT_WADO, AuditAction.READ, reason)
        async with _answered(api, attempt):
            patient, decision, rows = await wado_rows(attempt, study, series, instance)

            def read_all() -> list[dict[str, Any]]:
                return [_instance_metadata(api, row, instance_url(row)) for row in rows]

            try:
                body = await asyncio.to_thread(read_all)
            except ObjectStoreError as exc:
                log.error("WADO-RS metadata: object store unavailable", error=str(exc))
                raise unavailable("the stored headers cannot be read now") from None
            await _grant(api, attempt, patient, decision, (study,))
            return _dicom_json(body)

    wado_responses: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "The instances as stored, one part each.",
            "content": {"multipart/related": {"schema": {"type": "string", "format": "binary"}}},
        },
        **dicomweb_responses,
        406: _outcome_doc("Only application/dicom in the stored transfer syntax is offered."),
    }
    metadata_responses: dict[int | str, dict[str, Any]] = {
        200: {"description": "DICOM JSON of the stored headers, bulk data left out."},
        **dicomweb_responses,
        406: _outcome_doc(f"Metadata is sent as {DICOM_JSON}."),
    }

    @router.get("/dicomweb/studies/{study}", tags=["WADO-RS"], summary="Retrieve a study",
                response_class=StreamingResponse, responses=wado_responses)  # fmt: skip
    async def retrieve_study(
        request: Request,
        study: UidPath,
        break_the_glass: BreakTheGlass = None,
        principal: Principal = Depends(authenticate),  # noqa: B008
    ) -> Response:
        _refuse_extra_query(request, set())
        return await retrieve(request, principal, study, None, None, break_the_glass)

    @router.get("/dicomweb/studies/{study}/series/{series}", tags=["WADO-RS"],
                summary="Retrieve a series", response_class=StreamingResponse,
                responses=wado_responses)  # fmt: skip
    async def retrieve_series(
        request: Request,
        study: UidPath,
        series: UidPath,
        break_the_glass: BreakTheGlass = None,
        principal: Principal = Depends(authenticate),  # noqa: B008
    ) -> Response:
        _refuse_extra_query(request, set())
        return await retrieve(request, principal, study, series, None, break_the_glass)

    @router.get("/dicomweb/studies/{study}/series/{series}/instances/{instance}",
                tags=["WADO-RS"], summary="Retrieve an instance",
                response_class=StreamingResponse, responses=wado_responses)  # fmt: skip
    async def retrieve_instance(
        request: Request,
        study: UidPath,
        series: UidPath,
        instance: UidPath,
        break_the_glass: BreakTheGlass = None,
        principal: Principal = Depends(authenticate),  # noqa: B008
    ) -> Response:
        _refuse_extra_query(request, set())
        return await retrieve(request, principal, study, series, instance, break_the_glass)

    @router.get("/dicomweb/studies/{study}/metadata", tags=["WADO-RS"],
                summary="A study's metadata", responses=metadata_responses)  # fmt: skip
    async def study_metadata(
        request: Request,
        study: UidPath,
        break_the_glass: BreakTheGlass = None,
        principal: Principal = Depends(authenticate),  # noqa: B008
    ) -> Response:
        _refuse_extra_query(request, set())
        return await metadata(request, principal, study, None, None, break_the_glass)

    @router.get("/dicomweb/studies/{study}/series/{series}/metadata", tags=["WADO-RS"],
                summary="A series' metadata", responses=metadata_responses)  # fmt: skip
    async def series_metadata(
        request: Request,
        study: UidPath,
        series: UidPath,
        break_the_glass: BreakTheGlass = None,
        principal: Principal = Depends(authenticate),  # noqa: B008
    ) -> Response:
        _refuse_extra_query(request, set())
        return await metadata(request, principal, study, series, None, break_the_glass)

    @router.get("/dicomweb/studies/{study}/series/{series}/instances/{instance}/metadata",
                tags=["WADO-RS"], summary="An instance's metadata",
                responses=metadata_responses)  # fmt: skip
    async def instance_metadata(
        request: Request,
        study: UidPath,
        series: UidPath,
        instance: UidPath,
        break_the_glass: BreakTheGlass = None,
        principal: Principal = Depends(authenticate),  # noqa: B008
    ) -> Response:
        _refuse_extra_query(request, set())
        return await metadata(request, principal, study, series, instance, break_the_glass)

    return router


def add_operational_routes(app: FastAPI, api: TimelineApi) -> None:
    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        responses={503: {"description": "A view is not caught up, or PostgreSQL is unreachable."}},
    )
    async def readyz() -> Response:
        checks = await api.readiness()
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"])
    async def metrics(request: Request) -> Response:
        body, content_type = api.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)


def _safe_loc(error: Any) -> list[Any]:
    loc = list(error.get("loc", ()))
    if error.get("type") == "extra_forbidden" and loc:
        loc[-1] = "<unknown field>"  # the key itself is input
    return loc


def _render_loc(loc: Any) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(request)"


def create_app(api: TimelineApi) -> FastAPI:
    app = FastAPI(
        title="beeldportaal timeline",
        description="A patient's imaging timeline across institutions (FHIR), the patient's "
        "access log, and DICOMweb QIDO-RS/WADO-RS for viewers. Access needs a treatment "
        "relationship and the patient's explicit consent; every access is audited (NEN 7513). "
        "A BSN is accepted in request bodies only.",
        version="0.1.0",
        lifespan=api.lifespan,
    )
    app.add_middleware(CorrelationMiddleware, on_response=api.metrics.request)

    @app.exception_handler(Refusal)
    async def refusal(_request: Request, exc: Refusal) -> JSONResponse:
        return outcome_response(
            exc.status, exc.code, exc.diagnostics, conditions=exc.conditions, headers=exc.headers
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported"}.get(
            exc.status_code, "processing"
        )
        return outcome_response(
            exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {})
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, which may be a BSN.
        problems = "; ".join(
            f"{_render_loc(_safe_loc(item))}: {item.get('msg', 'invalid')}" for item in exc.errors()
        )
        return outcome_response(400, "invalid", f"the request is refused: {problems}"[:2000])

    app.include_router(build_router(api))
    add_operational_routes(app, api)
    return app
