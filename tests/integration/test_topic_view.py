"""TopicView through the real broker: it reads everything, catches up, syncs after writes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaProducer

from shared.errors import PoisonEvent
from shared.settings import KafkaSettings
from shared.topic_view import TopicView, ViewFailed

pytestmark = pytest.mark.integration

MakeTopic = Callable[..., Awaitable[str]]


async def _produce(settings: KafkaSettings, topic: str, items: list[tuple[bytes, bytes | None]]):
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_list, acks="all")
    await producer.start()
    try:
        return [await producer.send_and_wait(topic, value=v, key=k) for k, v in items]
    finally:
        await producer.stop()


async def test_a_view_holds_every_record_written_before_it_started_once_caught_up(
    kafka_settings: KafkaSettings, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=3)
    await _produce(kafka_settings, topic, [(f"k{i}".encode(), f"v{i}".encode()) for i in range(50)])
    state: dict[bytes, bytes | None] = {}
    view = TopicView(
        kafka_settings, [topic], lambda r: state.__setitem__(r.key, r.value), name="test"
    )
    assert not view.is_caught_up  # not started: it read nothing
    async with view:
        await view.wait_caught_up(30)
        assert view.is_caught_up
        assert len(state) == 50
        assert state[b"k7"] == b"v7"
        assert view.lag() == 0
    assert not view.is_caught_up  # stopped: it no longer follows the topics


async def test_sync_after_a_write_makes_the_write_visible(
    kafka_settings: KafkaSettings, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=2)
    state: dict[bytes, bytes | None] = {}
    view = TopicView(
        kafka_settings, [topic], lambda r: state.__setitem__(r.key, r.value), name="test"
    )
    async with view:
        await view.wait_caught_up(30)
        assert state == {}
        [meta] = await _produce(kafka_settings, topic, [(b"ura", b"first")])
        await view.sync(30)
        assert state[b"ura"] == b"first"
        [meta] = await _produce(kafka_settings, topic, [(b"ura", None)])
        await view.wait_for_offset(topic, meta.partition, meta.offset, 30)
        assert state[b"ura"] is None


async def test_a_poison_record_is_skipped_and_counted_and_the_rest_applied(
    kafka_settings: KafkaSettings, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    await _produce(kafka_settings, topic, [(b"a", b"ok"), (b"b", b"bad"), (b"c", b"ok")])
    seen: list[bytes] = []

    def apply(record) -> None:  # type: ignore[no-untyped-def]
        if record.value == b"bad":
            raise PoisonEvent("not a record this view understands")
        seen.append(record.key)

    async with TopicView(kafka_settings, [topic], apply, name="test") as view:
        await view.wait_caught_up(30)
        assert seen == [b"a", b"c"]
        assert (view.applied, view.skipped) == (2, 1)


async def test_an_unexpected_failure_stops_the_view_and_fails_its_waiters(
    kafka_settings: KafkaSettings, make_topic: MakeTopic
) -> None:
    topic = await make_topic(partitions=1)
    await _produce(kafka_settings, topic, [(b"a", b"boom")])

    def apply(record) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("bug in the fold")

    async with TopicView(kafka_settings, [topic], apply, name="test") as view:
        with pytest.raises(ViewFailed, match="bug in the fold"):
            await view.wait_caught_up(30)
        assert view.failed and not view.is_caught_up


async def test_a_view_of_a_topic_that_is_not_provisioned_refuses_to_start(
    kafka_settings: KafkaSettings,
) -> None:
    view = TopicView(kafka_settings, ["no-such-topic-here"], lambda r: None, name="test")
    with pytest.raises(Exception, match="not provisioned"):
        await view.start()
