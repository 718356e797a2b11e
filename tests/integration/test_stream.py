"""shared.stream.StreamWorker against the real broker: order, commits, the error policy, NotDue,
transactions and a clean stop.

Each test runs one worker on its own tagged source and sink topics and its own consumer group,
with a small handler that turns a study-received (or a queued delivery) into a consent-checked
whose id derives from the input's, as the project's deterministic handlers do. The handler
records every call and how it ended; tests read the sink and the group's committed offsets back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError

from shared import topics
from shared.codec import Codec
from shared.errors import TransientError
from shared.events import ConsentChecked, DeliveryQueued, Event, StudyReceived
from shared.events.base import utcnow
from shared.metrics import ServiceMetrics
from shared.settings import KafkaSettings
from shared.stream import NotDue, StreamWorker, Worker, decode_as
from shared.topics import TopicSpec
from tests.factories import (
    make_consent_checked,
    make_consent_registered,
    make_delivery_queued,
    make_route_resolved,
    make_study_received,
)
from tests.workers import running

pytestmark = pytest.mark.integration

TIMEOUT = 60.0
CODEC = Codec()
NAME = "test-stream"


@dataclass(frozen=True)
class Topics:
    source: str
    sink: str
    partitions: int
    group: str  # as StreamWorker is given it; the broker knows it as "beeldportaal-<group>"
    declared: str  # consent-checked's declared topic for this test; workers rename it to sink


@pytest.fixture
def make_topics(
    declare_topics: Callable[..., Awaitable[None]], tag: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[[int], Awaitable[Topics]]:
    async def make(partitions: int) -> Topics:
        names = Topics(
            source=f"test-stream-source-{tag}",
            sink=f"test-stream-sink-{tag}",
            partitions=partitions,
            group=f"test-stream-{tag}",
            declared=f"test-stream-declared-{tag}",
        )
        # Declared as a topic that does not exist (the broker creates none): a worker that
        # failed to rename could not write into the platform's real consent-checked.
        monkeypatch.setattr(ConsentChecked, "topic", names.declared)
        await declare_topics(
            TopicSpec(names.source, partitions, topics.DAY_MS),
            TopicSpec(names.sink, partitions, topics.DAY_MS),
        )
        return names

    return make


# --- the handler under test ---------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    partition: int
    offset: int
    outcome: str  # "ok" or the name of the exception the call raised
    at: datetime


Rule = Callable[[Any, Event], None]


def derived_id(event: Event) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"test-stream:{event.event_id}")


def checked_for(event: StudyReceived | DeliveryQueued) -> ConsentChecked:
    study = event.study if isinstance(event, StudyReceived) else event.route.study
    return make_consent_checked(
        study=study,
        event_id=derived_id(event),
        correlation_id=event.correlation_id,
        producer=NAME,
    )


class Handler:
    """study-received or delivery-queued in, one consent-checked out; ``rule`` may raise first.

    A delivery whose ``not_before`` lies ahead raises ``NotDue(1.5)``, as notify's retry tiers do.
    """

    def __init__(self, rule: Rule | None = None) -> None:
        self._rule = rule
        self.calls: list[Call] = []
        self.first_not_due = asyncio.Event()

    async def __call__(self, record: Any) -> list[ConsentChecked]:
        try:
            event = decode_as(CODEC, record, StudyReceived, DeliveryQueued)
            due = event.not_before if isinstance(event, DeliveryQueued) else None
            if due is not None and due > utcnow():
                self.first_not_due.set()
                raise NotDue(1.5)
            if self._rule is not None:
                self._rule(record, event)
        except Exception as exc:
            self._record(record, type(exc).__name__)
            raise
        self._record(record, "ok")
        return [checked_for(event)]

    def _record(self, record: Any, outcome: str) -> None:
        self.calls.append(Call(record.partition, record.offset, outcome, utcnow()))

    def handled(self, partition: int | None = None) -> list[tuple[int, int]]:
        """(partition, offset) of every successful call, in call order."""
        return [
            (c.partition, c.offset)
            for c in self.calls
            if c.outcome == "ok" and partition in (None, c.partition)
        ]

    def outcomes(self) -> list[tuple[int, int, str]]:
        return [(c.partition, c.offset, c.outcome) for c in self.calls]


def stream(
    kafka: KafkaSettings,
    names: Topics,
    handle: Handler,
    metrics: ServiceMetrics | None = None,
    **kwargs: Any,
) -> StreamWorker:
    return StreamWorker(
        kafka,
        name=NAME,
        group=names.group,
        topics=[names.source],
        handle=handle,
        metrics=metrics or new_metrics(),
        rename={names.declared: names.sink},
        poll_timeout_ms=100,
        **kwargs,
    )


def new_metrics() -> ServiceMetrics:
    return ServiceMetrics(NAME, "0", runtime_collectors=False)


# --- the broker side ----------------------------------------------------------------------------


async def produce(
    kafka: KafkaSettings, topic: str, items: Sequence[Event | bytes], partition: int = 0
) -> None:
    """Events (encoded as the project does) or raw bytes, in order, onto one partition."""
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_list, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for item in items:
            if isinstance(item, bytes):
                await producer.send_and_wait(topic, item, key=b"raw", partition=partition)
            else:
                record = CODEC.encode(item)
                await producer.send_and_wait(
                    topic,
                    record.value,
                    key=record.key,
                    headers=list(record.headers),
                    partition=partition,
                )
    finally:
        await producer.stop()


async def committed(kafka: KafkaSettings, names: Topics) -> dict[int, int]:
    """The group's committed offset per source partition (partitions never committed: absent)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_list)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(f"{kafka.client_id_prefix}-{names.group}")
    finally:
        await admin.close()
    return {
        tp.partition: meta.offset
        for tp, meta in offsets.items()
        if tp.topic == names.source and meta.offset >= 0
    }


