"""The access-log archive against the real Kafka and PostgreSQL: other services' NEN 7513
records on ``access-logged`` end up in ``access_log``, where the patient's access-log search
reads them; loading twice keeps each record once, and a record never changes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry

from services.timeline.adapters.audit import AccessLogArchive, PostgresAuditTrail
from services.timeline.config import TimelineSettings
from services.timeline.entrypoints.access_archive import build_access_archive
from services.timeline.entrypoints.projection import ProjectionMetrics
from shared import migrations, topics
from shared.codec import SCHEMA_HEADER, Codec
from shared.events import AccessLogged, AuditAction, AuditOutcome
from shared.kafka import KafkaEventPublisher
from shared.settings import KafkaSettings, PostgresSettings
from shared.stream import Worker
from shared.topics import TopicSpec
from tests.factories import T0, make_access_logged, make_pseudonym, make_study_received
from tests.integration.conftest import SERVICE_ROLE, as_role
from tests.workers import running

pytestmark = pytest.mark.integration

PARTITIONS = 3


class _NoPublisher:
    """The search reads PostgreSQL only; this trail never records."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, *_args: object, **_kwargs: object) -> asyncio.Future[None]:
        raise AssertionError("nothing is recorded here")


async def archive_until_caught_up(
    settings: TimelineSettings, topic: str, group: str, metrics: ProjectionMetrics
) -> None:
    """Run the archive (as the service role) until its group's offsets reach the topic's end."""
    service = settings.model_copy(
        update={"postgres": PostgresSettings(dsn=as_role(settings.postgres.conninfo, SERVICE_ROLE))}
    )
    archive = AccessLogArchive(service.postgres.conninfo)
    stream = build_access_archive(service, archive, metrics, group=group, topic=topic)
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_list)
    await consumer.start()
    try:
        end = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_list)
    await admin.start()
    try:
        async with running(Worker(stream, views=(archive,))), asyncio.timeout(60):
            group_id = f"{settings.kafka.client_id_prefix}-{group}"
            while True:
                committed = await admin.list_consumer_group_offsets(group_id)
                if all(
                    end[tp] == 0 or (tp in committed and committed[tp].offset >= end[tp])
                    for tp in tps
                ):
                    return
                await asyncio.sleep(0.05)
    finally:
        await admin.close()


def archived(metrics: ProjectionMetrics, topic: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "beeldportaal_events_consumed_total",
        {"schema": AccessLogged.schema_name, "outcome": outcome, "topic": topic},
    )
    return value or 0.0


async def test_other_services_records_reach_the_access_log_once_and_unchanged(
    kafka_settings: KafkaSettings,
    scratch_database: str,
    declare_topics: Callable[..., Awaitable[None]],
    tag: str,
) -> None:
    topic = f"test-access-logged-{tag}"
    await declare_topics(TopicSpec(topic, PARTITIONS, topics.DAY_MS))
    migrations.migrate(scratch_database, grant_to=SERVICE_ROLE)
    settings = TimelineSettings(
        kafka=kafka_settings, postgres=PostgresSettings(dsn=scratch_database)
    )
    patient = make_pseudonym()
    pickups = [
        make_access_logged(
            patient=patient,
            producer="notify-api",
            event_type="portal-pickup",
            action=AuditAction.READ,
            outcome=outcome,
            occurred_at=T0 + timedelta(minutes=i),
            access_point="GET /pickup/{token} from 127.0.0.1",
        )
        for i, outcome in enumerate((AuditOutcome.DENIED, AuditOutcome.ALLOWED))
    ]
    # A record of the timeline's own API: written to PostgreSQL already, and to the topic.
    own = make_access_logged(
        patient=patient, producer="timeline-api", occurred_at=T0 - timedelta(minutes=1)
    )
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO access_log (event_id, occurred_at, event_type, action, outcome, "
            "patient_pseudonym, organisation_ura, access_point, producer) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                own.event_id,
                own.occurred_at,
                own.event_type,
                own.action.value,
                own.outcome.value,
                own.patient,
                own.organisation_ura,
                own.access_point,
                own.producer,
            ),
        )
    async with KafkaEventPublisher(kafka_settings, "test-notify-api") as publisher:
        for event in (*pickups, own):
            await publisher.publish(event, topic)
        # Not an access record: poison, skipped; the records after it are still archived.
        await publisher.publish(make_study_received(), topic)
        await publisher.publish(pickups[0], topic)  # published twice (a producer's retry)

    metrics = ProjectionMetrics(registry=CollectorRegistry())
    await archive_until_caught_up(settings, topic, f"test-archive-{tag}", metrics)

    assert archived(metrics, topic, "archived") == 2
    assert archived(metrics, topic, "already-kept") == 2
    with psycopg.connect(scratch_database) as conn:
        rows = conn.execute(
            "SELECT event_id, producer, event_type, outcome, access_point FROM access_log "
            "ORDER BY occurred_at, event_id"
        ).fetchall()
    assert sorted(rows) == sorted(
        [
            (own.event_id, "timeline-api", own.event_type, "allowed", own.access_point),
            *(
                (p.event_id, "notify-api", "portal-pickup", p.outcome.value, p.access_point)
                for p in pickups
            ),
        ]
    )

    # Loading the whole topic again (a new group, as on a fresh database) keeps each once.
    again = ProjectionMetrics(registry=CollectorRegistry())
    await archive_until_caught_up(settings, topic, f"test-archive-again-{tag}", again)
    assert archived(again, topic, "archived") == 0
    assert archived(again, topic, "already-kept") == 4

    # The patient's access-log search finds the pickups, saying which service recorded them.
    trail = PostgresAuditTrail(scratch_database, _NoPublisher())
    await trail.start()
    try:
        found, total = await trail.search(patient, None, None, 10)
    finally:
        await trail.stop()
    assert total == 3
    assert [(r.event_id, r.producer) for r in found] == [
        (pickups[1].event_id, "notify-api"),
        (pickups[0].event_id, "notify-api"),
        (own.event_id, "timeline-api"),
    ]
    assert found[0] == pickups[1].model_copy(update={"correlation_id": str(pickups[1].event_id)})


