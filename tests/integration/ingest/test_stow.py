"""STOW-RS against a real ingest service: real Kafka, real S3, dicomweb-client and raw HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import structlog
from dicomweb_client.api import DICOMwebClient
from minio import Minio

from deploy.local.config import LocalConfig
from deploy.local.s3 import S3Server
from services.ingest.domain.status import Status
from shared.events import BsnStatus, CompletingRequestStored, InstanceStored, Urgency
from shared.settings import KafkaSettings, S3Settings
from shared.storage.memory import InMemoryObjectStore
from shared.storage.port import ObjectStoreUnavailable
from tests.dicom_samples import bsn_item, make_dicom_bytes, malformed_samples, well_formed_samples
from tests.integration.ingest.conftest import (
    RECIPIENT_URA,
    SENDER_URA,
    EventTap,
    RunningIngest,
    free_port,
    start_ingest,
)

pytestmark = pytest.mark.integration

BOUNDARY = "beeldportaal-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
FAILED, REFERENCED, FAILURE_REASON, WARNING_REASON = "00081198", "00081199", "00081197", "00081196"
SOP_UID, RETRIEVE_URL = "00081155", "00081190"


def multipart(parts: Iterable[bytes], part_type: str = "application/dicom") -> bytes:
    out = io.BytesIO()
    for part in parts:
        out.write(f"\r\n--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode())
        out.write(part)
    out.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def post(service: RunningIngest, body: bytes | Iterator[bytes], **kw: object) -> requests.Response:
    headers = {"Content-Type": CONTENT_TYPE, **service.auth_headers()}
    headers.update(kw.pop("headers", {}))  # type: ignore[arg-type]
    url = kw.pop("url", service.stow_url())
    return requests.post(url, data=body, headers=headers, timeout=60)  # type: ignore[arg-type]


def items(response: requests.Response, sequence: str) -> list[dict]:
    return response.json().get(sequence, {}).get("Value", [])


def uid_of(item: dict) -> str:
    return item[SOP_UID]["Value"][0]


def s3_client(settings: S3Settings) -> Minio:
    return Minio(
        settings.endpoint,
        access_key=settings.access_key,
        secret_key=settings.secret_key.get_secret_value(),
        region=settings.region,
        secure=False,
    )


def stored_bytes(settings: S3Settings, key: str) -> bytes:
    response = s3_client(settings).get_object(settings.bucket, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def for_sops(uids: Iterable[str]):
    wanted = set(uids)
    return lambda e: isinstance(e, InstanceStored) and e.instance.sop_instance_uid in wanted


def test_a_study_sent_with_dicomweb_client_is_stored_byte_for_byte_and_announced(
    ingest_service: RunningIngest, instance_stored_tap: EventTap, bucket: S3Settings
) -> None:
    study = pydicom.uid.generate_uid()
    files = [
        make_dicom_bytes(StudyInstanceUID=study, patient=bsn_item("999990019")) for _ in range(3)
    ]
    datasets = [pydicom.dcmread(io.BytesIO(f)) for f in files]
    client = DICOMwebClient(
        url=f"{ingest_service.base_url}/dicomweb/to/{RECIPIENT_URA}",
        headers=ingest_service.auth_headers(),
    )
    response = client.store_instances(datasets)

    referenced = response.ReferencedSOPSequence
    assert sorted(r.ReferencedSOPInstanceUID for r in referenced) == sorted(
        d.SOPInstanceUID for d in datasets
    )
    assert response.RetrieveURL.endswith(f"/dicomweb/studies/{study}")
    assert "FailedSOPSequence" not in response

    events = instance_stored_tap.read(for_sops(d.SOPInstanceUID for d in datasets), expect=3)
    assert len(events) == 3
    for event in events:
        assert event.sender_ura == SENDER_URA and event.recipient_ura == RECIPIENT_URA
        assert event.patient.bsn_status is BsnStatus.VERIFIED
        assert event.patient.pseudonym is not None
        assert "999990019" not in event.model_dump_json()
        assert event.instance.object_key == f"{SENDER_URA}/{event.instance.sop_instance_uid}.dcm"
        # dicomweb-client re-encodes the data sets: the stored bytes are what it sent.
        body = stored_bytes(bucket, event.instance.object_key)
        assert hashlib.sha256(body).hexdigest() == event.instance.sha256
        assert len(body) == event.instance.size
        assert pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID == event.instance.sop_instance_uid


def test_a_chunked_upload_of_large_instances_is_stored_with_exactly_the_bytes_sent(
    ingest_service: RunningIngest, instance_stored_tap: EventTap, bucket: S3Settings
) -> None:
    big = [
        make_dicom_bytes(Rows=512, Columns=1024, PixelData=bytes(512 * 1024 * 2)) for _ in range(3)
    ]

    def chunks() -> Iterator[bytes]:  # requests sends a generator with chunked encoding
        body = multipart(big)
        for i in range(0, len(body), 256 * 1024):
            yield body[i : i + 256 * 1024]

    response = post(ingest_service, chunks())
    assert response.status_code == 200, response.text
    uids = [pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True).SOPInstanceUID for b in big]
    assert sorted(uid_of(i) for i in items(response, REFERENCED)) == sorted(uids)
    events = instance_stored_tap.read(for_sops(uids), expect=3)
    by_uid = {e.instance.sop_instance_uid: e for e in events}
    for uid, sent in zip(uids, big, strict=True):
        assert stored_bytes(bucket, by_uid[uid].instance.object_key) == sent


def test_every_pydicom_test_file_is_stored_or_refused_on_its_own_in_one_request(
    ingest_service: RunningIngest,
) -> None:
    samples = well_formed_samples() + malformed_samples()
    response = post(ingest_service, multipart(Path(p).read_bytes() for p, _ in samples))
    assert response.status_code == 202, response.text
    referenced = items(response, REFERENCED)
    failed = items(response, FAILED)
    assert len(referenced) + len(failed) == len(samples)

    # Shipped files sometimes share a SOP Instance UID: the first is stored, a different
    # file with the same UID is refused as a duplicate, an identical one is accepted again.
    expected_failures = [s for _, s in malformed_samples()]
    seen: dict[str, bytes] = {}
    for path, _ in well_formed_samples():
        data = Path(path).read_bytes()
        uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        if uid in seen and seen[uid] != data:
            expected_failures.append(Status.DUPLICATE_SOP_INSTANCE)
        seen.setdefault(uid, data)
    assert sorted(i[FAILURE_REASON]["Value"][0] for i in failed) == sorted(
        int(s) for s in expected_failures
    )
    assert len({uid_of(i) for i in referenced}) == len(seen)
    for item in referenced:
        # Where the timeline serves it (the configured retrieve base), not ingest.
        assert item[RETRIEVE_URL]["Value"][0].startswith("http://timeline.example/dicomweb/")
    for item in failed:
        assert item["00091001"]["Value"][0], "every refusal says why"


def test_a_request_that_is_not_multipart_related_dicom_is_refused_with_415(
    ingest_service: RunningIngest,
) -> None:
    body = multipart([make_dicom_bytes()])
    for content_type in (
        "application/dicom",
        f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
        "multipart/related; type=application/dicom",  # no boundary
    ):
        response = post(ingest_service, body, headers={"Content-Type": content_type})
        assert response.status_code == 415, content_type


def test_no_or_a_bad_token_is_401_and_an_unknown_recipient_is_404_before_storing(
    ingest_service: RunningIngest, bucket: S3Settings
) -> None:
    body = multipart([make_dicom_bytes()])
    assert post(ingest_service, body, headers={"Authorization": ""}).status_code == 401
    assert (
        post(ingest_service, body, headers={"Authorization": "Bearer not.a.token"}).status_code
        == 401
    )
    response = post(ingest_service, body, url=ingest_service.stow_url("99999999"))
    assert response.status_code == 404
    # A client id longer than instance-stored records is refused before storing too.
    long_client = ingest_service.token(client_id="https://clients.example.nl/" + "x" * 102)
    response = post(ingest_service, body, headers={"Authorization": f"Bearer {long_client}"})
    assert response.status_code == 401
    assert "client_id is longer than 128 characters" in response.json()["detail"]
    assert list(s3_client(bucket).list_objects(bucket.bucket, recursive=True)) == []


def test_a_sender_the_portal_does_not_know_or_a_token_of_no_sender_is_403_before_storing(
    ingest_service: RunningIngest, bucket: S3Settings
) -> None:
    body = multipart([make_dicom_bytes()])
    stranger = ingest_service.token(ura="99999998")  # validly signed, in no peers file
    with structlog.testing.capture_logs() as logs:
        response = post(ingest_service, body, headers={"Authorization": f"Bearer {stranger}"})
    assert response.status_code == 403
    assert "organisation 99999998 does not send through this portal" in response.text
    # The operator sees it too.
    assert {"event": "STOW-RS request refused", "status": 403, "sender": "99999998"}.items() <= (
        next(line for line in logs if line["event"] == "STOW-RS request refused").items()
    )
    for role in ("patient-representative", "consent-authority", "operator"):
        token = ingest_service.token(roles=(role,))
        response = post(ingest_service, body, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 403, role
        assert "role provider or system" in response.text
    system = ingest_service.token(roles=("system",), client_id="pacs.oost.example.nl")
    response = post(ingest_service, body, headers={"Authorization": f"Bearer {system}"})
    assert response.status_code == 200, response.text
    stored = list(s3_client(bucket).list_objects(bucket.bucket, recursive=True))
    assert len(stored) == 1  # the system's instance only


def test_an_instance_of_another_study_than_the_url_names_is_a_409_conflict(
    ingest_service: RunningIngest,
) -> None:
    url = ingest_service.stow_url(study_uid=pydicom.uid.generate_uid())
    response = post(ingest_service, multipart([make_dicom_bytes()]), url=url)
    assert response.status_code == 409
    [item] = items(response, FAILED)
    assert item[FAILURE_REASON]["Value"] == [int(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS)]
    assert "does not match" in item["00091001"]["Value"][0]


def test_sending_an_identical_instance_again_succeeds_without_a_second_announcement(
    ingest_service: RunningIngest, instance_stored_tap: EventTap
) -> None:
    data = make_dicom_bytes()
    uid = pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
    assert post(ingest_service, multipart([data])).status_code == 200
    again = post(ingest_service, multipart([data]))
    assert again.status_code == 200
    assert [uid_of(i) for i in items(again, REFERENCED)] == [uid]
    assert len(instance_stored_tap.read(for_sops([uid]), expect=1, settle=2.0)) == 1


def test_the_same_sop_instance_with_other_bytes_is_refused_and_never_overwrites(
    ingest_service: RunningIngest, bucket: S3Settings
) -> None:
    first, second, key = _one_instance_twice_with_other_bytes()
    assert post(ingest_service, multipart([first])).status_code == 200
    response = post(ingest_service, multipart([second]))
    _assert_refused_as_a_duplicate(response)
    assert stored_bytes(bucket, key) == first


def test_the_same_sop_instance_in_another_series_or_study_is_refused_and_not_stored(
    ingest_service: RunningIngest, bucket: S3Settings, instance_stored_tap: EventTap
) -> None:
    first = make_dicom_bytes()
    ds = pydicom.dcmread(io.BytesIO(first))
    uid = ds.SOPInstanceUID
    other_series = make_dicom_bytes(SOPInstanceUID=uid, StudyInstanceUID=ds.StudyInstanceUID)
    other_study = make_dicom_bytes(SOPInstanceUID=uid)
    assert post(ingest_service, multipart([first])).status_code == 200
    for moved in (other_series, other_study):
        response = post(ingest_service, multipart([moved]))
        _assert_refused_as_a_duplicate(response)
        [item] = items(response, FAILED)
        assert uid_of(item) == uid

    client = s3_client(bucket)
    keys = [o.object_name for o in client.list_objects(bucket.bucket, recursive=True)]
    assert keys == [f"{SENDER_URA}/{uid}.dcm"]
    assert stored_bytes(bucket, keys[0]) == first
    assert len(instance_stored_tap.read(for_sops([uid]), expect=1, settle=2.0)) == 1


def _one_instance_twice_with_other_bytes() -> tuple[bytes, bytes, str]:
    """Two encodings of one SOP instance with different content, and its object key."""
    first = make_dicom_bytes(StudyDescription="first")
    ds = pydicom.dcmread(io.BytesIO(first))
    second = make_dicom_bytes(
        StudyDescription="second",
        SOPInstanceUID=ds.SOPInstanceUID,
        StudyInstanceUID=ds.StudyInstanceUID,
        SeriesInstanceUID=ds.SeriesInstanceUID,
    )
    key = f"{SENDER_URA}/{ds.SOPInstanceUID}.dcm"
    return first, second, key


def _assert_refused_as_a_duplicate(response: requests.Response) -> None:
    assert response.status_code == 409
    [item] = items(response, FAILED)
    assert item[FAILURE_REASON]["Value"] == [int(Status.DUPLICATE_SOP_INSTANCE)]


def test_stored_through_worker_threads_an_instance_keeps_the_same_promises(
    kafka_settings: KafkaSettings,
    bucket: S3Settings,
    tmp_path: Path,
    instance_stored_tap: EventTap,
) -> None:
    # inline_store_bytes=0: every instance takes the path large instances take.
    running = start_ingest(kafka_settings, bucket, tmp_path, inline_store_bytes=0)
    first, second, key = _one_instance_twice_with_other_bytes()
    try:
        assert post(running, multipart([first])).status_code == 200
        assert post(running, multipart([first])).status_code == 200
        refused = post(running, multipart([second]))
    finally:
        running.stop()
    _assert_refused_as_a_duplicate(refused)
    assert stored_bytes(bucket, key) == first
    uid = pydicom.dcmread(io.BytesIO(first)).SOPInstanceUID
    assert len(instance_stored_tap.read(for_sops([uid]), expect=1, settle=2.0)) == 1


def test_the_senders_note_urgency_and_completion_mark_travel_with_the_instances(
    ingest_service: RunningIngest, instance_stored_tap: EventTap
) -> None:
    data = make_dicom_bytes()
    uid = pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
    note = "Graag beoordelen vóór het MDO van dinsdag"
    response = post(
        ingest_service,
        multipart([data]),
        headers={
            "X-Beeldportaal-Note": urllib.parse.quote(note),
            "X-Beeldportaal-Urgency": "urgent",
            "X-Beeldportaal-Study-Complete": "true",
        },
    )
    assert response.status_code == 200
    [event] = instance_stored_tap.read(for_sops([uid]), expect=1)
    assert event.sender_note == note
    assert event.urgency is Urgency.URGENT
    # The completion mark is the request's end (CompletingRequestStored), once it is whole.
    assert event.completes_study is False
    bad = post(ingest_service, multipart([data]), headers={"X-Beeldportaal-Urgency": "asap"})
    assert bad.status_code == 400
    not_utf8 = post(ingest_service, multipart([data]), headers={"X-Beeldportaal-Note": "%FF"})
    assert not_utf8.status_code == 400
    assert "percent-encoded UTF-8" in not_utf8.json()["detail"]


class UnreachableStore(InMemoryObjectStore):
    """Object storage that is away: every write fails for now."""

    def put_if_absent(self, *args: Any, **kwargs: Any) -> Any:
        raise ObjectStoreUnavailable("connection refused")

    async def aput_if_absent(self, *args: Any, **kwargs: Any) -> Any:
        raise ObjectStoreUnavailable("connection refused")


def test_a_body_that_breaks_off_while_storage_is_away_stays_a_503_to_retry(
    kafka_settings: KafkaSettings, bucket: S3Settings, tmp_path: Path
) -> None:
    files = [make_dicom_bytes() for _ in range(3)]
    whole = multipart(files)
    cut = whole[: whole.index(files[2]) + 100]
    service = start_ingest(kafka_settings, bucket, tmp_path, objects=UnreachableStore())
    try:
        response = post(service, cut)
    finally:
        service.stop()

    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "5"
    reasons = sorted(i[FAILURE_REASON]["Value"][0] for i in items(response, FAILED))
    assert reasons == sorted([int(Status.OUT_OF_RESOURCES)] * 2 + [int(Status.CANNOT_UNDERSTAND)])


def test_a_body_that_breaks_off_answers_for_the_parts_before_it_and_completes_nothing(
    ingest_service: RunningIngest, instance_stored_tap: EventTap
) -> None:
    study = pydicom.uid.generate_uid()
    files = [make_dicom_bytes(StudyInstanceUID=study) for _ in range(3)]
    uids = [pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID for f in files]
    whole = multipart(files)
    cut = whole[: whole.index(files[2]) + 100]  # ends inside the third instance

    response = post(ingest_service, cut, headers={"X-Beeldportaal-Study-Complete": "true"})

    assert response.status_code == 202, response.text
    assert sorted(uid_of(i) for i in items(response, REFERENCED)) == sorted(uids[:2])
    [broken] = items(response, FAILED)
    assert broken[FAILURE_REASON]["Value"][0] == int(Status.CANNOT_UNDERSTAND)
    events = instance_stored_tap.read(lambda e: e.study_instance_uid == study, expect=2, settle=2)
    stored = [e for e in events if isinstance(e, InstanceStored)]
    assert sorted(e.instance.sop_instance_uid for e in stored) == sorted(uids[:2])
    # The request said it completes the study, but it did not arrive whole: nothing says so.
    assert not any(isinstance(e, CompletingRequestStored) for e in events)
    assert not any(e.completes_study for e in stored)


def test_no_bsn_reaches_the_bus_from_the_headers_texts_the_note_or_the_uids(
    ingest_service: RunningIngest, instance_stored_tap: EventTap, bucket: S3Settings
) -> None:
    bsn, other = "999990019", "999991772"
    # Texts a sender's PACS filled carelessly: the patient's BSN, another one typed in groups.
    data = make_dicom_bytes(
        patient=bsn_item(bsn),
        AccessionNumber=f"A{bsn}",
        StudyDescription=f"CT thorax pat {bsn}",
        SeriesDescription="BSN 9999.91.772",
        InstitutionName=f"Ziekenhuis {other}",
    )
    uid = pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
    response = post(ingest_service, multipart([data]))
    assert response.status_code == 200, response.text
    [event] = instance_stored_tap.read(for_sops([uid]), expect=1)
    assert event.patient.bsn_status is BsnStatus.VERIFIED
    assert event.accession_number == "A[BSN]"
    assert event.study_description == "CT thorax pat [BSN]"
    assert event.series_description == "BSN [BSN]"
    assert event.institution_name == "Ziekenhuis [BSN]"
    value = event.model_dump_json()
    assert bsn not in value and other not in value and "9999.91.772" not in value
    # The bytes are the medical record: stored as sent.
    assert bsn.encode() in stored_bytes(bucket, event.instance.object_key)

    # A note with a BSN is refused, before anything is stored.
    noted = make_dicom_bytes(patient=bsn_item(bsn))
    refused = post(
        ingest_service,
        multipart([noted]),
        headers={
            "X-Beeldportaal-Note": urllib.parse.quote(f"spoed, BSN {bsn[:4]}.{bsn[4:6]}.{bsn[6:]}")
        },
    )
    assert refused.status_code == 400
    assert "looks like a BSN" in refused.text and bsn not in refused.text

    # UIDs built from the patient's BSN: not stored, as the key, the events and the URLs would
    # carry it; the response names none of its UIDs.
    built = make_dicom_bytes(patient=bsn_item(bsn), StudyInstanceUID=f"1.2.826.0.1.3680043.{bsn}.1")
    answer = post(ingest_service, multipart([built]))
    assert answer.status_code == 409, answer.text
    [failed] = items(answer, FAILED)
    assert failed[FAILURE_REASON]["Value"] == [Status.DATASET_DOES_NOT_MATCH_SOP_CLASS]
    assert bsn not in answer.text
    noted_uid = pydicom.dcmread(io.BytesIO(noted)).SOPInstanceUID
    built_uid = pydicom.dcmread(io.BytesIO(built)).SOPInstanceUID
    assert instance_stored_tap.read(for_sops([noted_uid, built_uid]), expect=0, settle=2.0) == []


def test_a_completing_request_is_followed_by_its_end_per_study_after_its_instances(
    ingest_service: RunningIngest, instance_stored_tap: EventTap
) -> None:
    studies = [pydicom.uid.generate_uid() for _ in range(2)]
    parts = [make_dicom_bytes(StudyInstanceUID=studies[i % 2]) for i in range(5)]
    sops = [pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID for p in parts]
    plain = make_dicom_bytes()
    response = post(
        ingest_service, multipart(parts), headers={"X-Beeldportaal-Study-Complete": "true"}
    )
    assert response.status_code == 200
    assert post(ingest_service, multipart([plain])).status_code == 200  # not completing

    wanted = {*studies, pydicom.dcmread(io.BytesIO(plain)).StudyInstanceUID}
    events = instance_stored_tap.read(
        lambda e: e.study_instance_uid in wanted, expect=len(parts) + 1 + 2
    )
    ends = [e for e in events if isinstance(e, CompletingRequestStored)]
    assert sorted((e.study_instance_uid, e.instances) for e in ends) == sorted(
        [(studies[0], 3), (studies[1], 2)]
    )
    for end in ends:
        assert end.sender_ura == SENDER_URA and end.recipient_ura == RECIPIENT_URA
        assert end.correlation_id == response.headers["X-Correlation-ID"]
        # After every instance of its study in the partition: the tap reads partitions in order.
        of_study = [e for e in events if e.study_instance_uid == end.study_instance_uid]
        assert of_study[-1] is end
    stored = {e.instance.sop_instance_uid for e in events if isinstance(e, InstanceStored)}
    assert set(sops) <= stored


def test_a_part_that_is_not_dicom_fails_alone_while_its_siblings_are_stored(
    ingest_service: RunningIngest,
) -> None:
    good = make_dicom_bytes()
    body = (
        multipart([good]).replace(f"\r\n--{BOUNDARY}--\r\n".encode(), b"")
        + (
            f"\r\n--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nhello"
            f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nnot dicom at all"
            f"\r\n--{BOUNDARY}--\r\n"
        ).encode()
    )
    response = post(ingest_service, body)
    assert response.status_code == 202
    assert len(items(response, REFERENCED)) == 1
    reasons = sorted(i[FAILURE_REASON]["Value"][0] for i in items(response, FAILED))
    assert reasons == [int(Status.CANNOT_UNDERSTAND)] * 2


def test_when_s3_stops_mid_request_the_rest_fail_with_a700_and_are_not_announced(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    instance_stored_tap: EventTap,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A private S3 server for this test alone, so it can be stopped halfway through a request.
    monkeypatch.setenv("BEELDPORTAAL_LOCAL_STATE_DIR", str(tmp_path / "s3state"))
    monkeypatch.setenv("BEELDPORTAAL_LOCAL_S3_PORT", str(free_port()))
    s3 = S3Server(LocalConfig.from_env())
    s3.start()
    env = s3.config.client_env()
    settings = S3Settings(
        endpoint=env["BEELDPORTAAL_S3_ENDPOINT"],
        access_key=env["BEELDPORTAAL_S3_ACCESS_KEY"],
        secret_key=env["BEELDPORTAAL_S3_SECRET_KEY"],
        bucket=f"test-{uuid.uuid4().hex[:12]}",
    )
    service = start_ingest(kafka_settings, settings, tmp_path)
    try:
        files = [make_dicom_bytes() for _ in range(4)]
        uids = [pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID for f in files]

        def body() -> Iterator[bytes]:
            yield f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            yield files[0]
            yield f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            deadline = time.monotonic() + 20  # the first instance is stored and announced ...
            while not instance_stored_tap.read(for_sops(uids[:1]), expect=1, settle=0):
                assert time.monotonic() < deadline, "the first instance was never announced"
            s3.stop()  # ... then object storage goes away
            yield files[1]
            for data in files[2:]:
                yield f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                yield data
            yield f"\r\n--{BOUNDARY}--\r\n".encode()

        response = post(service, body())
        assert response.status_code == 202, response.text
        assert [uid_of(i) for i in items(response, REFERENCED)] == uids[:1]
        failed = items(response, FAILED)
        assert sorted(uid_of(i) for i in failed) == sorted(uids[1:])
        assert {i[FAILURE_REASON]["Value"][0] for i in failed} == {int(Status.OUT_OF_RESOURCES)}
        announced = instance_stored_tap.read(for_sops(uids), expect=1, settle=2.0)
        assert [e.instance.sop_instance_uid for e in announced] == uids[:1]
    finally:
        service.stop()
        s3.stop()


def test_readiness_reports_kafka_and_s3_and_metrics_count_what_came_in(
    ingest_service: RunningIngest,
) -> None:
    ready = requests.get(f"{ingest_service.base_url}/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"kafka": True, "s3": True}
    assert requests.get(f"{ingest_service.base_url}/healthz", timeout=10).status_code == 200
    post(ingest_service, multipart([make_dicom_bytes(), b"garbage"]))
    metrics = requests.get(f"{ingest_service.base_url}/metrics", timeout=10).text
    assert (
        'beeldportaal_ingest_instances_received_total{channel="stow-rs",outcome="stored"} 1.0'
        in (metrics)
    )
    assert 'beeldportaal_ingest_instances_rejected_total{channel="stow-rs",status="C000"} 1.0' in (
        metrics
    )
    # Requests refused before any instance are counted by their status too.
    body = multipart([make_dicom_bytes()])
    assert post(ingest_service, body, headers={"Authorization": ""}).status_code == 401
    assert post(ingest_service, body, url=ingest_service.stow_url("99999999")).status_code == 404
    assert post(
        ingest_service, body, headers={"Content-Type": "application/dicom"}
    ).status_code == (415)
    metrics = requests.get(f"{ingest_service.base_url}/metrics", timeout=10).text
    for status in ("202", "401", "404", "415"):
        assert f'beeldportaal_ingest_requests_total{{status="{status}"}} 1.0' in metrics, status
    assert 'beeldportaal_ingest_request_duration_seconds_count{channel="stow-rs"} 3.0' in metrics
    assert json.loads(requests.get(f"{ingest_service.base_url}/openapi.json", timeout=10).text)[
        "paths"
    ]


def test_the_same_data_set_wrapped_in_another_file_meta_is_the_same_instance(
    ingest_service: RunningIngest, instance_stored_tap: EventTap, bucket: S3Settings
) -> None:
    uids = {
        "SOPInstanceUID": pydicom.uid.generate_uid(),
        "StudyInstanceUID": pydicom.uid.generate_uid(),
        "SeriesInstanceUID": pydicom.uid.generate_uid(),
    }
    first = make_dicom_bytes(**uids)
    rewrapped = make_dicom_bytes(file_meta={"ImplementationVersionName": "OTHER_TOOLKIT"}, **uids)
    assert first != rewrapped
    assert post(ingest_service, multipart([first])).status_code == 200
    again = post(ingest_service, multipart([rewrapped]))
    assert again.status_code == 200, again.text
    [event] = instance_stored_tap.read(for_sops([uids["SOPInstanceUID"]]), expect=1, settle=2.0)
    assert stored_bytes(bucket, event.instance.object_key) == first  # the first copy is kept
    assert event.instance.sha256 == hashlib.sha256(first).hexdigest()
