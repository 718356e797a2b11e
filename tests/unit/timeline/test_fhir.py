"""The timeline in FHIR R4: search parameters, the searchset Bundle (checked by the independent
fhir.resources models), report links, the paging cursor, and no BSN anywhere in the output."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome

from services.timeline.domain.fhir import (
    ACCESS_CONDITION_SYSTEM,
    DATA_ABSENT_REASON,
    DCM_SYSTEM,
    ExpiredCursor,
    InvalidCursor,
    InvalidSearch,
    PageCursors,
    SearchRequest,
    audit_bundle,
    operation_outcome,
    parse_search,
    search_bundle,
    study_started,
)
from services.timeline.domain.ports import EntryKey, EntryKind, TimelineQuery
from shared.events import AuditAction, AuditOutcome
from shared.identifiers import BSN_SYSTEM, URA_SYSTEM
from tests.factories import TEST_BSN, make_access_logged, make_pseudonym
from tests.fakes.timeline import (
    InMemoryTimeline,
    make_entry,
    make_instance_row,
    make_series_row,
    make_source,
    new_uid,
)

BASE = "https://timeline.example.test"
PATIENT = make_pseudonym(TEST_BSN)
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
KEY = b"cursor-test-key-" + b"k" * 32


def bsn_form(bsn: str = TEST_BSN, **extra: str | list[str]) -> list[tuple[str, str]]:
    pairs = [("patient.identifier", f"{BSN_SYSTEM}|{bsn}")]
    for name, value in extra.items():
        for item in value if isinstance(value, list) else [value]:
            pairs.append((name, item))
    return pairs


async def bundle_of(timeline: InMemoryTimeline, query: TimelineQuery) -> dict[str, Any]:
    """What the API does with a page: series per images row, the report's instance row."""
    page = await timeline.search(query)
    series = {
        e.study_instance_uid: await timeline.series(e.study_instance_uid)
        for e in page.entries
        if e.kind is EntryKind.IMAGES
    }
    reports = {}
    for e in page.entries:
        if e.kind is EntryKind.REPORT and e.report_sop_instance_uid:
            rows = await timeline.instances(
                e.study_instance_uid, sop_instance_uid=e.report_sop_instance_uid
            )
            reports[e.report_sop_instance_uid] = rows[0]
    return search_bundle(
        page,
        base_url=BASE,
        series=series,
        report_instances=reports,
        links={"self": f"{BASE}/fhir/ImagingStudy?_page=c1.self"},
        now=NOW,
    )


@pytest.fixture
def timeline() -> InMemoryTimeline:
    """A CT (2024, two sources), its report (same accession), an MR (2025), an old XR."""
    timeline = InMemoryTimeline()
    ct = make_entry(
        study_date=date(2024, 11, 2),
        study_time="142501.123",
        accession_number="ACC-CT",
        description="CT abdomen",
        sources=[
            make_source("12345678", "Amphia", received_at=NOW - timedelta(days=200)),
            make_source("87654321", "Rivas", received_at=NOW - timedelta(days=100), version=2),
        ],
    )
    ct_series = [
        make_series_row(ct.study_instance_uid, series_number=1, number_of_instances=3),
        make_series_row(ct.study_instance_uid, series_number=2, modality=None),
    ]
    timeline.put(PATIENT, ct, series=ct_series)
    report = make_entry(
        kind=EntryKind.REPORT,
        study_date=date(2024, 11, 3),
        study_time="080000",
        accession_number="ACC-CT",
        description="Verslag CT abdomen",
        modalities=("SR",),
    )
    report_row = make_instance_row(
        report.study_instance_uid,
        new_uid(),
        sop_instance_uid=report.report_sop_instance_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.11",
        data=b"report bytes",
    )
    timeline.put(PATIENT, report, instances=[report_row])
    mr = make_entry(study_date=date(2025, 2, 1), modalities=("MR",), description="MR knee")
    timeline.put(PATIENT, mr, series=[make_series_row(mr.study_instance_uid, modality="MR")])
    xr = make_entry(study_date=date(2019, 5, 5), study_time=None, modalities=("CR",))
    timeline.put(PATIENT, xr)
    # Someone else's study never shows up.
    timeline.put(make_pseudonym(), make_entry(study_date=date(2025, 5, 1)))
    return timeline


