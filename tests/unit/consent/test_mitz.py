"""Reading Mitz consent notifications (FHIR R4 Bundles) into registry facts."""

from __future__ import annotations

import copy
import json
from datetime import date
from typing import Any

import pytest

from services.consent.domain.mitz import (
    PROVIDER_CATEGORY_EXTENSION,
    InvalidNotification,
    MitzNotification,
    NotificationKind,
    parse_notification,
)
from shared.events.consent import ConsentRegistered, ConsentRevoked, Provision
from shared.identifiers import BSN_SYSTEM, URA_SYSTEM, Bsn
from tests.factories import TEST_BSN, make_pseudonym

URA = "87654321"
INVALID_BSN = "123456789"  # fails the 11-proof


def make_bundle(
    *, status: str = "active", provision: str | None = "permit", bsn: str = TEST_BSN
) -> dict[str, Any]:
    consent: dict[str, Any] = {
        "resourceType": "Consent",
        "id": "mitz-consent-1",
        "status": status,
        "extension": [
            {
                "url": PROVIDER_CATEGORY_EXTENSION,
                "valueCoding": {"system": "urn:example:mitz", "code": "RPZAC104"},
            }
        ],
        "category": [
            {"coding": [{"system": "http://loinc.org", "code": "59284-0"}]},
            {"coding": [{"system": "urn:example:mitz", "code": "GGC002"}]},
        ],
        "patient": {"reference": "urn:uuid:patient-1"},
        "organization": [{"reference": "Organization/org-1"}],
        "provision": {"period": {"start": "2025-01-01", "end": "2025-12-31T23:59:59+01:00"}},
    }
    if provision is not None:
        consent["provision"]["type"] = provision
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:consent-1", "resource": consent},
            {
                "fullUrl": "urn:uuid:patient-1",
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [
                        {"system": "urn:example:mrn", "value": "MRN-1"},
                        {"system": BSN_SYSTEM, "value": bsn},
                    ],
                },
            },
            {
                "fullUrl": "https://mitz.example/Organization/org-1",
                "resource": {
                    "resourceType": "Organization",
                    "id": "org-1",
                    "identifier": [{"system": URA_SYSTEM, "value": URA}],
                },
            },
        ],
    }


def entry(bundle: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind)


def issues_of(bundle: object) -> InvalidNotification:
    with pytest.raises(InvalidNotification) as caught:
        parse_notification(bundle)
    return caught.value


def test_an_active_consent_is_read_as_a_registration() -> None:
    assert parse_notification(make_bundle()) == MitzNotification(
        kind=NotificationKind.REGISTERED,
        consent_id="mitz-consent-1",
        bsn=Bsn(TEST_BSN),
        organisation_ura=URA,
        provision=Provision.PERMIT,
        data_category="GGC002",
        provider_category="RPZAC104",
        period_start=date(2025, 1, 1),
        period_end=date(2025, 12, 31),
    )


def test_a_registration_becomes_a_consent_registered_event_for_the_pseudonym() -> None:
    patient = make_pseudonym(TEST_BSN)
    event = parse_notification(make_bundle(provision="deny")).to_event(
        patient, correlation_id="corr-1", producer="consent"
    )
    assert isinstance(event, ConsentRegistered)
    assert (event.patient, event.consent_id, event.provision) == (
        patient,
        "mitz-consent-1",
        Provision.DENY,
    )
    assert event.organisation_ura is None  # Mitz consents are per provider category
    assert event.source == "mitz"


@pytest.mark.parametrize("status", ["inactive", "entered-in-error"])
def test_an_inactive_consent_is_read_as_a_revocation(status: str) -> None:
    notification = parse_notification(make_bundle(status=status, provision=None))
    assert notification.kind is NotificationKind.REVOKED
    event = notification.to_event(make_pseudonym(), correlation_id="c", producer="consent")
    assert isinstance(event, ConsentRevoked)
    assert event.consent_id == "mitz-consent-1"


def test_without_the_provider_category_extension_the_consent_covers_every_category() -> None:
    bundle = make_bundle()
    del entry(bundle, "Consent")["extension"]
    assert parse_notification(bundle).provider_category is None