async def test_the_archive_waits_for_a_schema_it_does_not_know_and_skips_what_postgres_refuses(
    kafka_settings: KafkaSettings,
    scratch_database: str,
    declare_topics: Callable[..., Awaitable[None]],
    tag: str,
) -> None:
    refused_topic, waiting_topic = f"test-access-refused-{tag}", f"test-access-waiting-{tag}"
    await declare_topics(
        TopicSpec(refused_topic, PARTITIONS, topics.DAY_MS),
        TopicSpec(waiting_topic, 1, topics.DAY_MS),
    )
    migrations.migrate(scratch_database, grant_to=SERVICE_ROLE)
    settings = TimelineSettings(
        kafka=kafka_settings, postgres=PostgresSettings(dsn=scratch_database)
    )
    patient = make_pseudonym()
    # A NUL in a text: valid JSON and a valid event, but no PostgreSQL text holds it.
    unstorable = make_access_logged(patient=patient, reason="refused\x00here")
    kept = [make_access_logged(patient=patient) for _ in range(3)]
    async with KafkaEventPublisher(kafka_settings, "test-notify-api") as publisher:
        for event in (kept[0], unstorable, *kept[1:]):
            await publisher.publish(event, refused_topic)  # one patient: one partition

    metrics = ProjectionMetrics(registry=CollectorRegistry())
    await archive_until_caught_up(settings, refused_topic, f"test-archive-{tag}", metrics)

    with psycopg.connect(scratch_database) as conn:
        archived_ids = {r[0] for r in conn.execute("SELECT event_id FROM access_log")}
    assert archived_ids == {e.event_id for e in kept}

    # A record of a newer access.logged schema (its producer upgraded first) is not skipped:
    # the archive holds its offset, and archives nothing past it, until it can read it.
    future = json.loads(Codec().encode(make_access_logged(patient=patient)).value)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_list)
    await producer.start()
    try:
        await producer.send_and_wait(
            waiting_topic,
            json.dumps({**future, "new_field": 1}).encode(),
            headers=[(SCHEMA_HEADER, b"access.logged.v9")],
        )
    finally:
        await producer.stop()
    service = settings.model_copy(
        update={"postgres": PostgresSettings(dsn=as_role(scratch_database, SERVICE_ROLE))}
    )
    archive = AccessLogArchive(service.postgres.conninfo)
    group = f"test-archive-waiting-{tag}"
    stream = build_access_archive(
        service, archive, ProjectionMetrics(registry=CollectorRegistry()), group=group,
        topic=waiting_topic,
    )  # fmt: skip
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_list)
    await admin.start()
    try:
        async with running(Worker(stream, views=(archive,))) as worker:
            await asyncio.sleep(5)
            assert not worker.streams[0].stopping  # waiting, not stopped
            committed = await admin.list_consumer_group_offsets(
                f"{kafka_settings.client_id_prefix}-{group}"
            )
    finally:
        await admin.close()
    assert all(meta.offset <= 0 for meta in committed.values())
    with psycopg.connect(scratch_database) as conn:
        assert conn.execute("SELECT count(*) FROM access_log").fetchone() == (len(kept),)
