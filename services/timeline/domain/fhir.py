"""The timeline in FHIR R4: search parameters in, a searchset Bundle out, paging by sealed cursor.

- :func:`parse_search` reads the form body of ``POST /fhir/ImagingStudy/_search``. Unknown
  parameters are refused (400) rather than ignored: a silently dropped filter would show a
  provider more than they asked for. Errors never quote the input (it may hold the BSN).
- :func:`search_bundle` builds the Bundle: an ``ImagingStudy`` per images row and a
  ``DocumentReference`` per report row, newest first as the reader returns them. The patient is
  the one the request named; no resource repeats the BSN (nor the pseudonym): ``subject`` says
  "the patient with this BSN" with the value masked (data-absent-reason ``masked``), so a
  Bundle that leaks (a cache, a log of the client) does not identify anyone by itself.
- :class:`PageCursors` seal a query into an opaque, short-lived, requester-bound token (AES-GCM,
  key derived from the pseudonym key). The ``self``/``next``/``previous`` links are
  ``GET {base}/fhir/ImagingStudy?_page=<token>``: a URL without a BSN or pseudonym in it, which
  only the organisation and user that made the search can follow, for :data:`CURSOR_TTL`.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import hashlib
import hmac
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from typing import Any, Final
from zoneinfo import ZoneInfo

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.timeline.domain.ports import (
    EntryKey,
    EntryKind,
    InstanceRow,
    SeriesRow,
    Source,
    TimelineEntry,
    TimelinePage,
    TimelineQuery,
)
from shared.events import AccessLogged, AuditAction, AuditOutcome
from shared.identifiers import (
    BSN_OID,
    BSN_SYSTEM,
    URA_SYSTEM,
    UZI_PERSON_SYSTEM,
    UZI_ROLE_CODE_SYSTEM_OID,
    Bsn,
    InvalidBsn,
    parse_bsn,
)

FHIR_JSON: Final = "application/fhir+json"
DICOM_UID_SYSTEM: Final = "urn:dicom:uid"
DCM_SYSTEM: Final = "http://dicom.nema.org/resources/ontology/DCM"
V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
LOINC: Final = "http://loinc.org"
DATA_ABSENT_REASON: Final = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
ACCESS_CONDITION_SYSTEM: Final = "urn:beeldportaal:fhir:timeline-access-condition"
AUDIT_EVENT_TYPE_SYSTEM: Final = "urn:beeldportaal:fhir:audit-event-type"
NETHERLANDS: Final = ZoneInfo("Europe/Amsterdam")

MAX_COUNT: Final = 100
DEFAULT_COUNT: Final = 50
MAX_OFFSET: Final = 100_000
MAX_INSTITUTION_CHARS: Final = 64
MAX_CURSOR_CHARS: Final = 2048
CURSOR_TTL: Final = timedelta(minutes=15)

# Every spelling of "the patient" a client may use: the chain and the :identifier modifier.
PATIENT_PARAMETERS: Final = frozenset(
    {"patient.identifier", "patient:identifier", "subject.identifier", "subject:identifier"}
)
_BSN_SYSTEMS: Final = frozenset({BSN_SYSTEM, f"urn:oid:{BSN_OID}"})
_TYPES: Final = {"ImagingStudy": EntryKind.IMAGES, "DocumentReference": EntryKind.REPORT}
_KINDS: Final = {"images": EntryKind.IMAGES, "report": EntryKind.REPORT}
_MODALITY = re.compile(r"[A-Z0-9]{1,16}")
_URA = re.compile(r"[0-9]{8}")
# Letters of any script, digits, space and the punctuation of real institution names
# ('s-Hertogenbosch, St. Antonius, Amphia (Breda), Rivas Zorggroep / Beatrix).
_INSTITUTION = re.compile(r"[\w .,'&()/-]+")
_DATE = re.compile(r"(eq|ge|gt|le|lt)?([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2}))?)?")
_INTEGER = re.compile(r"[0-9]{1,7}")


class InvalidSearch(ValueError):
    """A search the API refuses (400). The message names the parameter, never its value."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """A parsed search: either a fresh one (``bsn`` set) or a page of an earlier one (``page``)."""

    bsn: Bsn | None = None
    date_from: date | None = None
    date_to: date | None = None
    modalities: frozenset[str] = frozenset()
    institution: str | None = None
    kind: EntryKind | None = None
    count: int = DEFAULT_COUNT
    offset: int = 0
    page: str | None = None

    def query(self, patient: str) -> TimelineQuery:
        return TimelineQuery(
            patient=patient,
            date_from=self.date_from,
            date_to=self.date_to,
            modalities=self.modalities,
            institution=self.institution,
            kind=self.kind,
            count=self.count,
            offset=self.offset,
        )


# --- search parameters ----------------------------------------------------------------------------


def parse_search(pairs: Sequence[tuple[str, str]]) -> SearchRequest:
    """Read ``application/x-www-form-urlencoded`` pairs; raise :class:`InvalidSearch`."""
    by_name: dict[str, list[str]] = {}
    for name, value in pairs:
        by_name.setdefault(name, []).append(value)
    known = PATIENT_PARAMETERS | {
        "date", "modality", "institution", "_type", "kind", "_count", "_offset", "_page",
    }  # fmt: skip
    unknown = sorted(set(by_name) - known)
    if unknown:
        shown = unknown[0] if _looks_like_a_name(unknown[0]) else "(unprintable)"
        raise InvalidSearch(f"unsupported search parameter {shown}", "not-supported")
    if "_page" in by_name:
        if len(by_name) != 1 or len(by_name["_page"]) != 1:
            raise InvalidSearch("_page continues an earlier search and stands alone")
        token = by_name["_page"][0]
        if not 0 < len(token) <= MAX_CURSOR_CHARS:
            raise InvalidSearch("_page is not a page of this server")
        return SearchRequest(page=token)

    patients = [v for n in sorted(PATIENT_PARAMETERS & set(by_name)) for v in by_name[n]]
    if not patients:
        raise InvalidSearch(
            "the patient is required: patient.identifier=http://fhir.nl/fhir/NamingSystem/bsn|<BSN>",
            "required",
        )
    if len(patients) > 1:
        raise InvalidSearch("name the patient once")
    date_from, date_to = _date_range(by_name.get("date", []))
    return SearchRequest(
        bsn=_patient_bsn(patients[0]),
        date_from=date_from,
        date_to=date_to,
        modalities=_modalities(_single(by_name, "modality")),
        institution=_institution(_single(by_name, "institution")),
        kind=_kind(_single(by_name, "_type"), _single(by_name, "kind")),
        count=_integer(_single(by_name, "_count"), "_count", 1, MAX_COUNT, DEFAULT_COUNT),
        offset=_integer(_single(by_name, "_offset"), "_offset", 0, MAX_OFFSET, 0),
    )


def _looks_like_a_name(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:-]{0,40}", text))


def _single(by_name: Mapping[str, list[str]], name: str) -> str | None:
    values = by_name.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidSearch(f"give {name} once (separate alternatives with commas)")
    return values[0]


def _patient_bsn(value: str) -> Bsn:
    system, bar, number = value.partition("|")
    if not bar or system not in _BSN_SYSTEMS:
        raise InvalidSearch(
            f"the patient identifier must be {BSN_SYSTEM}|<BSN> (a BSN is the only identifier)"
        )
    try:
        return parse_bsn(number)
    except InvalidBsn as exc:
        # InvalidBsn's message never contains the number.
        raise InvalidSearch(f"the patient identifier is not a valid BSN: {exc}") from None


def _date_range(values: Iterable[str]) -> tuple[date | None, date | None]:
    """``date`` parameters (AND-ed) as one inclusive range of study dates."""
    start: date | None = None
    end: date | None = None
    nothing = False  # after the last or before the first day there is
    for value in values:
        found = _DATE.fullmatch(value)
        if found is None:
            raise InvalidSearch("date must be [eq|ge|gt|le|lt]YYYY[-MM[-DD]]")
        prefix = found.group(1) or "eq"
        try:
            first, last = _period(found.group(2), found.group(3), found.group(4))
        except ValueError:
            raise InvalidSearch("date is not a calendar date") from None
        low: date | None = None
        high: date | None = None
        match prefix:
            case "eq":
                low, high = first, last
            case "ge":
                low = first
            case "gt":
                nothing |= last == date.max
                low = last if nothing else last + timedelta(days=1)
            case "le":
                high = last
            case "lt":
                nothing |= first == date.min
                high = first if nothing else first - timedelta(days=1)
        if low is not None:
            start = low if start is None else max(start, low)
        if high is not None:
            end = high if end is None else min(end, high)
    if nothing:
        return date.max, date.min  # a range no study date is in
    return start, end


def _period(year: str, month: str | None, day: str | None) -> tuple[date, date]:
    y = int(year)
    if y < 1:
        raise ValueError("year 0")
    if month is None:
        return date(y, 1, 1), date(y, 12, 31)
    m = int(month)
    if day is None:
        return date(y, m, 1), date(y, m, calendar.monthrange(y, m)[1])
    d = date(y, m, int(day))
    return d, d


def _modalities(value: str | None) -> frozenset[str]:
    if value is None:
        return frozenset()
    codes: set[str] = set()
    for item in value.split(","):
        system, bar, code = item.rpartition("|")
        if bar and system not in ("", DCM_SYSTEM):
            raise InvalidSearch(f"modality codes are from {DCM_SYSTEM}")
        if not _MODALITY.fullmatch(code):
            raise InvalidSearch("modality must be DICOM modality codes such as CT or MR")
        codes.add(code)
    return frozenset(codes)


def _institution(value: str | None) -> str | None:
    if value is None:
        return None
    system, bar, rest = value.partition("|")
    if bar:
        if system != URA_SYSTEM or not _URA.fullmatch(rest):
            raise InvalidSearch(f"institution as an identifier is {URA_SYSTEM}|<8-digit URA>")
        return rest
    text = value.strip()
    if not text or len(text) > MAX_INSTITUTION_CHARS or not _INSTITUTION.fullmatch(text):
        raise InvalidSearch(
            f"institution is a URA or a name of at most {MAX_INSTITUTION_CHARS} letters, "
            "digits, spaces and .,'&()/-"
        )
    return text


def _kind(type_value: str | None, kind_value: str | None) -> EntryKind | None:
    kinds: set[EntryKind] | None = None
    if type_value is not None:
        names = [t.strip() for t in type_value.split(",")]
        if not names or any(n not in _TYPES for n in names):
            raise InvalidSearch("_type must be ImagingStudy and/or DocumentReference")
        kinds = {_TYPES[n] for n in names}
    if kind_value is not None:
        if kind_value not in _KINDS:
            raise InvalidSearch("kind must be images or report")
        wanted = {_KINDS[kind_value]}
        kinds = wanted if kinds is None else kinds & wanted
        if not kinds:
            raise InvalidSearch("_type and kind contradict each other")
    return next(iter(kinds)) if kinds is not None and len(kinds) == 1 else None


def _integer(value: str | None, name: str, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    if not _INTEGER.fullmatch(value) or not low <= int(value) <= high:
        raise InvalidSearch(f"{name} must be a whole number from {low} to {high}")
    return int(value)


# --- paging cursors -------------------------------------------------------------------------------

_CURSOR_PREFIX = "c1."
_CURSOR_DOMAIN = b"beeldportaal:timeline-cursor:v1"


class InvalidCursor(ValueError):
    """Not a page token of this server, altered, or issued to another requester."""


class ExpiredCursor(InvalidCursor):
    """A genuine page token that is too old: search again."""


class PageCursors:
    """Seals a :class:`TimelineQuery` into a token only its requester can open, for a while.

    AES-256-GCM: the token is encrypted (the pseudonym and the filters are not readable from
    a URL) and authenticated, with the requester's URA and subject as associated data (a link
    passed to someone else does not open). The key is derived from the pseudonym key, so every
    replica opens every replica's tokens.
    """

    def __init__(self, secret: bytes, ttl: timedelta = CURSOR_TTL) -> None:
        if len(secret) < 32:
            raise ValueError("the cursor secret must be at least 32 bytes")
        self._aead = AESGCM(hmac.new(secret, _CURSOR_DOMAIN, hashlib.sha256).digest())
        self._ttl = ttl

    def __repr__(self) -> str:
        return "PageCursors(key=***)"

    def seal(self, query: TimelineQuery, *, requester: str, now: datetime) -> str:
        payload = {
            "p": query.patient,
            "f": query.date_from.isoformat() if query.date_from else None,
            "t": query.date_to.isoformat() if query.date_to else None,
            "m": sorted(query.modalities),
            "i": query.institution,
            "k": query.kind.value if query.kind else None,
            "c": query.count,
            "o": query.offset,
            "a": _sealed_key(query.after),
            "x": int((now + self._ttl).timestamp()),
        }
        nonce = os.urandom(12)
        plain = json.dumps(payload, separators=(",", ":")).encode()
        sealed = self._aead.encrypt(nonce, plain, requester.encode())
        return _CURSOR_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, token: str, *, requester: str, now: datetime) -> TimelineQuery:
        if not token.startswith(_CURSOR_PREFIX) or len(token) > MAX_CURSOR_CHARS:
            raise InvalidCursor("not a page token of this server")
        body = token[len(_CURSOR_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise InvalidCursor("not a page token of this server") from None
        if len(raw) < 12 + 16:
            raise InvalidCursor("not a page token of this server")
        try:
            plain = self._aead.decrypt(raw[:12], raw[12:], requester.encode())
        except InvalidTag:
            raise InvalidCursor("this page token was altered or is someone else's") from None
        data = json.loads(plain)
        if now.timestamp() > data["x"]:
            raise ExpiredCursor("this page token expired; search again")
        return TimelineQuery(
            patient=data["p"],
            date_from=date.fromisoformat(data["f"]) if data["f"] else None,
            date_to=date.fromisoformat(data["t"]) if data["t"] else None,
            modalities=frozenset(data["m"]),
            institution=data["i"],
            kind=EntryKind(data["k"]) if data["k"] else None,
            count=data["c"],
            offset=data["o"],
            after=_opened_key(data.get("a")),
        )


def _sealed_key(key: EntryKey | None) -> list[Any] | None:
    if key is None:
        return None
    return [
        key.study_date.isoformat() if key.study_date else None,
        key.study_time,
        key.received_at.isoformat(),
        key.study_instance_uid,
        key.kind.value,
        key.report_sop_instance_uid,
    ]


def _opened_key(sealed: list[Any] | None) -> EntryKey | None:
    if sealed is None:
        return None
    study_date, study_time, received_at, uid, kind, report_uid = sealed
    return EntryKey(
        date.fromisoformat(study_date) if study_date else None,
        study_time,
        datetime.fromisoformat(received_at),
        uid,
        EntryKind(kind),
        report_uid,
    )


def cursor_requester(organisation_ura: str, subject: str) -> str:
    """Whom a cursor is bound to: the organisation and the token's subject (person or client)."""
    return f"{organisation_ura}|{subject}"


