"""The notify API against the real Kafka and S3: status for the sender only, dead letters
re-driven through the queues, a pickup zip streamed from S3 with a NEN 7513 record of every
attempt, and a fuzz of its OpenAPI."""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
import time
import uuid
import zipfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import schemathesis
import uvicorn
from aiokafka import AIOKafkaConsumer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from minio import Minio
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from services.notify.adapters.dead_letters import DeadLetterTopics
from services.notify.adapters.journey_view import JourneyTopics
from services.notify.api_config import NotifyApiSettings
from services.notify.bootstrap import NotifyApi, build
from services.notify.config import NotifySettings
from services.notify.domain.pickup import dicom_entry_name, sign_pickup
from services.notify.entrypoints.http import StudyStatus, create_app
from services.notify.main import _study_status, describe
from shared import topics
from shared.auth import AuthSettings, generate_dev_keypair, mint_token
from shared.codec import SCHEMA_HEADER, Codec
from shared.events import (
    AccessLogged,
    AuditAction,
    AuditOutcome,
    Basis,
    Decision,
    DeliveryChannel,
    DeliveryQueued,
    Event,
    InstanceOutcomes,
    InstanceRef,
    Urgency,
)
from shared.events.routing import RouteFailureReason
from shared.kafka import KafkaEventPublisher
from shared.settings import KafkaSettings, S3Settings
from shared.storage.s3 import S3ObjectStore
from shared.topics import TopicSpec
from tests.dicom_samples import make_dicom_bytes
from tests.factories import (
    CT_IMAGE_STORAGE,
    EXPLICIT_VR_LITTLE_ENDIAN,
    RECIPIENT_URA,
    SENDER_URA,
    T0,
    TEST_BSN,
    make_consent_checked,
    make_delivered,
    make_delivery_failed,
    make_delivery_queued,
    make_destination,
    make_route_failed,
    make_route_resolved,
    make_study,
    make_study_received,
    make_uid,
)
from tests.integration.ingest.conftest import free_port
from tests.kafka_tap import EventTap

pytestmark = pytest.mark.integration

PICKUP_KEY = "integration-pickup-key-" + "p" * 32
OTHER_URA = "11112222"
OPERATOR_URA = "00000001"
ALLOWED, DENIED = AuditOutcome.ALLOWED, AuditOutcome.DENIED


@dataclass(frozen=True)
class NotifyTopics:
    journey: JourneyTopics
    dead: DeadLetterTopics
    audit: str


@pytest.fixture
async def notify_topics(declare_topics: Callable[..., Awaitable[None]], tag: str) -> NotifyTopics:
    journey = JourneyTopics(*(f"test-{name}-{tag}" for name in JourneyTopics().names))
    dead = DeadLetterTopics(
        f"test-delivery-dead-letter-{tag}",
        f"test-delivery-urgent-{tag}",
        f"test-delivery-routine-{tag}",
    )
    await declare_topics(
        *(
            TopicSpec(name, 3, topics.DAY_MS)
            for name in (*journey.names, dead.urgent, dead.routine)
        ),
        # Compacted, like the real one.
        TopicSpec(dead.dead_letter, 3, topics.FOREVER, compacted=True),
        TopicSpec(f"test-access-logged-{tag}", 1, topics.DAY_MS),
    )
    return NotifyTopics(journey, dead, f"test-access-logged-{tag}")


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


