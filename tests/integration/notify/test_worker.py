"""The notify worker end to end: route-resolved on Kafka, instances in S3, a real Orthanc as the
receiving PACS; delivered / delivery-failed / retry tiers / dead letters read back from Kafka.

Each test runs the worker on tagged copies of every topic it touches; the retry policy is
shortened to 1 s and 2 s tiers (declared for the test only).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry

from deploy.local.orthanc import OrthancConfig, OrthancPeer, free_port
from services.notify.adapters.webhooks import EVENT_HEADER, SIGNATURE_HEADER, verify
from services.notify.config import NotifySettings
from services.notify.domain.delivery import ROUTINE_QUEUE
from services.notify.entrypoints.worker import build_notify_worker
from services.notify.worker_metrics import NotifyWorkerMetrics
from services.routing.adapters.directory_view import PROVIDER_DIRECTORY, KafkaDirectoryWriter
from services.routing.domain.directory import Provider
from shared import topics
from shared.codec import Codec
from shared.events import (
    Delivered,
    DeliveryFailed,
    DeliveryQueued,
    Event,
    InstanceRef,
    RouteResolved,
    Urgency,
)
from shared.events.common import DeliveryChannel
from shared.events.routing import BatchLimits, Coercion, Destination
from shared.identifiers import BSN_DICOM_ISSUER, BSN_OID
from shared.kafka import KafkaEventPublisher
from shared.settings import KafkaSettings, S3Settings
from shared.storage.s3 import S3ObjectStore
from shared.topics import TopicSpec
from tests.dicom_samples import bsn_item, make_dicom_bytes
from tests.factories import RECIPIENT_URA, TEST_BSN, make_route_resolved, make_study
from tests.workers import running

pytestmark = pytest.mark.integration

TIMEOUT = 60.0
RECEIVER_AET = "NOTIFYRCV"
DELAYS = (1.0, 2.0)
DECLARED = (
    RouteResolved.topic,
    "delivery-urgent",
    "delivery-routine",
    "delivery-retry-1s",
    "delivery-retry-2s",
    "delivery-dead-letter",
    Delivered.topic,
    DeliveryFailed.topic,
    PROVIDER_DIRECTORY,
)


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    with OrthancPeer.running(
        tmp_path_factory.mktemp("notify-worker") / "receiver", aet=RECEIVER_AET, stable_age=2
    ) as peer:
        yield peer


@pytest.fixture
async def names(declare_topics: Any, tag: str) -> dict[str, str]:
    names = {name: f"test-{name}-{tag}" for name in DECLARED}
    specs = [
        TopicSpec(
            names[name],
            1 if name == PROVIDER_DIRECTORY else 3,
            topics.DAY_MS,
            compacted=name in (PROVIDER_DIRECTORY, "delivery-dead-letter"),
        )
        for name in DECLARED
    ]
    # The shortened retry tiers exist for this test only (NotifySettings checks they are declared).
    tiers = [TopicSpec(n, 3, topics.DAY_MS) for n in ("delivery-retry-1s", "delivery-retry-2s")]
    await declare_topics(*specs, *tiers)
    return names


WEBHOOK_SECRET = "test-notify-webhook-secret-0123456789"


@dataclass
class Hooks:
    """What the recipient's webhook endpoint received: (event type, body, signature valid)."""

    url: str
    received: list[tuple[str, dict[str, Any], bool]] = field(default_factory=list)


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    state = Hooks(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            valid = verify(body, WEBHOOK_SECRET, self.headers.get(SIGNATURE_HEADER))
            state.received.append((self.headers.get(EVENT_HEADER, ""), json.loads(body), valid))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def objects(s3_settings: S3Settings) -> S3ObjectStore:
    store = S3ObjectStore.from_settings(s3_settings)
    store.ensure_bucket()
    return store


def settings(kafka: KafkaSettings, s3: S3Settings) -> NotifySettings:
    return NotifySettings(
        kafka=kafka,
        s3=s3,
        retry_delays=DELAYS,
        receiver_timeout_seconds=20,
        connect_timeout_seconds=3,
        view_start_timeout_seconds=10,
    )


async def seed(kafka: KafkaSettings, topic: str, receiver: OrthancPeer, **overrides: Any) -> None:
    endpoints = [
        {"channel": "dicomweb", "id": "pacs-dicomweb", "base_url": receiver.dicomweb_url},
        {
            "channel": "dimse",
            "id": "pacs-dimse",
            "host": "127.0.0.1",
            "port": receiver.dicom_port,
            "ae_title": RECEIVER_AET,
        },
        {"channel": "dimse", "id": "down", "host": "127.0.0.1", "port": 9, "ae_title": "DOWN"},
    ]
    fields: dict[str, Any] = {
        "ura": RECIPIENT_URA,
        "name": "Ontvangend Ziekenhuis",
        "type_code": "V4",
        "city": "Utrecht",
        "endpoints": endpoints,
    }
    fields.update(overrides)
    async with KafkaDirectoryWriter(kafka, topic) as writer:
        await writer.put(Provider.model_validate(fields))


def stored_study(objects: S3ObjectStore, count: int) -> tuple[list[bytes], Any]:
    """``count`` CT instances of one study, with a BSN in Other Patient IDs, put in S3."""
    study_uid = pydicom.uid.generate_uid()
    series_uid = pydicom.uid.generate_uid()
    files = [
        make_dicom_bytes(
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=series_uid,
            other_patient_ids=[bsn_item(TEST_BSN)],
        )
        for _ in range(count)
    ]
    refs = []
    for data in files:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        key = f"test-notify/{study_uid}/{ds.SOPInstanceUID}.dcm"
        objects.put(key, data)
        refs.append(
            InstanceRef(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                series_instance_uid=series_uid,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                object_key=key,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    study = make_study(0, study_instance_uid=study_uid).model_copy(
        update={
            "instances": tuple(refs),
            "new_sop_instance_uids": tuple(r.sop_instance_uid for r in refs),
        }
    )
    return files, study


def route_to(
    study: Any, endpoint: str, channel: DeliveryChannel, **overrides: Any
) -> RouteResolved:
    return make_route_resolved(
        study=study,
        destination=Destination(
            organisation_ura=RECIPIENT_URA, endpoint_id=endpoint, channel=channel
        ),
        **overrides,
    )


class Outputs:
    """delivered + delivery-failed (+ whatever else is asked) as a read_committed consumer."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._codec = Codec()
        self.events: list[tuple[str, Event]] = []

    async def until(self, done: Any, timeout: float = TIMEOUT) -> list[tuple[str, Event]]:
        async with asyncio.timeout(timeout):
            while not done(self.events):
                batches = await self._consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    self.events += [(r.topic, self._codec.decode_record(r)) for r in records]
        return self.events

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for _, e in self.events if isinstance(e, kind)]


@asynccontextmanager
async def outputs(kafka: KafkaSettings, *topic_names: str) -> AsyncIterator[Outputs]:
    consumer = AIOKafkaConsumer(
        *topic_names,
        bootstrap_servers=kafka.bootstrap_list,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        yield Outputs(consumer)
    finally:
        await consumer.stop()


async def publish(kafka: KafkaSettings, topic: str, events: list[RouteResolved]) -> None:
    async with KafkaEventPublisher(kafka, "test-notify") as publisher:
        await publisher.publish_many(events, topic=topic)


def arrived(receiver: OrthancPeer, sop_uid: str) -> bytes:
    [found] = receiver.lookup(sop_uid)
    return receiver.instance_file(found["ID"])


def pixel_data(data: bytes) -> bytes:
    return pydicom.dcmread(io.BytesIO(data))["PixelData"].value


async def test_routes_by_stow_rs_and_c_store_arrive_in_the_receivers_pacs_coerced(
    kafka_settings: KafkaSettings,
    s3_settings: S3Settings,
    names: dict[str, str],
    objects: S3ObjectStore,
    receiver: OrthancPeer,
    hooks: Hooks,
    tag: str,
) -> None:
    webhook = {"url": hooks.url, "secret": WEBHOOK_SECRET}
    await seed(kafka_settings, names[PROVIDER_DIRECTORY], receiver, webhook=webhook)
    stow_files, stow_study = stored_study(objects, 12)
    dimse_files, dimse_study = stored_study(objects, 3)
    coercion = Coercion(
        profile="bsn-as-patient-id",
        issuer_of_patient_id=BSN_DICOM_ISSUER,
        universal_entity_id=BSN_OID,
    )
    by_stow = route_to(stow_study, "pacs-dicomweb", DeliveryChannel.DICOMWEB, coercion=coercion)
    by_dimse = route_to(dimse_study, "pacs-dimse", DeliveryChannel.DIMSE, priority=Urgency.URGENT)
    worker = build_notify_worker(
        settings(kafka_settings, s3_settings), group_prefix=f"test-notify-{tag}", rename=names
    )
    async with outputs(kafka_settings, names[Delivered.topic]) as out, running(worker):
        await publish(kafka_settings, names[RouteResolved.topic], [by_stow, by_dimse])
        await out.until(lambda events: len(events) >= 2)
        async with asyncio.timeout(TIMEOUT):
            while len(hooks.received) < 2:
                await asyncio.sleep(0.1)

    delivered = {e.endpoint_id: e for e in out.of(Delivered)}
    assert delivered["pacs-dicomweb"].outcomes.sent == 12
    assert delivered["pacs-dicomweb"].outcomes.failed == 0
    assert delivered["pacs-dicomweb"].attempts == 1
    assert delivered["pacs-dimse"].outcomes.sent == 3
    assert delivered["pacs-dimse"].channel is DeliveryChannel.DIMSE
    # The recipient's webhook heard of both, signed with its secret.
    assert sorted(
        (kind, body["data"]["endpoint_id"], valid) for kind, body, valid in hooks.received
    ) == [("delivered.v1", "pacs-dicomweb", True), ("delivered.v1", "pacs-dimse", True)]
    assert {body["id"] for _, body, _ in hooks.received} == {
        str(e.event_id) for e in delivered.values()
    }
    # Default batch limits are 10 instances: the STOW-RS study went in two requests.
    for data in stow_files:
        uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        received = pydicom.dcmread(io.BytesIO(arrived(receiver, uid)))
        assert received.PatientID == TEST_BSN
        assert received.IssuerOfPatientID == BSN_DICOM_ISSUER
        [original] = received.OriginalAttributesSequence
        assert original.ModifiedAttributesSequence[0].PatientID == "H1234567"
        assert received.PixelData == pixel_data(data)
        assert received.SOPInstanceUID == uid
    for data in dimse_files:
        uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        assert pixel_data(arrived(receiver, uid)) == pixel_data(data)


# pynetdicom 3.0.4 leaks the socket of a refused connection (see test_channels_orthanc.py).
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
async def test_an_unreachable_receiver_is_retried_then_dead_lettered_and_a_bad_object_refused(
    kafka_settings: KafkaSettings,
    s3_settings: S3Settings,
    names: dict[str, str],
    objects: S3ObjectStore,
    receiver: OrthancPeer,
    tag: str,
) -> None:
    await seed(kafka_settings, names[PROVIDER_DIRECTORY], receiver)
    _, down_study = stored_study(objects, 2)
    _, tampered_study = stored_study(objects, 3)
    # One stored object no longer matches its sha256: it is refused, the others delivered.
    bad = tampered_study.instances[0]
    objects.put(bad.object_key, b"not what was received")
    down = route_to(down_study, "down", DeliveryChannel.DIMSE)
    tampered = route_to(tampered_study, "pacs-dicomweb", DeliveryChannel.DICOMWEB)
    worker = build_notify_worker(
        settings(kafka_settings, s3_settings), group_prefix=f"test-notify-{tag}", rename=names
    )
    watched = (names[Delivered.topic], names[DeliveryFailed.topic], names["delivery-dead-letter"])
    async with outputs(kafka_settings, *watched) as out, running(worker):
        await publish(kafka_settings, names[RouteResolved.topic], [down, tampered])
        await out.until(
            lambda events: (
                any(isinstance(e, DeliveryFailed) and e.final for _, e in events)
                and any(isinstance(e, Delivered) for _, e in events)
                and any(t == names["delivery-dead-letter"] for t, _ in events)
            )
        )

    failures = sorted(out.of(DeliveryFailed), key=lambda e: e.attempt)
    assert [(f.attempt, f.final) for f in failures] == [(1, False), (2, False), (3, True)]
    assert all(f.endpoint_id == "down" for f in failures)
    assert failures[0].next_attempt_at is not None
    assert "gave up after 3 attempts" in failures[-1].reason
    [dead] = [e for t, e in out.events if t == names["delivery-dead-letter"]]
    assert isinstance(dead, DeliveryQueued)
    assert dead.route.event_id == down.event_id and dead.attempt == 3
    [delivered] = out.of(Delivered)
    assert (delivered.outcomes.sent, delivered.outcomes.failed) == (2, 1)
    assert [r.sop_instance_uid for r in delivered.refused] == [bad.sop_instance_uid]
    assert "sha256" in delivered.refused[0].reason
    assert receiver.lookup(bad.sop_instance_uid) == []


async def test_a_receiver_that_comes_back_gets_the_study_on_a_later_attempt(
    kafka_settings: KafkaSettings,
    s3_settings: S3Settings,
    names: dict[str, str],
    objects: S3ObjectStore,
    tmp_path: Path,
    tag: str,
) -> None:
    # Fixed ports, so the directory can name the receiver before it is up.
    late = OrthancPeer(
        tmp_path / "late",
        OrthancConfig(http_port=free_port(), dicom_port=free_port(), aet="LATE", stable_age=2),
    )
    await seed(
        kafka_settings,
        names[PROVIDER_DIRECTORY],
        late,
        endpoints=[{"channel": "dicomweb", "id": "late", "base_url": late.dicomweb_url}],
    )
    _, study = stored_study(objects, 2)
    worker = build_notify_worker(
        settings(kafka_settings, s3_settings), group_prefix=f"test-notify-{tag}", rename=names
    )
    watched = (names[Delivered.topic], names[DeliveryFailed.topic])
    try:
        async with outputs(kafka_settings, *watched) as out, running(worker):
            await publish(
                kafka_settings,
                names[RouteResolved.topic],
                [route_to(study, "late", DeliveryChannel.DICOMWEB)],
            )
            await out.until(lambda events: len(events) >= 1)  # the first attempt failed
            await asyncio.to_thread(late.start)
            await out.until(lambda events: any(isinstance(e, Delivered) for _, e in events))
        [delivered] = out.of(Delivered)
        assert delivered.attempts >= 2
        assert all(not f.final for f in out.of(DeliveryFailed))
        for ref in study.instances:
            assert late.lookup(ref.sop_instance_uid)
    finally:
        late.stop()


async def test_a_copy_of_a_route_after_a_restart_is_recognised_and_not_delivered_again(
    kafka_settings: KafkaSettings,
    s3_settings: S3Settings,
    names: dict[str, str],
    objects: S3ObjectStore,
    receiver: OrthancPeer,
    tag: str,
) -> None:
    """An upstream service that restarts may publish a route again (consent and routing are
    at-least-once, with the same event ids): its queued delivery is then a copy, which a
    notify worker started after the first was handled must recognise too (it reads back the
    partition it is assigned), not deliver again (seen in the resilience test: 21 of 200)."""
    await seed(kafka_settings, names[PROVIDER_DIRECTORY], receiver)
    _, study = stored_study(objects, 2)
    route = route_to(study, "pacs-dicomweb", DeliveryChannel.DICOMWEB)
    config = settings(kafka_settings, s3_settings)
    group = f"test-notify-{tag}"

    async with outputs(kafka_settings, names[Delivered.topic]) as out:
        async with running(build_notify_worker(config, group_prefix=group, rename=names)):
            await publish(kafka_settings, names[RouteResolved.topic], [route])
            await out.until(lambda events: len(events) >= 1)
        # The route again, after the worker that delivered it is gone; a new one takes over.
        await publish(kafka_settings, names[RouteResolved.topic], [route])
        metrics = NotifyWorkerMetrics(registry=CollectorRegistry())
        again = build_notify_worker(config, group_prefix=group, rename=names, metrics=metrics)
        async with running(again):
            async with asyncio.timeout(TIMEOUT):
                while not metrics.registry.get_sample_value(
                    "beeldportaal_events_consumed_total",
                    {"topic": names[ROUTINE_QUEUE], "schema": "delivery.queued.v1",
                     "outcome": "copy"},
                ):  # fmt: skip
                    await asyncio.sleep(0.1)
            await out.until(lambda events: True)

    [delivered] = out.of(Delivered)
    assert delivered.outcomes.sent == 2


def worker_process(
    kafka: KafkaSettings, s3: S3Settings, names: dict[str, str], tag: str, log: Path
) -> subprocess.Popen[bytes]:
    config = {
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers},
        "s3": {
            "endpoint": s3.endpoint,
            "access_key": s3.access_key,
            "secret_key": s3.secret_key.get_secret_value(),
            "region": s3.region,
            "bucket": s3.bucket,
        },
        "rename": names,
        "group_prefix": f"test-notify-{tag}",
        "retry_delays": list(DELAYS),
        "declared": ["delivery-retry-1s", "delivery-retry-2s"],
    }
    env = {**os.environ, "NOTIFY_TEST_CONFIG": json.dumps(config)}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.integration.notify.worker_process"],
            env=env,
            cwd=Path(__file__).resolve().parents[3],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_a_worker_killed_mid_delivery_delivers_every_instance_once_with_one_event(
    kafka_settings: KafkaSettings,
    s3_settings: S3Settings,
    names: dict[str, str],
    objects: S3ObjectStore,
    receiver: OrthancPeer,
    tmp_path: Path,
    tag: str,
) -> None:
    """kill -9 while a study is half sent (one instance per request), start another process:
    the receiver holds every instance once, and read_committed consumers see one delivered."""
    await seed(kafka_settings, names[PROVIDER_DIRECTORY], receiver)
    count = 80
    _, study = stored_study(objects, count)
    route = route_to(
        study,
        "pacs-dicomweb",
        DeliveryChannel.DICOMWEB,
        batch_limits=BatchLimits(max_instances=1, max_bytes=10 * 1024 * 1024),
    )
    uids = [ref.sop_instance_uid for ref in study.instances]

    def present() -> int:
        return sum(1 for uid in uids if receiver.lookup(uid))

    log = tmp_path / "notify.log"
    first = worker_process(kafka_settings, s3_settings, names, tag, log)
    try:
        await publish(kafka_settings, names[RouteResolved.topic], [route])
        async with asyncio.timeout(TIMEOUT):
            while await asyncio.to_thread(lambda: receiver.lookup(uids[0])) == []:
                await asyncio.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    killed_with = await asyncio.to_thread(present)
    assert 0 < killed_with < count, f"the kill did not land mid-delivery ({killed_with} sent)"

    second = worker_process(kafka_settings, s3_settings, names, tag, log)
    try:
        async with outputs(kafka_settings, names[Delivered.topic]) as out:
            await out.until(lambda events: len(events) >= 1)
            # Anything a replay would add has had time to show; still one delivered.
            await asyncio.sleep(3)
            await out.until(lambda events: True)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    [delivered] = out.of(Delivered)
    assert delivered.outcomes.sent == count
    assert await asyncio.to_thread(present) == count
    [found] = receiver.lookup(study.study_instance_uid)
    assert len(receiver.rest("GET", f"/studies/{found['ID']}/instances")) == count
