"""The deliverer on pure logic: a portal pickup is offered only for what is stored, a directory
behind is synced, a slow delivery yields its turn, a delivery queued twice is sent once."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from services.notify.adapters.dimse import DimseSender
from services.notify.adapters.stow import StowSender
from services.notify.domain.delivery import conclude, queued
from services.notify.domain.outcomes import BatchResult, InstanceOutcome, InstanceStatus
from services.notify.domain.retry import RetryPolicy
from services.notify.handlers.deliver import Deliverer
from services.notify.worker_metrics import NotifyWorkerMetrics
from services.routing.domain.directory import DicomWebEndpoint, PickupEndpoint
from shared.errors import TransientError
from shared.events import Delivered, DeliveryChannel, DeliveryFailed, DeliveryQueued
from shared.events.routing import BatchLimits
from shared.storage.memory import InMemoryObjectStore
from shared.topic_view import ViewFailed
from tests.factories import (
    T0,
    make_consumer_record,
    make_destination,
    make_route_resolved,
    make_study,
)

NOW = T0 + timedelta(hours=1)


class OneProvider:
    """The directory view as the deliverer asks it: the recipient and its endpoints, known
    after ``behind`` syncs (the view behind the topic); ``sync_fails`` raises instead."""

    def __init__(
        self, *endpoints: Any, behind: int = 0, sync_fails: Exception | None = None
    ) -> None:
        self.endpoints = endpoints
        self.behind = behind
        self.sync_fails = sync_fails
        self.syncs = 0

    def get(self, ura: str) -> Any:
        return self if self.syncs >= self.behind else None

    async def sync(self, timeout: float) -> None:
        if self.sync_fails:
            raise self.sync_fails
        self.syncs += 1


def deliverer(objects: InMemoryObjectStore, directory: Any = None) -> Deliverer:
    return Deliverer(
        directory=directory or OneProvider(PickupEndpoint(id="portal")),
        objects=objects,
        stow=StowSender(),
        dimse=DimseSender(),
        policy=RetryPolicy(),
        metrics=NotifyWorkerMetrics(registry=CollectorRegistry()),
    )


def pickup_of(instances: int) -> Any:
    study = make_study(instances)  # instance i holds the bytes b"instance i"
    destination = make_destination(endpoint_id="portal", channel=DeliveryChannel.PICKUP)
    return study, queued(make_route_resolved(study=study, destination=destination), now=NOW)


async def test_a_pickup_offers_only_the_instances_stored_as_received() -> None:
    study, delivery = pickup_of(3)
    objects = InMemoryObjectStore()
    whole, changed, _missing = study.instances
    objects.put(whole.object_key, b"instance 0")
    objects.put(changed.object_key, b"instance X")  # the same size, other bytes

    attempt = await deliverer(objects).attempt(delivery)

    assert [o.sop_instance_uid for o in attempt.results.stored] == [whole.sop_instance_uid]
    assert sorted(r.reason for r in attempt.unsendable) == [
        "the stored bytes are not the ones received: not offered",
        "the stored instance is missing from the object store",
    ]


async def test_a_pickup_of_a_study_not_in_the_store_is_not_reported_delivered() -> None:
    _, delivery = pickup_of(3)

    attempt = await deliverer(InMemoryObjectStore()).attempt(delivery)
    [outcome, *_] = conclude(delivery, attempt, policy=RetryPolicy(), now=NOW)

    event = outcome[1] if isinstance(outcome, tuple) else outcome
    assert not isinstance(event, Delivered)
    assert isinstance(event, DeliveryFailed)


def stored_pickup(instances: int) -> tuple[Any, InMemoryObjectStore]:
    study, delivery = pickup_of(instances)
    objects = InMemoryObjectStore()
    for i, ref in enumerate(study.instances):
        objects.put(ref.object_key, f"instance {i}".encode())
    return delivery, objects


async def test_a_recipient_the_view_does_not_hold_yet_is_looked_up_after_a_sync() -> None:
    delivery, objects = stored_pickup(2)
    directory = OneProvider(PickupEndpoint(id="portal"), behind=1)

    attempt = await deliverer(objects, directory).attempt(delivery)

    assert directory.syncs == 1
    assert attempt.failure is None and len(attempt.results.stored) == 2


@pytest.mark.parametrize(
    "trouble", [TimeoutError(), TransientError("Kafka away"), ViewFailed("the view stopped")]
)
async def test_a_recipient_missing_from_a_view_that_cannot_sync_is_tried_again_later(
    trouble: Exception,
) -> None:
    delivery, objects = stored_pickup(1)
    directory = OneProvider(PickupEndpoint(id="portal"), behind=1, sync_fails=trouble)

    attempt = await deliverer(objects, directory).attempt(delivery)
    [failure, (topic, _)] = conclude(delivery, attempt, policy=RetryPolicy(), now=NOW)

    assert not attempt.failure_is_permanent
    assert isinstance(failure, DeliveryFailed) and not failure.final
    assert topic == "delivery-retry-10s"


async def test_an_endpoint_the_directory_does_not_hold_after_a_sync_is_a_dead_letter() -> None:
    delivery, objects = stored_pickup(1)
    directory = OneProvider(PickupEndpoint(id="another-portal"))

    attempt = await deliverer(objects, directory).attempt(delivery)

    assert directory.syncs == 1
    assert attempt.failure_is_permanent
    assert "not (or no longer) an enabled endpoint" in (attempt.failure or "")


class RecordingStow:
    """A receiver that stores every instance it is sent, and says which were sent together."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def send(self, endpoint: Any, study: str, instances: Any) -> BatchResult:
        self.batches.append([i.sop_instance_uid for i in instances])
        return BatchResult(
            tuple(InstanceOutcome(i.sop_instance_uid, InstanceStatus.STORED) for i in instances)
        )