# --- the Bundle -----------------------------------------------------------------------------------


async def test_a_page_is_a_valid_r4_searchset_bundle(timeline: InMemoryTimeline) -> None:
    bundle = await bundle_of(timeline, TimelineQuery(patient=PATIENT))

    parsed = Bundle.model_validate(bundle)

    assert parsed.type == "searchset" and parsed.total == 4
    assert [link.relation for link in parsed.link] == ["self"]
    for entry in bundle["entry"]:
        resource = entry["resource"]
        model = {"ImagingStudy": ImagingStudy, "DocumentReference": DocumentReference}
        model[resource["resourceType"]].model_validate(resource)
        assert entry["fullUrl"] == f"{BASE}/fhir/{resource['resourceType']}/{resource['id']}"
        assert entry["search"] == {"mode": "match"}
    statuses = {e["resource"]["status"] for e in bundle["entry"]}
    assert statuses == {"available", "current"}


async def test_entries_come_newest_first_and_a_study_without_date_last() -> None:
    timeline = InMemoryTimeline()
    same_day_late = make_entry(study_date=date(2025, 1, 1), study_time="2300")
    same_day_early = make_entry(study_date=date(2025, 1, 1), study_time="0700")
    older = make_entry(study_date=date(2020, 1, 1))
    undated = make_entry(study_date=None, study_time=None)
    for entry in (older, undated, same_day_early, same_day_late):
        timeline.put(PATIENT, entry)

    bundle = await bundle_of(timeline, TimelineQuery(patient=PATIENT))

    ids = [e["resource"]["id"] for e in bundle["entry"]]
    assert ids == [
        same_day_late.study_instance_uid,
        same_day_early.study_instance_uid,
        older.study_instance_uid,
        undated.study_instance_uid,
    ]
    assert "started" not in bundle["entry"][-1]["resource"]


async def test_an_imaging_study_carries_uid_accession_modalities_series_sources_and_endpoint(
    timeline: InMemoryTimeline,
) -> None:
    bundle = await bundle_of(timeline, TimelineQuery(patient=PATIENT, kind=EntryKind.IMAGES))
    [study] = [
        e["resource"] for e in bundle["entry"] if e["resource"].get("description") == "CT abdomen"
    ]

    uid = study["id"]
    assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}
    assert study["identifier"][1]["value"] == "ACC-CT"
    assert study["identifier"][1]["type"]["coding"][0]["code"] == "ACSN"
    assert study["modality"] == [{"system": DCM_SYSTEM, "code": "CT"}]
    # DICOM time, Dutch local time in November: UTC+1.
    assert study["started"] == "2024-11-02T14:25:01+01:00"
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (2, 4)
    first, second = study["series"]
    assert (first["number"], first["numberOfInstances"]) == (1, 3)
    # A series without its own modality takes the study's (R4 requires one).
    assert second["modality"] == {"system": DCM_SYSTEM, "code": "CT"}
    contained = {r["id"]: r for r in study["contained"]}
    assert contained["dicomweb"]["address"] == f"{BASE}/dicomweb"
    assert contained["dicomweb"]["connectionType"]["code"] == "dicom-wado-rs"
    assert study["endpoint"] == [{"reference": "#dicomweb"}]
    # Every source institution: a contained Organization (URA) that a note is authored by.
    authors = [n["authorReference"]["reference"][1:] for n in study["note"]]
    assert [contained[a]["identifier"][0] for a in authors] == [
        {"system": URA_SYSTEM, "value": "12345678"},
        {"system": URA_SYSTEM, "value": "87654321"},
    ]
    assert [contained[a]["name"] for a in authors] == ["Amphia", "Rivas"]
    assert "version 2" in study["note"][1]["text"]