def test_a_provider_category_may_be_given_as_value_code() -> None:
    bundle = make_bundle()
    entry(bundle, "Consent")["extension"] = [
        {"url": PROVIDER_CATEGORY_EXTENSION, "valueCode": "RPZAC200"}
    ]
    assert parse_notification(bundle).provider_category == "RPZAC200"


def test_partial_dates_cover_their_whole_year_or_month() -> None:
    bundle = make_bundle()
    entry(bundle, "Consent")["provision"]["period"] = {"start": "2024", "end": "2024-02"}
    notification = parse_notification(bundle)
    assert (notification.period_start, notification.period_end) == (
        date(2024, 1, 1),
        date(2024, 2, 29),
    )


@pytest.mark.parametrize(
    ("start", "end", "period"),
    [
        # The day it is in the Netherlands at that moment (CEST, UTC+2, from 30 March 2025).
        ("2025-03-31T23:30:00Z", "2025-06-30T21:59:59Z", (date(2025, 4, 1), date(2025, 6, 30))),
        ("2025-01-01T00:30:00+01:00", "2025-12-31T23:59:59.123456789+01:00",
         (date(2025, 1, 1), date(2025, 12, 31))),
        # Days the calendar does not have in the Netherlands: its first and last.
        ("0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00Z", (date.min, date.max)),
    ],
)  # fmt: skip
def test_a_date_time_counts_as_the_dutch_day_it_falls_on(
    start: str, end: str, period: tuple[date, date]
) -> None:
    bundle = make_bundle()
    entry(bundle, "Consent")["provision"]["period"] = {"start": start, "end": end}
    notification = parse_notification(bundle)
    assert (notification.period_start, notification.period_end) == period


@pytest.mark.parametrize(
    "written", ["2025-03-01Tgarbage", "2025-03-01T!!", "2025-03-01T10:00:00", "2025-03-01T10:00Z"]
)
def test_a_date_time_without_seconds_and_zone_is_refused(written: str) -> None:
    bundle = make_bundle()
    entry(bundle, "Consent")["provision"]["period"] = {"start": written}
    with pytest.raises(InvalidNotification, match="expected a FHIR date or dateTime"):
        parse_notification(bundle)


def test_the_notification_does_not_show_the_bsn_in_its_repr() -> None:
    assert TEST_BSN not in repr(parse_notification(make_bundle()))


def mutate(fn) -> dict[str, Any]:
    bundle = make_bundle()
    fn(bundle)
    return bundle