def to_a_dicomweb_receiver(study: Any) -> tuple[Deliverer, RecordingStow]:
    """A deliverer to a DICOMweb receiver that stores what it is sent, with the study's
    instances stored (instance i holds the bytes b"instance i")."""
    objects = InMemoryObjectStore()
    for i, ref in enumerate(study.instances):
        objects.put(ref.object_key, f"instance {i}".encode())
    endpoint = DicomWebEndpoint(id="pacs-dicomweb", base_url="https://pacs.example.nl/dicomweb")
    worker = deliverer(objects, OneProvider(endpoint))
    stow = RecordingStow()
    worker.stow = stow  # type: ignore[assignment]
    return worker, stow


async def test_a_delivery_past_its_time_slice_yields_to_the_queue_and_resumes_where_it_was() -> (
    None
):
    study = make_study(3)
    route = make_route_resolved(
        study=study, batch_limits=BatchLimits(max_instances=1, max_bytes=10**9)
    )
    sliced, stow = to_a_dicomweb_receiver(study)
    sliced.attempt_seconds = 0.0

    delivery = queued(route, now=NOW)
    turns = []
    for _ in range(3):
        attempt = await sliced.attempt(delivery)
        [outcome] = conclude(delivery, attempt, policy=RetryPolicy(), now=NOW)
        turns.append(outcome)
        if not isinstance(outcome, tuple):
            break
        queue, delivery = outcome
        # Back on its priority queue: the same attempt, what it settled kept.
        assert queue == "delivery-routine" and delivery.attempt == 1

    assert stow.batches == [[ref.sop_instance_uid] for ref in study.instances]
    assert [len(t[1].stored) for t in turns[:2]] == [1, 2]
    assert len({t[1].event_id for t in turns[:2]}) == 2
    delivered = turns[2]
    assert isinstance(delivered, Delivered) and delivered.outcomes.sent == 3


async def test_a_queued_delivery_published_twice_is_attempted_once() -> None:
    study = make_study(2)
    worker, stow = to_a_dicomweb_receiver(study)
    delivery = queued(make_route_resolved(study=study), now=NOW)
    first = make_consumer_record(delivery, topic="delivery-routine", offset=4)

    outcome = await worker.handle(first)
    # The same record handled again (its batch replayed) is attempted again: it is the first.
    replayed = await worker.handle(first)
    # A copy further on in the partition (published twice) is skipped ...
    copy = await worker.handle(make_consumer_record(delivery, topic="delivery-routine", offset=9))
    # ... but not the same event elsewhere, which this worker has no first copy of.
    other = await worker.handle(
        make_consumer_record(delivery, topic="delivery-routine", offset=9, partition=1)
    )

    [delivered] = outcome
    assert isinstance(delivered, Delivered) and delivered.outcomes.sent == 2
    assert [e.event_id for e in replayed] == [delivered.event_id]
    assert copy == []
    assert [type(e) for e in other] == [Delivered]
    assert len(stow.batches) == 3  # first, replayed, other; never the copy
    copies = worker.metrics.registry.get_sample_value(
        "beeldportaal_events_consumed_total",
        {"topic": "delivery-routine", "schema": DeliveryQueued.schema_name, "outcome": "copy"},
    )
    assert copies == 1.0