async def test_a_study_without_series_rows_counts_from_its_sources() -> None:
    timeline = InMemoryTimeline()
    entry = make_entry(
        sources=[make_source(number_of_series=4, number_of_instances=120)], study_time="1030"
    )
    timeline.put(PATIENT, entry)

    [item] = (await bundle_of(timeline, TimelineQuery(patient=PATIENT)))["entry"]

    resource = item["resource"]
    assert (resource["numberOfSeries"], resource["numberOfInstances"]) == (4, 120)
    assert "series" not in resource
    assert resource["started"] == "2025-03-14T10:30:00+01:00"


async def test_a_report_is_a_document_reference_linked_to_its_images_by_accession(
    timeline: InMemoryTimeline,
) -> None:
    bundle = await bundle_of(timeline, TimelineQuery(patient=PATIENT))
    resources = [e["resource"] for e in bundle["entry"]]
    [report] = [r for r in resources if r["resourceType"] == "DocumentReference"]
    [ct] = [r for r in resources if r.get("description") == "CT abdomen"]

    related = report["context"]["related"]
    assert related[0]["identifier"]["value"] == "ACC-CT"
    assert related[0]["identifier"]["type"]["coding"][0]["code"] == "ACSN"
    assert {"reference": f"ImagingStudy/{ct['id']}"} in related
    assert report["masterIdentifier"]["value"] == f"urn:oid:{report['id']}"
    assert report["type"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "18748-4",
        "display": "Diagnostic imaging study",
    }
    attachment = report["content"][0]["attachment"]
    assert attachment["contentType"] == "application/dicom"
    assert attachment["url"].startswith(f"{BASE}/dicomweb/studies/")
    assert attachment["url"].endswith(f"/instances/{report['id']}")
    assert attachment["size"] == len(b"report bytes")
    assert attachment["title"] == "DICOM SR report"


async def test_a_report_whose_images_are_on_another_page_is_still_linked_by_accession(
    timeline: InMemoryTimeline,
) -> None:
    bundle = await bundle_of(timeline, TimelineQuery(patient=PATIENT, kind=EntryKind.REPORT))
    [entry] = bundle["entry"]
    related = entry["resource"]["context"]["related"]
    assert [r.get("reference") for r in related] == [None]
    assert related[0]["identifier"]["value"] == "ACC-CT"


async def test_no_bsn_nor_pseudonym_appears_anywhere_in_the_bundle(
    timeline: InMemoryTimeline,
) -> None:
    bundle = await bundle_of(timeline, TimelineQuery(patient=PATIENT))
    text = json.dumps(bundle)

    assert TEST_BSN not in text
    assert PATIENT not in text
    for entry in bundle["entry"]:
        subject = entry["resource"]["subject"]
        # "The patient with this BSN", the BSN itself withheld (data-absent-reason: masked).
        assert subject["identifier"]["system"] == BSN_SYSTEM
        assert "value" not in subject["identifier"]
        assert subject["identifier"]["_value"]["extension"] == [
            {"url": DATA_ABSENT_REASON, "valueCode": "masked"}
        ]


def test_study_start_is_dutch_local_time_and_tolerates_partial_or_bad_times() -> None:
    assert study_started(date(2025, 7, 1), "0930") == "2025-07-01T09:30:00+02:00"
    assert study_started(date(2025, 1, 1), "09") == "2025-01-01T09:00:00+01:00"
    assert study_started(date(2025, 1, 1), "09:30:15") == "2025-01-01T09:30:15+01:00"
    assert study_started(date(2025, 1, 1), "9999") == "2025-01-01"
    assert study_started(date(2025, 1, 1), None) == "2025-01-01"
    assert study_started(None, "0930") is None