# --- resources ------------------------------------------------------------------------------------


def uid_identifier(uid: str) -> dict[str, str]:
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def accession_identifier(accession: str) -> dict[str, Any]:
    return {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": accession}


def masked_patient() -> dict[str, Any]:
    """The subject: the patient the search named by BSN, the BSN itself withheld."""
    return {
        "type": "Patient",
        "identifier": {
            "system": BSN_SYSTEM,
            "_value": {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "masked"}]},
        },
        "display": "the patient of the search (BSN withheld)",
    }


def study_started(study_date: date | None, study_time: str | None) -> str | None:
    """FHIR dateTime of a DICOM StudyDate/StudyTime, read as Dutch local time."""
    if study_date is None:
        return None
    moment = _dicom_time(study_time)
    if moment is None:
        return study_date.isoformat()
    local = datetime.combine(study_date, moment, tzinfo=NETHERLANDS)
    return local.isoformat(timespec="seconds")


def _dicom_time(text: str | None) -> dtime | None:
    """DICOM TM (HH, HHMM, HHMMSS[.ffffff], or the old HH:MM:SS), None when unreadable."""
    if not text:
        return None
    digits = text.strip().replace(":", "").split(".")[0]
    if not digits.isdigit() or len(digits) not in (2, 4, 6):
        return None
    try:
        return dtime(int(digits[0:2]), int(digits[2:4] or 0), int(digits[4:6] or 0))
    except ValueError:
        return None