@dataclass
class RunningNotify:
    api: NotifyApi
    base_url: str
    key_path: Path
    topics: NotifyTopics
    kafka: KafkaSettings
    server: uvicorn.Server
    thread: threading.Thread

    def auth(
        self, ura: str = SENDER_URA, roles: Sequence[str] = ("provider",), **claims: str
    ) -> dict[str, str]:
        token = mint_token(self.key_path, ura=ura, roles=roles, **claims)  # type: ignore[arg-type]
        return {"Authorization": f"Bearer {token}"}

    @property
    def operator(self) -> dict[str, str]:
        return self.auth(OPERATOR_URA, ("operator",))

    def get(self, path: str, headers: dict[str, str] | None = None) -> requests.Response:
        return requests.get(f"{self.base_url}{path}", headers=headers, timeout=30)

    def post(self, path: str, headers: dict[str, str] | None = None) -> requests.Response:
        return requests.post(f"{self.base_url}{path}", headers=headers, timeout=60)

    def publish(self, *items: tuple[str, Event]) -> None:
        """Publish (topic, event) pairs in order and wait for every acknowledgement."""

        async def send() -> None:
            async with KafkaEventPublisher(self.kafka, "notify-api-test") as publisher:
                for topic, event in items:
                    await publisher.publish(event, topic)

        asyncio.run(send())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def running_notify(
    kafka_settings: KafkaSettings,
    notify_topics: NotifyTopics,
    bucket: S3Settings,
    keys: Path,
    *,
    audit_topic: str | None = None,
    audit_timeout: float = 10.0,
) -> Iterator[RunningNotify]:
    """The notify API on a free port, once ready; ``audit_topic`` replaces the test's own."""
    private, public = generate_dev_keypair(keys)
    port = free_port()
    api_settings = NotifyApiSettings(
        kafka=kafka_settings,
        s3=bucket,
        http_port=port,
        pickup_key=PICKUP_KEY,  # type: ignore[arg-type]
        view_sync_timeout_seconds=15,
        audit_timeout_seconds=audit_timeout,
    )
    api = build(
        api_settings,
        auth=AuthSettings(public_keys=[public]),  # type: ignore[call-arg]
        journey_topics=notify_topics.journey,
        dead_letter_topics=notify_topics.dead,
        audit_topic=audit_topic or notify_topics.audit,
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(api), host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="notify-api-under-test", daemon=True)
    thread.start()
    running = RunningNotify(
        api, f"http://127.0.0.1:{port}", private, notify_topics, kafka_settings, server, thread
    )
    # Waits for /readyz (both views read their topics' history); generous for a loaded broker.
    deadline = time.monotonic() + 90
    try:
        while True:
            assert thread.is_alive(), "the notify API stopped while starting (see its log)"
            assert time.monotonic() < deadline, "the notify API did not become ready in 90 s"
            if server.started:
                try:
                    if running.get("/readyz").status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
            time.sleep(0.05)
        yield running
    finally:
        running.stop()


@pytest.fixture
def notify_api(
    kafka_settings: KafkaSettings, notify_topics: NotifyTopics, bucket: S3Settings, tmp_path: Path
) -> Iterator[RunningNotify]:
    with running_notify(kafka_settings, notify_topics, bucket, tmp_path / "keys") as running:
        yield running


def read_records(kafka: KafkaSettings, topic: str) -> list[tuple[bytes, bytes | None]]:
    """Every (key, value) on ``topic`` from the beginning to its current end."""

    async def read() -> list[tuple[bytes, bytes | None]]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap_list,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            await consumer._client.force_metadata_update()
            parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            ends = await consumer.end_offsets(parts)
            found: list[tuple[bytes, bytes | None]] = []
            async with asyncio.timeout(20):
                while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
                    batch = await consumer.getmany(timeout_ms=200)
                    found += [(r.key, r.value) for rs in batch.values() for r in rs]
            return found
        finally:
            await consumer.stop()

    return asyncio.run(read())


# --- status ---------------------------------------------------------------------------------------


