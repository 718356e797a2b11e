"""A faust app from make_app, run in-process against the real broker: decode, forward, collect."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import faust
import pytest
from aiokafka import AIOKafkaConsumer

from shared import topics
from shared.codec import Codec
from shared.events import ConsentRevoked, Event
from shared.faust_app import decode_event, make_app
from shared.kafka import KafkaEventPublisher
from shared.settings import KafkaSettings
from shared.topics import TopicSpec

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


def pseudonym() -> str:
    return "psn1-" + base64.b32encode(os.urandom(32)).decode().rstrip("=").lower()


def revoked(n: int) -> ConsentRevoked:
    return ConsentRevoked(
        consent_id=f"consent-{n}", patient=pseudonym(), correlation_id="c", producer="test"
    )


@pytest.fixture
async def declared(
    declare_topics: Callable[..., Awaitable[None]], tag: str
) -> tuple[TopicSpec, TopicSpec]:
    """An input and an output topic, declared (for this test only) and provisioned."""
    specs = (
        TopicSpec(f"test-faust-in-{tag}", 3, topics.DAY_MS),
        TopicSpec(f"test-faust-out-{tag}", 2, topics.DAY_MS),
    )
    await declare_topics(*specs)
    return specs


async def consume(settings: KafkaSettings, topic: str, count: int) -> list[Event]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_list,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        codec, events = Codec(), []
        async with asyncio.timeout(TIMEOUT):
            while len(events) < count:
                batches = await consumer.getmany(timeout_ms=500)
                events += [codec.decode_record(r) for rs in batches.values() for r in rs]
        return events
    finally:
        await consumer.stop()


async def test_a_faust_agent_decodes_project_events_and_forwards_them(
    kafka_settings: KafkaSettings, tag: str, declared: tuple[TopicSpec, TopicSpec], tmp_path: Path
) -> None:
    source_spec, sink_spec = declared
    app = make_app(f"test-{tag}", kafka_settings, data_dir=tmp_path)
    source, sink = app.topic(source_spec.name), app.topic(sink_spec.name)
    assert (source.partitions, source.value_serializer) == (3, "raw")
    codec, collected, all_forwarded = Codec(), [], asyncio.Event()
    sent = [revoked(n) for n in range(5)]

    @app.agent(source)
    async def forward(stream: faust.StreamT) -> None:
        async for faust_event in stream.events():
            event = decode_event(codec, faust_event)
            collected.append(event)
            record = codec.encode(event)
            acked = await sink.send(
                key=record.key, value=record.value, headers=list(record.headers)
            )
            await acked
            if len(collected) == len(sent):
                all_forwarded.set()

    try:
        await asyncio.wait_for(app.start(), TIMEOUT)
        # The broker gave faust's producer an id: idempotence is on for real, not only asked for.
        producer = app.producer._producer
        assert producer is not None
        assert producer._txn_manager is not None
        assert producer._txn_manager.producer_id >= 0
        async with KafkaEventPublisher(kafka_settings, "test-faust-app") as publisher:
            await publisher.publish_many(sent, topic=source_spec.name)
        await asyncio.wait_for(all_forwarded.wait(), TIMEOUT)
    finally:
        await asyncio.wait_for(app.stop(), TIMEOUT)

    assert sorted(collected, key=lambda e: e.consent_id) == sent
    forwarded = await consume(kafka_settings, sink_spec.name, len(sent))
    assert sorted(forwarded, key=lambda e: e.consent_id) == sent
    assert {type(e) for e in forwarded} == {ConsentRevoked}