class Sink:
    """The sink topic as a reader with ``isolation_level`` sees it, from the beginning."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self.events: list[Event] = []

    async def _poll(self) -> None:
        batches = await self._consumer.getmany(timeout_ms=200)
        for records in batches.values():
            self.events += [CODEC.decode_record(r) for r in records]

    def ids(self) -> Counter[uuid.UUID]:
        return Counter(e.event_id for e in self.events)

    async def until(self, expected: set[uuid.UUID], timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while not expected <= set(self.ids()):
                await self._poll()

    async def ends(self) -> dict[TopicPartition, int]:
        """End offsets: the high watermark, or for read_committed the last stable offset."""
        return dict(await self._consumer.end_offsets(list(self._consumer.assignment())))

    async def drain(
        self, ends: dict[TopicPartition, int] | None = None, timeout: float = TIMEOUT
    ) -> Counter[uuid.UUID]:
        """Read up to ``ends`` (default: this reader's end offsets now); event id -> copies."""
        async with asyncio.timeout(timeout):
            ends = ends or await self.ends()
            while True:
                positions = {tp: await self._consumer.position(tp) for tp in ends}
                if all(positions[tp] >= end for tp, end in ends.items()):
                    return self.ids()
                await self._poll()


@asynccontextmanager
async def sink(
    kafka: KafkaSettings, names: Topics, isolation_level: str = "read_committed"
) -> AsyncIterator[Sink]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_list,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(names.sink, p) for p in range(names.partitions)])
        yield Sink(consumer)
    finally:
        await consumer.stop()


def studies(count: int) -> list[StudyReceived]:
    return [make_study_received() for _ in range(count)]


async def three_studies_a_partition(kafka: KafkaSettings, names: Topics) -> set[uuid.UUID]:
    """Three studies on each source partition; the ids of the events they cause."""
    expected: set[uuid.UUID] = set()
    for p in range(names.partitions):
        events = studies(3)
        await produce(kafka, names.source, events, partition=p)
        expected |= {derived_id(e) for e in events}
    return expected


def sample(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"beeldportaal_{name}_total", labels) or 0.0


# --- the tests ----------------------------------------------------------------------------------


