"""The timeline API against the real Kafka, PostgreSQL and S3: who may search, what every
attempt leaves in the NEN 7513 audit trail, the patient's access log, DICOMweb byte for byte
through dicomweb-client, hostile input, and a fuzz.

The read model is the PostgreSQL projection (PostgresTimeline), in the same database as the
access log as in production: each test gets a copy of a database migrated once per module, and
its studies go in as the events ingest and consent send (``tests.timeline_seed``), so the
projection's own visibility rules decide what the API may show."""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import pytest
import requests
import schemathesis
import uvicorn
from aiokafka import AIOKafkaProducer
from dicomweb_client import DICOMwebClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from minio import Minio
from pydicom.uid import BasicTextSRStorage, CTImageStorage
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from services.consent.adapters.registry_view import RegistryTopics
from services.timeline.adapters.store import PostgresTimeline
from services.timeline.bootstrap import TimelineApi, build
from services.timeline.config import TimelineSettings
from services.timeline.domain.ports import InstanceRow, SeriesRow
from services.timeline.entrypoints.http import create_app
from shared import migrations, topics
from shared.auth import AuthSettings, generate_dev_keypair, mint_token
from shared.events import AccessLogged, Event, Provision
from shared.http import http_server
from shared.identifiers import BSN_SYSTEM, Bsn, Pseudonymizer
from shared.kafka import KafkaEventPublisher
from shared.settings import KafkaSettings, PostgresSettings, PrivacySettings, S3Settings
from shared.storage.s3 import S3ObjectStore
from shared.topics import TopicSpec
from tests.contracts.timeline_reader import Report, Sender, Study
from tests.dicom_samples import bsn_item, make_dicom_bytes
from tests.factories import (
    PSEUDONYM_KEY,
    TEST_BSN,
    make_consent_registered,
    make_provider,
    make_treatment_relationship_registered,
)
from tests.fakes.timeline import make_instance_row, make_series_row, new_uid
from tests.integration.conftest import SERVICE_ROLE, as_role, temporary_database
from tests.integration.ingest.conftest import free_port
from tests.kafka_tap import EventTap
from tests.timeline_seed import ProjectedTimeline

pytestmark = pytest.mark.integration

HOSPITAL = "11111111"  # V4 (hospital): treats the patients below
OTHER_HOSPITAL = "22222222"  # V4, no relationship with anyone
GP_PRACTICE = "44444444"  # Z3: no Mitz category for the timeline
PORTAL = "00000002"  # the patient portal (patient-representative)
UZI = "900000001"
PHYSICIAN = "900000002"  # the professional an assistant acts for (on-behalf-of)
HOSPITALS = "RPZAC104"
# Published test BSNs (11-proof): one patient with consent, one without, one who objected.
CONSENTING_BSN = TEST_BSN
SILENT_BSN = "999991772"
OBJECTING_BSN = "999999990"
_pseudonyms = Pseudonymizer(PSEUDONYM_KEY)


def pseudonym(bsn: str) -> str:
    return _pseudonyms.pseudonym(Bsn(bsn))


@dataclass(frozen=True)
class Topics:
    registry: RegistryTopics
    directory: str
    audit: str


@pytest.fixture
async def timeline_topics(declare_topics: Callable[..., Awaitable[None]], tag: str) -> Topics:
    registry = RegistryTopics(
        f"test-consent-registered-{tag}",
        f"test-consent-revoked-{tag}",
        f"test-treatment-relationships-{tag}",
    )
    named = Topics(registry, f"test-provider-directory-{tag}", f"test-access-logged-{tag}")
    await declare_topics(
        *(TopicSpec(name, 3, topics.DAY_MS) for name in registry.names),
        TopicSpec(named.directory, 1, topics.FOREVER, compacted=True),
        TopicSpec(named.audit, 3, topics.DAY_MS),
    )
    return named


@pytest.fixture
def bucket(s3_settings: S3Settings) -> Iterator[S3Settings]:
    """A bucket of its own for one test, emptied and removed afterwards."""
    settings = s3_settings.model_copy(update={"bucket": f"test-{uuid.uuid4().hex[:16]}"})
    S3ObjectStore.from_settings(settings).ensure_bucket()
    yield settings
    client = Minio(
        settings.endpoint,
        access_key=settings.access_key,
        secret_key=settings.secret_key.get_secret_value(),
        region=settings.region,
        secure=False,
    )
    for obj in client.list_objects(settings.bucket, recursive=True):
        client.remove_object(settings.bucket, obj.object_name)
    client.remove_bucket(settings.bucket)


@pytest.fixture(scope="module")
def migrated_database(postgres_settings: PostgresSettings) -> Iterator[str]:
    """This module's database with every migration applied (the timeline's read model and
    access log among them), dropped after the module; its name, a template for each test's."""
    with temporary_database(postgres_settings.conninfo) as dsn:
        migrations.migrate(dsn, grant_to=SERVICE_ROLE)
        yield dsn.rpartition("/")[2]


@pytest.fixture
def timeline_database(postgres_settings: PostgresSettings, migrated_database: str) -> Iterator[str]:
    """A copy of the migrated database for one test, dropped afterwards; yields its DSN.

    A copy, not the module's database emptied: the access log is append-only (a trigger refuses
    DELETE and TRUNCATE), and every test counts the audit records of its own requests.
    """
    with temporary_database(postgres_settings.conninfo, template=migrated_database) as dsn:
        yield dsn


@dataclass
class StoredStudy:
    uid: str
    series: list[SeriesRow]
    instances: list[InstanceRow]
    contents: dict[str, bytes]  # SOP Instance UID -> the exact bytes in S3