def test_the_sender_sees_each_version_of_its_study_and_nobody_else_learns_it_exists(
    notify_api: RunningNotify, capsys: pytest.CaptureFixture[str]
) -> None:
    t = notify_api.topics.journey
    v1 = make_study(instances=2)
    uid = v1.study_instance_uid
    v2 = make_study(instances=3, version=2, study_instance_uid=uid)
    web = make_destination(endpoint_id="pacs-web")
    dimse = make_destination(endpoint_id="pacs-dimse", channel=DeliveryChannel.DIMSE)
    retry_at = T0 + timedelta(minutes=5)
    notify_api.publish(
        (t.study_received, make_study_received(study=v1)),
        (t.consent_checked, make_consent_checked(study=v1)),
        (t.route_resolved, make_route_resolved(study=v1, destination=web)),
        (t.route_resolved, make_route_resolved(study=v1, destination=dimse)),
        (
            t.delivered,
            make_delivered(
                study_instance_uid=uid,
                endpoint_id="pacs-web",
                outcomes=InstanceOutcomes(sent=2, already_present=0),
                attempts=1,
            ),
        ),
        (
            t.delivery_failed,
            make_delivery_failed(
                study_instance_uid=uid,
                endpoint_id="pacs-dimse",
                channel=DeliveryChannel.DIMSE,
                attempt=1,
                next_attempt_at=retry_at,
            ),
        ),
        (
            t.delivery_failed,
            make_delivery_failed(
                study_instance_uid=uid,
                endpoint_id="pacs-dimse",
                channel=DeliveryChannel.DIMSE,
                attempt=6,
                final=True,
                next_attempt_at=None,
                reason="association rejected by the receiver",
            ),
        ),
        (t.study_received, make_study_received(study=v2)),
    )

    answer = notify_api.get(f"/studies/{uid}/status", notify_api.auth(SENDER_URA))

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["study_instance_uid"] == uid and body["fresh"] is True
    first, second = body["versions"]
    assert (first["version"], first["state"], first["instances"]) == (1, "failed", 2)
    assert first["recipient_ura"] == RECIPIENT_URA
    assert first["consent"] == {
        "decision": "permit",
        "basis": "presumed-referral",
        "flagged": False,
    }
    assert first["routes"] == [
        {
            "destination_ura": RECIPIENT_URA,
            "endpoint_id": "pacs-dimse",
            "channel": "dimse",
            "priority": "routine",
        },
        {
            "destination_ura": RECIPIENT_URA,
            "endpoint_id": "pacs-web",
            "channel": "dicomweb",
            "priority": "routine",
        },
    ]
    failing, delivered = first["deliveries"]
    assert failing["state"] == "failed"
    assert failing["last_failure"]["attempt"] == 6 and failing["last_failure"]["final"] is True
    assert failing["last_failure"]["reason"] == "association rejected by the receiver"
    assert delivered["state"] == "delivered"
    assert delivered["outcomes"]["sent"] == 2 and delivered["attempts"] == 1
    assert (second["version"], second["state"], second["routes"]) == (2, "received", [])
    # No patient data: not the pseudonym, let alone a BSN.
    assert v1.patient.pseudonym is not None and v1.patient.pseudonym not in answer.text
    assert TEST_BSN not in answer.text

    # Another organisation (the recipient included) gets what an unknown study gets: 404.
    for ura in (OTHER_URA, RECIPIENT_URA):
        hidden = notify_api.get(f"/studies/{uid}/status", notify_api.auth(ura))
        unknown = notify_api.get(f"/studies/{make_uid()}/status", notify_api.auth(ura))
        assert hidden.status_code == unknown.status_code == 404
        assert hidden.headers["content-type"] == "application/problem+json"
        assert hidden.json() == unknown.json()
    assert notify_api.get(f"/studies/{uid}/status").status_code == 401
    # An operator (of any organisation) follows every study, and sees who sent it.
    operator = notify_api.get(f"/studies/{uid}/status", notify_api.auth(OTHER_URA, ("operator",)))
    assert operator.status_code == 200, operator.text
    assert [(v["version"], v["sender_ura"]) for v in operator.json()["versions"]] == [
        (1, SENDER_URA),
        (2, SENDER_URA),
    ]
    assert operator.json()["versions"] == body["versions"]
    printed = "\n".join(describe(StudyStatus.model_validate(operator.json())))
    assert f"version 1: failed  (from {SENDER_URA} to {RECIPIENT_URA}, 2 instances)" in printed
    assert "delivered    " in printed and "2 sent, 0 already there" in printed
    assert "association rejected by the receiver" in printed
    assert v1.patient.pseudonym not in printed
    # `beeldportaal study status UID` prints the same, read straight from the topics.
    settings = NotifySettings(kafka=notify_api.kafka)
    capsys.readouterr()  # what the API running in this process logged so far (its 401 above)
    assert asyncio.run(_study_status(settings, uid, False, notify_api.topics.journey)) == 0
    assert capsys.readouterr().out.strip() == printed
    assert asyncio.run(_study_status(settings, make_uid(), False, notify_api.topics.journey)) == 1
    nobody = notify_api.auth(SENDER_URA, ("patient-representative",))
    assert notify_api.get(f"/studies/{uid}/status", nobody).status_code == 403