async def test_records_are_handled_once_in_partition_order_and_a_next_member_starts_after_them(
    kafka_settings: KafkaSettings, make_topics: Callable[[int], Awaitable[Topics]]
) -> None:
    names = await make_topics(3)
    first = {p: studies(4) for p in range(3)}
    second = {p: studies(2) for p in range(3)}
    for p in range(3):
        await produce(kafka_settings, names.source, first[p], partition=p)
    handler, metrics = Handler(), new_metrics()

    async with sink(kafka_settings, names) as out:
        async with running(Worker(stream(kafka_settings, names, handler, metrics))):
            await out.until({derived_id(e) for events in first.values() for e in events})
        after_first = await committed(kafka_settings, names)
        for p in range(3):
            await produce(kafka_settings, names.source, second[p], partition=p)
        again = Handler()
        async with running(Worker(stream(kafka_settings, names, again))):
            await out.until({derived_id(e) for events in second.values() for e in events})
        seen = await out.drain()

    # Each record once, in offset order within its partition.
    assert all(c.outcome == "ok" for c in handler.calls)
    for p in range(3):
        assert handler.handled(p) == [(p, offset) for offset in range(4)]
    assert len(handler.calls) == 12
    # The clean stop committed everything, so the next member took only what came after.
    assert after_first == {0: 4, 1: 4, 2: 4}
    assert sorted(again.handled()) == [(p, offset) for p in range(3) for offset in (4, 5)]
    assert await committed(kafka_settings, names) == {0: 6, 1: 6, 2: 6}
    # Outputs went to the renamed topic, one per record, each about its record's study.
    inputs = [e for events in (*first.values(), *second.values()) for e in events]
    assert seen == Counter({derived_id(e): 1 for e in inputs})
    by_id = {e.event_id: e for e in out.events}
    assert all(by_id[derived_id(e)].study == e.study for e in inputs)
    schema = "consent.checked.v1"
    assert sample(metrics, "events_produced", topic=names.sink, schema=schema) == 12
    assert sample(metrics, "events_produced", topic=names.declared, schema=schema) == 0


async def test_poison_records_are_counted_and_skipped_and_the_records_after_them_handled(
    kafka_settings: KafkaSettings, make_topics: Callable[[int], Awaitable[Topics]]
) -> None:
    names = await make_topics(1)
    before, after = make_study_received(), make_study_received()
    wrong_type = make_consent_registered()  # a valid event, but not one this topic carries
    await produce(kafka_settings, names.source, [before, b"not an event", wrong_type, after])
    handler, metrics = Handler(), new_metrics()

    async with sink(kafka_settings, names) as out:
        async with running(Worker(stream(kafka_settings, names, handler, metrics))):
            await out.until({derived_id(before), derived_id(after)})
        seen = await out.drain()

    assert handler.outcomes() == [
        (0, 0, "ok"),
        (0, 1, "PoisonEvent"),
        (0, 2, "PoisonEvent"),
        (0, 3, "ok"),
    ]
    assert seen == Counter({derived_id(before): 1, derived_id(after): 1})
    assert sample(metrics, "events_failed", topic=names.source, error_class="poison") == 2
    consumed = {"topic": names.source, "schema": "unknown", "outcome": "poison"}
    assert sample(metrics, "events_consumed", **consumed) == 2
    # Skipped means committed with the batch: never seen again.
    assert await committed(kafka_settings, names) == {0: 4}


