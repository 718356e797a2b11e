"""The consent decision worker through the real broker: the decision table, redelivery, restart.

Each test runs the worker on its own tagged copies of the topics, publishes registry events and
study-received records with the project's publisher, and reads consent-checked back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.consent.adapters.registry_view import RegistryTopics
from services.consent.config import ConsentSettings
from services.consent.entrypoints.decisions import DecisionMetrics, build_decision_worker
from shared import topics
from shared.codec import Codec
from shared.events import ConsentChecked, Event, StudyReceived
from shared.events.common import BsnStatus, Urgency
from shared.events.consent import Basis, Decision, Provision, Purpose
from shared.kafka import KafkaEventPublisher
from shared.settings import KafkaSettings
from shared.stream import Worker
from shared.topics import TopicSpec
from tests.factories import (
    RECIPIENT_URA,
    make_consent_registered,
    make_provider,
    make_pseudonym,
    make_study,
    make_study_received,
)
from tests.workers import running

pytestmark = pytest.mark.integration

TIMEOUT = 60.0
PARTITIONS = 3
OTHER_TYPE_URA = "00000303"  # in the directory with a type no Mitz category is mapped to


@dataclass(frozen=True)
class Topics:
    study: str
    registered: str
    revoked: str
    relationships: str
    checked: str
    directory: str

    @property
    def registry(self) -> tuple[str, str, str]:
        return (self.registered, self.revoked, self.relationships)


@pytest.fixture
async def declared(declare_topics: Callable[..., Awaitable[None]], tag: str) -> Topics:
    names = Topics(
        *(
            f"test-{name}-{tag}"
            for name in (
                "study-received",
                "consent-registered",
                "consent-revoked",
                "treatment-relationships",
                "consent-checked",
                "provider-directory",
            )
        )
    )
    await declare_topics(
        TopicSpec(names.study, PARTITIONS, topics.DAY_MS),
        *(TopicSpec(t, PARTITIONS, topics.DAY_MS) for t in names.registry),
        TopicSpec(names.checked, PARTITIONS, topics.DAY_MS),
        TopicSpec(names.directory, 1, topics.DAY_MS, compacted=True),
    )
    return names


def decision_worker(kafka: KafkaSettings, tag: str, names: Topics, *, suffix: str = "") -> Worker:
    return build_decision_worker(
        ConsentSettings(kafka=kafka),
        group=f"test-consent-{tag}{suffix}",
        study_topic=names.study,
        registry_topics=RegistryTopics(*names.registry),
        sink_topic=names.checked,
        directory_topic=names.directory,
        metrics=DecisionMetrics(),
    )


async def publish(kafka: KafkaSettings, topic: str, events: list[Event]) -> None:
    async with KafkaEventPublisher(kafka, "test-consent") as publisher:
        await publisher.publish_many(events, topic=topic)


async def publish_directory(kafka: KafkaSettings, topic: str, entries: dict[str, str]) -> None:
    """Directory records as routing writes them (URA -> provider JSON); consent keeps type_code."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_list, acks="all")
    await producer.start()
    try:
        for ura, type_code in entries.items():
            record = make_provider(ura, type_code=type_code).to_record().encode()
            await producer.send_and_wait(topic, key=ura.encode(), value=record)
    finally:
        await producer.stop()