def test_a_denied_send_is_reported_not_routed_with_the_reason(notify_api: RunningNotify) -> None:
    t = notify_api.topics.journey
    study = make_study()
    uid = study.study_instance_uid
    notify_api.publish(
        (t.study_received, make_study_received(study=study)),
        (
            t.consent_checked,
            make_consent_checked(
                study=study, decision=Decision.DENY, basis=Basis.EXPLICIT_OBJECTION
            ),
        ),
        (
            t.route_failed,
            make_route_failed(
                study_instance_uid=uid,
                study_version=1,
                reason="the patient objected to this send",
                reason_code=RouteFailureReason.CONSENT_DENIED,
            ),
        ),
    )

    [version] = notify_api.get(f"/studies/{uid}/status", notify_api.auth()).json()["versions"]

    assert version["state"] == "not-routed"
    assert version["consent"]["decision"] == "deny"
    assert version["route_failure"]["reason_code"] == "consent-denied"
    assert version["routes"] == [] and version["deliveries"] == []


# --- dead letters ---------------------------------------------------------------------------------


def dead_letter(priority: Urgency, failure: str) -> DeliveryQueued:
    route = make_route_resolved(
        study=make_study(urgency=priority),
        priority=priority,
        destination=make_destination(endpoint_id=f"pacs-{priority.value}"),
    )
    return make_delivery_queued(
        route=route,
        attempt=6,
        not_before=T0 + timedelta(hours=2),
        last_failure=failure,
        first_queued_at=T0,
    )


def test_an_operator_re_drives_dead_letters_onto_their_priority_queue(
    notify_api: RunningNotify,
) -> None:
    t = notify_api.topics.dead
    routine = dead_letter(Urgency.ROUTINE, "HTTP 503 from the receiver, 6 times")
    urgent = dead_letter(Urgency.EMERGENCY, "the endpoint left the directory")
    notify_api.publish((t.dead_letter, routine))
    notify_api.publish((t.dead_letter, urgent))
    urgent_tap = EventTap(notify_api.kafka, t.urgent)
    routine_tap = EventTap(notify_api.kafka, t.routine)

    assert notify_api.get("/dead-letters", notify_api.auth()).status_code == 403
    listed = notify_api.get("/dead-letters", notify_api.operator)
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["count"] == 2
    newest, oldest = body["dead_letters"]
    assert (newest["key"], oldest["key"]) == (urgent.key, routine.key)  # newest first
    assert newest["study_instance_uid"] == urgent.route.study.study_instance_uid
    assert (newest["study_version"], newest["endpoint_id"]) == (1, "pacs-emergency")
    assert (newest["priority"], newest["attempts"]) == ("emergency", 6)
    assert newest["last_failure"] == "the endpoint left the directory"
    assert datetime.fromisoformat(newest["first_queued_at"]) == T0
    assert datetime.fromisoformat(newest["dead_since"]) > datetime.now(UTC) - timedelta(minutes=5)
    assert "pseudonym" not in listed.text and "patient" not in listed.text

    # One, by its URL-encoded key.
    path = f"/dead-letters/{quote(urgent.key, safe='')}/redrive"
    assert notify_api.post(path, notify_api.auth()).status_code == 403
    redriven = notify_api.post(path, notify_api.operator)

    assert redriven.status_code == 200, redriven.text
    assert redriven.json()["queue"] == t.urgent and redriven.json()["visible"] is True
    # Read-your-writes: the list no longer shows it.
    left = notify_api.get("/dead-letters", notify_api.operator).json()
    assert [d["key"] for d in left["dead_letters"]] == [routine.key]
    [requeued] = urgent_tap.read(lambda e: True, expect=1)
    assert isinstance(requeued, DeliveryQueued)
    assert str(requeued.event_id) == redriven.json()["event_id"] != str(urgent.event_id)
    assert requeued.route == urgent.route and requeued.key == urgent.key
    assert (requeued.attempt, requeued.not_before, requeued.last_failure) == (1, None, None)
    # A run of its own, queued when the last one died: its events get ids of their own.
    assert requeued.first_queued_at == datetime.fromisoformat(newest["dead_since"])
    records = read_records(notify_api.kafka, t.dead_letter)
    assert [value is None for key, value in records if key == urgent.key.encode()] == [False, True]
    # Gone: a second re-drive of the same key finds nothing.
    assert notify_api.post(path, notify_api.operator).status_code == 404

    # The rest, all at once.
    everything = notify_api.post("/dead-letters/redrive", notify_api.operator)

    assert everything.status_code == 200, everything.text
    assert everything.json()["count"] == 1
    assert [r["key"] for r in everything.json()["redriven"]] == [routine.key]
    [requeued_routine] = routine_tap.read(lambda e: True, expect=1)
    assert isinstance(requeued_routine, DeliveryQueued)
    assert requeued_routine.route == routine.route and requeued_routine.attempt == 1
    assert notify_api.get("/dead-letters", notify_api.operator).json()["count"] == 0
    metrics = notify_api.get("/metrics").text
    assert f'beeldportaal_notify_dead_letters_redriven_total{{queue="{t.urgent}"}} 1.0' in metrics
    assert f'beeldportaal_notify_dead_letters_redriven_total{{queue="{t.routine}"}} 1.0' in metrics