def test_an_operation_outcome_names_the_failed_conditions_and_validates() -> None:
    outcome = operation_outcome(
        "forbidden",
        "no active treatment relationship with the patient",
        conditions=("treatment-relationship", "consent"),
    )

    OperationOutcome.model_validate(outcome)
    [issue] = outcome["issue"]
    assert (issue["severity"], issue["code"]) == ("error", "forbidden")
    assert [c["code"] for c in issue["details"]["coding"]] == ["treatment-relationship", "consent"]
    assert {c["system"] for c in issue["details"]["coding"]} == {ACCESS_CONDITION_SYSTEM}


def test_the_access_log_is_a_bundle_of_audit_events_without_the_patient() -> None:
    allowed = make_access_logged(patient=PATIENT, purpose_of_use="TREAT")
    emergency = make_access_logged(
        patient=PATIENT,
        event_type="wado-rs",
        action=AuditAction.READ,
        outcome=AuditOutcome.EMERGENCY,
        emergency=True,
        reason="unconscious at the ED",
        purpose_of_use="ETREAT",
    )
    denied = make_access_logged(
        patient=PATIENT,
        outcome=AuditOutcome.DENIED,
        reason="no consent",
        study_instance_uids=(),
        purpose_of_use="HRESCH",
    )
    # Recorded before the purpose was kept (access.logged.v1): no purpose is made up for it.
    older = make_access_logged(patient=PATIENT)

    bundle = audit_bundle([emergency, allowed, denied, older], now=NOW)

    Bundle.model_validate(bundle)
    events = [e["resource"] for e in bundle["entry"]]
    for event in events:
        AuditEvent.model_validate(event)
    assert bundle["total"] == 4
    assert [e["outcome"] for e in events] == ["0", "0", "4", "0"]
    assert [e["action"] for e in events] == ["R", "E", "E", "E"]
    purposes = [
        [c["code"] for p in e.get("purposeOfEvent", []) for c in p["coding"]] for e in events
    ]
    assert purposes == [["ETREAT"], ["TREAT"], ["HRESCH"], []]
    assert "unconscious at the ED" in events[0]["outcomeDesc"]
    assert events[2]["outcomeDesc"] == "no consent"
    requestor = events[1]["agent"][0]
    assert requestor["requestor"] is True
    assert requestor["who"]["identifier"]["value"] == allowed.user_uzi
    assert events[1]["agent"][1]["who"]["identifier"] == {
        "system": URA_SYSTEM,
        "value": allowed.organisation_ura,
    }
    assert events[1]["entity"][0]["what"]["identifier"]["value"] == (
        f"urn:oid:{allowed.study_instance_uids[0]}"
    )
    assert PATIENT not in json.dumps(bundle)


def test_an_audit_event_names_the_service_that_recorded_it() -> None:
    search = make_access_logged(patient=PATIENT, producer="timeline-api")
    pickup = make_access_logged(
        patient=PATIENT,
        producer="notify-api",
        event_type="portal-pickup",
        action=AuditAction.READ,
        access_point="GET /pickup/{token} from 127.0.0.1",
    )

    bundle = audit_bundle([pickup, search], now=NOW)

    events = [e["resource"] for e in bundle["entry"]]
    for event in events:
        AuditEvent.model_validate(event)
    assert [e["source"]["observer"]["display"] for e in events] == [
        "beeldportaal notify",
        "beeldportaal timeline",
    ]
    assert events[0]["subtype"][0]["code"] == "portal-pickup"
    assert events[0]["action"] == "R"


# --- search parameters ----------------------------------------------------------------------------


def test_a_full_search_is_read_into_a_query() -> None:
    search = parse_search(
        bsn_form(
            date=["ge2024-01-01", "le2024-12-31"],
            modality="CT,http://dicom.nema.org/resources/ontology/DCM|MR",
            institution=f"{URA_SYSTEM}|12345678",
            _type="ImagingStudy",
            _count="10",
            _offset="20",
        )
    )

    assert search.bsn is not None and search.bsn.value == TEST_BSN
    query = search.query(PATIENT)
    assert query == TimelineQuery(
        patient=PATIENT,
        date_from=date(2024, 1, 1),
        date_to=date(2024, 12, 31),
        modalities=frozenset({"CT", "MR"}),
        institution="12345678",
        kind=EntryKind.IMAGES,
        count=10,
        offset=20,
    )


