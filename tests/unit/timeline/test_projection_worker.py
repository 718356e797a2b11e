"""The projection's batch step without a broker or database: decode, fold, one apply per batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from services.timeline.adapters.store import ProjectionBatch
from services.timeline.entrypoints.projection import ProjectionMetrics, Projector
from shared.codec import Codec
from shared.errors import PoisonEvent, TransientError
from shared.events import Decision, Event, Purpose
from tests.factories import (
    make_consent_checked,
    make_consent_revoked,
    make_delivered,
    make_route_failed,
    make_study,
    make_study_received,
)

CODEC = Codec()


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: list[tuple[str, bytes]]


def record(event: Event, offset: int = 0) -> Record:
    encoded = CODEC.encode(event)
    return Record(encoded.topic, 0, offset, encoded.value, list(encoded.headers))


@dataclass
class FakeStore:
    """A recording spy for the Projector's own logic, not a fake of ``PostgresTimeline``.

    It keeps each batch the Projector hands to ``apply`` (so a test sees when it is called,
    how often, and what was folded into the batch), or raises ``fail_with`` instead, as the real
    ``apply`` raises ``TransientError`` when PostgreSQL is away. It holds no tables and answers
    no reads, so it claims nothing about what applying a batch does. The real store's ``apply``
    is tested on PostgreSQL by tests/integration/timeline/test_projection.py (the worker on
    Kafka: events in, timeline out, a replay changes nothing) and test_rebuild_equivalence.py
    (``apply`` on random batches, held to the rebuild's tables).
    """

    batches: list[ProjectionBatch] = field(default_factory=list)
    fail_with: Exception | None = None

    async def apply(self, batch: ProjectionBatch) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.batches.append(batch)


def consumed(metrics: ProjectionMetrics, topic: str, schema: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "beeldportaal_events_consumed_total",
        {"topic": topic, "schema": schema, "outcome": outcome},
    )
    return value or 0.0


def projector(store: Any) -> tuple[Projector, ProjectionMetrics]:
    metrics = ProjectionMetrics(registry=None)
    return Projector(store=store, metrics=metrics), metrics


async def test_a_batch_is_folded_and_applied_once_by_the_tick_delivery_decisions_ignored() -> None:
    study = make_study()
    events: list[Event] = [
        make_study_received(study=study),
        make_consent_checked(study=study, purpose=Purpose.DELIVERY),
        make_consent_checked(
            study=study, purpose=Purpose.TIMELINE, decision=Decision.PERMIT, decided_by="c-1"
        ),
        make_consent_revoked(),
        make_delivered(study_instance_uid=study.study_instance_uid),
    ]
    store = FakeStore()
    worker, metrics = projector(store)

    await worker.prepare()
    for i, event in enumerate(events):
        assert await worker.handle(record(event, i)) == ()
    assert store.batches == []  # nothing is written per record
    assert await worker.tick() == ()

    [batch] = store.batches
    key = (study.study_instance_uid, study.sender_ura)
    assert list(batch.snapshots) == [key] and list(batch.decisions) == [key]
    assert len(batch.revocations) == 1 and len(batch.deliveries) == 1
    assert consumed(metrics, "consent-checked", "consent.checked.v1", "ignored") == 1
    assert consumed(metrics, "consent-checked", "consent.checked.v1", "projected") == 1
    # A tick without a batch writes nothing.
    assert await worker.tick() == ()
    assert len(store.batches) == 1


async def test_a_delivery_decision_is_passed_over_by_its_purpose_header_without_decoding() -> None:
    store = FakeStore()
    worker, metrics = projector(store)
    delivery = record(make_consent_checked(purpose=Purpose.DELIVERY))
    # Not even looked at: a value that would be poison if it were decoded.
    delivery.value = b"{not json"
    await worker.prepare()
    assert await worker.handle(delivery) == ()
    await worker.tick()
    assert store.batches == []  # nothing to apply: an empty fold is not written
    assert consumed(metrics, "consent-checked", "consent.checked.v1", "ignored") == 1


async def test_a_record_that_does_not_decode_is_poison_for_the_worker_to_skip() -> None:
    worker, _ = projector(FakeStore())
    await worker.prepare()
    poison = Record("study-received", 0, 99, b"{not json", [("schema", b"study.received.v1")])
    with pytest.raises(PoisonEvent):
        await worker.handle(poison)
    wrong = record(make_route_failed())
    with pytest.raises(PoisonEvent, match="does not belong"):
        await worker.handle(wrong)


async def test_a_failed_apply_counts_nothing_and_the_batch_handled_again_is_applied_whole() -> None:
    store = FakeStore(fail_with=TransientError("PostgreSQL away"))
    worker, metrics = projector(store)
    records = [record(make_study_received(), i) for i in range(3)]
    await worker.prepare()
    for r in records:
        await worker.handle(r)
    with pytest.raises(TransientError):
        await worker.tick()
    assert consumed(metrics, "study-received", "study.received.v1", "projected") == 0

    store.fail_with = None  # the worker handles the same batch again: prepare, handle, tick
    await worker.prepare()
    for r in records:
        await worker.handle(r)
    await worker.tick()
    [batch] = store.batches
    assert len(batch.snapshots) == 3
    assert consumed(metrics, "study-received", "study.received.v1", "projected") == 3
