"""The aiokafka study assembly worker against the real broker: versions, shortcut, duplicates,
poison, restarts and crashes, rebalances, a failed transaction, and the faust worker's events.

Each test runs on its own instance-stored, study-received and (compacted) assembly changelog
topics and its own consumer group. study-received is read back with isolation level
read_committed, as every consumer of it reads: that is where "exactly once" is checked.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.ingest.config import IngestSettings
from services.ingest.domain.assembly import StudyAssemblies
from services.ingest.entrypoints.assembler import StudyAssembler, build_assembler
from services.ingest.metrics import IngestMetrics
from shared import topics
from shared.codec import Codec
from shared.events import CompletingRequestStored, InstanceStored, StudyReceived
from shared.kafka import CachedMurmur2Partitioner, KafkaEventPublisher
from shared.settings import KafkaSettings
from shared.stream import Worker
from shared.topics import TopicSpec
from tests.factories import RECIPIENT_URA, make_completing_request_stored, make_patient
from tests.ingest_factories import BASIC_TEXT_SR, copy_of, make_study_instances
from tests.integration.ingest.test_assembly_agent import assembly_app
from tests.integration.ingest.test_assembly_agent import running as running_faust
from tests.workers import running

pytestmark = pytest.mark.integration

TIMEOUT = 60.0
# Fewer partitions than production's 12 start faster; the topics only need the same count.
PARTITIONS = 4
CODEC = Codec()


@dataclass(frozen=True)
class Names:
    source: str
    sink: str
    state: str
    group: str


@pytest.fixture
async def names(declare_topics: Callable[..., Awaitable[None]], tag: str) -> Names:
    """This test's instance-stored, study-received and changelog (declared, deleted after)."""
    declared = Names(
        source=f"test-instance-stored-{tag}",
        sink=f"test-study-received-{tag}",
        state=f"test-assembly-state-{tag}",
        group=f"test-assembler-{tag}",
    )
    await declare_topics(
        TopicSpec(declared.source, PARTITIONS, topics.DAY_MS),
        TopicSpec(declared.sink, PARTITIONS, topics.DAY_MS),
        TopicSpec(declared.state, PARTITIONS, topics.FOREVER, compacted=True),
    )
    return declared


def assembler(
    kafka_settings: KafkaSettings,
    names: Names,
    *,
    stable_age: float,
    completion_quiet: float = 2.0,
    metrics: IngestMetrics | None = None,
    member: str = "a",
    max_records: int = 500,
    max_announced_per_tick: int = 200,
) -> Worker:
    """A member of the test's group; ``member`` names its transactional id (a restarted member
    with the same name fences its predecessor, as a restarted replica does)."""
    settings = IngestSettings(
        kafka=kafka_settings,
        stable_age_seconds=stable_age,
        assembly_check_interval_seconds=0.2,
        assembly_completion_quiet_seconds=completion_quiet,
    )
    return build_assembler(
        settings,
        group=names.group,
        source_topic=names.source,
        sink_topic=names.sink,
        state_topic=names.state,
        metrics=metrics or IngestMetrics(),
        transactional_id=f"{names.group}-{member}",
        max_records=max_records,
        max_announced_per_tick=max_announced_per_tick,
    )


