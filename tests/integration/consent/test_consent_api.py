"""The consent API against the real Kafka: writes are visible on the next request, no BSN leaks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from services.consent.adapters.registry_view import RegistryTopics
from services.consent.entrypoints.http import FHIR_JSON
from shared.codec import Codec
from shared.events.consent import ConsentRegistered, ConsentRevoked
from shared.identifiers import Bsn, Pseudonymizer
from shared.settings import KafkaSettings
from tests.factories import TEST_BSN
from tests.integration.consent.conftest import (
    HOSPITAL,
    OTHER_HOSPITAL,
    PSEUDONYM_KEY,
    RunningConsent,
    read_topics,
    start_consent,
)
from tests.unit.consent.test_mitz import make_bundle as make_mitz_bundle

pytestmark = pytest.mark.integration

# Another test number from the government's list (passes the 11-proof, issued to nobody).
SECOND_BSN = "999990020"


def make_bundle(**kw: Any) -> dict[str, Any]:
    """A Mitz notification in force today (the service decides on the real date)."""
    bundle = make_mitz_bundle(**kw)
    del bundle["entry"][0]["resource"]["provision"]["period"]["end"]
    return bundle


def timeline_query(service: RunningConsent, bsn: str = TEST_BSN) -> dict[str, Any]:
    body = {
        "bsn": bsn,
        "purpose": "timeline",
        "requester_ura": HOSPITAL,
        "provider_category": "RPZAC104",
    }
    response = service.post("/consent-queries", body)
    assert response.status_code == 200, response.text
    return response.json()


def relate(service: RunningConsent, bsn: str = TEST_BSN, **body: Any):  # type: ignore[no-untyped-def]
    payload = {
        "bsn": bsn,
        "organisation_ura": HOSPITAL,
        "start": "2025-01-01",
        "source": "referral",
        **body,
    }
    return service.post("/treatment-relationships", payload)


def test_a_mitz_permit_is_visible_to_the_very_next_query(consent_service: RunningConsent) -> None:
    assert relate(consent_service).status_code == 201
    response = consent_service.mitz(make_bundle())
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == FHIR_JSON
    answer = timeline_query(consent_service)
    assert answer["decision"] == "permit"
    assert (answer["basis"], answer["decided_by"]) == ("explicit-consent", "mitz-consent-1")
    assert answer["treatment_relationship"] is True
    assert answer["registry_version"] == 2


def test_a_mitz_inactive_notification_revokes_and_a_repeat_changes_nothing(
    consent_service: RunningConsent, kafka_settings: KafkaSettings, registry_topics: RegistryTopics
) -> None:
    relate(consent_service)
    assert consent_service.mitz(make_bundle()).status_code == 201
    assert timeline_query(consent_service)["decision"] == "permit"
    assert consent_service.mitz(make_bundle(status="inactive")).status_code == 201
    answer = timeline_query(consent_service)
    assert (answer["decision"], answer["basis"]) == ("deny", "no-explicit-consent")
    assert consent_service.mitz(make_bundle(status="inactive")).status_code == 200
    assert timeline_query(consent_service)["registry_version"] == answer["registry_version"]

    codec = Codec()
    names = (registry_topics.consent_registered, registry_topics.consent_revoked)
    events = [codec.decode_record(r) for r in read_topics(kafka_settings, names)]
    patient = Pseudonymizer(PSEUDONYM_KEY.encode()).pseudonym(Bsn(TEST_BSN))
    # Two topics: no order between them. The repeated revocation was not published again.
    assert sorted(type(e).__name__ for e in events) == [
        ConsentRegistered.__name__,
        ConsentRevoked.__name__,
    ]
    assert all(e.patient == patient for e in events)  # type: ignore[attr-defined]


def _malformed() -> list[Any]:
    bad_bsn = make_bundle(bsn="123456789")
    no_patient = make_bundle()
    no_patient["entry"] = [
        e for e in no_patient["entry"] if e["resource"]["resourceType"] != "Patient"
    ]
    bad_status = make_bundle(status="draft")
    two_consents = make_bundle()
    two_consents["entry"].append(copy.deepcopy(two_consents["entry"][0]))
    return [bad_bsn, no_patient, bad_status, two_consents, {"resourceType": "Patient"}, [1, 2]]


def test_malformed_bundles_get_an_operation_outcome_and_nothing_is_published(
    consent_service: RunningConsent, kafka_settings: KafkaSettings, registry_topics: RegistryTopics
) -> None:
    for bundle in _malformed():
        response = consent_service.mitz(bundle)
        assert 400 <= response.status_code < 500, response.text
        assert response.headers["content-type"] == FHIR_JSON
        body = response.json()
        assert body["resourceType"] == "OperationOutcome"
        assert body["issue"] and all(i["severity"] == "error" for i in body["issue"])
    assert read_topics(kafka_settings, registry_topics.names) == []


def test_a_relationship_for_another_organisation_is_forbidden_and_not_published(
    consent_service: RunningConsent, kafka_settings: KafkaSettings, registry_topics: RegistryTopics
) -> None:
    response = relate(consent_service, organisation_ura=OTHER_HOSPITAL)
    assert response.status_code == 403
    assert read_topics(kafka_settings, registry_topics.names) == []


def test_a_relationship_is_ended_only_by_its_organisation(consent_service: RunningConsent) -> None:
    assert relate(consent_service, relationship_id="opname-7").status_code == 201
    path = "/treatment-relationships/opname-7/end"
    body = {"bsn": TEST_BSN, "end": "2025-02-01"}
    assert (
        consent_service.post(path, body, headers=consent_service.auth(OTHER_HOSPITAL)).status_code
        == 403
    )
    assert consent_service.post("/treatment-relationships/nope/end", body).status_code == 404
    ended = consent_service.post(path, body)
    assert (ended.status_code, ended.json()["status"]) == (200, "recorded")
    consent_service.mitz(make_bundle())
    answer = timeline_query(consent_service)
    assert (answer["decision"], answer["basis"]) == ("deny", "no-treatment-relationship")


def test_no_bsn_appears_in_any_record_the_api_writes(
    consent_service: RunningConsent, kafka_settings: KafkaSettings, registry_topics: RegistryTopics
) -> None:
    for bsn in (TEST_BSN, SECOND_BSN):
        assert relate(consent_service, bsn).status_code == 201
        assert relate(consent_service, bsn, relationship_id="r-1").status_code == 201
        end = consent_service.post(
            "/treatment-relationships/r-1/end", {"bsn": bsn, "end": "2025-03-01"}
        )
        assert end.status_code == 200
        assert consent_service.mitz(make_bundle(bsn=bsn)).status_code == 201
        assert consent_service.mitz(make_bundle(bsn=bsn, status="inactive")).status_code == 201
    records = read_topics(kafka_settings, registry_topics.names)
    assert len(records) == 10
    for record in records:
        blobs = [record.key or b"", record.value or b"", *(v for _, v in record.headers)]
        for bsn in (TEST_BSN, SECOND_BSN):
            assert not any(bsn.encode() in blob for blob in blobs), record.topic


def test_a_restarted_api_rebuilds_the_registry_from_the_topics(
    consent_service: RunningConsent,
    kafka_settings: KafkaSettings,
    registry_topics: RegistryTopics,
    tmp_path: Path,
) -> None:
    relate(consent_service)
    consent_service.mitz(make_bundle())
    before = timeline_query(consent_service)
    second = start_consent(kafka_settings, registry_topics, tmp_path / "keys-2")
    try:
        assert timeline_query(second) == before
        assert second.mitz(make_bundle()).status_code == 200  # already recorded
    finally:
        second.stop()


def test_readiness_and_metrics_of_a_running_api(consent_service: RunningConsent) -> None:
    import requests

    ready = requests.get(f"{consent_service.base_url}/readyz", timeout=5)
    assert ready.json() == {"ready": True, "checks": {"registry_view": True}}
    consent_service.mitz(make_bundle())
    metrics = requests.get(f"{consent_service.base_url}/metrics", timeout=5).text
    assert 'beeldportaal_consent_mitz_notifications_total{outcome="registered"} 1.0' in metrics
    assert "beeldportaal_consent_registry_view_caught_up 1.0" in metrics
    assert TEST_BSN not in metrics