@dataclass
class RunningTimeline:
    api: TimelineApi
    base_url: str
    key_path: Path
    reader: PostgresTimeline  # the API's
    topics: Topics
    kafka: KafkaSettings
    dsn: str
    bucket: S3Settings
    server: uvicorn.Server
    thread: threading.Thread
    store: S3ObjectStore = field(init=False)

    def __post_init__(self) -> None:
        self.store = S3ObjectStore.from_settings(self.bucket)

    def token(
        self,
        ura: str = HOSPITAL,
        roles: Sequence[str] = ("provider",),
        purpose: str | None = "TREAT",
        uzi: str | None = UZI,
        on_behalf_of: str | None = None,
        represents: Sequence[str] = (),
    ) -> str:
        return mint_token(
            self.key_path,
            ura=ura,
            uzi=uzi,
            roles=roles,
            purpose=purpose,
            on_behalf_of=on_behalf_of,
            represents=represents,
        )

    def auth(self, ura: str = HOSPITAL, **kw: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(ura, **kw)}"}

    def search(
        self,
        pairs: Sequence[tuple[str, str]],
        headers: dict[str, str] | None = None,
        *,
        url: str = "/fhir/ImagingStudy/_search",
    ) -> requests.Response:
        return requests.post(
            f"{self.base_url}{url}",
            data=list(pairs),
            headers=self.auth() if headers is None else headers,
            timeout=30,
        )

    def get(self, path: str, headers: dict[str, str] | None = None) -> requests.Response:
        url = path if path.startswith("http") else f"{self.base_url}{path}"
        return requests.get(url, headers=self.auth() if headers is None else headers, timeout=30)

    def dicomweb(self, headers: dict[str, str] | None = None) -> DICOMwebClient:
        return DICOMwebClient(
            url=f"{self.base_url}/dicomweb", headers=self.auth() if headers is None else headers
        )

    def publish(self, *items: tuple[str, Event]) -> None:
        async def send() -> None:
            async with KafkaEventPublisher(self.kafka, "timeline-api-test") as publisher:
                for topic, event in items:
                    await publisher.publish(event, topic)

        asyncio.run(send())

    def list_provider(self, ura: str, type_code: str) -> None:
        async def send() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=self.kafka.bootstrap_list)
            await producer.start()
            try:
                value = make_provider(ura, type_code=type_code).to_record().encode()
                await producer.send_and_wait(self.topics.directory, value, key=ura.encode())
            finally:
                await producer.stop()

        asyncio.run(send())

    def treats(self, bsn: str, ura: str = HOSPITAL) -> None:
        self.publish(
            (
                self.topics.registry.treatment_relationships,
                make_treatment_relationship_registered(
                    patient=pseudonym(bsn),
                    organisation_ura=ura,
                    start=date(2020, 1, 1),
                    relationship_id=f"r-{ura}-{uuid.uuid4().hex[:8]}",
                ),
            )
        )

    def consents(self, bsn: str, provision: Provision = Provision.PERMIT) -> None:
        self.publish(
            (
                self.topics.registry.consent_registered,
                make_consent_registered(
                    patient=pseudonym(bsn),
                    provision=provision,
                    provider_category=HOSPITALS,
                    period_start=date(2020, 1, 1),
                ),
            )
        )

    def seed(self, *studies: Study) -> None:
        """Apply the events ingest and consent send about ``studies`` to the read model, as the
        projection would."""

        async def apply() -> None:
            async with PostgresTimeline(self.dsn, pool_size=1, name="timeline-seed") as store:
                await ProjectedTimeline(store).seed(*studies)

        asyncio.run(apply())

    def put_study(
        self,
        bsn: str,
        *,
        study_date: date = date(2024, 3, 1),
        series: int = 2,
        per_series: int = 2,
        reports: int = 0,
        corrupt: bool = False,
        revoked: bool = False,
        description: str = "CT thorax",
        sender: Sender | None = None,
    ) -> StoredStudy:
        """Real DICOM instances in S3, ``series`` CT series of ``per_series`` and then one SR
        series of ``reports``, and the study on the patient's timeline (see ``on_timeline``)."""
        uid = new_uid()
        rows: list[SeriesRow] = []
        instances: list[InstanceRow] = []
        contents: dict[str, bytes] = {}
        layout = [(CTImageStorage, per_series)] * series
        if reports:
            layout.append((BasicTextSRStorage, reports))
        for number, (sop_class, count) in enumerate(layout, start=1):
            series_uid = new_uid()
            rows.append(
                make_series_row(
                    uid,
                    series_instance_uid=series_uid,
                    modality="SR" if sop_class == BasicTextSRStorage else "CT",
                    series_number=number,
                    number_of_instances=count,
                )
            )
            for _ in range(count):
                sop = new_uid()
                data = make_dicom_bytes(
                    sop_class_uid=sop_class,
                    StudyInstanceUID=uid,
                    SeriesInstanceUID=series_uid,
                    SOPInstanceUID=sop,
                    SeriesNumber=number,
                    patient=bsn_item(bsn),
                )
                row = make_instance_row(
                    uid, series_uid, sop_instance_uid=sop, data=data, sop_class_uid=sop_class
                )
                self.store.put(row.object_key, data)
                if corrupt:
                    # The store's bytes no longer hash to what ingest recorded.
                    flipped = data[:-1] + bytes([data[-1] ^ 0xFF])
                    row = make_instance_row(
                        uid, series_uid, sop_instance_uid=sop, data=data, sop_class_uid=sop_class,
                        sha256=hashlib.sha256(flipped).hexdigest(),
                    )  # fmt: skip
                instances.append(row)
                contents[sop] = data
        self.seed(
            on_timeline(
                bsn,
                uid,
                rows,
                instances,
                study_date=study_date,
                description=description,
                sender=sender,
                revoked=revoked,
            )
        )
        return StoredStudy(uid, rows, instances, contents)

    def audit_rows(self) -> list[dict[str, Any]]:
        with (
            psycopg.connect(self.dsn, autocommit=True) as conn,
            conn.cursor(row_factory=psycopg.rows.dict_row) as cursor,
        ):
            cursor.execute("SELECT * FROM access_log ORDER BY occurred_at, event_id")
            return list(cursor.fetchall())

    def audit_tap(self) -> EventTap:
        return EventTap(self.kafka, self.topics.audit)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def on_timeline(
    bsn: str,
    uid: str,
    series: Sequence[SeriesRow],
    instances: Sequence[InstanceRow],
    *,
    study_date: date = date(2024, 3, 1),
    description: str = "CT thorax",
    sender: Sender | None = None,
    revoked: bool = False,
) -> Study:
    """The study as ``sender`` (Testziekenhuis) sent it, its SR instances its reports, permitted
    for the patient's timeline by consent; ``revoked``: that consent was revoked since."""
    return Study(
        patient=pseudonym(bsn),
        uid=uid,
        study_date=study_date,
        study_time="092653",
        description=description,
        accession="ACC0001",
        senders=(sender or Sender(),),
        series=tuple(series),
        instances=tuple(instances),
        reports=tuple(
            Report(i.sop_instance_uid, i.series_instance_uid)
            for i in instances
            if i.sop_class_uid == BasicTextSRStorage
        ),
        permitted=True,
        revoked=revoked,
    )


