"""The study assembly worker in-process against the real broker: versions, shortcut, restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from benchmarks.faust_assembly import build_assembly_app
from services.ingest.config import IngestSettings
from services.ingest.metrics import IngestMetrics
from shared import topics
from shared.codec import Codec
from shared.events import InstanceStored, StudyReceived
from shared.faust_app import App, declare_changelogs
from shared.kafka import KafkaEventPublisher
from shared.settings import KafkaSettings
from shared.topics import TopicSpec
from tests.ingest_factories import make_study_instances

pytestmark = pytest.mark.integration

TIMEOUT = 45.0
# Fewer partitions than production's 12 start faster; the two topics only need the same count.
PARTITIONS = 4


@pytest.fixture
async def declared(declare_topics: Callable[..., Awaitable[None]], tag: str) -> tuple[str, str]:
    """instance-stored and study-received of this test only (declared, provisioned, deleted)."""
    specs = (
        TopicSpec(f"test-instance-stored-{tag}", PARTITIONS, topics.DAY_MS),
        TopicSpec(f"test-study-received-{tag}", PARTITIONS, topics.DAY_MS),
    )
    await declare_topics(*specs)
    return specs[0].name, specs[1].name


def assembly_app(
    kafka_settings: KafkaSettings,
    tag: str,
    declared: tuple[str, str],
    *,
    stable_age: float,
    state_dir: Path | None = None,
    completion_quiet: float = 2.0,
    **kwargs: Any,
) -> App:
    settings = IngestSettings(
        kafka=kafka_settings,
        stable_age_seconds=stable_age,
        assembly_check_interval_seconds=0.2,
        assembly_completion_quiet_seconds=completion_quiet,
    )
    source, sink = declared
    return build_assembly_app(
        settings,
        app_id=f"test-assembly-{tag}",
        source_topic=source,
        sink_topic=sink,
        metrics=kwargs.pop("metrics", None) or IngestMetrics(),
        state_dir=state_dir,
        **kwargs,
    )


@asynccontextmanager
async def running(app: App, source: str, kafka_settings: KafkaSettings) -> AsyncIterator[App]:
    """The app started and owning every partition of ``source`` (its state recovered)."""
    await declare_changelogs(app, kafka_settings)  # as main() does
    try:
        await asyncio.wait_for(app.start(), TIMEOUT)
        async with asyncio.timeout(TIMEOUT):
            while True:
                ours = {tp for tp in app.assignor.assigned_actives() if tp.topic == source}
                if len(ours) == PARTITIONS and not (app.rebalancing or app.in_recovery):
                    break
                await asyncio.sleep(0.1)
        yield app
    finally:
        await asyncio.wait_for(app.stop(), TIMEOUT)


@asynccontextmanager
async def announcements(settings: KafkaSettings, topic: str) -> AsyncIterator[Announcements]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_list,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        yield Announcements(consumer)
    finally:
        await consumer.stop()


class Announcements:
    """study-received as a test reads it: every event so far, waited for with a deadline."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._codec = Codec()
        self.seen: list[StudyReceived] = []

    async def _poll(self) -> None:
        batches = await self._consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for record in records:
                event = self._codec.decode_record(record)
                assert isinstance(event, StudyReceived)
                self.seen.append(event)

    async def wait_for(self, count: int, timeout: float = TIMEOUT) -> list[StudyReceived]:
        async with asyncio.timeout(timeout):
            while len(self.seen) < count:
                await self._poll()
        return self.seen

    async def quiet_for(self, seconds: float) -> list[StudyReceived]:
        """Everything seen once nothing more came for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await self._poll()
        return self.seen


async def publish(settings: KafkaSettings, topic: str, events: list[InstanceStored]) -> None:
    async with KafkaEventPublisher(settings, "test-assembly") as publisher:
        await publisher.publish_many(events, topic=topic)


def uids(events: list[InstanceStored]) -> set[str]:
    return {e.instance.sop_instance_uid for e in events}


async def test_a_study_sent_in_three_batches_is_announced_once_and_a_late_instance_as_v2(
    kafka_settings: KafkaSettings, tag: str, declared: tuple[str, str], tmp_path: Path
) -> None:
    source, sink = declared
    *study, late = make_study_instances(9)
    metrics = IngestMetrics()
    # rocksdb: every table write happens while handling a record (see the entrypoint's notes).
    app = assembly_app(
        kafka_settings, tag, declared, stable_age=2.0, state_dir=tmp_path, metrics=metrics
    )
    async with running(app, source, kafka_settings), announcements(kafka_settings, sink) as out:
        for batch in (study[:3], study[3:6], study[6:]):
            await publish(kafka_settings, source, batch)
            await asyncio.sleep(0.5)  # well within the stable age
        [v1] = await out.wait_for(1)
        assert v1.study.version == 1
        assert {r.sop_instance_uid for r in v1.study.instances} == uids(study)
        assert set(v1.study.new_sop_instance_uids) == uids(study)
        assert v1.correlation_id == study[0].correlation_id

        await publish(kafka_settings, source, [late])
        _, v2 = await out.wait_for(2)
        assert v2.study.version == 2
        assert v2.study.new_sop_instance_uids == (late.instance.sop_instance_uid,)
        assert {r.sop_instance_uid for r in v2.study.instances} == uids([*study, late])
        assert len(await out.quiet_for(3.0)) == 2  # stable: nothing announced twice

    assert metrics.studies_assembled.labels("first")._value.get() == 1
    assert metrics.studies_assembled.labels("follow-up")._value.get() == 1
    assert list(tmp_path.rglob("study-assembly-*.db")), "state was not kept in rocksdb"
    # Co-partitioning, checked on the broker: every row of the study (the study row, and the
    # record and seen rows whose keys only start with its UID) went to the changelog partition
    # with the number of the partition its instance-stored and study-received records are in.
    changelog = f"beeldportaal-test-assembly-{tag}-study-assembly-changelog"
    opened = f"beeldportaal-test-assembly-{tag}-study-assembly-open-changelog"
    key = study[0].study_instance_uid.encode()
    found = await records_of(kafka_settings, [source, sink, changelog, opened], key)
    placed = {topic: {partition for partition, _, _ in rows} for topic, rows in found.items()}
    assert len(placed[source]) == 1
    assert placed[source] == placed[sink] == placed[changelog] == placed[opened]
    assert len(found[changelog]) == 3 * 9 + 2  # 3 rows per instance, 1 per version recorded
    # The open mark is written when there is something to announce and removed once it is
    # announced, not per instance.
    assert [value for _, _, value in found[opened]] == [b"1", None, b"1", None]


async def records_of(
    settings: KafkaSettings, names: list[str], key: bytes
) -> dict[str, list[tuple[int, bytes, bytes | None]]]:
    """Topic -> (partition, key, value) of the records whose key is ``key`` or starts with it
    and a NUL (a row of that study), read from the start to the end."""
    prefix = key + b"\x00"
    consumer = AIOKafkaConsumer(
        *names,
        bootstrap_servers=settings.bootstrap_list,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        found: dict[str, list[tuple[int, bytes, bytes | None]]] = {name: [] for name in names}
        async with asyncio.timeout(TIMEOUT):
            while not consumer.assignment():
                await asyncio.sleep(0.05)
            ends = await consumer.end_offsets(list(consumer.assignment()))
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                batches = await consumer.getmany(timeout_ms=200)
                for tp, records in batches.items():
                    found[tp.topic].extend(
                        (tp.partition, r.key, r.value)
                        for r in records
                        if r.key is not None and (r.key == key or r.key.startswith(prefix))
                    )
        return found
    finally:
        await consumer.stop()


async def test_a_study_marked_complete_is_announced_long_before_the_stable_age(
    kafka_settings: KafkaSettings, tag: str, declared: tuple[str, str]
) -> None:
    source, sink = declared
    study = make_study_instances(3, completes_study=True)
    app = assembly_app(kafka_settings, tag, declared, stable_age=60.0)
    async with running(app, source, kafka_settings), announcements(kafka_settings, sink) as out:
        started = time.monotonic()
        await publish(kafka_settings, source, study)
        [v1] = await out.wait_for(1, timeout=20.0)
        elapsed = time.monotonic() - started

    assert elapsed < 15.0
    assert len(v1.study.instances) == 3


async def test_after_a_restart_the_state_comes_back_from_the_changelog(
    kafka_settings: KafkaSettings, tag: str, declared: tuple[str, str]
) -> None:
    source, sink = declared
    *study, late = make_study_instances(3)
    async with announcements(kafka_settings, sink) as out:
        first = assembly_app(kafka_settings, tag, declared, stable_age=1.0)
        async with running(first, source, kafka_settings):
            await publish(kafka_settings, source, study)
            [v1] = await out.wait_for(1)
            # Let the announcement be recorded (consumed back) and committed before stopping.
            await asyncio.sleep(2.0)

        # Same app id, fresh in-memory store: all it knows comes from the changelog.
        second = assembly_app(kafka_settings, tag, declared, stable_age=1.0)
        async with running(second, source, kafka_settings):
            await publish(kafka_settings, source, [late])
            seen = await out.wait_for(2)
            seen = await out.quiet_for(2.5)

    assert v1.study.version == 1
    assert [e.study.version for e in seen] == [1, 2]
    v2 = seen[-1]
    assert v2.study.new_sop_instance_uids == (late.instance.sop_instance_uid,)
    assert len(v2.study.instances) == 3
    assert v2.study.first_received_at == v1.study.first_received_at
    assert timedelta(0) <= v2.study.last_received_at - v1.study.last_received_at


async def test_a_study_open_when_the_worker_stopped_is_announced_after_the_restart(
    kafka_settings: KafkaSettings, tag: str, declared: tuple[str, str]
) -> None:
    # The due index is memory; after a restart it is rebuilt from the open marks and study rows.
    source, sink = declared
    study = make_study_instances(4)
    async with announcements(kafka_settings, sink) as out:
        metrics = IngestMetrics()
        first = assembly_app(kafka_settings, tag, declared, stable_age=3.0, metrics=metrics)
        async with running(first, source, kafka_settings):
            await publish(kafka_settings, source, study)
            taken_in = metrics.events_consumed.labels(source, InstanceStored.schema_name, "new")
            async with asyncio.timeout(TIMEOUT):
                while taken_in._value.get() < len(study):
                    await asyncio.sleep(0.05)
        assert await out.quiet_for(0.5) == []  # stopped before it was due

        second = assembly_app(kafka_settings, tag, declared, stable_age=3.0)
        async with running(second, source, kafka_settings):
            [v1] = await out.wait_for(1)
            seen = await out.quiet_for(3.5)

    assert [e.study.version for e in seen] == [1]
    assert {r.sop_instance_uid for r in v1.study.instances} == uids(study)


async def test_a_study_of_2000_instances_is_announced_once_as_v1_listing_all_of_them(
    kafka_settings: KafkaSettings, tag: str, declared: tuple[str, str]
) -> None:
    # A CT of a few thousand instances is normal. The first layout rewrote the whole study per
    # instance (quadratic: some 90 s CPU and 1.3 GB of changelog for 2,000); this is linear.
    source, sink = declared
    study = make_study_instances(2000)
    # Published before the worker starts, so that it finds them all waiting: published by this
    # test's own event loop while the worker runs, the publisher can be starved by the worker
    # for longer than the stable age, and a study whose sender paused is rightly announced.
    await publish(kafka_settings, source, study)
    started = time.monotonic()
    # Stable age 2 s: faust's consumer can pause about a second between fetches.
    app = assembly_app(kafka_settings, tag, declared, stable_age=2.0)
    async with running(app, source, kafka_settings), announcements(kafka_settings, sink) as out:
        [v1] = await out.wait_for(1, timeout=60.0)
        elapsed = time.monotonic() - started
        assert len(await out.quiet_for(2.5)) == 1  # nothing announced after it

    assert elapsed < 60.0
    assert v1.study.version == 1
    assert len(v1.study.instances) == 2000
    assert {r.sop_instance_uid for r in v1.study.instances} == uids(study)
    assert set(v1.study.new_sop_instance_uids) == uids(study)