@pytest.mark.parametrize(
    ("dates", "expected"),
    [
        (["2024"], (date(2024, 1, 1), date(2024, 12, 31))),
        (["eq2024-02"], (date(2024, 2, 1), date(2024, 2, 29))),
        (["gt2024-02"], (date(2024, 3, 1), None)),
        (["lt2024-02-10"], (None, date(2024, 2, 9))),
        (["ge2020", "lt2021-07"], (date(2020, 1, 1), date(2021, 6, 30))),
        (["ge2024-05-01", "ge2024-06-01"], (date(2024, 6, 1), None)),
        # After the last day or before the first there is: a range nothing is in, not an error.
        (["gt9999"], (date.max, date.min)),
        (["gt9999-12-31", "ge2020"], (date.max, date.min)),
        (["lt0001-01-01"], (date.max, date.min)),
        (["lt0001"], (date.max, date.min)),
    ],
)
def test_date_prefixes_and_partial_dates_become_one_inclusive_range(
    dates: list[str], expected: tuple[date | None, date | None]
) -> None:
    search = parse_search(bsn_form(date=dates))
    assert (search.date_from, search.date_to) == expected


@pytest.mark.parametrize(
    "name", ["patient.identifier", "patient:identifier", "subject.identifier", "subject:identifier"]
)
def test_the_patient_may_be_named_in_each_usual_spelling(name: str) -> None:
    search = parse_search([(name, f"urn:oid:2.16.840.1.113883.2.4.6.3|{TEST_BSN}")])
    assert search.bsn is not None and search.bsn.value == TEST_BSN


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ({"_type": "DocumentReference"}, EntryKind.REPORT),
        ({"kind": "images"}, EntryKind.IMAGES),
        ({"_type": "ImagingStudy,DocumentReference"}, None),
        ({"_type": "ImagingStudy,DocumentReference", "kind": "report"}, EntryKind.REPORT),
    ],
)
def test_type_and_kind_select_images_or_reports(
    values: dict[str, str], kind: EntryKind | None
) -> None:
    assert parse_search(bsn_form(**values)).kind is kind


@pytest.mark.parametrize(
    ("pairs", "words"),
    [
        ([("date", "ge2024-01-01")], "the patient is required"),
        (bsn_form() + bsn_form("999991772"), "name the patient once"),
        ([("patient.identifier", "urn:oid:1.2.3|999990019")], "must be http://fhir.nl"),
        ([("patient.identifier", f"{BSN_SYSTEM}|123456789")], "11-proof"),
        ([("patient.identifier", f"{BSN_SYSTEM}|12345")], "exactly 9 digits"),
        (bsn_form(date="ge2024-13-01"), "not a calendar date"),
        (bsn_form(date="ge2024-01-01' OR '1'='1"), "date must be"),
        (bsn_form(modality="CT' OR 1=1--"), "modality must be"),
        (bsn_form(modality="http://loinc.org|CT"), "modality codes are from"),
        (bsn_form(modality=["CT", "MR"]), "give modality once"),
        (bsn_form(institution="x; DROP TABLE access_log"), "institution is a URA or a name"),
        (bsn_form(institution="a" * 65), "institution is a URA or a name"),
        (bsn_form(institution=f"{URA_SYSTEM}|1234"), "8-digit URA"),
        (bsn_form(_count="0"), "_count must be"),
        (bsn_form(_count="1000"), "_count must be"),
        (bsn_form(_count="1e3"), "_count must be"),
        (bsn_form(_offset="-1"), "_offset must be"),
        (bsn_form(_type="Patient"), "_type must be"),
        (bsn_form(_type="ImagingStudy", kind="report"), "contradict"),
        (bsn_form(identifier="urn:dicom:uid|urn:oid:1.2"), "unsupported search parameter"),
        (bsn_form(_page="c1.x"), "stands alone"),
        ([("_page", "x" * 3000)], "not a page of this server"),
    ],
)
def test_a_bad_search_is_refused_naming_the_parameter_never_quoting_the_value(
    pairs: list[tuple[str, str]], words: str
) -> None:
    with pytest.raises(InvalidSearch) as refused:
        parse_search(pairs)

    message = str(refused.value)
    assert words in message
    for _, value in pairs:
        if len(value) > 3:
            assert value not in message
    assert "123456789" not in message and TEST_BSN not in message