INVALID_BUNDLES = {
    "not a bundle": ({"resourceType": "Patient"}, "structure", "Bundle"),
    "no entries": ({"resourceType": "Bundle", "entry": []}, "required", "Bundle.entry"),
    "missing patient": (
        mutate(lambda b: b["entry"].pop(1)),
        "required",
        "Bundle.entry",
    ),
    "two patients": (
        mutate(lambda b: b["entry"].append(copy.deepcopy(b["entry"][1]))),
        "multiple-matches",
        "Bundle.entry",
    ),
    "bad BSN 11-proof": (make_bundle(bsn=INVALID_BSN), "value", "Bundle.entry[1].resource"),
    "no BSN": (
        mutate(lambda b: entry(b, "Patient").pop("identifier")),
        "required",
        "Bundle.entry[1].resource.identifier",
    ),
    "two different BSNs": (
        mutate(
            lambda b: entry(b, "Patient")["identifier"].append(
                {"system": BSN_SYSTEM, "value": "999991772"}
            )
        ),
        "multiple-matches",
        "Bundle.entry[1].resource.identifier",
    ),
    "unknown status": (make_bundle(status="draft"), "code-invalid", "resource.status"),
    "no provision type": (make_bundle(provision=None), "required", "provision.type"),
    "bad provision type": (make_bundle(provision="maybe"), "code-invalid", "provision.type"),
    "wrong resource type": (
        mutate(lambda b: b["entry"].append({"resource": {"resourceType": "Observation"}})),
        "not-supported",
        "Bundle.entry[3].resource.resourceType",
    ),
    "entry without resource": (
        mutate(lambda b: b["entry"].append({"fullUrl": "urn:uuid:x"})),
        "structure",
        "Bundle.entry[3].resource",
    ),
    "no data category": (
        mutate(lambda b: entry(b, "Consent").pop("category")),
        "required",
        "category",
    ),
    "two data categories": (
        mutate(
            lambda b: entry(b, "Consent")["category"].append(
                {"coding": [{"system": "urn:example:mitz", "code": "GGC003"}]}
            )
        ),
        "multiple-matches",
        "category",
    ),
    "no organisation": (mutate(lambda b: b["entry"].pop(2)), "required", "Bundle.entry"),
    "bad URA": (
        mutate(lambda b: entry(b, "Organization")["identifier"][0].update(value="1234")),
        "value",
        "Bundle.entry[2].resource.identifier",
    ),
    "no consent id": (mutate(lambda b: entry(b, "Consent").pop("id")), "required", ".id"),
    "period ends before it starts": (
        mutate(
            lambda b: entry(b, "Consent")["provision"].update(
                period={"start": "2025-02-01", "end": "2025-01-31"}
            )
        ),
        "invariant",
        "provision.period",
    ),
    "impossible date": (
        mutate(lambda b: entry(b, "Consent")["provision"].update(period={"start": "2025-02-30"})),
        "value",
        "provision.period.start",
    ),
    "patient reference to elsewhere": (
        mutate(lambda b: entry(b, "Consent").update(patient={"reference": "Patient/other"})),
        "invariant",
        "patient.reference",
    ),
    "patient reference not a string": (
        mutate(lambda b: entry(b, "Consent").update(patient={"reference": []})),
        "structure",
        "patient.reference",
    ),
    "organisation reference not a string": (
        mutate(lambda b: entry(b, "Consent").update(organization=[{"reference": {"x": 1}}])),
        "structure",
        "organization[0].reference",
    ),
    "two provider categories": (
        mutate(
            lambda b: entry(b, "Consent")["extension"].append(
                {"url": PROVIDER_CATEGORY_EXTENSION, "valueCode": "RPZAC200"}
            )
        ),
        "multiple-matches",
        "extension",
    ),
}


@pytest.mark.parametrize("name", INVALID_BUNDLES)
def test_a_malformed_notification_is_refused_with_an_issue_that_says_where(name: str) -> None:
    bundle, code, expression = INVALID_BUNDLES[name]
    issues = issues_of(bundle).issues
    assert any(i.code == code and expression in i.expression for i in issues), issues


def test_every_problem_is_reported_at_once() -> None:
    bundle = make_bundle(status="draft", bsn=INVALID_BSN)
    entry(bundle, "Organization")["identifier"] = []
    codes = sorted(i.code for i in issues_of(bundle).issues)
    assert codes == ["code-invalid", "required", "value"]


def test_the_issues_form_a_fhir_operation_outcome() -> None:
    outcome = issues_of(make_bundle(provision=None)).to_operation_outcome()
    assert outcome["resourceType"] == "OperationOutcome"
    [issue] = outcome["issue"]
    assert issue["severity"] == "error"
    assert issue["code"] == "required"
    assert issue["expression"] == ["Bundle.entry[0].resource.provision.type"]
    assert "provision.type" in issue["diagnostics"]


def test_no_issue_ever_quotes_a_bsn_wherever_it_was_put() -> None:
    bundle = make_bundle(bsn=INVALID_BSN)
    consent = entry(bundle, "Consent")
    consent["status"] = TEST_BSN
    consent["id"] = f"{TEST_BSN}!"
    consent["provision"]["type"] = TEST_BSN
    consent["category"][1]["coding"][0]["code"] = f"{TEST_BSN} x"
    consent["patient"] = {"reference": f"Patient/{TEST_BSN}"}
    consent["provision"]["period"] = {"start": TEST_BSN}
    entry(bundle, "Organization")["identifier"][0]["value"] = TEST_BSN
    error = issues_of(bundle)
    text = json.dumps(error.to_operation_outcome()) + str(error) + repr(error)
    assert TEST_BSN not in text
    assert INVALID_BSN not in text
    assert len(error.issues) >= 7