# --- pickup ---------------------------------------------------------------------------------------


@dataclass
class PickupStudy:
    uid: str
    contents: dict[str, bytes]  # zip member name -> the exact bytes stored
    patient: str | None  # the pseudonym its audit records name


def put_pickup_study(
    notify_api: RunningNotify, bucket: S3Settings, *, corrupt: bool = False
) -> PickupStudy:
    """Two real DICOM instances in S3, announced, permitted (presumed referral) and routed to
    the recipient's pickup portal."""
    store = S3ObjectStore.from_settings(bucket)
    uid, series = make_uid(), make_uid()
    refs: list[InstanceRef] = []
    contents: dict[str, bytes] = {}
    for _ in range(2):
        sop = make_uid()
        data = make_dicom_bytes(StudyInstanceUID=uid, SeriesInstanceUID=series, SOPInstanceUID=sop)
        key = f"studies/{uid}/{series}/{sop}.dcm"
        store.put(key, data)
        # A corrupt store: the bytes no longer hash to what ingest recorded (same size).
        recorded = data[:-1] + bytes([data[-1] ^ 0xFF]) if corrupt else data
        refs.append(
            InstanceRef(
                sop_instance_uid=sop,
                sop_class_uid=CT_IMAGE_STORAGE,
                series_instance_uid=series,
                transfer_syntax_uid=EXPLICIT_VR_LITTLE_ENDIAN,
                object_key=key,
                size=len(data),
                sha256=hashlib.sha256(recorded).hexdigest(),
            )
        )
        contents[dicom_entry_name(series, sop)] = data
    study = make_study(study_instance_uid=uid, instances=0)
    study = study.model_copy(update={"instances": tuple(refs)})
    portal = make_destination(endpoint_id="portal", channel=DeliveryChannel.PICKUP)
    t = notify_api.topics.journey
    notify_api.publish(
        (t.study_received, make_study_received(study=study)),
        (t.consent_checked, make_consent_checked(study=study)),
        (t.route_resolved, make_route_resolved(study=study, destination=portal)),
    )
    return PickupStudy(uid, contents, study.patient.pseudonym)


def audit_records(notify_api: RunningNotify) -> list[AccessLogged]:
    """The NEN 7513 records the API published, in order (the test's topic has one partition)."""
    codec = Codec()
    found = [
        codec.decode(value, [(SCHEMA_HEADER, AccessLogged.schema_name.encode())])
        for _key, value in read_records(notify_api.kafka, notify_api.topics.audit)
        if value is not None
    ]
    assert all(isinstance(record, AccessLogged) for record in found)
    return found  # type: ignore[return-value]


def token_for(
    study: PickupStudy,
    *,
    ura: str = RECIPIENT_URA,
    sender: str | None = SENDER_URA,
    ttl: timedelta,
) -> str:
    return sign_pickup(study.uid, 1, ura, sender, datetime.now(UTC) + ttl, PICKUP_KEY.encode())