def _organisation_id(ura: str) -> str:
    return f"org{ura}"


def _organisation(ura: str, name: str | None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Organization",
        "id": _organisation_id(ura),
        "identifier": [{"system": URA_SYSTEM, "value": ura}],
    }
    if name:
        resource["name"] = name
    return resource


def _dicomweb_endpoint(dicomweb_url: str) -> dict[str, Any]:
    return {
        "resourceType": "Endpoint",
        "id": "dicomweb",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": dicomweb_url,
    }


def _source_note(source: Source) -> dict[str, Any]:
    who = source.institution_name or f"URA {source.sender_ura}"
    return {
        "authorReference": {"reference": f"#{_organisation_id(source.sender_ura)}"},
        "time": source.received_at.astimezone(UTC).isoformat(),
        "text": f"Sent by {who} through beeldportaal (version {source.version}, "
        f"{source.number_of_series} series, {source.number_of_instances} instances).",
    }


def _unique_sources(sources: Iterable[Source]) -> list[Source]:
    seen: dict[str, Source] = {}
    for source in sources:
        seen.setdefault(source.sender_ura, source)
    return list(seen.values())


def _modality_coding(code: str) -> dict[str, str]:
    return {"system": DCM_SYSTEM, "code": code}


def imaging_study(
    entry: TimelineEntry, series: Sequence[SeriesRow], *, dicomweb_url: str
) -> dict[str, Any]:
    """An images row as ImagingStudy; ``series`` from the reader (may be empty)."""
    sources = _unique_sources(entry.sources)
    identifiers: list[dict[str, Any]] = [uid_identifier(entry.study_instance_uid)]
    if entry.accession_number:
        identifiers.append(accession_identifier(entry.accession_number))
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": entry.study_instance_uid,
        "contained": [
            _dicomweb_endpoint(dicomweb_url),
            *(_organisation(s.sender_ura, s.institution_name) for s in sources),
        ],
        "identifier": identifiers,
        "status": "available",
        "subject": masked_patient(),
        "endpoint": [{"reference": "#dicomweb"}],
    }
    if entry.modalities:
        resource["modality"] = [_modality_coding(m) for m in entry.modalities]
    started = study_started(entry.study_date, entry.study_time)
    if started:
        resource["started"] = started
    if series:
        resource["numberOfSeries"] = len(series)
        resource["numberOfInstances"] = sum(s.number_of_instances for s in series)
    elif sources:
        resource["numberOfSeries"] = max(s.number_of_series for s in sources)
        resource["numberOfInstances"] = max(s.number_of_instances for s in sources)
    if entry.description:
        resource["description"] = entry.description
    if sources:
        resource["note"] = [_source_note(s) for s in sources]
    if series:
        resource["series"] = [_series(row, entry.modalities) for row in series]
    return resource