@asynccontextmanager
async def started(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    """The worker started and assigned, its stream's run as a task the test may cancel (a
    cancel lands in the middle of whatever it does: Worker.run would make it a graceful stop)
    or watch fail; on exit the worker is stopped however the run ended."""
    async with worker:
        task = asyncio.create_task(worker.stream.run())
        try:
            await worker.wait_assigned(TIMEOUT)
            yield task
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class Announcements:
    """study-received as its consumers see it (read_committed): every event so far."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self.seen: list[StudyReceived] = []

    async def _poll(self) -> None:
        batches = await self._consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for record in records:
                event = CODEC.decode_record(record)
                assert isinstance(event, StudyReceived)
                self.seen.append(event)

    async def wait_for(self, count: int, timeout: float = TIMEOUT) -> list[StudyReceived]:
        async with asyncio.timeout(timeout):
            while len(self.seen) < count:
                await self._poll()
        return self.seen

    async def quiet_for(self, seconds: float) -> list[StudyReceived]:
        """Everything seen once ``seconds`` passed (an announcement due would be in by then)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await self._poll()
        return self.seen


@asynccontextmanager
async def announcements(
    settings: KafkaSettings, topic: str, isolation_level: str = "read_committed"
) -> AsyncIterator[Announcements]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_list,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    try:
        yield Announcements(consumer)
    finally:
        await consumer.stop()


async def publish(
    settings: KafkaSettings, topic: str, events: list[InstanceStored | CompletingRequestStored]
) -> None:
    async with KafkaEventPublisher(settings, "test-assembler") as publisher:
        await publisher.publish_many(events, topic=topic)


async def read_all(
    settings: KafkaSettings, topic: str, isolation_level: str = "read_committed"
) -> list[Any]:
    """Every record of ``topic`` from the start to its end, as a consumer with that level sees."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_list,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    found: list[Any] = []
    try:
        async with asyncio.timeout(TIMEOUT):
            while not consumer.assignment():
                await asyncio.sleep(0.05)
            ends = await consumer.end_offsets(list(consumer.assignment()))
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    found.extend(records)
        return found
    finally:
        await consumer.stop()


def owned(worker: Worker) -> set[int]:
    [assembler] = worker.views
    assert isinstance(assembler, StudyAssembler)
    return assembler.owned


def uids(events: Iterable[InstanceStored]) -> set[str]:
    return {e.instance.sop_instance_uid for e in events}


def taken_in(metrics: IngestMetrics, names: Names, outcome: str = "new") -> float:
    counter = metrics.events_consumed.labels(names.source, InstanceStored.schema_name, outcome)
    return float(counter._value.get())


async def until_taken_in(metrics: IngestMetrics, names: Names, count: int) -> None:
    async with asyncio.timeout(TIMEOUT):
        while taken_in(metrics, names) < count:
            await asyncio.sleep(0.05)


def assert_every_study_announced_once_per_version(
    seen: list[StudyReceived], published: Iterable[InstanceStored]
) -> dict[str, list[int]]:
    """Every instance published is announced as new exactly once, in versions 1, 2, ... of its
    study with no version missing or repeated; each version lists everything up to it.
    Returns the versions per study."""
    assert len({e.event_id for e in seen}) == len(seen), "an announcement was seen twice"
    instances: dict[str, set[str]] = defaultdict(set)
    for event in published:
        instances[event.study_instance_uid].add(event.instance.sop_instance_uid)
    by_study: dict[str, list[StudyReceived]] = defaultdict(list)
    for event in seen:
        by_study[event.study.study_instance_uid].append(event)
    assert set(by_study) == set(instances)
    versions = {}
    for uid, events in by_study.items():
        events.sort(key=lambda e: e.study.version)
        versions[uid] = [e.study.version for e in events]
        assert versions[uid] == list(range(1, len(events) + 1))
        listed: set[str] = set()
        for event in events:
            new = set(event.study.new_sop_instance_uids)
            assert len(new) == len(event.study.new_sop_instance_uids)
            assert not new & listed, "an instance was announced as new twice"
            listed |= new
            assert {r.sop_instance_uid for r in event.study.instances} == listed
        assert listed == instances[uid]
    return versions


def studies(count: int, instances: int, **overrides: Any) -> list[list[InstanceStored]]:
    return [make_study_instances(instances, **overrides) for _ in range(count)]


def flat(groups: Iterable[list[InstanceStored]]) -> list[InstanceStored]:
    return [event for group in groups for event in group]


def late_instance(study: list[InstanceStored]) -> InstanceStored:
    """One more instance of ``study`` (same study, series, patient and correlation id)."""
    [extra] = make_study_instances(
        1,
        study_instance_uid=study[0].study_instance_uid,
        series_instance_uid=study[0].instance.series_instance_uid,
        patient=study[0].patient,
        correlation_id=study[0].correlation_id,
    )
    return extra


# --- the rules, as the faust worker's tests check them -------------------------------------------


async def test_a_study_sent_in_three_batches_is_announced_once_and_a_late_instance_as_v2(
    kafka_settings: KafkaSettings, names: Names
) -> None:
    *study, late = make_study_instances(9)
    metrics = IngestMetrics()
    worker = assembler(kafka_settings, names, stable_age=2.0, metrics=metrics)
    async with running(worker), announcements(kafka_settings, names.sink) as out:
        for batch in (study[:3], study[3:6], study[6:]):
            await publish(kafka_settings, names.source, batch)
            await asyncio.sleep(0.5)  # well within the stable age
        [v1] = await out.wait_for(1)
        assert v1.study.version == 1
        assert {r.sop_instance_uid for r in v1.study.instances} == uids(study)
        assert set(v1.study.new_sop_instance_uids) == uids(study)
        assert v1.correlation_id == study[0].correlation_id
        assert v1.producer == "ingest-assembly"

        await publish(kafka_settings, names.source, [late])
        _, v2 = await out.wait_for(2)
        assert v2.study.version == 2
        assert v2.study.new_sop_instance_uids == (late.instance.sop_instance_uid,)
        assert {r.sop_instance_uid for r in v2.study.instances} == uids([*study, late])
        assert len(await out.quiet_for(3.0)) == 2  # stable: nothing announced twice

    assert metrics.studies_assembled.labels("first")._value.get() == 1
    assert metrics.studies_assembled.labels("follow-up")._value.get() == 1
    # Co-partitioning, checked on the broker: the study's changelog rows (its study row and the
    # record rows whose keys start with its UID) are in the partition number of its records.
    key = study[0].study_instance_uid.encode()
    partitioner = CachedMurmur2Partitioner()
    expected = partitioner(key, list(range(PARTITIONS)), list(range(PARTITIONS)))
    sources = [r for r in await read_all(kafka_settings, names.source) if r.key == key]
    rows = [
        r
        for r in await read_all(kafka_settings, names.state)
        if r.key == key or r.key.startswith(key + b"\x00")
    ]
    assert {r.partition for r in sources} == {r.partition for r in rows} == {expected}
    records = [r for r in rows if r.key != key]
    study_rows = [StudyAssemblies.from_bytes(r.value) for r in rows if r.key == key]
    assert len(records) == 9  # one record row per instance; the seen marks are derived
    # The study row as last written: two versions announced, listing all nine instances.
    [assembly] = study_rows[-1].assemblies.values()
    assert (assembly.announced_version, assembly.announced_instances) == (2, 9)


async def test_a_study_marked_complete_is_announced_long_before_the_stable_age(
    kafka_settings: KafkaSettings, names: Names
) -> None:
    study = make_study_instances(3, completes_study=True)
    worker = assembler(kafka_settings, names, stable_age=120.0, completion_quiet=0.5)
    async with running(worker), announcements(kafka_settings, names.sink) as out:
        await publish(kafka_settings, names.source, study)
        # Waiting far less than the stable age: only the completion mark can announce it.
        [v1] = await out.wait_for(1, timeout=45.0)

    assert v1.study.version == 1
    assert {r.sop_instance_uid for r in v1.study.instances} == uids(study)


def end_of_request(study: list[InstanceStored]) -> CompletingRequestStored:
    first = study[0]
    return make_completing_request_stored(
        study_instance_uid=first.study_instance_uid,
        sender_ura=first.sender_ura,
        recipient_ura=first.recipient_ura,
        correlation_id=first.correlation_id,
        instances=len(study),
    )


async def test_a_study_is_announced_as_soon_as_the_end_of_its_completing_request_comes(
    kafka_settings: KafkaSettings, names: Names
) -> None:
    ended, waiting = (make_study_instances(3, completes_study=True) for _ in range(2))
    metrics = IngestMetrics()
    # A quiet period and a stable age far beyond the test: only the end of a request counts.
    worker = assembler(
        kafka_settings, names, stable_age=300.0, completion_quiet=300.0, metrics=metrics
    )
    async with running(worker), announcements(kafka_settings, names.sink) as out:
        await publish(kafka_settings, names.source, [*ended, *waiting])
        await until_taken_in(metrics, names, 6)
        assert await out.quiet_for(1.0) == []
        await publish(kafka_settings, names.source, [end_of_request(ended)])
        [v1] = await out.wait_for(1, timeout=20.0)
        assert await out.quiet_for(1.5) == [v1]  # the other study still waits for its end

    assert v1.study.study_instance_uid == ended[0].study_instance_uid
    assert {r.sop_instance_uid for r in v1.study.instances} == uids(ended)
    consumed = metrics.events_consumed.labels(
        names.source, CompletingRequestStored.schema_name, "ok"
    )._value.get()
    assert consumed == 1


async def test_instance_stored_again_changes_nothing_announced_or_not(
    kafka_settings: KafkaSettings, names: Names
) -> None:
    study = make_study_instances(4)
    metrics = IngestMetrics()
    worker = assembler(kafka_settings, names, stable_age=1.5, metrics=metrics)
    async with running(worker), announcements(kafka_settings, names.sink) as out:
        # A redelivery before the announcement (ingest published twice) ...
        await publish(kafka_settings, names.source, [*study, copy_of(study[0])])
        [v1] = await out.wait_for(1)
        # ... and a resend of every instance after it (a sender sending the study again).
        await publish(kafka_settings, names.source, [copy_of(e) for e in study])
        async with asyncio.timeout(TIMEOUT):
            while taken_in(metrics, names, "duplicate") < 5:
                await asyncio.sleep(0.05)
        seen = await out.quiet_for(3.0)  # twice the stable age: a v2 would be here

    assert [e.study.version for e in seen] == [1]
    assert len(v1.study.instances) == 4
    assert taken_in(metrics, names) == 4
    assert taken_in(metrics, names, "duplicate") == 5


async def test_poison_records_are_skipped_and_the_studies_behind_them_announced(
    kafka_settings: KafkaSettings, names: Names
) -> None:
    study = make_study_instances(2)
    uid = study[0].study_instance_uid
    key = uid.encode()
    every = list(range(PARTITIONS))
    home = CachedMurmur2Partitioner()(key, every, every)
    record = CODEC.encode(study[0])
    producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_list)
    await producer.start()
    try:
        # Not an event; an event under another key; an event in another partition than its key's.
        await producer.send_and_wait(names.source, b"not json", key=key, partition=home)
        await producer.send_and_wait(
            names.source, record.value, key=b"other", headers=list(record.headers), partition=home
        )
        await producer.send_and_wait(
            names.source,
            record.value,
            key=key,
            headers=list(record.headers),
            partition=(home + 1) % PARTITIONS,
        )
    finally:
        await producer.stop()
    await publish(kafka_settings, names.source, study)

    metrics = IngestMetrics()
    worker = assembler(kafka_settings, names, stable_age=1.0, metrics=metrics)
    async with running(worker), announcements(kafka_settings, names.sink) as out:
        [v1] = await out.wait_for(1)
        seen = await out.quiet_for(2.0)

    assert seen == [v1]
    assert {r.sop_instance_uid for r in v1.study.instances} == uids(study)
    poison = metrics.events_failed.labels(names.source, "poison")._value.get()
    assert poison == 3
    assert taken_in(metrics, names) == 2


async def test_a_study_of_2000_instances_is_announced_once_as_v1_listing_all_of_them(
    kafka_settings: KafkaSettings, names: Names
) -> None:
    study = make_study_instances(2000)
    # Waiting on the topic before the worker starts: its first fetches find a backlog, which
    # must not look like a quiet study however long taking it in takes.
    await publish(kafka_settings, names.source, study)
    worker = assembler(kafka_settings, names, stable_age=1.0)
    async with running(worker), announcements(kafka_settings, names.sink) as out:
        [v1] = await out.wait_for(1)
        assert len(await out.quiet_for(2.0)) == 1

    assert v1.study.version == 1
    assert {r.sop_instance_uid for r in v1.study.instances} == uids(study)
    assert set(v1.study.new_sop_instance_uids) == uids(study)
    # The study row goes to the changelog once per batch (and announcement), not per instance.
    key = study[0].study_instance_uid.encode()
    study_rows = [r for r in await read_all(kafka_settings, names.state) if r.key == key]
    assert 2 <= len(study_rows) < len(study) / 10


# --- state across members -------------------------------------------------------------------------


async def test_after_a_stop_and_a_new_member_the_state_comes_back_from_the_changelog(
    kafka_settings: KafkaSettings, names: Names
) -> None:
    *study, late = make_study_instances(3)
    async with announcements(kafka_settings, names.sink) as out:
        async with running(assembler(kafka_settings, names, stable_age=1.0)):
            await publish(kafka_settings, names.source, study)
            [v1] = await out.wait_for(1)

        # A new member with nothing in memory: all it knows comes from the changelog.
        async with running(assembler(kafka_settings, names, stable_age=1.0, member="b")):
            await publish(kafka_settings, names.source, [late])
            await out.wait_for(2)
            seen = await out.quiet_for(2.5)

    assert [e.study.version for e in seen] == [1, 2]
    v2 = seen[-1]
    assert v2.study.new_sop_instance_uids == (late.instance.sop_instance_uid,)
    assert {r.sop_instance_uid for r in v2.study.instances} == uids([*study, late])
    assert v2.study.first_received_at == v1.study.first_received_at
    assert timedelta(0) <= v2.study.last_received_at - v1.study.last_received_at


async def test_a_study_open_when_the_member_stopped_is_announced_by_the_next(
    kafka_settings: KafkaSettings, names: Names
) -> None:
    study = make_study_instances(4)
    async with announcements(kafka_settings, names.sink) as out:
        metrics = IngestMetrics()
        first = assembler(kafka_settings, names, stable_age=3.0, metrics=metrics)
        async with running(first):
            await publish(kafka_settings, names.source, study)
            await until_taken_in(metrics, names, len(study))
        assert await out.quiet_for(0.5) == []  # stopped before it was due

        again = IngestMetrics()
        async with running(assembler(kafka_settings, names, stable_age=3.0, metrics=again)):
            [v1] = await out.wait_for(1)
            seen = await out.quiet_for(3.5)

    assert [e.study.version for e in seen] == [1]
    assert {r.sop_instance_uid for r in v1.study.instances} == uids(study)
    assert taken_in(again, names) == 0  # from the changelog, not by reading instances again


async def test_many_studies_due_at_once_are_announced_a_few_per_tick_each_once(
    kafka_settings: KafkaSettings, names: Names
) -> None:
    # After downtime every open study is due at once; announcing them in one tick blocked the
    # event loop past the session timeout (evicted, aborted, announced again: a loop).
    open_studies = studies(30, 2)
    metrics = IngestMetrics()
    # Taken in by a member that would wait a minute, then stopped: all 30 studies stay open.
    async with running(assembler(kafka_settings, names, stable_age=60.0, metrics=metrics)):
        await publish(kafka_settings, names.source, flat(open_studies))
        await until_taken_in(metrics, names, 60)
    worker = assembler(kafka_settings, names, stable_age=1.0, max_announced_per_tick=4)
    [state] = worker.views
    assert isinstance(state, StudyAssembler)
    per_tick: list[int] = []
    announce_due = state._announce_due

    async def counted(now: Any) -> list[Any]:
        events = await announce_due(now)
        per_tick.append(len(events))
        return events

    state._announce_due = counted  # type: ignore[method-assign]
    async with announcements(kafka_settings, names.sink) as out, running(worker):
        await out.wait_for(30)
        seen = await out.quiet_for(1.0)  # everything so far: nothing more comes

    assert_every_study_announced_once_per_version(seen, flat(open_studies))
    assert max(per_tick) == 4 and sum(per_tick) == 30  # at most 4 a tick, all of them in the end


async def test_a_member_that_dies_mid_transaction_loses_and_repeats_nothing(
    kafka_settings: KafkaSettings, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = studies(6, 3)
    second = studies(6, 3)
    late = [late_instance(s) for s in first[:3]]

    async def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the process died mid-transaction")

    async def never_arrives(*args: Any, **kwargs: Any) -> None:
        """A dead process sends no abort: its transaction stays open on the broker."""

    async with announcements(kafka_settings, names.sink) as out:
        with monkeypatch.context() as patch:
            metrics = IngestMetrics()
            worker = assembler(kafka_settings, names, stable_age=1.0, metrics=metrics)
            async with started(worker) as task:
                await publish(kafka_settings, names.source, flat(first))
                await out.wait_for(len(first))
                # The next batch's rows and announcements are sent; then the process dies.
                patch.setattr(AIOKafkaProducer, "send_offsets_to_transaction", crash)
                patch.setattr(AIOKafkaProducer, "abort_transaction", never_arrives)
                await publish(kafka_settings, names.source, [*flat(second), *late])
                with pytest.raises(RuntimeError, match="died mid-transaction"):
                    await asyncio.wait_for(task, TIMEOUT)
        assert taken_in(metrics, names) > len(flat(first))  # it did take some of them in
        # The open transaction is on the log, invisible to read_committed readers.
        state_records = await read_all(kafka_settings, names.state, "read_uncommitted")
        assert len(state_records) > len(await read_all(kafka_settings, names.state))

        # Restarted under the same name: it fences the dead member's transaction (aborted).
        async with running(assembler(kafka_settings, names, stable_age=1.0)):
            await out.wait_for(len(first) + len(second) + len(late))
            seen = await out.quiet_for(2.5)

    versions = assert_every_study_announced_once_per_version(
        seen, [*flat(first), *flat(second), *late]
    )
    assert sorted(len(v) for v in versions.values()) == [1] * 9 + [2] * 3


async def test_a_member_cancelled_without_committing_loses_and_repeats_nothing(
    kafka_settings: KafkaSettings, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = studies(6, 3)
    second = studies(6, 10)
    late = [late_instance(s) for s in first[:3]]
    cancel_at = {e.instance.sop_instance_uid for e in flat(second)[25:26]}
    run: list[asyncio.Task[None]] = []
    handle = StudyAssembler.handle

    async def cancelling(self: StudyAssembler, record: Any) -> Any:
        # The task is cancelled in the middle of a batch (batches of 20: the first of the
        # second wave is committed by then); it ends at its next await, uncommitted.
        outgoing = await handle(self, record)
        event = CODEC.decode_record(record)
        if isinstance(event, InstanceStored) and event.instance.sop_instance_uid in cancel_at:
            run[0].cancel()
        return outgoing

    async with announcements(kafka_settings, names.sink) as out:
        metrics = IngestMetrics()
        with monkeypatch.context() as patch:
            patch.setattr(StudyAssembler, "handle", cancelling)
            worker = assembler(
                kafka_settings, names, stable_age=1.0, metrics=metrics, max_records=20
            )
        async with started(worker) as task:
            run.append(task)
            await publish(kafka_settings, names.source, flat(first))
            await out.wait_for(len(first))
            await publish(kafka_settings, names.source, [*flat(second), *late])
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, TIMEOUT)
        # It got into the second wave. How far it got depends on where the cancelled record
        # fell: a handler that never waits is cancelled only when its batch yields, so the
        # batch in hand is handled to its end (and not committed). Sometimes that is the last.
        assert taken_in(metrics, names) > len(flat(first))

        async with running(assembler(kafka_settings, names, stable_age=1.0, member="b")):
            await out.wait_for(len(first) + len(second) + len(late))
            seen = await out.quiet_for(2.5)

    versions = assert_every_study_announced_once_per_version(
        seen, [*flat(first), *flat(second), *late]
    )
    assert all(len(versions[s[0].study_instance_uid]) == 2 for s in first[:3])


async def test_partitions_move_between_members_with_their_state(
    kafka_settings: KafkaSettings, names: Names
) -> None:
    waves = [studies(8, 2), studies(8, 2), studies(8, 2)]
    late = [[late_instance(s) for s in waves[0]], [late_instance(s) for s in waves[1]]]
    published: list[InstanceStored] = []

    async def send(events: list[InstanceStored]) -> None:
        published.extend(events)
        await publish(kafka_settings, names.source, events)

    async with announcements(kafka_settings, names.sink) as out:
        a = assembler(kafka_settings, names, stable_age=1.0, member="a")
        async with started(a):
            await send(flat(waves[0]))
            await out.wait_for(8)
            # b joins: the partitions are shared out again, each with its studies.
            b = assembler(kafka_settings, names, stable_age=1.0, member="b")
            async with running(b):
                async with asyncio.timeout(TIMEOUT):
                    while not (owned(a) and owned(b)):
                        await asyncio.sleep(0.1)
                await send([*flat(waves[1]), *late[0]])
                await out.wait_for(24)
            # b left: its partitions come back to a.
            async with asyncio.timeout(TIMEOUT):
                while len(owned(a)) < PARTITIONS:
                    await asyncio.sleep(0.1)
            await send([*flat(waves[2]), *late[1]])
            await out.wait_for(40)
            seen = await out.quiet_for(2.5)

    versions = assert_every_study_announced_once_per_version(seen, published)
    assert all(versions[s[0].study_instance_uid] == [1, 2] for s in waves[0] + waves[1])


async def test_a_failed_transaction_is_undone_in_memory_too_and_its_batch_counts_once(
    kafka_settings: KafkaSettings, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = make_study_instances(5)
    real = AIOKafkaProducer.send_offsets_to_transaction
    failures = []

    async def fails_once(self: AIOKafkaProducer, *args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(args)
            raise KafkaError("the broker went away for a moment")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(AIOKafkaProducer, "send_offsets_to_transaction", fails_once)
    await publish(kafka_settings, names.source, study)
    metrics = IngestMetrics()
    worker = assembler(kafka_settings, names, stable_age=1.0, metrics=metrics)
    async with announcements(kafka_settings, names.sink) as out, running(worker):
        [v1] = await out.wait_for(1)
        seen = await out.quiet_for(2.0)

    assert failures, "no transaction failed"
    assert seen == [v1]
    assert {r.sop_instance_uid for r in v1.study.instances} == uids(study)
    # The replay found the state as committed (rebuilt), not as the aborted attempt left it:
    # its instances were new again, not duplicates.
    assert taken_in(metrics, names) > len(study)
    assert taken_in(metrics, names, "duplicate") == 0


# --- the same events as the faust worker --------------------------------------------------------


async def test_both_workers_announce_the_same_study_received_for_the_same_input(
    kafka_settings: KafkaSettings,
    names: Names,
    tag: str,
    declare_topics: Callable[..., Awaitable[None]],
) -> None:
    faust_sink = f"test-study-received-faust-{tag}"
    await declare_topics(TopicSpec(faust_sink, PARTITIONS, topics.DAY_MS))
    patient = make_patient()
    ct = make_study_instances(6, patient=patient, series_number=2, series_description="thorax")
    report = make_study_instances(
        1,
        study_instance_uid=ct[0].study_instance_uid,
        patient=patient,
        sop_class_uid=BASIC_TEXT_SR,
        modality="SR",
        series_number=9,
    )
    # The same study to two recipients: two assemblies, announced separately.
    twice = make_study_instances(3)
    elsewhere = [
        copy_of(e, recipient_ura="33333333", correlation_id=twice[0].correlation_id) for e in twice
    ]
    mixed = [
        *make_study_instances(2, urgency="urgent", sender_note="graag snel"),
        *make_study_instances(2, patient=make_patient()),
    ]
    conflicting = make_study_instances(2)
    conflicting += make_study_instances(
        1, study_instance_uid=conflicting[0].study_instance_uid, patient=make_patient()
    )
    marked = make_study_instances(3, completes_study=True)
    first = [*ct, *report, *twice, *elsewhere, *mixed, *conflicting, *marked]
    late = [late_instance(ct), late_instance(marked)]
    assert {e.recipient_ura for e in first} == {RECIPIENT_URA, "33333333"}

    faust_app = assembly_app(kafka_settings, tag, (names.source, faust_sink), stable_age=2.0)
    ours = assembler(kafka_settings, names, stable_age=2.0)
    async with (
        running_faust(faust_app, names.source, kafka_settings),
        running(ours),
        announcements(kafka_settings, faust_sink, "read_uncommitted") as theirs_out,
        announcements(kafka_settings, names.sink) as ours_out,
    ):
        expected_first = 7  # ct (with its report), twice x2, mixed x2, conflicting, marked
        await publish(kafka_settings, names.source, first)
        await theirs_out.wait_for(expected_first)
        await ours_out.wait_for(expected_first)
        await publish(kafka_settings, names.source, late)
        await theirs_out.wait_for(expected_first + 2)
        await ours_out.wait_for(expected_first + 2)
        theirs = await theirs_out.quiet_for(2.5)
        mine = await ours_out.quiet_for(0.5)

    def comparable(events: list[StudyReceived]) -> dict[Any, dict[str, Any]]:
        # occurred_at is each worker's own clock at announcing; everything else must match.
        return {e.event_id: e.model_dump(exclude={"occurred_at"}) for e in events}

    assert len(mine) == len(theirs) == expected_first + 2
    assert comparable(mine) == comparable(theirs)
    assert {e.study.version for e in mine} == {1, 2}