def test_the_recipient_downloads_the_study_as_a_zip_of_exactly_the_stored_bytes(
    notify_api: RunningNotify, bucket: S3Settings
) -> None:
    study = put_pickup_study(notify_api, bucket)
    token = token_for(study, ttl=timedelta(hours=1))
    person = notify_api.auth(RECIPIENT_URA, uzi="900000123", purpose="TREAT")

    download = notify_api.get(f"/pickup/{token}", person)

    assert download.status_code == 200, download.text
    assert download.headers["content-type"] == "application/zip"
    assert f"study-{study.uid}-v1.zip" in download.headers["content-disposition"]
    archive = zipfile.ZipFile(io.BytesIO(download.content))
    assert archive.testzip() is None
    assert sorted(archive.namelist()) == sorted(study.contents)
    for name, data in study.contents.items():
        assert archive.read(name) == data
    assert 'beeldportaal_notify_pickup_downloads_total{outcome="ok"} 1.0' in (
        notify_api.get("/metrics").text
    )
    # Kept on access-logged before the first byte went out: who downloaded which patient's
    # study, on what basis; the link itself is in no field.
    [record] = audit_records(notify_api)
    assert record.producer == "notify-api"
    assert (record.event_type, record.action, record.outcome) == (
        "portal-pickup",
        AuditAction.READ,
        AuditOutcome.ALLOWED,
    )
    assert study.patient is not None and record.patient == study.patient
    assert (record.user_uzi, record.organisation_ura) == ("900000123", RECIPIENT_URA)
    assert (record.user_role, record.purpose_of_use) == ("provider", "TREAT")
    assert record.study_instance_uids == (study.uid,)
    assert record.authorisation_basis == "pickup link for the recipient of a routed delivery"
    assert record.consent_profile == "delivery: presumed-referral"
    assert record.access_point.startswith("GET /pickup/{token} from ")
    assert token not in record.model_dump_json()


def test_a_pickup_link_that_expired_was_altered_or_is_for_another_organisation_is_refused(
    notify_api: RunningNotify, bucket: S3Settings
) -> None:
    study = put_pickup_study(notify_api, bucket)
    recipient = notify_api.auth(RECIPIENT_URA)
    expired = token_for(study, ttl=timedelta(seconds=-1))
    genuine = token_for(study, ttl=timedelta(hours=1))
    payload, mac = genuine.split(".")
    altered = token_for(study, ura=OTHER_URA, ttl=timedelta(hours=1)).split(".")[0] + "." + mac

    gone = notify_api.get(f"/pickup/{expired}", recipient)
    assert gone.status_code == 410
    assert gone.headers["content-type"] == "application/problem+json"
    assert "expired" in gone.json()["detail"]
    # The link is genuine, but the caller's organisation is not its recipient.
    other = notify_api.get(f"/pickup/{genuine}", notify_api.auth(OTHER_URA))
    assert other.status_code == 403
    assert "another organisation" in other.json()["detail"]
    # The recipient URA changed in the payload: the signature no longer matches.
    tampered = notify_api.get(f"/pickup/{altered}", notify_api.auth(OTHER_URA))
    assert tampered.status_code == 403
    assert "not genuine" in tampered.json()["detail"]
    assert notify_api.get(f"/pickup/{payload}", recipient).status_code == 400
    assert notify_api.get(f"/pickup/{genuine}").status_code == 401
    # A study version without a pickup route is not for download, even with a genuine link.
    unrouted = sign_pickup(
        make_uid(),
        1,
        RECIPIENT_URA,
        SENDER_URA,
        datetime.now(UTC) + timedelta(hours=1),
        PICKUP_KEY.encode(),
    )
    assert notify_api.get(f"/pickup/{unrouted}", recipient).status_code == 404
    # Versions are numbered per sender: a link to another sender's version 1 of this UID
    # opens nothing, and one signed before links named the sender opens the one routed here.
    another_sender = token_for(study, sender=OTHER_URA, ttl=timedelta(hours=1))
    assert notify_api.get(f"/pickup/{another_sender}", recipient).status_code == 404
    before_senders = token_for(study, sender=None, ttl=timedelta(hours=1))
    assert notify_api.get(f"/pickup/{before_senders}", recipient).status_code == 200
    # An operator holds the link, but a pickup is a provider's: refused, and recorded too.
    by_operator = notify_api.get(f"/pickup/{genuine}", notify_api.operator)
    assert by_operator.status_code == 403
    assert "role provider" in by_operator.json()["detail"]

    # Every attempt of an authenticated caller is a NEN 7513 record (the 401 is not: nobody
    # to name). A refusal names the study when the link is genuine, and the patient when the
    # view knows which version it was for.
    records = audit_records(notify_api)
    seen = [
        (r.outcome, r.organisation_ura, r.study_instance_uids, r.patient, r.reason) for r in records
    ]
    assert seen == [
        (DENIED, RECIPIENT_URA, (study.uid,), study.patient, "the pickup link expired"),
        (
            DENIED,
            OTHER_URA,
            (study.uid,),
            study.patient,
            "the pickup link is for another organisation",
        ),
        (DENIED, OTHER_URA, (), None, "the pickup link is not genuine"),
        (DENIED, RECIPIENT_URA, (), None, "not a pickup link"),
        (
            DENIED,
            RECIPIENT_URA,
            records[4].study_instance_uids,
            None,
            "not (or no longer) available for pickup",
        ),
        (
            DENIED,
            RECIPIENT_URA,
            (study.uid,),
            None,
            "not (or no longer) available for pickup",
        ),
        (ALLOWED, RECIPIENT_URA, (study.uid,), study.patient, None),
        (
            DENIED,
            OPERATOR_URA,
            (study.uid,),
            study.patient,
            "the token lacks the role provider",
        ),
    ]
    assert records[4].study_instance_uids != (study.uid,)
    assert {r.event_type for r in records} == {"portal-pickup"}
    assert [r.authorisation_basis is None for r in records] == [True] * 6 + [False, True]


