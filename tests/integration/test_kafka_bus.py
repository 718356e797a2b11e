"""Events through the real Kafka broker: every contract round-trips, groups share partitions."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from shared.codec import SCHEMA_HEADER, Codec
from shared.errors import PoisonEvent
from shared.events import ConsentRevoked, registry
from shared.kafka import KafkaEventPublisher, WireRecord
from shared.settings import KafkaSettings
from tests.factories import sample_event

pytestmark = pytest.mark.integration

MakeTopic = Callable[..., Awaitable[str]]


def _consumer(settings: KafkaSettings, topic: str, group: str, **kw: object) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_list,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **kw,
    )


async def _drain(consumer: AIOKafkaConsumer, count: int, timeout: float = 30.0) -> list:
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        batch = await consumer.getmany(timeout_ms=500)
        for part in batch.values():
            records.extend(part)
    return records


async def test_every_event_type_round_trips_through_the_broker_with_the_codec(
    kafka_settings: KafkaSettings, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=3)
    events = [sample_event(model) for model in registry.models()]
    async with KafkaEventPublisher(kafka_settings, "test") as publisher:
        await publisher.publish_many(events, topic=topic)

    consumer = _consumer(kafka_settings, topic, f"g-{uuid.uuid4().hex}")
    await consumer.start()
    try:
        records = await _drain(consumer, len(events))
    finally:
        await consumer.stop()

    codec = Codec()
    decoded = {e.event_id: e for e in (codec.decode_record(r) for r in records)}
    assert len(records) == len(events)
    for original in events:
        assert decoded[original.event_id] == original
        assert type(decoded[original.event_id]) is type(original)
    for record in records:
        event = decoded[codec.decode_record(record).event_id]
        assert record.key == event.partition_key().encode()
        assert dict(record.headers)[SCHEMA_HEADER] == type(event).schema_name.encode()


async def test_events_of_one_aggregate_land_in_one_partition_in_order(
    kafka_settings: KafkaSettings, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=6)
    patient = "psn1-" + "a" * 52
    revocations = [
        ConsentRevoked(consent_id=f"c{i}", patient=patient, correlation_id="t", producer="test")
        for i in range(20)
    ]
    async with KafkaEventPublisher(kafka_settings, "test") as publisher:
        for event in revocations:  # one at a time: the order we assert is the order we sent
            await publisher.publish(event, topic=topic)

    consumer = _consumer(kafka_settings, topic, f"g-{uuid.uuid4().hex}")
    await consumer.start()
    try:
        records = await _drain(consumer, len(revocations))
    finally:
        await consumer.stop()
    assert len({r.partition for r in records}) == 1
    assert [Codec().decode_record(r).consent_id for r in records] == [
        e.consent_id for e in revocations
    ]


async def test_records_sent_in_batches_land_where_one_by_one_sends_put_them_in_order(
    kafka_settings: KafkaSettings, make_topic: MakeTopic
) -> None:
    batched, single = await make_topic(partitions=6), await make_topic(partitions=6)
    keys = [f"1.2.826.0.1.{i % 37}".encode() for i in range(300)]
    # Big enough values that a partition's records need several batches (max_batch_bytes).
    records = [
        WireRecord(batched, key, f"{i}:".encode() + b"x" * 2_000, (("n", str(i).encode()),))
        for i, key in enumerate(keys)
    ]
    pinned = WireRecord(batched, b"anywhere", b"pinned", (), partition=4)
    async with KafkaEventPublisher(kafka_settings, "test", max_batch_size=16_384) as publisher:
        producer = await publisher.ready()
        futures = await publisher.send_many(producer, [*records, pinned])
        assert len(futures) > 6  # a batch per partition, and more where one was full
        await asyncio.gather(*futures)
    # The reference: aiokafka's own producer and default partitioner, one record at a time.
    plain = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_list)
    await plain.start()
    try:
        for key in set(keys):
            await plain.send_and_wait(single, value=b"", key=key)
    finally:
        await plain.stop()

    async def read(topic: str, count: int) -> list:
        consumer = _consumer(kafka_settings, topic, f"g-{uuid.uuid4().hex}")
        await consumer.start()
        try:
            return await _drain(consumer, count)
        finally:
            await consumer.stop()

    got, expected = await read(batched, len(records) + 1), await read(single, len(set(keys)))
    where = {r.key: r.partition for r in expected}
    [pinned_back] = [r for r in got if r.key == b"anywhere"]
    assert pinned_back.partition == 4 and pinned_back.value == b"pinned"
    got = [r for r in got if r.key != b"anywhere"]
    assert len(got) == len(records)
    assert all(r.partition == where[r.key] for r in got)
    for partition in {r.partition for r in got}:
        numbers = [int(dict(r.headers)["n"]) for r in got if r.partition == partition]
        assert numbers == sorted(numbers)  # in the order given, per partition
        assert all(
            r.value.startswith(dict(r.headers)["n"] + b":") for r in got if r.partition == partition
        )


async def test_a_record_with_an_unknown_schema_is_recognised_as_poison_after_the_trip(
    kafka_settings: KafkaSettings, make_topic: MakeTopic
) -> None:
    topic = await make_topic()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_list)
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, b'{"a": 1}', key=b"k", headers=[(SCHEMA_HEADER, b"nobody.knows.v9")]
        )
    finally:
        await producer.stop()
    consumer = _consumer(kafka_settings, topic, f"g-{uuid.uuid4().hex}")
    await consumer.start()
    try:
        [record] = await _drain(consumer, 1)
    finally:
        await consumer.stop()
    with pytest.raises(PoisonEvent, match=re.escape("unknown schema 'nobody.knows.v9'")):
        Codec().decode_record(record)


async def test_the_broker_refuses_to_auto_create_an_undeclared_topic(
    kafka_settings: KafkaSettings,
) -> None:
    publisher = KafkaEventPublisher(kafka_settings, "test", request_timeout_ms=3000)
    await publisher.start()
    try:
        event = sample_event(ConsentRevoked)
        with pytest.raises(KafkaError):
            await (await publisher.send(event, topic=f"undeclared-{uuid.uuid4().hex}"))
    finally:
        await publisher.stop()


class _Tracker(ConsumerRebalanceListener):
    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.assigned -= set(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned |= set(assigned)


async def test_two_consumers_in_one_group_split_the_partitions_and_hand_them_back(
    kafka_settings: KafkaSettings, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=4)
    group = f"g-{uuid.uuid4().hex}"
    trackers = [_Tracker(), _Tracker()]
    consumers: list[AIOKafkaConsumer | None] = []
    for tracker in trackers:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka_settings.bootstrap_list,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=True,
            auto_commit_interval_ms=200,
        )
        consumer.subscribe([topic], listener=tracker)
        await consumer.start()
        consumers.append(consumer)
    received: list[list] = [[], []]

    async def poll_until(done: Callable[[], bool], timeout: float = 30) -> None:
        # Every member must keep polling: a group only rebalances through its members' polls.
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            for i, consumer in enumerate(consumers):
                if consumer is not None:
                    for part in (await consumer.getmany(timeout_ms=100)).values():
                        received[i].extend(part)

    try:
        await poll_until(lambda: all(len(t.assigned) == 2 for t in trackers))
        first, second = (t.assigned for t in trackers)
        assert len(first) == len(second) == 2
        assert first.isdisjoint(second)

        events = [sample_event(ConsentRevoked) for _ in range(200)]
        async with KafkaEventPublisher(kafka_settings, "test") as publisher:
            await publisher.publish_many(events, topic=topic)
        await poll_until(lambda: sum(map(len, received)) >= len(events))

        for records, tracker in zip(received, trackers, strict=True):
            assert records, "each consumer got a share"
            assert {TopicPartition(r.topic, r.partition) for r in records} <= tracker.assigned
        ids = [Codec().decode_record(r).event_id for records in received for r in records]
        assert sorted(ids) == sorted(e.event_id for e in events)

        # One member leaves: the group rebalances and the other takes over every partition.
        leaving, consumers[1] = consumers[1], None
        assert leaving is not None
        await leaving.stop()
        await poll_until(lambda: len(trackers[0].assigned) == 4)
        assert len(trackers[0].assigned) == 4
    finally:
        for consumer in consumers:
            if consumer is not None:
                await consumer.stop()