def _series(row: SeriesRow, study_modalities: Sequence[str]) -> dict[str, Any]:
    # R4 requires a series modality; "OT" (other) when neither series nor study names one.
    code = row.modality or (study_modalities[0] if study_modalities else "OT")
    item: dict[str, Any] = {"uid": row.series_instance_uid, "modality": _modality_coding(code)}
    if row.series_number is not None and row.series_number >= 0:
        item["number"] = row.series_number
    if row.series_description:
        item["description"] = row.series_description
    item["numberOfInstances"] = row.number_of_instances
    return item


def _retrieve_url(dicomweb_url: str, study: str, instance: InstanceRow | None) -> str:
    if instance is None:
        return f"{dicomweb_url}/studies/{study}"
    return (
        f"{dicomweb_url}/studies/{instance.study_instance_uid}/series/"
        f"{instance.series_instance_uid}/instances/{instance.sop_instance_uid}"
    )


def document_reference(
    entry: TimelineEntry,
    instance: InstanceRow | None,
    *,
    dicomweb_url: str,
    related_studies: Sequence[str] = (),
) -> dict[str, Any]:
    """A report row as DocumentReference, linked to its images by accession number and, where
    they are on the same page, by reference to their ImagingStudy."""
    sources = _unique_sources(entry.sources)
    document_uid = entry.report_sop_instance_uid or entry.study_instance_uid
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": document_uid,
        "contained": [_organisation(s.sender_ura, s.institution_name) for s in sources],
        "masterIdentifier": uid_identifier(document_uid),
        "identifier": [uid_identifier(entry.study_instance_uid)],
        "status": "current",
        "type": {
            "coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}]
        },
        "subject": masked_patient(),
    }
    if not resource["contained"]:
        del resource["contained"]
    if entry.accession_number:
        resource["identifier"].append(accession_identifier(entry.accession_number))
    newest = max((s.received_at for s in sources), default=None)
    if newest is not None:
        resource["date"] = newest.astimezone(UTC).isoformat()
    if sources:
        resource["author"] = [{"reference": f"#{_organisation_id(s.sender_ura)}"} for s in sources]
    if entry.description:
        resource["description"] = entry.description
    attachment: dict[str, Any] = {
        "contentType": "application/dicom",
        "url": _retrieve_url(dicomweb_url, entry.study_instance_uid, instance),
        "title": f"{'DICOM SR' if entry.report_kind == 'sr' else 'Encapsulated PDF'} report"
        if entry.report_kind in ("sr", "pdf")
        else "Report",
    }
    if instance is not None:
        attachment["size"] = instance.size
    resource["content"] = [{"attachment": attachment}]
    related: list[dict[str, Any]] = []
    if entry.accession_number:
        related.append({"identifier": accession_identifier(entry.accession_number)})
    related.extend({"reference": f"ImagingStudy/{uid}"} for uid in related_studies)
    context: dict[str, Any] = {}
    if related:
        context["related"] = related
    started = study_started(entry.study_date, entry.study_time)
    if started:
        context["period"] = {"start": started}
    if context:
        resource["context"] = context
    return resource