@pytest.fixture
def timeline_api(
    kafka_settings: KafkaSettings,
    timeline_topics: Topics,
    bucket: S3Settings,
    timeline_database: str,
    tmp_path: Path,
) -> Iterator[RunningTimeline]:
    private, public = generate_dev_keypair(tmp_path / "keys")
    port = free_port()
    settings = TimelineSettings(
        kafka=kafka_settings,
        s3=bucket,
        # The API as production runs it: a role that owns nothing (the tests seed as the owner).
        postgres=PostgresSettings(dsn=as_role(timeline_database, SERVICE_ROLE)),
        http_port=port,
        public_base_url=f"http://127.0.0.1:{port}",
        view_sync_timeout_seconds=15,
        pool_size=4,
    )
    # As services/timeline/main.py builds it; started and stopped with the app.
    reader = PostgresTimeline(settings.postgres.conninfo, pool_size=settings.pool_size)
    api = build(
        settings,
        reader=reader,
        privacy=PrivacySettings(pseudonym_key=PSEUDONYM_KEY.decode()),  # type: ignore[arg-type]
        auth=AuthSettings(public_keys=[public]),  # type: ignore[call-arg]
        registry_topics=timeline_topics.registry,
        directory_topic=timeline_topics.directory,
        audit_topic=timeline_topics.audit,
    )
    server = http_server(create_app(api), "127.0.0.1", port)
    thread = threading.Thread(target=server.run, name="timeline-api-under-test", daemon=True)
    thread.start()
    running = RunningTimeline(
        api,
        f"http://127.0.0.1:{port}",
        private,
        reader,
        timeline_topics,
        kafka_settings,
        timeline_database,
        bucket,
        server,
        thread,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert thread.is_alive(), "the timeline API stopped while starting (see its log)"
            assert time.monotonic() < deadline, "the timeline API did not become ready in 90 s"
            if server.started:
                try:
                    if requests.get(f"{running.base_url}/readyz", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
            time.sleep(0.05)
        for ura, type_code in ((HOSPITAL, "V4"), (OTHER_HOSPITAL, "V4"), (GP_PRACTICE, "Z3")):
            running.list_provider(ura, type_code)
        yield running
    finally:
        running.stop()


def patient_form(bsn: str, *more: tuple[str, str]) -> list[tuple[str, str]]:
    return [("patient.identifier", f"{BSN_SYSTEM}|{bsn}"), *more]


def assert_no_bsn(response: requests.Response, *bsns: str) -> None:
    """No BSN in the URL, the headers or (for FHIR answers) the body."""
    for bsn in bsns or (CONSENTING_BSN, SILENT_BSN, OBJECTING_BSN):
        assert bsn not in response.url
        assert all(bsn not in f"{k}: {v}" for k, v in response.headers.items())
        assert bsn not in response.text


def outcome_of(response: requests.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    OperationOutcome.model_validate(body)
    return body["issue"][0]


def conditions_of(response: requests.Response) -> list[str]:
    issue = outcome_of(response)
    return [c["code"] for c in issue.get("details", {}).get("coding", [])]


# --- the timeline search --------------------------------------------------------------------------


def test_a_treating_provider_with_consent_sees_the_timeline_newest_first_and_it_is_audited(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    old = t.put_study(CONSENTING_BSN, study_date=date(2023, 5, 1), description="CT thorax 2023")
    # Four images and a report (an SR instance of the study: its own entry, after the images).
    new = t.put_study(
        CONSENTING_BSN, study_date=date(2024, 9, 1), description="CT thorax 2024", reports=1
    )
    tap = t.audit_tap()

    # An assistant acting for a physician (who is named as on-behalf-of in the audit record).
    answer = t.search(patient_form(CONSENTING_BSN), t.auth(on_behalf_of=PHYSICIAN))

    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    assert answer.headers["cache-control"] == "no-store"
    bundle = answer.json()
    Bundle.model_validate(bundle)
    assert bundle["total"] == 3
    kinds = [
        (e["resource"]["resourceType"], e["resource"].get("description")) for e in bundle["entry"]
    ]
    assert kinds == [
        ("ImagingStudy", "CT thorax 2024"),
        ("DocumentReference", "CT thorax 2024"),
        ("ImagingStudy", "CT thorax 2023"),
    ]
    report = bundle["entry"][1]["resource"]
    assert {"reference": f"ImagingStudy/{new.uid}"} in report["context"]["related"]
    study = bundle["entry"][0]["resource"]
    assert study["id"] == new.uid and study["numberOfInstances"] == 5  # the report's too
    assert study["contained"][0]["address"] == f"{t.base_url}/dicomweb"
    assert_no_bsn(answer)
    assert pseudonym(CONSENTING_BSN) not in answer.text

    # Audited before the answer: in PostgreSQL and on Kafka, the same record.
    [row] = t.audit_rows()
    assert (row["event_type"], row["action"], row["outcome"]) == (
        "timeline-search", "query", "allowed",
    )  # fmt: skip
    assert row["patient_pseudonym"] == pseudonym(CONSENTING_BSN)
    assert (row["organisation_ura"], row["user_uzi"], row["user_role"]) == (
        HOSPITAL,
        UZI,
        "provider",
    )
    assert row["on_behalf_of_uzi"] == PHYSICIAN
    assert row["authorisation_basis"] == "treatment-relationship"
    assert row["consent_profile"].startswith(f"GGC002/{HOSPITALS}:consent-")
    assert row["emergency"] is False
    assert sorted(row["study_instance_uids"]) == sorted([new.uid, old.uid])
    assert row["access_point"].startswith("POST /fhir/ImagingStudy/_search from 127.0.0.1")
    [event] = tap.read(lambda e: isinstance(e, AccessLogged), expect=1)
    assert isinstance(event, AccessLogged)
    assert event.event_id == row["event_id"] and event.outcome.value == "allowed"
    assert event.on_behalf_of_uzi == PHYSICIAN
    assert TEST_BSN not in event.model_dump_json()


def test_the_next_link_pages_without_a_bsn_and_only_for_whoever_searched(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    for year in (2021, 2022, 2023):
        t.put_study(CONSENTING_BSN, study_date=date(year, 1, 1), series=1, per_series=1)

    first = t.search(patient_form(CONSENTING_BSN, ("_count", "2"), ("modality", "CT")))

    assert first.status_code == 200, first.text
    links = {link["relation"]: link["url"] for link in first.json()["link"]}
    assert set(links) == {"self", "next"}
    assert all(CONSENTING_BSN not in url and "psn1-" not in url for url in links.values())
    # A study arriving before the link is followed does not shift the next page: by place,
    # it would show 2022 again.
    t.put_study(CONSENTING_BSN, study_date=date(2024, 1, 1), series=1, per_series=1)
    second = t.get(links["next"])
    assert second.status_code == 200, second.text
    page = second.json()
    assert page["total"] == 4 and len(page["entry"]) == 1
    assert page["entry"][0]["resource"]["started"].startswith("2021-01-01")
    assert {link["relation"] for link in page["link"]} == {"self", "previous"}
    # Another organisation (or user) holding the link gets nothing.
    stolen = t.get(links["next"], t.auth(OTHER_HOSPITAL))
    assert stolen.status_code == 400
    assert "someone else's" in outcome_of(stolen)["diagnostics"]
    other_user = t.get(links["next"], t.auth(uzi="900000013"))
    assert other_user.status_code == 400
    # Each page is an access of its own: two allowed searches audited; each use of the link
    # by someone else too, denied, naming no patient (the link does not open for them).
    rows = t.audit_rows()
    assert [r["outcome"] for r in rows] == ["allowed", "allowed", "denied", "denied"]
    assert [(r["organisation_ura"], r["patient_pseudonym"]) for r in rows[2:]] == [
        (OTHER_HOSPITAL, None),
        (HOSPITAL, None),
    ]
    assert all("someone else's" in r["reason"] for r in rows[2:])


def test_filters_reach_the_reader(timeline_api: RunningTimeline) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    # The range's first and last day, the first day's study with a report as well ...
    first_day = t.put_study(
        CONSENTING_BSN, study_date=date(2024, 1, 1), series=1, per_series=1, reports=1
    )
    last_day = t.put_study(CONSENTING_BSN, study_date=date(2024, 12, 31), series=1, per_series=1)
    # ... and studies each left out by one filter alone: the dates, then the institution.
    for day in (date(2022, 6, 1), date(2023, 12, 31), date(2025, 1, 1)):
        t.put_study(CONSENTING_BSN, study_date=day, series=1, per_series=1)
    elsewhere = Sender("33333333", "Tweede Ziekenhuis")
    t.put_study(
        CONSENTING_BSN, study_date=date(2024, 6, 1), series=1, per_series=1, sender=elsewhere
    )

    answer = t.search(
        patient_form(
            CONSENTING_BSN,
            ("date", "ge2024-01-01"),
            ("date", "le2024-12-31"),
            ("institution", "testziekenhuis"),
            ("_type", "ImagingStudy"),
        )
    )

    assert answer.status_code == 200, answer.text
    # The reader searched from 2024-01-01 to 2024-12-31, at Testziekenhuis, images only.
    bundle = answer.json()
    assert bundle["total"] == 2
    assert [(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]] == [
        ("ImagingStudy", last_day.uid),
        ("ImagingStudy", first_day.uid),
    ]

    # After the last day or before the first there is: nothing, not an error.
    for edge in ("gt9999", "gt9999-12-31", "lt0001-01-01"):
        beyond = t.search(patient_form(CONSENTING_BSN, ("date", edge)))
        assert beyond.status_code == 200, beyond.text
        assert beyond.json()["total"] == 0


def test_a_requester_not_treating_the_patient_learns_nothing_of_their_consent(
    timeline_api: RunningTimeline,
) -> None:
    """Whether the patient objected, or never consented, is theirs: an organisation without
    a treatment relationship is told only that; the audit record holds the whole answer."""
    t = timeline_api
    t.consents(OBJECTING_BSN, Provision.DENY)
    t.put_study(OBJECTING_BSN, series=1, per_series=1)

    refused = t.search(patient_form(OBJECTING_BSN))

    assert refused.status_code == 403
    assert conditions_of(refused) == ["treatment-relationship"]
    diagnostics = outcome_of(refused)["diagnostics"]
    assert "no active treatment relationship" in diagnostics
    assert "object" not in refused.text and "consent" not in diagnostics
    [row] = t.audit_rows()
    assert "no active treatment relationship" in row["reason"] and "objected" in row["reason"]


@pytest.mark.parametrize(
    ("bsn", "setup", "conditions", "words"),
    [
        (SILENT_BSN, ("treats",), ["consent"], "no explicit consent of the patient covers"),
        (CONSENTING_BSN, ("consents",), ["treatment-relationship"], "no active treatment"),
        (OBJECTING_BSN, ("treats", "objects"), ["objection"], "objected"),
    ],
)
def test_a_refused_search_answers_403_naming_the_condition_and_is_audited(
    timeline_api: RunningTimeline,
    bsn: str,
    setup: tuple[str, ...],
    conditions: list[str],
    words: str,
) -> None:
    t = timeline_api
    if "treats" in setup:
        t.treats(bsn)
    if "consents" in setup:
        t.consents(bsn)
    if "objects" in setup:
        t.consents(bsn, Provision.DENY)
    study = t.put_study(bsn, series=1, per_series=1)
    tap = t.audit_tap()

    refused = t.search(patient_form(bsn))

    assert refused.status_code == 403
    issue = outcome_of(refused)
    assert issue["code"] == "forbidden" and words in issue["diagnostics"]
    assert conditions_of(refused) == conditions
    assert study.uid not in refused.text
    assert_no_bsn(refused)
    [row] = t.audit_rows()
    assert (row["event_type"], row["outcome"], row["patient_pseudonym"]) == (
        "timeline-search", "denied", pseudonym(bsn),
    )  # fmt: skip
    assert words in row["reason"] and row["study_instance_uids"] == []
    [event] = tap.read(lambda e: isinstance(e, AccessLogged), expect=1)
    assert isinstance(event, AccessLogged) and event.outcome.value == "denied"


def test_an_unknown_provider_type_and_a_missing_role_are_refused_and_audited(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN, GP_PRACTICE)
    t.consents(CONSENTING_BSN)

    gp = t.search(patient_form(CONSENTING_BSN), t.auth(GP_PRACTICE))
    operator = t.search(patient_form(CONSENTING_BSN), t.auth(roles=("operator",)))

    assert gp.status_code == operator.status_code == 403
    assert conditions_of(gp) == ["requester-type"]
    assert "unknown requester type" in outcome_of(gp)["diagnostics"]
    assert conditions_of(operator) == ["role"]
    assert [(r["organisation_ura"], r["outcome"]) for r in t.audit_rows()] == [
        (GP_PRACTICE, "denied"),
        (HOSPITAL, "denied"),
    ]


def test_a_token_for_another_purpose_or_naming_no_person_sees_nothing_and_is_audited(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    study = t.put_study(CONSENTING_BSN, series=1, per_series=1)

    research = t.search(patient_form(CONSENTING_BSN), t.auth(purpose="HRESCH"))
    no_purpose = t.search(patient_form(CONSENTING_BSN), t.auth(purpose=None))
    no_person = t.search(patient_form(CONSENTING_BSN), t.auth(uzi=None))
    wado = t.get(f"/dicomweb/studies/{study.uid}", t.auth(purpose="HMARKT"))
    treatment = t.search(patient_form(CONSENTING_BSN))

    for refused in (research, no_purpose, no_person, wado):
        assert refused.status_code == 403, refused.text
    assert conditions_of(research) == conditions_of(no_purpose) == ["purpose-of-use"]
    assert "treatment only" in outcome_of(research)["diagnostics"]
    assert conditions_of(no_person) == ["user-identity"]
    assert treatment.status_code == 200
    # Every attempt is audited with the purpose its token stated.
    rows = t.audit_rows()
    assert [(r["outcome"], r["purpose_of_use"], r["user_uzi"] is None) for r in rows] == [
        ("denied", "HRESCH", False),
        ("denied", None, False),
        ("denied", "TREAT", True),
        ("denied", "HMARKT", False),
        ("allowed", "TREAT", False),
    ]


def test_break_the_glass_with_a_reason_opens_the_timeline_flagged_and_without_is_refused(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    study = t.put_study(SILENT_BSN, series=1, per_series=1)  # no consent, no relationship
    emergency = t.auth(OTHER_HOSPITAL, purpose="ETREAT")

    glass = t.search(
        patient_form(SILENT_BSN),
        {
            **emergency,
            # As typed, and as ID documents print it (1234.56.782).
            "X-Break-The-Glass": f"unconscious at the ED, BSN {SILENT_BSN}, card "
            f"{SILENT_BSN[:4]}.{SILENT_BSN[4:6]}.{SILENT_BSN[6:]}",
        },
    )
    no_reason = t.search(patient_form(SILENT_BSN), emergency)
    header_only = t.search(
        patient_form(SILENT_BSN), {**t.auth(OTHER_HOSPITAL), "X-Break-The-Glass": "curious"}
    )

    assert glass.status_code == 200, glass.text
    assert [e["resource"]["id"] for e in glass.json()["entry"]] == [study.uid]
    assert no_reason.status_code == 403
    assert conditions_of(no_reason) == ["emergency-reason"]
    assert "needs a stated reason" in outcome_of(no_reason)["diagnostics"]
    assert header_only.status_code == 403
    assert "ETREAT" in outcome_of(header_only)["diagnostics"]
    rows = t.audit_rows()
    assert [(r["outcome"], r["emergency"]) for r in rows] == [
        ("emergency", True),
        ("denied", False),
        ("denied", False),
    ]
    # The stated reason is kept, a BSN typed into it masked.
    assert rows[0]["reason"] == "unconscious at the ED, BSN [BSN], card [BSN]"
    assert rows[0]["authorisation_basis"] == "emergency"
    assert "normal rules denied" in rows[0]["consent_profile"]
    assert rows[0]["study_instance_uids"] == [study.uid]


def test_without_a_valid_token_the_answer_is_401_and_names_no_one(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    missing = t.search(patient_form(CONSENTING_BSN), {})
    forged = t.search(patient_form(CONSENTING_BSN), {"Authorization": "Bearer abc.def.ghi"})

    assert missing.status_code == forged.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert outcome_of(forged)["code"] == "login"
    assert_no_bsn(missing)
    assert t.audit_rows() == []


def test_no_access_without_its_audit_record(timeline_api: RunningTimeline) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    study = t.put_study(CONSENTING_BSN, series=1, per_series=1)
    with psycopg.connect(t.dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE access_log RENAME TO access_log_away")
    try:
        answer = t.search(patient_form(CONSENTING_BSN))
        wado = t.get(f"/dicomweb/studies/{study.uid}")
    finally:
        with psycopg.connect(t.dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE access_log_away RENAME TO access_log")

    assert answer.status_code == wado.status_code == 503
    assert answer.headers["retry-after"] == "5"
    assert "could not be audited" in outcome_of(answer)["diagnostics"]
    assert study.uid not in answer.text and study.uid not in wado.text
    assert 'beeldportaal_timeline_audit_records_total{result="failed"} 2.0' in (
        t.get("/metrics", {}).text
    )


def test_an_allowed_access_that_could_not_be_answered_is_audited_as_such(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    study = t.put_study(CONSENTING_BSN, series=1, per_series=1)
    other = t.put_study(CONSENTING_BSN, series=1, per_series=1)
    t.treats(SILENT_BSN)
    refused = t.put_study(SILENT_BSN, series=1, per_series=1)  # treated, but no consent

    # The read model is away (its search's table gone) when the search is allowed.
    with psycopg.connect(t.dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE timeline_entries RENAME TO timeline_entries_away")
    try:
        down = t.search(patient_form(CONSENTING_BSN))
    finally:
        with psycopg.connect(t.dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE timeline_entries_away RENAME TO timeline_entries")
    s3 = t.bucket
    Minio(
        s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key.get_secret_value(),
        region=s3.region, secure=False,
    ).remove_object(s3.bucket, other.instances[0].object_key)  # fmt: skip
    missing = t.get(f"/dicomweb/studies/{other.uid}")
    # One request for a study this requester may see and one it may not: refused as a whole,
    # and both patients' records say so, whatever the order.
    both = t.get(f"/dicomweb/studies?StudyInstanceUID={refused.uid},{study.uid}")

    assert down.status_code == 503
    assert missing.status_code == 404
    assert both.status_code == 403
    rows = [
        (r["patient_pseudonym"], r["outcome"], r["reason"], r["study_instance_uids"])
        for r in t.audit_rows()
    ]
    consenting, silent = pseudonym(CONSENTING_BSN), pseudonym(SILENT_BSN)
    assert rows[:2] == [
        (
            consenting,
            "denied",
            "allowed, not answered: the timeline read model is unavailable",
            [],
        ),
        (
            consenting,
            "denied",
            "allowed, not answered: the images of this study are not available",
            [other.uid],
        ),
    ]
    assert len(rows) == 4
    last = {patient: (outcome, reason, uids) for patient, outcome, reason, uids in rows[2:]}
    assert last[silent][0] == "denied" and last[silent][2] == [refused.uid]
    assert "no explicit consent" in last[silent][1]
    assert last[consenting] == (
        "denied",
        "allowed, not answered: the same request asked for a study refused to this requester",
        [study.uid],
    )


# --- the patient's access log ---------------------------------------------------------------------


def test_the_patients_representative_sees_who_accessed_their_data_and_that_is_audited(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    t.put_study(CONSENTING_BSN, series=1, per_series=1)
    assert t.search(patient_form(CONSENTING_BSN)).status_code == 200
    assert t.search(patient_form(CONSENTING_BSN), t.auth(OTHER_HOSPITAL)).status_code == 403
    assert t.search(patient_form(SILENT_BSN)).status_code == 403  # another patient
    portal = t.auth(
        PORTAL, roles=("patient-representative",), uzi=None, represents=(CONSENTING_BSN,)
    )
    # The portal's token for another patient (who may well represent somebody else).
    someone_else = t.auth(
        PORTAL, roles=("patient-representative",), uzi=None, represents=(SILENT_BSN,)
    )
    body = {"bsn": CONSENTING_BSN, "since": (datetime.now(UTC) - timedelta(hours=1)).isoformat()}

    answer = requests.post(
        f"{t.base_url}/access-log/_search", json=body, headers=portal, timeout=30
    )
    provider = requests.post(
        f"{t.base_url}/access-log/_search", json=body, headers=t.auth(), timeout=30
    )
    not_theirs = requests.post(
        f"{t.base_url}/access-log/_search", json=body, headers=someone_else, timeout=30
    )

    assert answer.status_code == 200, answer.text
    bundle = answer.json()
    Bundle.model_validate(bundle)
    events = [e["resource"] for e in bundle["entry"]]
    # Newest first: the refused search of the other hospital, then the allowed one.
    assert [e["agent"][1]["who"]["identifier"]["value"] for e in events] == [
        OTHER_HOSPITAL,
        HOSPITAL,
    ]
    assert [e["outcome"] for e in events] == ["4", "0"]
    assert events[1]["agent"][0]["who"]["identifier"]["value"] == UZI
    assert_no_bsn(answer)
    assert provider.status_code == 403 and conditions_of(provider) == ["role"]
    assert not_theirs.status_code == 403, not_theirs.text
    assert conditions_of(not_theirs) == ["represented-patient"]
    assert_no_bsn(not_theirs)
    rows = t.audit_rows()
    assert [(r["event_type"], r["organisation_ura"], r["outcome"]) for r in rows[-3:]] == [
        ("access-log-search", PORTAL, "allowed"),
        ("access-log-search", HOSPITAL, "denied"),
        ("access-log-search", PORTAL, "denied"),
    ]
    assert rows[-3]["patient_pseudonym"] == pseudonym(CONSENTING_BSN)
    # The refusal is on the record of the patient whose log was asked for.
    assert rows[-1]["patient_pseudonym"] == pseudonym(CONSENTING_BSN)
    assert "does not act for this patient" in rows[-1]["reason"]
    # A page shorter than the period: the total counts the period, not the page.
    one = requests.post(
        f"{t.base_url}/access-log/_search", json={**body, "limit": 1}, headers=portal, timeout=30
    ).json()
    assert (len(one["entry"]), one["total"]) == (1, 5)  # two timeline, three access-log searches
    # An invalid BSN is refused without being echoed.
    bad = requests.post(
        f"{t.base_url}/access-log/_search", json={"bsn": "123456789"}, headers=portal, timeout=30
    )
    assert bad.status_code == 400 and "123456789" not in bad.text


def test_an_access_log_search_allowed_but_not_answered_is_audited_as_such(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    portal = t.auth(
        PORTAL, roles=("patient-representative",), uzi=None, represents=(CONSENTING_BSN,)
    )

    async def unavailable(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError("the access log is away")

    search = t.api.audit.search
    t.api.audit.search = unavailable  # type: ignore[method-assign]
    try:
        answer = requests.post(
            f"{t.base_url}/access-log/_search", json={"bsn": CONSENTING_BSN}, headers=portal,
            timeout=30,
        )  # fmt: skip
    finally:
        t.api.audit.search = search  # type: ignore[method-assign]
    reversed_period = requests.post(
        f"{t.base_url}/access-log/_search",
        json={
            "bsn": CONSENTING_BSN,
            "since": "2026-02-01T00:00:00Z",
            "until": "2026-01-01T00:00:00Z",
        },
        headers=portal,
        timeout=30,
    )

    assert answer.status_code == 503
    assert reversed_period.status_code == 400  # malformed: refused before it is an attempt
    assert [(r["event_type"], r["outcome"], r["reason"]) for r in t.audit_rows()] == [
        ("access-log-search", "denied", "allowed, not answered: the access log is unavailable")
    ]


# --- DICOMweb -------------------------------------------------------------------------------------


def test_wado_rs_returns_exactly_the_stored_bytes_through_dicomweb_client(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    study = t.put_study(CONSENTING_BSN, series=2, per_series=2)
    client = t.dicomweb()
    first = study.instances[0]
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}

    # The raw parts, split by dicomweb-client's own multipart parser: byte for byte.
    response = client._http_get(
        f"{t.base_url}/dicomweb/studies/{study.uid}", headers={**t.auth(), **accept}
    )
    parts = list(client._decode_multipart_message(response, stream=False))
    assert sorted(parts) == sorted(study.contents.values())
    series_parts = list(
        client._decode_multipart_message(
            client._http_get(
                f"{t.base_url}/dicomweb/studies/{study.uid}/series/{first.series_instance_uid}",
                headers={**t.auth(), **accept},
            ),
            stream=True,
        )
    )
    assert sorted(series_parts) == sorted(
        study.contents[i.sop_instance_uid]
        for i in study.instances
        if i.series_instance_uid == first.series_instance_uid
    )
    # And through the public API, as a viewer would.
    instance = client.retrieve_instance(
        study.uid, first.series_instance_uid, first.sop_instance_uid
    )
    assert instance.SOPInstanceUID == first.sop_instance_uid
    assert len(client.retrieve_study(study.uid)) == 4
    metadata = client.retrieve_study_metadata(study.uid)
    assert len(metadata) == 4
    one = pydicom.Dataset.from_json(metadata[0])
    assert one.StudyInstanceUID == study.uid and "PixelData" not in one
    assert "7FE00010" not in metadata[0]
    assert metadata[0]["00081190"]["Value"][0].startswith(f"{t.base_url}/dicomweb/studies/")
    rows = t.audit_rows()
    assert {(r["event_type"], r["action"], r["outcome"]) for r in rows} == {
        ("wado-rs", "read", "allowed")
    }
    assert all(r["study_instance_uids"] == [study.uid] for r in rows)


def test_qido_rs_answers_by_study_uid_only(timeline_api: RunningTimeline) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    study = t.put_study(CONSENTING_BSN, series=2, per_series=3)
    client = t.dicomweb()

    [found] = client.search_for_studies(search_filters={"StudyInstanceUID": study.uid})
    series = client.search_for_series(study.uid)
    instances = client.search_for_instances(study.uid, study.series[0].series_instance_uid)
    all_instances = client.search_for_instances(study.uid)
    nothing = client.search_for_studies(search_filters={"StudyInstanceUID": new_uid()})

    assert found["0020000D"]["Value"] == [study.uid]
    assert found["00201206"]["Value"] == [2] and found["00201208"]["Value"] == [6]
    assert found["00080061"]["Value"] == ["CT"]
    assert found["00081190"]["Value"] == [f"{t.base_url}/dicomweb/studies/{study.uid}"]
    assert "00100020" not in found  # no patient attributes
    assert sorted(s["0020000E"]["Value"][0] for s in series) == sorted(
        s.series_instance_uid for s in study.series
    )
    assert len(instances) == 3 and len(all_instances) == 6
    assert {i["00083002"]["Value"][0] for i in all_instances} == {"1.2.840.10008.1.2.1"}
    assert nothing == []
    # A patient-level query is not offered; the UID is required.
    by_patient = t.get(f"/dicomweb/studies?PatientID={CONSENTING_BSN}")
    no_uid = t.get("/dicomweb/studies")
    assert by_patient.status_code == no_uid.status_code == 400
    assert "UID" in outcome_of(no_uid)["diagnostics"]
    assert CONSENTING_BSN not in by_patient.text
    assert all(CONSENTING_BSN not in v for v in by_patient.headers.values())
    assert {r["event_type"] for r in t.audit_rows()} == {"qido-rs"}


def test_dicomweb_tells_nobody_whether_a_study_uid_is_on_a_timeline_they_may_not_see(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    t.treats(OBJECTING_BSN)  # treated, but no consent
    theirs = t.put_study(SILENT_BSN, series=1, per_series=1)  # a patient they do not treat
    unconsented = t.put_study(OBJECTING_BSN, series=1, per_series=1)
    # Its timeline consent was revoked since: off the timeline.
    hidden = t.put_study(CONSENTING_BSN, series=1, per_series=1, revoked=True)
    row = theirs.instances[0]

    unknown = t.get(f"/dicomweb/studies/{new_uid()}")
    invisible = t.get(f"/dicomweb/studies/{hidden.uid}/metadata")
    not_theirs = t.get(f"/dicomweb/studies/{theirs.uid}")
    not_theirs_qido = t.get(f"/dicomweb/studies?StudyInstanceUID={theirs.uid}")
    not_theirs_instance = t.get(
        f"/dicomweb/studies/{theirs.uid}/series/{row.series_instance_uid}"
        f"/instances/{row.sop_instance_uid}"
    )
    # Their own patient, who did not consent: told which condition failed.
    no_consent = t.get(f"/dicomweb/studies/{unconsented.uid}/metadata")
    # A token that may see no study at all (no person named) is refused for what it is,
    # whether the study it names exists or not.
    anonymous = t.auth(uzi=None)
    token_known = t.get(f"/dicomweb/studies/{theirs.uid}", anonymous)
    token_unknown = t.get(f"/dicomweb/studies/{new_uid()}", anonymous)

    # A study of a patient they do not treat answers as one on no timeline: the same status
    # and the same words, and a QIDO-RS search leaves it out as it leaves out unknown UIDs.
    assert unknown.status_code == invisible.status_code == not_theirs.status_code == 404
    assert not_theirs_instance.status_code == 404
    assert outcome_of(not_theirs) == outcome_of(unknown)
    assert outcome_of(not_theirs)["diagnostics"] == "no such study on any timeline"
    assert not_theirs_qido.status_code == 200 and not_theirs_qido.json() == []
    assert theirs.contents[row.sop_instance_uid] not in not_theirs_instance.content
    assert no_consent.status_code == 403
    assert conditions_of(no_consent) == ["consent"]
    assert token_known.status_code == token_unknown.status_code == 403
    assert outcome_of(token_known) == outcome_of(token_unknown)
    assert conditions_of(token_known) == ["user-identity"]
    # The audit keeps what the requester was not told: whose study it was, and why refused.
    rows = t.audit_rows()
    assert [(r["event_type"], r["outcome"]) for r in rows] == [("wado-rs", "denied")] * 3 + [
        ("qido-rs", "denied"),
        ("wado-rs", "denied"),
        ("wado-rs", "denied"),
        ("wado-rs", "denied"),
        ("wado-rs", "denied"),
    ]
    assert rows[0]["patient_pseudonym"] is None
    assert rows[2]["patient_pseudonym"] == pseudonym(SILENT_BSN)
    assert "treatment relationship" in rows[2]["reason"]
    assert rows[5]["patient_pseudonym"] == pseudonym(OBJECTING_BSN)
    assert rows[6]["patient_pseudonym"] is rows[7]["patient_pseudonym"] is None


def test_a_wado_stream_whose_bytes_do_not_match_their_sha256_breaks_off(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    study = t.put_study(CONSENTING_BSN, series=1, per_series=1, corrupt=True)

    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        t.get(f"/dicomweb/studies/{study.uid}")

    assert 'beeldportaal_timeline_wado_streams_total{outcome="checksum-mismatch"} 1.0' in (
        t.get("/metrics", {}).text
    )


def test_metadata_writes_a_non_finite_float_as_the_dicom_json_model_does(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    uid, series_uid, sop = new_uid(), new_uid(), new_uid()
    dataset = pydicom.dcmread(
        io.BytesIO(
            make_dicom_bytes(StudyInstanceUID=uid, SeriesInstanceUID=series_uid, SOPInstanceUID=sop)
        )
    )
    # FD and FL may hold any IEEE 754 value; JSON has no number for these.
    dataset.add_new(0x00189317, "FD", [float("nan"), 1.5])  # Reconstruction Field of View
    dataset.add_new(0x00189318, "FD", [float("inf"), float("-inf"), 0.0])  # Target Center
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    row = make_instance_row(uid, series_uid, sop_instance_uid=sop, data=data)
    t.store.put(row.object_key, data)
    series = make_series_row(uid, series_instance_uid=series_uid)
    t.seed(on_timeline(CONSENTING_BSN, uid, [series], [row]))

    answer = t.get(f"/dicomweb/studies/{uid}/metadata")

    assert answer.status_code == 200, answer.text
    [header] = answer.json()
    assert header["00189317"] == {"vr": "FD", "Value": ["NaN", 1.5]}
    assert header["00189318"] == {"vr": "FD", "Value": ["inf", "-inf", 0.0]}


def test_a_transfer_syntax_the_server_does_not_hold_is_406(timeline_api: RunningTimeline) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    study = t.put_study(CONSENTING_BSN, series=1, per_series=1)
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'

    answer = t.get(f"/dicomweb/studies/{study.uid}", {**t.auth(), "Accept": jpeg})

    assert answer.status_code == 406
    assert "stored transfer syntax" in outcome_of(answer)["diagnostics"]


def test_a_report_instance_is_retrievable_where_the_timeline_points(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    # A study of one report (an SR instance) and no images: a report entry only.
    study = t.put_study(CONSENTING_BSN, series=0, reports=1)
    [row] = study.instances
    assert row.sop_class_uid == BasicTextSRStorage

    bundle = t.search(patient_form(CONSENTING_BSN)).json()
    [entry] = bundle["entry"]
    url = entry["resource"]["content"][0]["attachment"]["url"]
    client = t.dicomweb()
    parts = list(
        client._decode_multipart_message(client._http_get(url, headers=t.auth()), stream=False)
    )

    assert parts == [study.contents[row.sop_instance_uid]]


# --- hostile input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "status"),
    [
        (patient_form(CONSENTING_BSN, ("modality", "CT' OR '1'='1")), 400),
        (patient_form(CONSENTING_BSN, ("date", "ge2024-01-01; DROP TABLE access_log")), 400),
        (patient_form(CONSENTING_BSN, ("institution", "x'); DELETE FROM access_log; --")), 400),
        (patient_form(CONSENTING_BSN, ("_count", "1 OR 1=1")), 400),
        ([("patient.identifier", f"{BSN_SYSTEM}|999990019' OR '1'='1")], 400),
        (patient_form(CONSENTING_BSN, ("institution", "A" * 100_000)), 413),
        (patient_form(CONSENTING_BSN, *[("date", "ge2024") for _ in range(100)]), 400),
    ],
)
def test_injection_looking_and_oversized_parameters_are_refused(
    timeline_api: RunningTimeline, form: list[tuple[str, str]], status: int
) -> None:
    answer = timeline_api.search(form)

    assert answer.status_code == status
    assert outcome_of(answer)["severity"] == "error"
    assert_no_bsn(answer)
    assert timeline_api.audit_rows() == []  # refused before any patient was looked at


def test_a_bsn_in_the_url_or_a_non_form_body_is_refused(timeline_api: RunningTimeline) -> None:
    t = timeline_api
    in_url = requests.post(
        f"{t.base_url}/fhir/ImagingStudy/_search?patient.identifier={BSN_SYSTEM}|{CONSENTING_BSN}",
        headers=t.auth(),
        timeout=30,
    )
    as_json = requests.post(
        f"{t.base_url}/fhir/ImagingStudy/_search",
        json={"patient.identifier": f"{BSN_SYSTEM}|{CONSENTING_BSN}"},
        headers=t.auth(),
        timeout=30,
    )
    get_search = t.get(f"/fhir/ImagingStudy?patient.identifier={BSN_SYSTEM}|{CONSENTING_BSN}")

    assert in_url.status_code == 400 and "never in the URL" in outcome_of(in_url)["diagnostics"]
    assert as_json.status_code == 415
    assert get_search.status_code == 400
    for answer in (in_url, as_json, get_search):
        assert CONSENTING_BSN not in answer.text
        assert all(CONSENTING_BSN not in v for v in answer.headers.values())
    # A correlation id that looks like a BSN is not echoed.
    for offered in (
        CONSENTING_BSN,
        f"{CONSENTING_BSN[:3]}-{CONSENTING_BSN[3:6]}-{CONSENTING_BSN[6:]}",
    ):
        echoed = t.get("/healthz", {"X-Correlation-Id": offered})
        assert echoed.headers["x-correlation-id"] != offered


def test_a_uid_that_is_not_a_uid_is_refused(timeline_api: RunningTimeline) -> None:
    t = timeline_api
    for path in (
        "/dicomweb/studies/1.2.3'%20OR%201=1",
        "/dicomweb/studies/" + "1." * 40 + "1",
        "/dicomweb/studies?StudyInstanceUID=1.2.3;DROP",
        "/dicomweb/studies?StudyInstanceUID=" + ",".join(["1.2"] * 101),
    ):
        answer = t.get(path)
        assert 400 <= answer.status_code < 500, path
    assert t.audit_rows() == []


# --- operations -----------------------------------------------------------------------------------


def test_health_readiness_and_metrics_carry_no_patient_data(timeline_api: RunningTimeline) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    assert t.search(patient_form(CONSENTING_BSN)).status_code == 200
    assert t.search(patient_form(SILENT_BSN)).status_code == 403

    health = t.get("/healthz", {})
    ready = t.get("/readyz", {})
    metrics = t.get("/metrics", {}).text

    assert health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json()["checks"] == {
        "postgres": True,
        "consent_registry_view": True,
        "provider_directory_view": True,
        "read_model": True,
    }
    allowed = '{endpoint="timeline-search",outcome="allowed"} 1.0'
    assert f"beeldportaal_timeline_access_decisions_total{allowed}" in metrics
    assert (
        'beeldportaal_timeline_access_denied_conditions_total{condition="consent"} 1.0' in metrics
    )
    assert 'beeldportaal_timeline_audit_records_total{result="written"} 2.0' in metrics
    assert 'route="/fhir/ImagingStudy/_search",status="200"' in metrics
    assert 'beeldportaal_timeline_view_caught_up{view="consent-registry"} 1.0' in metrics
    for bsn in (CONSENTING_BSN, SILENT_BSN):
        assert bsn not in metrics and pseudonym(bsn) not in metrics


# --- fuzz -----------------------------------------------------------------------------------------


# schemathesis' own strategies draw from the `random` module, which Hypothesis deprecates.
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
def test_no_request_the_schema_allows_or_breaks_makes_the_api_fail(
    timeline_api: RunningTimeline,
) -> None:
    t = timeline_api
    t.treats(CONSENTING_BSN)
    t.consents(CONSENTING_BSN)
    t.put_study(CONSENTING_BSN, series=1, per_series=1)
    schema = schemathesis.openapi.from_url(f"{t.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /fhir/ImagingStudy/_search",
        "GET /fhir/ImagingStudy",
        "POST /access-log/_search",
        "GET /dicomweb/studies",
        "GET /dicomweb/studies/{study}",
        "GET /dicomweb/studies/{study}/metadata",
        "GET /dicomweb/studies/{study}/series",
        "GET /dicomweb/studies/{study}/series/{series}/instances/{instance}",
    }
    strategies = [
        operation.as_strategy(generation_mode=mode).map(lambda case, op=operation: (op, case))
        for operation in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    headers = t.auth(roles=("provider", "patient-representative"))
    session = requests.Session()
    calls: dict[str, set[int]] = {}

    @settings(
        max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(drawn=st.one_of(strategies))
    def fuzz(drawn: tuple[schemathesis.APIOperation, schemathesis.Case]) -> None:
        operation, case = drawn
        response = case.call(base_url=t.base_url, session=session, headers=headers, timeout=30)
        calls.setdefault(operation.label, set()).add(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    fuzz()
    # Requests got past authentication and validation into the handlers' own answers: a
    # study on no timeline is the handler's 404, a refused search its 400.
    assert any(
        404 in statuses for label, statuses in calls.items() if label.startswith("GET /dicomweb/")
    ), calls
    assert 400 in calls.get("POST /fhir/ImagingStudy/_search", set()), calls