def test_no_pickup_is_answered_that_could_not_be_audited(
    kafka_settings: KafkaSettings,
    notify_topics: NotifyTopics,
    bucket: S3Settings,
    tmp_path: Path,
    tag: str,
) -> None:
    # The audit topic does not exist (the brokers do not create topics): Kafka never
    # acknowledges the record, and the download is refused before its first byte.
    with running_notify(
        kafka_settings,
        notify_topics,
        bucket,
        tmp_path / "keys",
        audit_topic=f"test-missing-access-logged-{tag}",
        audit_timeout=2,
    ) as notify_api:
        study = put_pickup_study(notify_api, bucket)
        token = token_for(study, ttl=timedelta(hours=1))

        download = notify_api.get(f"/pickup/{token}", notify_api.auth(RECIPIENT_URA))
        refused = notify_api.get(f"/pickup/{token}", notify_api.auth(OTHER_URA))
        metrics = notify_api.get("/metrics").text

    assert download.status_code == 503
    assert download.headers["content-type"] == "application/problem+json"
    assert "could not be audited" in download.json()["detail"]
    assert refused.status_code == 503
    assert 'beeldportaal_notify_pickup_downloads_total{outcome="unaudited"} 2.0' in metrics
    assert 'beeldportaal_notify_pickup_downloads_total{outcome="ok"} 0.0' in metrics
    assert 'beeldportaal_notify_pickup_downloads_total{outcome="forbidden"} 0.0' in metrics


def test_a_download_whose_bytes_do_not_match_their_sha256_breaks_off_unreadable(
    notify_api: RunningNotify, bucket: S3Settings
) -> None:
    study = put_pickup_study(notify_api, bucket, corrupt=True)
    token = token_for(study, ttl=timedelta(hours=1))

    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        notify_api.get(f"/pickup/{token}", notify_api.auth(RECIPIENT_URA))

    assert 'beeldportaal_notify_pickup_downloads_total{outcome="aborted"} 1.0' in (
        notify_api.get("/metrics").text
    )


# --- fuzz -----------------------------------------------------------------------------------------


# schemathesis' own strategies draw from the `random` module, which Hypothesis deprecates.
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
def test_no_request_the_schema_allows_or_breaks_makes_the_api_fail(
    notify_api: RunningNotify,
) -> None:
    schema = schemathesis.openapi.from_url(f"{notify_api.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "GET /studies/{study_instance_uid}/status",
        "GET /dead-letters",
        "POST /dead-letters/redrive",
        "POST /dead-letters/{key}/redrive",
        "GET /pickup/{token}",
    }
    strategies = [
        operation.as_strategy(generation_mode=mode).map(lambda case, op=operation: (op, case))
        for operation in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    headers = notify_api.auth(SENDER_URA, ("provider", "operator"))
    session = requests.Session()
    calls: dict[str, set[int]] = {}

    @settings(
        max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(drawn=st.one_of(strategies))
    def fuzz(drawn: tuple[schemathesis.APIOperation, schemathesis.Case]) -> None:
        operation, case = drawn
        response = case.call(
            base_url=notify_api.base_url, session=session, headers=headers, timeout=30
        )
        calls.setdefault(operation.label, set()).add(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    fuzz()
    # The token was accepted and requests got past validation into the handlers.
    assert 404 in calls.get("GET /studies/{study_instance_uid}/status", set()), calls
    assert 200 in calls.get("GET /dead-letters", set()), calls
    assert 404 in calls.get("POST /dead-letters/{key}/redrive", set()), calls
    assert calls.get("GET /pickup/{token}", set()) & {400, 403}, calls