def search_bundle(
    page: TimelinePage,
    *,
    base_url: str,
    series: Mapping[str, Sequence[SeriesRow]],
    report_instances: Mapping[str, InstanceRow],
    links: Mapping[str, str],
    now: datetime,
) -> dict[str, Any]:
    """The searchset: one entry per timeline row, in the reader's (newest-first) order.

    ``series`` by study UID for images rows; ``report_instances`` by report SOP Instance UID;
    ``links`` relation -> URL (self, next, previous).
    """
    base = base_url.rstrip("/")
    dicomweb_url = f"{base}/dicomweb"
    images_by_accession: dict[str, list[str]] = {}
    for entry in page.entries:
        if entry.kind is EntryKind.IMAGES and entry.accession_number:
            images_by_accession.setdefault(entry.accession_number, []).append(
                entry.study_instance_uid
            )
    images_uids = {e.study_instance_uid for e in page.entries if e.kind is EntryKind.IMAGES}
    entries: list[dict[str, Any]] = []
    for entry in page.entries:
        if entry.kind is EntryKind.IMAGES:
            resource = imaging_study(
                entry, series.get(entry.study_instance_uid, ()), dicomweb_url=dicomweb_url
            )
            full_url = f"{base}/fhir/ImagingStudy/{resource['id']}"
        else:
            related = list(images_by_accession.get(entry.accession_number or "", ()))
            if entry.study_instance_uid in images_uids and entry.study_instance_uid not in related:
                related.append(entry.study_instance_uid)
            instance = report_instances.get(entry.report_sop_instance_uid or "")
            resource = document_reference(
                entry, instance, dicomweb_url=dicomweb_url, related_studies=related
            )
            full_url = f"{base}/fhir/DocumentReference/{resource['id']}"
        entries.append({"fullUrl": full_url, "resource": resource, "search": {"mode": "match"}})
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": now.astimezone(UTC).isoformat()},
        "type": "searchset",
        "total": page.total,
        "link": [{"relation": relation, "url": url} for relation, url in links.items()],
        "entry": entries,
    }