def test_an_unknown_parameter_that_holds_a_bsn_is_not_repeated() -> None:
    with pytest.raises(InvalidSearch) as refused:
        parse_search([*bsn_form(), (f"x{TEST_BSN}|", "1")])
    assert TEST_BSN not in str(refused.value)


def test_a_page_token_alone_is_a_continuation() -> None:
    assert parse_search([("_page", "c1.abc")]) == SearchRequest(page="c1.abc")


# --- paging cursors -------------------------------------------------------------------------------

QUERY = TimelineQuery(
    patient=PATIENT,
    date_from=date(2024, 1, 1),
    modalities=frozenset({"CT"}),
    institution="Amphia",
    kind=EntryKind.IMAGES,
    count=10,
    offset=30,
)


def test_a_cursor_opens_to_the_same_query_for_the_same_requester() -> None:
    cursors = PageCursors(KEY)
    token = cursors.seal(QUERY, requester="11111111|900000001", now=NOW)

    assert cursors.open(token, requester="11111111|900000001", now=NOW) == QUERY
    # Opaque: no pseudonym, BSN or filter readable from the URL it goes into.
    assert PATIENT not in token and TEST_BSN not in token and "Amphia" not in token
    assert len(token) < 1024
    # Another replica with the same key opens it too.
    assert PageCursors(KEY).open(token, requester="11111111|900000001", now=NOW) == QUERY


@pytest.mark.parametrize(
    "after",
    [
        EntryKey(date(2024, 3, 1), "0930", NOW, "1.2.3", EntryKind.IMAGES, ""),
        EntryKey(None, None, NOW, "1.2.3.4", EntryKind.REPORT, "1.2.3.4.5"),
    ],
)
def test_a_cursor_carries_the_entry_its_page_starts_after(after: EntryKey) -> None:
    cursors = PageCursors(KEY)
    query = replace(QUERY, after=after)
    token = cursors.seal(query, requester="11111111|900000001", now=NOW)

    assert cursors.open(token, requester="11111111|900000001", now=NOW) == query
    assert "1.2.3" not in token and len(token) < 1024


def test_a_cursor_does_not_open_for_someone_else_altered_or_with_another_key() -> None:
    cursors = PageCursors(KEY)
    token = cursors.seal(QUERY, requester="11111111|900000001", now=NOW)
    flipped = token[:-5] + ("A" if token[-5] != "A" else "B") + token[-4:]

    with pytest.raises(InvalidCursor, match="someone else's"):
        cursors.open(token, requester="22222222|900000001", now=NOW)
    with pytest.raises(InvalidCursor):
        cursors.open(flipped, requester="11111111|900000001", now=NOW)
    with pytest.raises(InvalidCursor):
        PageCursors(b"another-key-" + b"o" * 32).open(
            token, requester="11111111|900000001", now=NOW
        )
    for garbage in ("", "c1.", "c1.!!!", "nope", "c1." + "A" * 20):
        with pytest.raises(InvalidCursor):
            cursors.open(garbage, requester="11111111|900000001", now=NOW)


def test_a_cursor_expires() -> None:
    cursors = PageCursors(KEY, ttl=timedelta(minutes=15))
    token = cursors.seal(QUERY, requester="r", now=NOW)

    assert cursors.open(token, requester="r", now=NOW + timedelta(minutes=14)) == QUERY
    with pytest.raises(ExpiredCursor):
        cursors.open(token, requester="r", now=NOW + timedelta(minutes=16))