class Checked:
    """consent-checked as a test reads it: every event so far, waited for with a deadline."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self.seen: list[ConsentChecked] = []

    async def wait_for(
        self, count: int, timeout: float = TIMEOUT, *, distinct: bool = False
    ) -> list[ConsentChecked]:
        """Wait for ``count`` events (``distinct``: with different event ids)."""
        codec = Codec()

        def enough() -> bool:
            found = len({e.event_id for e in self.seen}) if distinct else len(self.seen)
            return found >= count

        async with asyncio.timeout(timeout):
            while not enough():
                batches = await self._consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    for record in records:
                        event = codec.decode_record(record)
                        assert isinstance(event, ConsentChecked)
                        self.seen.append(event)
        return self.seen

    def of(self, received: StudyReceived, purpose: Purpose) -> ConsentChecked:
        [found] = {
            e.event_id: e for e in self.seen if e.study == received.study and e.purpose is purpose
        }.values()
        return found


@asynccontextmanager
async def checked(kafka: KafkaSettings, topic: str) -> AsyncIterator[Checked]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap_list,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        yield Checked(consumer)
    finally:
        await consumer.stop()


def study_for(patient: str | None = None, **overrides: Any) -> StudyReceived:
    bsn_status = overrides.pop("bsn_status", BsnStatus.VERIFIED)
    study = make_study(bsn_status=bsn_status, **overrides)
    if patient is not None:
        study = study.model_copy(
            update={"patient": study.patient.model_copy(update={"pseudonym": patient})}
        )
    return make_study_received(study=study)


async def test_every_case_of_the_decision_table_is_decided_and_announced_for_both_purposes(
    kafka_settings: KafkaSettings, declared: Topics, tag: str
) -> None:
    objecting, consenting, category_objecting, emergency = (make_pseudonym() for _ in range(4))
    registry_events = [
        make_consent_registered(
            patient=objecting,
            consent_id="objection-recipient",
            provision=Provision.DENY,
            provider_category=None,
            organisation_ura=RECIPIENT_URA,
        ),
        make_consent_registered(
            patient=consenting, consent_id="consent-all", provider_category=None
        ),
        make_consent_registered(
            patient=category_objecting,
            consent_id="objection-hospitals",
            provision=Provision.DENY,
            provider_category="RPZAC104",
        ),
        make_consent_registered(
            patient=emergency,
            consent_id="objection-any",
            provision=Provision.DENY,
            provider_category=None,
        ),
    ]
    await publish_directory(
        kafka_settings, declared.directory, {RECIPIENT_URA: "V4", OTHER_TYPE_URA: "Z9"}
    )
    await publish(kafka_settings, declared.registered, registry_events)
    cases = {
        "nothing registered": study_for(),
        "objection for the recipient": study_for(objecting),
        "explicit consent": study_for(consenting),
        "objection for hospitals, recipient a hospital": study_for(category_objecting),
        "objection for hospitals, recipient of unmapped type": study_for(
            category_objecting, recipient_ura=OTHER_TYPE_URA
        ),
        "unverified BSN": study_for(bsn_status=BsnStatus.INVALID),
        "emergency over an objection": study_for(emergency, urgency=Urgency.EMERGENCY),
    }
    async with (
        checked(kafka_settings, declared.checked) as out,
        running(decision_worker(kafka_settings, tag, declared)),
    ):
        # No pause needed: each batch waits for the registry view to reach the topics' ends.
        await publish(kafka_settings, declared.study, list(cases.values()))
        await out.wait_for(2 * len(cases))

    def outcome(case: str, purpose: Purpose) -> tuple[Decision, Basis, bool]:
        event = out.of(cases[case], purpose)
        return event.decision, event.basis, event.flagged

    D, T = Purpose.DELIVERY, Purpose.TIMELINE
    assert outcome("nothing registered", D) == (Decision.PERMIT, Basis.PRESUMED_REFERRAL, False)
    assert outcome("nothing registered", T) == (Decision.DENY, Basis.NO_EXPLICIT_CONSENT, False)
    assert outcome("objection for the recipient", D) == (
        Decision.DENY,
        Basis.EXPLICIT_OBJECTION,
        False,
    )
    assert out.of(cases["objection for the recipient"], D).decided_by == "objection-recipient"
    assert out.of(cases["objection for the recipient"], D).registry_version == 1
    assert outcome("explicit consent", D) == (Decision.PERMIT, Basis.EXPLICIT_CONSENT, False)
    assert outcome("explicit consent", T) == (Decision.PERMIT, Basis.EXPLICIT_CONSENT, False)
    assert outcome("objection for hospitals, recipient a hospital", D)[0] is Decision.DENY
    # The recipient's category is unknown: a category-specific objection still refuses.
    assert outcome("objection for hospitals, recipient of unmapped type", D)[0] is Decision.DENY
    assert outcome("unverified BSN", D) == (
        Decision.PERMIT,
        Basis.PRESUMED_UNVERIFIED_IDENTITY,
        True,
    )
    assert outcome("unverified BSN", T) == (Decision.DENY, Basis.UNVERIFIED_IDENTITY, False)
    assert outcome("emergency over an objection", D) == (Decision.PERMIT, Basis.EMERGENCY, True)
    assert len(out.seen) == 2 * len(cases)


async def test_a_redelivered_study_gets_the_same_events_and_a_new_version_the_current_registry(
    kafka_settings: KafkaSettings, declared: Topics, tag: str
) -> None:
    patient = make_pseudonym()
    received = study_for(patient)
    async with (
        checked(kafka_settings, declared.checked) as out,
        running(decision_worker(kafka_settings, tag, declared)),
    ):
        await publish(kafka_settings, declared.study, [received])
        first = list(await out.wait_for(2))
        await publish(kafka_settings, declared.study, [received])  # the same record again
        await out.wait_for(4)
        objection = make_consent_registered(
            patient=patient,
            provision=Provision.DENY,
            provider_category=None,
            organisation_ura=RECIPIENT_URA,
        )
        await publish(kafka_settings, declared.registered, [objection])
        # Published right after the objection: the batch waits for the registry to have it.
        v2 = make_study_received(study=received.study.model_copy(update={"version": 2}))
        await publish(kafka_settings, declared.study, [v2])
        await out.wait_for(6)

    assert out.seen[2:4] == first  # the redelivery: the same events, ids included
    assert first[0].purpose is Purpose.DELIVERY and first[0].decision is Decision.PERMIT
    delivery_v2 = out.of(v2, Purpose.DELIVERY)
    assert (delivery_v2.decision, delivery_v2.decided_by) == (Decision.DENY, objection.consent_id)
    assert delivery_v2.event_id != first[0].event_id


async def test_a_worker_stopped_mid_stream_and_restarted_decides_every_study(
    kafka_settings: KafkaSettings, declared: Topics, tag: str
) -> None:
    """Stop (SIGTERM path) while a backlog is being decided, start a new member of the same
    group: every study version is announced for both purposes, nothing is lost."""
    studies = [study_for(make_pseudonym()) for _ in range(600)]
    async with checked(kafka_settings, declared.checked) as out:
        await publish(kafka_settings, declared.study, studies)
        first = decision_worker(kafka_settings, tag, declared)
        async with running(first):
            async with asyncio.timeout(TIMEOUT):
                while first.stream.records == 0:
                    await asyncio.sleep(0.01)
        handled_before_stop = first.stream.records
        async with running(decision_worker(kafka_settings, tag, declared)):
            await out.wait_for(2 * len(studies), distinct=True)

    ids = {e.event_id for e in out.seen}
    decided = {(e.study.study_instance_uid, e.purpose) for e in out.seen}
    assert len(ids) == 2 * len(studies)
    assert decided == {
        (s.study.study_instance_uid, p)
        for s in studies
        for p in (Purpose.DELIVERY, Purpose.TIMELINE)
    }
    assert handled_before_stop > 0