def operation_outcome(
    code: str,
    diagnostics: str,
    *,
    severity: str = "error",
    conditions: Sequence[str] = (),
) -> dict[str, Any]:
    """One issue; ``conditions`` (access conditions that failed) as its details' codings."""
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if conditions:
        issue["details"] = {
            "coding": [{"system": ACCESS_CONDITION_SYSTEM, "code": c} for c in conditions],
            "text": diagnostics,
        }
    return {"resourceType": "OperationOutcome", "issue": [issue]}


# --- the access log as AuditEvents ----------------------------------------------------------------

_AUDIT_TYPES: Final = {
    AuditAction.QUERY: {"system": DCM_SYSTEM, "code": "110112", "display": "Query"},
    AuditAction.READ: {
        "system": DCM_SYSTEM,
        "code": "110103",
        "display": "DICOM Instances Accessed",
    },
}
_AUDIT_ACTIONS: Final = {AuditAction.QUERY: "E", AuditAction.READ: "R"}
_ACT_REASON: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"


def audit_event(event: AccessLogged) -> dict[str, Any]:
    """One NEN 7513 record as a FHIR AuditEvent, without the patient (the caller named them)."""
    emergency = event.emergency or event.outcome is AuditOutcome.EMERGENCY
    requestor: dict[str, Any] = {"requestor": True}
    if event.user_uzi:
        requestor["who"] = {"identifier": {"system": UZI_PERSON_SYSTEM, "value": event.user_uzi}}
    else:
        requestor["who"] = {"identifier": {"system": URA_SYSTEM, "value": event.organisation_ura}}
    if event.user_role:
        requestor["role"] = [
            {"coding": [{"system": f"urn:oid:{UZI_ROLE_CODE_SYSTEM_OID}", "code": event.user_role}]}
        ]
    agents = [
        requestor,
        {
            "who": {"identifier": {"system": URA_SYSTEM, "value": event.organisation_ura}},
            "requestor": False,
        },
    ]
    if event.on_behalf_of_uzi:
        agents.append(
            {
                "who": {
                    "identifier": {"system": UZI_PERSON_SYSTEM, "value": event.on_behalf_of_uzi}
                },
                "requestor": False,
            }
        )
    entities: list[dict[str, Any]] = [
        {"what": {"identifier": uid_identifier(uid)}} for uid in event.study_instance_uids
    ]
    details = [
        {"type": name, "valueString": value}
        for name, value in (
            ("authorisation-basis", event.authorisation_basis),
            ("consent-profile", event.consent_profile),
        )
        if value
    ]
    if details:
        entities.append({"description": "authorisation", "detail": details})
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(event.event_id),
        "type": _AUDIT_TYPES[event.action],
        "subtype": [{"system": AUDIT_EVENT_TYPE_SYSTEM, "code": event.event_type}],
        "action": _AUDIT_ACTIONS[event.action],
        "recorded": event.occurred_at.astimezone(UTC).isoformat(),
        # 0 success; 4 minor failure: the request was refused.
        "outcome": "4" if event.outcome is AuditOutcome.DENIED else "0",
        "agent": agents,
        # The service that recorded it: timeline (its API), notify (portal pickup), ...
        "source": {
            "site": event.access_point,
            "observer": {"display": f"beeldportaal {event.producer.split('-', 1)[0]}"},
        },
    }
    if event.purpose_of_use:  # as the token stated it; a record from before v2 has none
        resource["purposeOfEvent"] = [
            {"coding": [{"system": _ACT_REASON, "code": event.purpose_of_use}]}
        ]
    description = event.reason
    if emergency:
        description = f"emergency access (break the glass): {event.reason or ''}".rstrip(": ")
    if description:
        resource["outcomeDesc"] = description
    if entities:
        resource["entity"] = entities
    return resource


def audit_bundle(
    events: Sequence[AccessLogged], *, now: datetime, total: int | None = None
) -> dict[str, Any]:
    """The newest records of a period as a searchset; ``total``: how many the period holds (the
    older ones are read by searching again with ``until`` the oldest shown)."""
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": now.astimezone(UTC).isoformat()},
        "type": "searchset",
        "total": len(events) if total is None else total,
        "entry": [
            {
                "fullUrl": f"urn:uuid:{event.event_id}",
                "resource": audit_event(event),
                "search": {"mode": "match"},
            }
            for event in events
        ],
    }