async def test_a_transient_error_replays_the_batch_until_it_succeeds_and_loses_nothing(
    kafka_settings: KafkaSettings, make_topics: Callable[[int], Awaitable[Topics]]
) -> None:
    names = await make_topics(1)
    inputs = studies(5)
    await produce(kafka_settings, names.source, inputs)
    failures = 0

    def twice_unavailable(record: Any, event: Event) -> None:
        nonlocal failures
        if record.offset == 2 and failures < 2:
            failures += 1
            raise TransientError("the peer is away")

    handler, metrics = Handler(twice_unavailable), new_metrics()
    async with sink(kafka_settings, names) as out:
        async with running(Worker(stream(kafka_settings, names, handler, metrics))):
            await out.until({derived_id(e) for e in inputs})
        seen = await out.drain()

    outcomes = handler.outcomes()
    fail_at = [i for i, (_, _, outcome) in enumerate(outcomes) if outcome == "TransientError"]
    assert len(fail_at) == 2
    first, second, rest = (
        outcomes[: fail_at[0] + 1],
        outcomes[fail_at[0] + 1 : fail_at[1] + 1],
        outcomes[fail_at[1] + 1 :],
    )
    # Each attempt handled the same batch again from its start, up to the failing record ...
    assert [o[:2] for o in second] == [o[:2] for o in first]
    assert [o[:2] for o in rest[: len(first)]] == [o[:2] for o in first]
    assert first[0][1] == 0 and first[-1][1] == 2
    # ... and the third went through: every record handled, every output there.
    assert {offset for _, offset in handler.handled()} == set(range(5))
    assert set(seen) == {derived_id(e) for e in inputs}  # a replay repeats an id, never a new one
    assert await committed(kafka_settings, names) == {0: 5}
    assert sample(metrics, "events_failed", topic=names.source, error_class="poison") == 0
    # Each failed attempt at the batch is counted: a worker stuck retrying shows.
    assert sample(metrics, "events_failed", topic=names.source, error_class="transient") == 2


async def test_a_tick_that_fails_for_now_is_tried_again_and_counted_on_the_workers_topics(
    kafka_settings: KafkaSettings, make_topics: Callable[[int], Awaitable[Topics]]
) -> None:
    names = await make_topics(1)
    ticks: list[str] = []

    async def tick() -> list[Event]:
        if len(ticks) < 2:
            ticks.append("failed")
            raise TransientError("the store is away")
        ticks.append("ok")
        return []

    metrics = new_metrics()
    worker = stream(kafka_settings, names, Handler(), metrics, tick=tick, tick_interval_ms=100)
    async with running(Worker(worker)):
        async with asyncio.timeout(TIMEOUT):
            while "ok" not in ticks:
                await asyncio.sleep(0.05)

    assert ticks[:3] == ["failed", "failed", "ok"]
    # No record in hand, yet the stall shows: the failures count on the worker's topics.
    assert sample(metrics, "events_failed", topic=names.source, error_class="transient") == 2


async def test_an_unexpected_error_stops_the_run_uncommitted_and_a_new_member_handles_it_again(
    kafka_settings: KafkaSettings, make_topics: Callable[[int], Awaitable[Topics]]
) -> None:
    names = await make_topics(1)
    inputs = studies(3)
    await produce(kafka_settings, names.source, inputs)

    def bug(record: Any, event: Event) -> None:
        if record.offset == 1:
            raise RuntimeError("a bug in the handler")

    handler = Handler(bug)
    async with stream(kafka_settings, names, handler) as failing:
        with pytest.raises(RuntimeError, match="a bug in the handler"):
            await asyncio.wait_for(failing.run(), TIMEOUT)

    # The three records came in one fetch: the record before the failing one was handled, but
    # neither it nor anything else was committed or published.
    assert handler.outcomes() == [(0, 0, "ok"), (0, 1, "RuntimeError")]
    assert await committed(kafka_settings, names) == {}
    async with sink(kafka_settings, names) as out:
        assert await out.drain() == Counter()

        again = Handler()
        async with running(Worker(stream(kafka_settings, names, again))):
            await out.until({derived_id(e) for e in inputs})
        seen = await out.drain()

    assert again.handled() == [(0, 0), (0, 1), (0, 2)]
    assert seen == Counter({derived_id(e): 1 for e in inputs})
    assert await committed(kafka_settings, names) == {0: 3}


