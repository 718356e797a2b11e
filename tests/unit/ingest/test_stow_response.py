"""The STOW-RS answer (services/ingest/domain/stow_response.py): which sequence an instance is
listed in, its codes, and RetrieveURLs only where a retrieve base is configured."""

from __future__ import annotations

from services.ingest.domain.status import Status
from services.ingest.domain.stow_response import InstanceResult, http_status, response_body

CT = "1.2.840.10008.5.1.4.1.1.2"
RETRIEVE_URL, FAILED, REFERENCED = "00081190", "00081198", "00081199"


def stored(sop: str, url: str | None = None, status: Status = Status.SUCCESS) -> InstanceResult:
    return InstanceResult(status, "stored", CT, sop, "2.25.1", stored=True, retrieve_url=url)


def refused(sop: str, status: Status = Status.CANNOT_UNDERSTAND) -> InstanceResult:
    return InstanceResult(status, "not DICOM", CT, sop, "2.25.1", stored=False)


def test_without_a_retrieve_base_stored_instances_are_listed_with_no_retrieve_url() -> None:
    results = [stored("2.25.10"), stored("2.25.11")]

    body = response_body(results, study_url=None)

    assert http_status(results) == 200
    assert RETRIEVE_URL not in body and FAILED not in body
    items = body[REFERENCED]["Value"]
    assert [i["00081155"]["Value"] for i in items] == [["2.25.10"], ["2.25.11"]]
    assert all(RETRIEVE_URL not in item for item in items)


def test_with_a_retrieve_base_the_study_and_each_instance_name_where_they_are() -> None:
    url = "http://timeline.example/dicomweb/studies/2.25.1/series/2.25.2/instances/2.25.10"
    results = [stored("2.25.10", url, Status.WARNING_COERCION), refused("2.25.12")]

    body = response_body(results, study_url="http://timeline.example/dicomweb/studies/2.25.1")

    assert http_status(results) == 202
    assert body[RETRIEVE_URL]["Value"] == ["http://timeline.example/dicomweb/studies/2.25.1"]
    [item] = body[REFERENCED]["Value"]
    assert item[RETRIEVE_URL]["Value"] == [url]
    assert item["00081196"]["Value"] == [int(Status.WARNING_COERCION)]  # WarningReason
    [failed] = body[FAILED]["Value"]
    assert failed["00081197"]["Value"] == [int(Status.CANNOT_UNDERSTAND)]  # FailureReason
    assert RETRIEVE_URL not in failed


def test_none_stored_is_a_conflict_or_for_storage_trouble_a_503() -> None:
    assert http_status([refused("2.25.10")]) == 409
    assert http_status([refused("2.25.10", Status.OUT_OF_RESOURCES)]) == 503
