"""The routing worker in-process against the real broker: decisions in, routes out, restarts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.routing.adapters.directory_view import KafkaDirectoryWriter
from services.routing.config import RoutingSettings
from services.routing.domain.directory import Provider
from services.routing.domain.route import route_failed_id, route_resolved_id
from services.routing.entrypoints.worker import build_routing_worker
from services.routing.metrics import RoutingMetrics
from shared import topics
from shared.codec import Codec
from shared.events import ConsentChecked, Event
from shared.events.common import DeliveryChannel, Urgency
from shared.events.consent import Basis, Decision, Purpose
from shared.events.routing import RouteFailed, RouteFailureReason, RouteResolved
from shared.kafka import KafkaEventPublisher
from shared.settings import KafkaSettings
from shared.stream import Worker
from shared.topics import TopicSpec
from tests.factories import make_consent_checked, make_study
from tests.workers import running

pytestmark = pytest.mark.integration

TIMEOUT = 45.0
PARTITIONS = 4  # fewer than production's 12 start faster
RECIPIENT = "20202020"
UNUSABLE = "30303030"
UNKNOWN = "40404040"
BSN = "999990019"


@dataclass(frozen=True)
class Topics:
    decisions: str
    resolved: str
    failed: str
    directory: str


@pytest.fixture
async def declared(declare_topics: Callable[..., Awaitable[None]], tag: str) -> Topics:
    names = Topics(
        f"test-consent-checked-{tag}",
        f"test-route-resolved-{tag}",
        f"test-route-failed-{tag}",
        f"test-provider-directory-{tag}",
    )
    await declare_topics(
        TopicSpec(names.decisions, PARTITIONS, topics.DAY_MS),
        TopicSpec(names.resolved, PARTITIONS, topics.DAY_MS),
        TopicSpec(names.failed, 2, topics.DAY_MS),
        TopicSpec(names.directory, 1, topics.FOREVER, compacted=True),
    )
    return names


def provider(ura: str, *endpoints: dict[str, Any], **overrides: Any) -> Provider:
    fields: dict[str, Any] = {
        "ura": ura,
        "name": f"Ziekenhuis {ura}",
        "type_code": "V4",
        "city": "Utrecht",
        "endpoints": list(endpoints),
    }
    fields.update(overrides)
    return Provider.model_validate(fields)


DICOMWEB = {"channel": "dicomweb", "id": "pacs-web", "base_url": "https://pacs.example.nl/dw"}
PICKUP = {"channel": "pickup", "id": "portal"}


async def seed_directory(kafka: KafkaSettings, topic: str) -> None:
    async with KafkaDirectoryWriter(kafka, topic) as writer:
        await writer.put(provider(RECIPIENT, DICOMWEB, PICKUP))
        await writer.put(provider(UNUSABLE, {**DICOMWEB, "enabled": False}))


def worker(kafka: KafkaSettings, tag: str, names: Topics, metrics: RoutingMetrics) -> Worker:
    return build_routing_worker(
        RoutingSettings(kafka=kafka, view_start_timeout_seconds=5),
        group=f"test-routing-{tag}",
        source_topic=names.decisions,
        resolved_topic=names.resolved,
        failed_topic=names.failed,
        directory_topic=names.directory,
        metrics=metrics,
    )


class Outputs:
    """Everything on the route topics since the start, waited for with a deadline."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._codec = Codec()
        self.events: list[Event] = []

    async def until(self, done: Callable[[list[Event]], bool], timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while not done(self.events):
                batches = await self._consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    self.events += [self._codec.decode_record(r) for r in records]

    async def settle(self, seconds: float = 2.0) -> list[Event]:
        await asyncio.sleep(seconds)
        batches = await self._consumer.getmany(timeout_ms=500)
        for records in batches.values():
            self.events += [self._codec.decode_record(r) for r in records]
        return self.events

    def ids(self) -> set[uuid.UUID]:
        return {e.event_id for e in self.events}


@asynccontextmanager
async def outputs(kafka: KafkaSettings, names: Topics) -> AsyncIterator[Outputs]:
    consumer = AIOKafkaConsumer(
        names.resolved,
        names.failed,
        bootstrap_servers=kafka.bootstrap_list,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        yield Outputs(consumer)
    finally:
        await consumer.stop()


async def publish(kafka: KafkaSettings, topic: str, events: list[ConsentChecked]) -> None:
    async with KafkaEventPublisher(kafka, "test-routing") as publisher:
        await publisher.publish_many(events, topic=topic)


def decision(recipient: str = RECIPIENT, **overrides: Any) -> ConsentChecked:
    study = overrides.pop("study", None) or make_study(recipient_ura=recipient)
    return make_consent_checked(study=study, **overrides)


def by_id(events: list[Event]) -> dict[uuid.UUID, Event]:
    return {e.event_id: e for e in events}


async def test_decisions_become_routes_or_failures_read_back_from_kafka(
    kafka_settings: KafkaSettings, tag: str, declared: Topics
) -> None:
    await seed_directory(kafka_settings, declared.directory)
    permit = decision()
    urgent = decision(study=make_study(recipient_ura=RECIPIENT, urgency=Urgency.URGENT))
    emergency = decision(basis=Basis.EMERGENCY, flagged=True)
    deny = decision(decision=Decision.DENY, basis=Basis.EXPLICIT_OBJECTION, decided_by="c-1")
    unknown = decision(UNKNOWN)
    unusable = decision(UNUSABLE)
    timeline = decision(purpose=Purpose.TIMELINE, basis=Basis.EXPLICIT_CONSENT)
    metrics = RoutingMetrics()

    async with (
        running(worker(kafka_settings, tag, declared, metrics)),
        outputs(kafka_settings, declared) as out,
    ):
        # A record that is not an event at all goes first: skipped, nothing else held up.
        producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_list)
        await producer.start()
        try:
            poison_key = permit.partition_key().encode()
            await producer.send_and_wait(declared.decisions, b"not an event", key=poison_key)
        finally:
            await producer.stop()
        await publish(
            kafka_settings,
            declared.decisions,
            [permit, urgent, emergency, deny, unknown, unusable, timeline],
        )
        # 3 permitted decisions x 2 endpoints, and 3 failures.
        await out.until(lambda events: len({e.event_id for e in events}) >= 9)
        events = by_id(await out.settle())

    assert len(events) == 9
    for checked in (permit, urgent, emergency):
        web = events[route_resolved_id(checked.study, "pacs-web")]
        portal = events[route_resolved_id(checked.study, "portal")]
        assert isinstance(web, RouteResolved) and isinstance(portal, RouteResolved)
        assert web.destination.channel is DeliveryChannel.DICOMWEB
        assert portal.destination.channel is DeliveryChannel.PICKUP
        assert web.study == checked.study and web.correlation_id == checked.correlation_id
        assert web.sop_instance_uids == tuple(i.sop_instance_uid for i in checked.study.instances)
    priority = {
        c.event_id: events[route_resolved_id(c.study, "pacs-web")].priority  # type: ignore[attr-defined]
        for c in (permit, urgent, emergency)
    }
    assert priority == {
        permit.event_id: Urgency.ROUTINE,
        urgent.event_id: Urgency.URGENT,
        emergency.event_id: Urgency.EMERGENCY,
    }
    assert events[route_resolved_id(emergency.study, "portal")].flagged  # type: ignore[attr-defined]
    codes = {}
    for checked in (deny, unknown, unusable):
        failed = events[route_failed_id(checked.study)]
        assert isinstance(failed, RouteFailed)
        assert failed.study_instance_uid == checked.study.study_instance_uid
        codes[checked.event_id] = failed.reason_code
    assert codes == {
        deny.event_id: RouteFailureReason.CONSENT_DENIED,
        unknown.event_id: RouteFailureReason.UNKNOWN_RECIPIENT,
        unusable.event_id: RouteFailureReason.NO_USABLE_ENDPOINT,
    }
    # Pseudonyms only: no BSN in clear reaches the route topics.
    assert all(BSN not in e.model_dump_json() for e in events.values())
    resolved = metrics.routes_resolved
    assert resolved.labels("dicomweb", "urgent")._value.get() == 1
    assert metrics.routes_failed.labels("unknown-recipient")._value.get() == 1
    consumed = metrics.events_consumed
    assert consumed.labels(declared.decisions, "unknown", "poison")._value.get() == 1
    assert consumed.labels(declared.decisions, "consent.checked.v1", "not-routed")._value.get() == 1


async def test_a_restart_mid_stream_loses_nothing(
    kafka_settings: KafkaSettings, tag: str, declared: Topics
) -> None:
    await seed_directory(kafka_settings, declared.directory)
    first = [decision() for _ in range(20)]
    second = [decision() for _ in range(20)] + [decision(UNKNOWN) for _ in range(5)]
    expected = {
        route_resolved_id(c.study, endpoint)
        for c in first + second[:20]
        for endpoint in ("pacs-web", "portal")
    } | {route_failed_id(c.study) for c in second[20:]}

    async with outputs(kafka_settings, declared) as out:
        async with running(worker(kafka_settings, tag, declared, RoutingMetrics())):
            await publish(kafka_settings, declared.decisions, first)
            await out.until(lambda events: len(events) >= 10)
            # More decisions arrive while the worker stops: some are handled, some not yet.
            await publish(kafka_settings, declared.decisions, second[:10])
        await publish(kafka_settings, declared.decisions, second[10:])
        # The same consumer group picks up from its committed offsets.
        async with running(worker(kafka_settings, tag, declared, RoutingMetrics())):
            await out.until(lambda events: expected <= {e.event_id for e in events})
            events = await out.settle()

    assert {e.event_id for e in events} == expected
    # At-least-once: a replayed decision may repeat a route, always under the same id.
    assert all(isinstance(e, RouteResolved | RouteFailed) for e in events)