async def test_a_record_not_yet_due_pauses_only_its_partition_until_its_time(
    kafka_settings: KafkaSettings, make_topics: Callable[[int], Awaitable[Topics]]
) -> None:
    names = await make_topics(2)
    # Far enough ahead that partition 1's records, published once the pause began, go first.
    not_before = utcnow() + timedelta(seconds=6)
    early = make_study_received()
    late = make_delivery_queued(route=make_route_resolved(), not_before=not_before)
    behind = make_study_received()  # after the late one in its partition: waits with it
    elsewhere = studies(3)
    handler = Handler()

    async with sink(kafka_settings, names) as out:
        async with running(Worker(stream(kafka_settings, names, handler))):
            await produce(kafka_settings, names.source, [early, late, behind], partition=0)
            await asyncio.wait_for(handler.first_not_due.wait(), TIMEOUT)
            await produce(kafka_settings, names.source, elsewhere, partition=1)
            await out.until({derived_id(e) for e in (early, *elsewhere)})
            # Partition 1 flowed while partition 0 waited, with what came before it committed.
            assert (0, 1) not in handler.handled()
            assert (await committed(kafka_settings, names)).get(0) == 1
            await out.until({derived_id(late), derived_id(behind)})
        seen = await out.drain()

    handled_at = {(c.partition, c.offset): c.at for c in handler.calls if c.outcome == "ok"}
    assert handled_at[0, 1] >= not_before
    assert handled_at[0, 1] - not_before < timedelta(seconds=30)
    assert all(handled_at[1, offset] < handled_at[0, 1] for offset in range(3))
    # In partition order, each once; the late record was refused until due, then handled.
    assert handler.handled(0) == [(0, 0), (0, 1), (0, 2)]
    assert handler.handled(1) == [(1, 0), (1, 1), (1, 2)]
    refusals = [c for c in handler.calls if c.outcome == "NotDue"]
    assert refusals and all((c.partition, c.offset) == (0, 1) for c in refusals)
    # Paused between tries, not fetched again and again: 6 s in 1.5 s pauses is at most 5 tries.
    assert len(refusals) <= 6
    assert seen == Counter({derived_id(e): 1 for e in (early, late, behind, *elsewhere)})
    assert await committed(kafka_settings, names) == {0: 3, 1: 3}


