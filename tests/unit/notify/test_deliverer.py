"""The deliverer on pure logic: a portal pickup is offered only for what is stored, a directory
behind is synced, a slow delivery yields its turn, a delivery queued twice is sent once, an
aborted batch keeps its answers, a refused batch does not stop the others, resends are the same
bytes, urgent C-STOREs go at high priority."""

from __future__ import annotations

import asyncio
import io
from datetime import timedelta
from typing import Any

import httpx
import pydicom
import pytest
from prometheus_client import CollectorRegistry

from services.notify.adapters.dimse import PRIORITY_HIGH, PRIORITY_MEDIUM, DimseSender
from services.notify.adapters.stow import StowSender
from services.notify.domain.delivery import conclude, queued, remaining
from services.notify.domain.outcomes import (
    BatchResult,
    InstanceOutcome,
    InstanceStatus,
    TransientDeliveryError,
)
from services.notify.domain.retry import RetryPolicy
from services.notify.handlers.deliver import Deliverer
from services.notify.worker_metrics import NotifyWorkerMetrics
from services.routing.domain.directory import DicomWebEndpoint, DimseEndpoint, PickupEndpoint
from shared.errors import TransientError
from shared.events import Delivered, DeliveryChannel, DeliveryFailed, DeliveryQueued, Urgency
from shared.events.routing import BatchLimits, Coercion
from shared.identifiers import BSN_DICOM_ISSUER, BSN_OID
from shared.storage.memory import InMemoryObjectStore
from shared.topic_view import ViewFailed
from tests.dicom_samples import bsn_item, make_dicom_bytes, patient_id_item
from tests.factories import (
    T0,
    TEST_BSN,
    make_consumer_record,
    make_destination,
    make_instance_ref,
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


class ScriptedDimse:
    """A DIMSE receiver that stores what it is sent, but for the batches ``aborts`` names
    (batch number -> how many it answers before the association is aborted)."""

    def __init__(self, aborts: dict[int, int] | None = None) -> None:
        self.aborts = aborts or {}
        self.batches: list[list[str]] = []
        self.priorities: list[int] = []

    async def send(self, endpoint: Any, instances: Any, *, priority: int) -> BatchResult:
        number = len(self.batches)
        self.batches.append([i.sop_instance_uid for i in instances])
        self.priorities.append(priority)
        outcomes = tuple(
            InstanceOutcome(i.sop_instance_uid, InstanceStatus.STORED) for i in instances
        )
        if number in self.aborts:
            answered = BatchResult(outcomes[: self.aborts[number]])
            raise TransientDeliveryError("association aborted", answered=answered)
        return BatchResult(outcomes)


def to_a_dimse_receiver(study: Any, dimse: ScriptedDimse) -> Deliverer:
    objects = InMemoryObjectStore()
    for i, ref in enumerate(study.instances):
        objects.put(ref.object_key, f"instance {i}".encode())
    endpoint = DimseEndpoint(id="pacs-dimse", host="pacs.example.nl", port=104, ae_title="PACS")
    worker = deliverer(objects, OneProvider(endpoint))
    worker.dimse = dimse  # type: ignore[assignment]
    return worker


def dimse_route(study: Any, **overrides: Any) -> Any:
    return make_route_resolved(
        study=study,
        destination=make_destination(endpoint_id="pacs-dimse", channel=DeliveryChannel.DIMSE),
        batch_limits=BatchLimits(max_instances=2, max_bytes=10**9),
        **overrides,
    )


async def test_an_association_aborted_mid_batch_settles_the_answered_and_resends_the_rest() -> None:
    study = make_study(5)
    dimse = ScriptedDimse(aborts={1: 1})  # the second batch: one answer, then the abort
    worker = to_a_dimse_receiver(study, dimse)
    delivery = queued(dimse_route(study), now=NOW)
    uids = [ref.sop_instance_uid for ref in study.instances]

    attempt = await worker.attempt(delivery)
    [failure, (_, retry)] = conclude(delivery, attempt, policy=RetryPolicy(), now=NOW)

    assert isinstance(failure, DeliveryFailed) and not failure.final
    assert failure.reason == "association aborted"
    assert isinstance(retry, DeliveryQueued)
    assert retry.stored == tuple(uids[:3])
    assert [ref.sop_instance_uid for ref in remaining(retry)] == uids[3:]
    # The retry sends only what the receiver never answered.
    dimse.aborts = {}
    await worker.attempt(retry)
    assert dimse.batches[2:] == [uids[3:]]


@pytest.mark.parametrize(
    ("urgency", "priority"),
    [(Urgency.ROUTINE, PRIORITY_MEDIUM), (Urgency.URGENT, PRIORITY_HIGH),
     (Urgency.EMERGENCY, PRIORITY_HIGH)],
)  # fmt: skip
async def test_c_stores_of_an_urgent_delivery_go_at_high_priority(
    urgency: Urgency, priority: int
) -> None:
    study = make_study(3, urgency=urgency)
    dimse = ScriptedDimse()
    worker = to_a_dimse_receiver(study, dimse)

    await worker.attempt(queued(dimse_route(study, priority=urgency), now=NOW))

    assert dimse.priorities == [priority, priority]


async def test_a_batch_refused_without_naming_an_instance_fails_alone_and_the_rest_is_sent() -> (
    None
):
    study = make_study(3)
    route = make_route_resolved(
        study=study, batch_limits=BatchLimits(max_instances=1, max_bytes=10**9)
    )
    objects = InMemoryObjectStore()
    for i, ref in enumerate(study.instances):
        objects.put(ref.object_key, f"instance {i}".encode())
    endpoint = DicomWebEndpoint(id="pacs-dicomweb", base_url="https://pacs.example.nl/dicomweb")
    requests = 0

    async def receiver(request: httpx.Request) -> httpx.Response:
        nonlocal requests
        requests += 1
        await request.aread()
        if requests == 2:
            return httpx.Response(400)  # names nothing: refuses this request only
        return httpx.Response(200)

    worker = deliverer(objects, OneProvider(endpoint))
    worker.stow = StowSender(transport=httpx.MockTransport(receiver))
    delivery = queued(route, now=NOW)

    attempt = await worker.attempt(delivery)
    [delivered] = conclude(delivery, attempt, policy=RetryPolicy(), now=NOW)

    assert requests == 3
    assert isinstance(delivered, Delivered)
    assert (delivered.outcomes.sent, delivered.outcomes.failed) == (2, 1)
    [refused] = delivered.refused
    assert refused.sop_instance_uid == study.instances[1].sop_instance_uid
    assert refused.reason == "refused by the receiver without naming it (HTTP 400)"
    await worker.stow.aclose()


class RecordingBytesStow:
    """A receiver that stores everything and keeps the bytes it was sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, endpoint: Any, study: str, instances: Any) -> BatchResult:
        self.sent += [i.data for i in instances]
        return BatchResult(
            tuple(InstanceOutcome(i.sop_instance_uid, InstanceStatus.STORED) for i in instances)
        )


async def test_every_attempt_of_a_coerced_delivery_sends_identical_bytes() -> None:
    # A resend after a lost answer is the same SOP Instance UID: it must be the same content,
    # so the coercion records the route's time, not the clock's.
    data = make_dicom_bytes(
        patient=patient_id_item("H1234567", "ZNOORD"), other_patient_ids=[bsn_item(TEST_BSN)]
    )
    study = make_study(1)
    ref = make_instance_ref(series_instance_uid=study.series[0].series_instance_uid, data=data)
    study = study.model_copy(update={"instances": (ref,)})
    coercion = Coercion(
        profile="bsn-as-patient-id",
        issuer_of_patient_id=BSN_DICOM_ISSUER,
        universal_entity_id=BSN_OID,
    )
    route = make_route_resolved(study=study, coercion=coercion)
    objects = InMemoryObjectStore()
    objects.put(ref.object_key, data)
    endpoint = DicomWebEndpoint(id="pacs-dicomweb", base_url="https://pacs.example.nl/dicomweb")
    worker = deliverer(objects, OneProvider(endpoint))
    stow = RecordingBytesStow()
    worker.stow = stow  # type: ignore[assignment]
    first = queued(route, now=NOW)
    later = first.model_copy(update={"attempt": 3, "occurred_at": NOW + timedelta(hours=2)})

    await worker.attempt(first)
    await asyncio.sleep(0.01)
    await worker.attempt(later)

    one, two = stow.sent
    assert one == two != data
    [record] = pydicom.dcmread(io.BytesIO(one)).OriginalAttributesSequence
    assert record.AttributeModificationDateTime == route.occurred_at.strftime("%Y%m%d%H%M%S.%f%z")