async def test_a_transaction_that_fails_is_invisible_to_read_committed_and_its_replay_counts_once(
    kafka_settings: KafkaSettings,
    make_topics: Callable[[int], Awaitable[Topics]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = await make_topics(2)
    expected = await three_studies_a_partition(kafka_settings, names)

    async def crash(self: AIOKafkaProducer, offsets: object, group_id: str) -> None:
        raise RuntimeError("crashed between the batch's events and its offsets")

    handler = Handler()
    async with (
        sink(kafka_settings, names, "read_committed") as clean,
        sink(kafka_settings, names, "read_uncommitted") as dirty,
    ):
        with monkeypatch.context() as patch:
            # The events are sent and acknowledged inside the transaction; then it fails.
            patch.setattr(AIOKafkaProducer, "send_offsets_to_transaction", crash)
            async with stream(kafka_settings, names, handler, transactional=True) as failing:
                with pytest.raises(RuntimeError, match="crashed between"):
                    await asyncio.wait_for(failing.run(), TIMEOUT)
        assert len(handler.handled()) == 6
        assert await committed(kafka_settings, names) == {}
        await dirty.until(expected)  # the aborted transaction's events are on the log ...
        assert await clean.drain() == Counter()  # ... but not for read_committed readers

        again = Handler()
        async with running(Worker(stream(kafka_settings, names, again, transactional=True))):
            await clean.until(expected)
        ends = await dirty.ends()
        dirty_seen = await dirty.drain(ends)
        clean_seen = await clean.drain(ends)

    assert sorted(again.handled()) == [(p, offset) for p in range(2) for offset in range(3)]
    assert clean_seen == Counter(dict.fromkeys(expected, 1))
    assert dirty_seen == Counter(dict.fromkeys(expected, 2))  # aborted copies + committed ones
    assert await committed(kafka_settings, names) == {0: 3, 1: 3}


async def test_a_transaction_committed_though_its_answer_was_lost_is_not_handled_again(
    kafka_settings: KafkaSettings,
    make_topics: Callable[[int], Awaitable[Topics]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = await make_topics(2)
    expected = await three_studies_a_partition(kafka_settings, names)
    commit = AIOKafkaProducer.commit_transaction
    lost: list[int] = []

    async def answer_lost(self: AIOKafkaProducer) -> None:
        """The broker commits; the client never hears (the connection dropped), once."""
        await commit(self)
        if not lost:
            lost.append(1)
            raise KafkaConnectionError("connection lost before the commit's answer")

    checked = StreamWorker._not_committed
    replays: list[dict[TopicPartition, list[Any]]] = []

    async def replay_checked(
        self: StreamWorker, batch: dict[TopicPartition, list[Any]]
    ) -> dict[TopicPartition, list[Any]]:
        replays.append(left := await checked(self, batch))
        return left

    monkeypatch.setattr(AIOKafkaProducer, "commit_transaction", answer_lost)
    monkeypatch.setattr(StreamWorker, "_not_committed", replay_checked)
    handler = Handler()
    async with sink(kafka_settings, names, "read_committed") as clean:
        async with running(Worker(stream(kafka_settings, names, handler, transactional=True))):
            await clean.until(expected)
            async with asyncio.timeout(TIMEOUT):
                # The batch whose answer was lost is handled again, or found committed.
                while not replays and len(handler.handled()) <= len(expected):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # a wrongful second handling would publish meanwhile
        seen = await clean.drain()

    assert lost == [1]
    assert replays == [{}]  # every record of the batch was found committed ...
    # ... and none was handled or published a second time.
    assert sorted(handler.handled()) == [(p, offset) for p in range(2) for offset in range(3)]
    assert seen == Counter(dict.fromkeys(expected, 1))
    assert await committed(kafka_settings, names) == {0: 3, 1: 3}


async def test_a_stop_requested_mid_batch_finishes_and_commits_the_batch(
    kafka_settings: KafkaSettings, make_topics: Callable[[int], Awaitable[Topics]]
) -> None:
    names = await make_topics(1)
    inputs = studies(5)
    await produce(kafka_settings, names.source, inputs)
    worker: StreamWorker | None = None

    def stop_at_the_first(record: Any, event: Event) -> None:
        if record.offset == 0:
            assert worker is not None
            worker.request_stop()  # SIGTERM arrives while the batch is being handled

    handler = Handler(stop_at_the_first)
    worker = stream(kafka_settings, names, handler)
    async with sink(kafka_settings, names) as out, worker:
        await asyncio.wait_for(worker.run(), TIMEOUT)  # returns: nothing raised
        seen = await out.drain()

    assert handler.handled() == [(0, offset) for offset in range(5)]
    assert seen == Counter({derived_id(e): 1 for e in inputs})
    assert await committed(kafka_settings, names) == {0: 5}


async def test_a_restarted_transactional_worker_fences_the_transaction_a_crash_left_open(
    kafka_settings: KafkaSettings,
    make_topics: Callable[[int], Awaitable[Topics]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = await make_topics(1)
    inputs = studies(3)
    expected = {derived_id(e) for e in inputs}
    await produce(kafka_settings, names.source, inputs)

    async def crash(self: AIOKafkaProducer, offsets: object, group_id: str) -> None:
        raise RuntimeError("the process died mid-transaction")

    async def never_arrives(self: AIOKafkaProducer) -> None:
        """A dead process sends no abort: its transaction stays open on the broker."""

    with monkeypatch.context() as patch:
        patch.setattr(AIOKafkaProducer, "send_offsets_to_transaction", crash)
        patch.setattr(AIOKafkaProducer, "abort_transaction", never_arrives)
        async with stream(kafka_settings, names, Handler(), transactional=True) as crashed:
            with pytest.raises(RuntimeError, match="died mid-transaction"):
                await asyncio.wait_for(crashed.run(), TIMEOUT)

    again = Handler()
    async with sink(kafka_settings, names, "read_committed") as clean:
        async with running(Worker(stream(kafka_settings, names, again, transactional=True))):
            async with asyncio.timeout(TIMEOUT):
                while len(again.handled()) < len(inputs) or not await committed(
                    kafka_settings, names
                ):
                    await asyncio.sleep(0.1)
        # The restarted worker committed its transaction: its events are due to readers now,
        # well before the crashed one's transaction would time out.
        await clean.until(expected, timeout=30)
        seen = await clean.drain()

    assert seen == Counter(dict.fromkeys(expected, 1))


# --- parallel_keys: the keys of a partition side by side ------------------------------------------


class SideBySide(Handler):
    """A slow handler that notes which keys were in hand at once."""

    def __init__(self, seconds: float = 0.3) -> None:
        super().__init__()
        self._seconds = seconds
        self._in_hand: set[bytes] = set()
        self.most_at_once = 0
        self.same_key_overlapped = False

    async def __call__(self, record: Any) -> list[ConsentChecked]:
        if record.key in self._in_hand:
            self.same_key_overlapped = True
        self._in_hand.add(record.key)
        self.most_at_once = max(self.most_at_once, len(self._in_hand))
        try:
            await asyncio.sleep(self._seconds)
            return await super().__call__(record)
        finally:
            self._in_hand.discard(record.key)


def version_of(event: StudyReceived, version: int) -> StudyReceived:
    """The same study (same key), another version: a second record of that key."""
    return make_study_received(study=event.study.model_copy(update={"version": version}))


async def test_with_parallel_keys_the_keys_of_a_partition_go_side_by_side_each_in_order(
    kafka_settings: KafkaSettings, make_topics: Callable[[int], Awaitable[Topics]]
) -> None:
    names = await make_topics(1)
    firsts = studies(4)
    records = [*firsts, *(version_of(e, 2) for e in firsts)]  # offsets 0-3, then 4-7
    await produce(kafka_settings, names.source, records)
    handler = SideBySide()

    async with sink(kafka_settings, names) as out:
        worker = stream(kafka_settings, names, handler, parallel_keys=True)
        async with running(Worker(worker)):
            await out.until({derived_id(e) for e in records})
        seen = await out.drain()

    assert handler.most_at_once >= 2  # different keys were in hand at once
    assert not handler.same_key_overlapped  # one key's records never were
    by_key: dict[str, list[int]] = {}
    for _, offset in handler.handled():
        by_key.setdefault(records[offset].study.study_instance_uid, []).append(offset)
    assert sorted(by_key.values()) == sorted([i, i + 4] for i in range(4))  # each key in order
    assert seen == Counter({derived_id(e): 1 for e in records})
    # Published in offset order, whatever order the handling finished in.
    order = {derived_id(e): i for i, e in enumerate(records)}
    assert [order[e.event_id] for e in out.events] == sorted(order[e.event_id] for e in out.events)
    assert await committed(kafka_settings, names) == {0: 8}


async def test_with_parallel_keys_a_record_not_yet_due_drops_what_came_after_it_for_later(
    kafka_settings: KafkaSettings, make_topics: Callable[[int], Awaitable[Topics]]
) -> None:
    names = await make_topics(1)
    not_before = utcnow() + timedelta(seconds=4)
    early = make_study_received()
    late = make_delivery_queued(route=make_route_resolved(), not_before=not_before)
    behind = studies(3)  # other keys, after the late record: handled beside it, then again
    handler = SideBySide(seconds=0.05)

    # All there before the worker starts: its first batch holds the late record and those after.
    await produce(kafka_settings, names.source, [early, late, *behind])
    async with sink(kafka_settings, names) as out:
        worker = stream(kafka_settings, names, handler, parallel_keys=True, transactional=True)
        async with running(Worker(worker)):
            await out.until({derived_id(e) for e in (early, late, *behind)})
        seen = await out.drain()

    # Every output exactly once for read_committed readers, the late one only once due.
    assert seen == Counter({derived_id(e): 1 for e in (early, late, *behind)})
    handled_at = {(c.partition, c.offset): c.at for c in handler.calls if c.outcome == "ok"}
    assert handled_at[0, 1] >= not_before
    # The records behind the late one were handled before it was due (side by side) and again
    # after: their first outputs were dropped with the partition rewound to the late record.
    for offset in (2, 3, 4):
        times = [c.at for c in handler.calls if (c.offset, c.outcome) == (offset, "ok")]
        assert len(times) >= 2 and min(times) < not_before <= max(times)
    assert await committed(kafka_settings, names) == {0: 5}
