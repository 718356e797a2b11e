"""The two handlers of the notify worker: queue a route for delivery, and make an attempt.

``Dispatcher.handle`` turns a ``route-resolved`` into the first ``DeliveryQueued`` on the
urgent or the routine queue (``services.notify.domain.delivery.queue_for``): separate topics
with consumers of their own, so an urgent study never waits behind a routine backlog.

``Deliverer.handle`` makes one attempt of a queued delivery (from a queue or, once due, from a
retry tier): it looks the endpoint up in the provider directory (credentials never travel on
Kafka), reads each instance from the object store and checks its sha256, applies the
receiver's coercion, sends the batches over the endpoint's channel, and returns what
:func:`~services.notify.domain.delivery.conclude` makes of the answers. A record on a retry
tier that is not yet due raises :class:`~shared.stream.NotDue`, which pauses its partition.

A queued delivery published twice (the same event id: a publish that succeeded although its
producer saw it fail) is attempted once: the deliverer skips a copy of one it handled earlier
in the same partition (``Deliverer._is_copy``).

Failures while sending are outcomes, not exceptions: they become a retry or a dead letter.
Only what says nothing about the receiver is raised: the object store unreachable
(``TransientError``: the batch is handled again, the partition held) and poison records.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from services.notify.adapters.dimse import DimseSender, c_store_priority
from services.notify.adapters.stow import StowSender
from services.notify.domain.coercion import CoercionImpossible, coerce
from services.notify.domain.delivery import (
    Attempt,
    batches,
    conclude,
    queue_for,
    queued,
    remaining,
)
from services.notify.domain.outcomes import (
    BatchResult,
    InstanceOutcome,
    InstanceStatus,
    OutgoingInstance,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from services.notify.domain.retry import RetryPolicy
from services.notify.worker_metrics import NotifyWorkerMetrics
from services.routing.adapters.directory_view import DirectoryView
from services.routing.domain.directory import DicomWebEndpoint, DimseEndpoint, PickupEndpoint
from shared.codec import Codec
from shared.errors import TransientError
from shared.events import (
    Delivered,
    DeliveryFailed,
    DeliveryQueued,
    InstanceRef,
    RefusedInstance,
    RouteResolved,
)
from shared.events.base import utcnow
from shared.logging import correlation_context, get_logger
from shared.settings import KafkaSettings
from shared.storage.port import ObjectNotFound, ObjectStore, ObjectStoreError
from shared.stream import NotDue, Outgoing, decode_as, position
from shared.topic_view import ViewFailed

log = get_logger(__name__)

# How many handled queued deliveries a deliverer remembers to recognise their copies: copies are
# published seconds apart (a publish retried), so the last 20,000 are plenty (5.4 MB measured).
HANDLED_REMEMBERED = 20_000
# How long reading back a new assignment's handled deliveries may take (see ``recall``).
RECALL_SECONDS = 10.0
# Records read back before a partition's committed offset when it is assigned (``recall``):
# the queued deliveries handled there before, by this process or another (a restart, a
# rebalance), so that copies of them arriving later are recognised too. Copies come seconds
# to a minute after their first (an upstream service restarted and published again).
RECALLED_PER_PARTITION = 500
# At most this many SOP Instance UIDs in one log line (a whole study may be answered 0111).
_UIDS_LOGGED = 50


@dataclass
class Dispatcher:
    metrics: NotifyWorkerMetrics
    codec: Codec = field(default_factory=Codec)

    async def handle(self, record: Any) -> list[Outgoing]:
        route = decode_as(self.codec, record, RouteResolved)
        # The route's own time, not the clock: a replay queues the identical record.
        first = queued(route, now=route.occurred_at)
        queue = queue_for(route.priority)
        self.metrics.consumed(record.topic, route.schema_name, queue)
        return [(queue, first)]


@dataclass
class Deliverer:
    directory: DirectoryView
    objects: ObjectStore
    stow: StowSender
    dimse: DimseSender
    policy: RetryPolicy
    metrics: NotifyWorkerMetrics
    codec: Codec = field(default_factory=Codec)
    view_timeout: float = 60.0
    # Deliveries in flight at once per source topic (a queue, or a retry tier), so that the
    # urgent queue never waits for a slot the routine one holds.
    max_concurrent: int = 12
    # An attempt's time slice: past it, no further batch is started and the delivery yields
    # to those queued behind it (see ``delivery.conclude``).
    attempt_seconds: float = 120.0
    _directory_ready: bool = False
    _slots: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    # The queued deliveries handled last (event id -> topic, partition, offset): copies of them
    # further on in their partition are skipped (``_is_copy``).
    _handled: OrderedDict[uuid.UUID, tuple[str, int, int]] = field(default_factory=OrderedDict)

    async def prepare(self) -> None:
        if not self._directory_ready:
            try:
                await self.directory.wait_caught_up(self.view_timeout)
                log.info("provider directory read; delivering", providers=len(self.directory))
            except TimeoutError:
                log.error("provider directory not read in time; delivering with what it has")
            self._directory_ready = True

    async def handle(self, record: Any) -> list[Outgoing]:
        delivery = decode_as(self.codec, record, DeliveryQueued)
        if self._is_copy(delivery, record):
            # Its first copy went before it in this partition and was handled by this worker:
            # what that attempt concluded (delivered, the next try, the dead letter) carries the
            # delivery on, and commits no later than this record's offset does.
            log.warning(
                "a copy of a queued delivery already handled; skipped",
                position=position(record),
                study_instance_uid=delivery.route.study.study_instance_uid,
                version=delivery.route.study.version,
                endpoint_id=delivery.route.destination.endpoint_id,
                attempt=delivery.attempt,
            )
            self.metrics.consumed(record.topic, delivery.schema_name, "copy")
            return []
        now = utcnow()
        if delivery.not_before is not None and delivery.not_before > now:
            raise NotDue((delivery.not_before - now).total_seconds())
        slots = self._slots.get(record.topic)
        if slots is None:
            slots = self._slots[record.topic] = asyncio.Semaphore(self.max_concurrent)
        with correlation_context(delivery.correlation_id):
            async with slots:
                attempt = await self.attempt(delivery)
            outgoing = conclude(delivery, attempt, policy=self.policy, now=utcnow())
            self._record(record.topic, delivery, attempt, outgoing)
        self._remember(delivery.event_id, record)
        return outgoing

    async def recall(
        self,
        kafka: KafkaSettings,
        committed: Callable[[TopicPartition], Awaitable[int | None]],
        partitions: set[TopicPartition],
    ) -> None:
        """Remember the queued deliveries handled in ``partitions`` before their committed
        offsets (the last ``RECALLED_PER_PARTITION`` of each): assigned anew (a restart, a
        rebalance), this worker then skips copies of them as it skips copies of what it
        handled itself. Best effort: if Kafka cannot be read now, a copy after a restart
        makes one more attempt, as before."""
        if not partitions:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap_list,
            enable_auto_commit=False,
            isolation_level="read_committed",
            max_partition_fetch_bytes=kafka.max_message_bytes,
        )
        recalled = 0
        try:
            await consumer.start()
            ends = {tp: await committed(tp) for tp in partitions}
            todo = {tp: end for tp, end in ends.items() if end}
            if not todo:
                return
            consumer.assign(list(todo))
            starts = await consumer.beginning_offsets(list(todo))
            for tp, end in todo.items():
                consumer.seek(tp, max(starts[tp], end - RECALLED_PER_PARTITION))
            async with asyncio.timeout(RECALL_SECONDS):
                while todo:
                    fetched = await consumer.getmany(*todo, timeout_ms=200)
                    for tp, records in fetched.items():
                        for record in records:
                            if record.offset < todo.get(tp, -1):
                                recalled += self._recall_one(record)
                    for tp in list(todo):
                        if await consumer.position(tp) >= todo[tp]:
                            del todo[tp]
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("queued deliveries handled before not recalled", error=repr(exc))
        finally:
            await consumer.stop()
        if recalled:
            log.info("queued deliveries handled before recalled", count=recalled)

    def _recall_one(self, record: Any) -> int:
        try:
            event_id = uuid.UUID(json.loads(record.value)["event_id"])
        except (ValueError, TypeError, KeyError):
            return 0  # not a queued delivery the worker could have handled
        self._remember(event_id, record)
        return 1

    def _is_copy(self, delivery: DeliveryQueued, record: Any) -> bool:
        """Whether the same queued delivery (its event id: the delivery's key and attempt, and
        for a yielded turn what it settled, for a re-driven run when it was re-driven) was
        handled here at an earlier offset of this partition: a copy published twice (a
        producer that saw a publish fail that had succeeded, then sent it again).

        Skipping it is safe: a copy has the first's key, and the records of one key are
        handled in offset order from the partition's committed offset on, so the first copy's
        outcome is either committed already or in the same transaction as this record, and a
        batch handled again (or a partition taken over) handles the first copy again before
        it reaches this one. What was handled before a restart or a rebalance is learnt when
        the partition is assigned (:meth:`recall`).
        """
        first = self._handled.get(delivery.event_id)
        return (
            first is not None
            and first[:2] == (record.topic, record.partition)
            and first[2] < record.offset
        )

    def _remember(self, event_id: uuid.UUID, record: Any) -> None:
        handled = self._handled
        handled[event_id] = (record.topic, record.partition, record.offset)
        handled.move_to_end(event_id)
        while len(handled) > HANDLED_REMEMBERED:
            handled.popitem(last=False)

    def _endpoint(self, delivery: DeliveryQueued) -> Any:
        destination = delivery.route.destination
        provider = self.directory.get(destination.organisation_ura)
        if provider is None:
            return None
        return next((e for e in provider.endpoints if e.id == destination.endpoint_id), None)

    async def attempt(self, delivery: DeliveryQueued) -> Attempt:
        destination = delivery.route.destination
        endpoint = self._endpoint(delivery)
        if endpoint is None:
            # Not in this view (yet?): routing found it, so the view may be behind (a provider
            # added just before the study): read the directory up to now before giving up.
            try:
                await self.directory.sync(self.view_timeout)
            except (TimeoutError, TransientError, ViewFailed) as exc:
                return Attempt(
                    BatchResult(()),
                    failure="the provider directory could not be read up to date "
                    f"({type(exc).__name__}); the endpoint is looked up again on the next try",
                )
            endpoint = self._endpoint(delivery)
        if endpoint is None or not endpoint.enabled:
            return Attempt(
                BatchResult(()),
                failure=f"endpoint {destination.endpoint_id} of {destination.organisation_ura} "
                "is not (or no longer) an enabled endpoint in the provider directory",
                failure_is_permanent=True,
            )
        todo = remaining(delivery)
        if isinstance(endpoint, PickupEndpoint):
            # Portal pickup: the study is delivered when the recipient can download it (a signed
            # link), which it can once each instance is in the store as received: looked up,
            # not assumed (a missing one would fail the recipient's download later).
            problems = await asyncio.gather(*(self._check_stored(ref) for ref in todo))
            return Attempt(
                BatchResult(
                    tuple(
                        _stored(ref.sop_instance_uid)
                        for ref, problem in zip(todo, problems, strict=True)
                        if problem is None
                    )
                ),
                tuple(
                    _refused(ref, problem)
                    for ref, problem in zip(todo, problems, strict=True)
                    if problem is not None
                ),
            )
        results: list[BatchResult] = []
        unsendable: list[RefusedInstance] = []
        deadline = time.monotonic() + self.attempt_seconds
        for number, batch in enumerate(batches(todo, delivery.route.batch_limits)):
            if number and time.monotonic() > deadline:
                return Attempt(BatchResult.merge(results), tuple(unsendable), yielded=True)
            outgoing, refused = await self._read(batch, delivery)
            unsendable += refused
            if not outgoing:
                continue
            try:
                results.append(await self._send(endpoint, delivery, outgoing))
            except TransientDeliveryError as exc:
                # What the receiver answered before the batch broke off is settled.
                return Attempt(
                    BatchResult.merge([*results, exc.answered]),
                    tuple(unsendable),
                    failure=exc.reason,
                    retry_after=exc.retry_after,
                )
            except PermanentDeliveryError as exc:
                return Attempt(
                    BatchResult.merge(results),
                    tuple(unsendable),
                    failure=exc.reason,
                    failure_is_permanent=True,
                )
        return Attempt(BatchResult.merge(results), tuple(unsendable))

    async def _send(
        self,
        endpoint: DicomWebEndpoint | DimseEndpoint,
        delivery: DeliveryQueued,
        instances: Sequence[OutgoingInstance],
    ) -> BatchResult:
        with self.metrics.time_handler(f"send-{endpoint.channel}"):
            if isinstance(endpoint, DicomWebEndpoint):
                study = delivery.route.study.study_instance_uid
                return await self.stow.send(endpoint, study, instances)
            priority = c_store_priority(delivery.route.priority)
            return await self.dimse.send(endpoint, instances, priority=priority)

    async def _read(
        self, batch: Sequence[InstanceRef], delivery: DeliveryQueued
    ) -> tuple[list[OutgoingInstance], list[RefusedInstance]]:
        """The batch's instances as they will be sent, and the ones that cannot be sent."""
        coercion = delivery.route.coercion
        sender = delivery.route.study.sender_ura
        # The modification time recorded in Original Attributes Sequence is the route's, not the
        # clock's: every attempt (and a re-drive) sends identical bytes under one SOP Instance
        # UID, so an instance a lost answer left unsettled is resent as the very same content.
        modified_at = delivery.route.occurred_at
        loaded = await asyncio.gather(*(self._load(ref) for ref in batch))
        outgoing: list[OutgoingInstance] = []
        refused: list[RefusedInstance] = []
        for ref, (data, problem) in zip(batch, loaded, strict=True):
            if problem is not None:
                refused.append(_refused(ref, problem))
                continue
            assert data is not None
            try:
                data = coerce(
                    data, coercion, source_of_previous_values=sender, modified_at=modified_at
                )
            except CoercionImpossible as exc:
                refused.append(_refused(ref, f"not coerced for the receiver: {exc.reason}"))
                continue
            outgoing.append(
                OutgoingInstance(
                    sop_instance_uid=ref.sop_instance_uid,
                    sop_class_uid=ref.sop_class_uid,
                    transfer_syntax_uid=ref.transfer_syntax_uid,
                    data=data,
                )
            )
        return outgoing, refused

    async def _check_stored(self, ref: InstanceRef) -> str | None:
        """Why the stored instance cannot be offered for pickup (missing, or not the bytes that
        were received, by size and recorded sha256), or None."""
        try:
            info = await asyncio.to_thread(self.objects.stat, ref.object_key)
        except ObjectStoreError as exc:
            raise TransientError(f"object store unavailable: {type(exc).__name__}") from exc
        if info is None:
            return "the stored instance is missing from the object store"
        if info.size != ref.size or (info.sha256 is not None and info.sha256 != ref.sha256):
            return "the stored bytes are not the ones received: not offered"
        return None

    async def _load(self, ref: InstanceRef) -> tuple[bytes | None, str | None]:
        """The stored bytes, or why they cannot be sent (missing, or not what was received)."""
        try:
            data = await asyncio.to_thread(self.objects.get, ref.object_key)
        except ObjectNotFound:
            return None, "the stored instance is missing from the object store"
        except ObjectStoreError as exc:
            raise TransientError(f"object store unavailable: {type(exc).__name__}") from exc
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            return None, "the stored bytes do not match their sha256: not sent"
        return data, None

    def _record(
        self,
        source: str,
        delivery: DeliveryQueued,
        attempt: Attempt,
        outgoing: Sequence[Outgoing],
    ) -> None:
        route = delivery.route
        channel = route.destination.channel.value
        outcome = "unknown"
        for item in outgoing:
            event = item[1] if isinstance(item, tuple) else item
            if isinstance(event, Delivered):
                outcome = "delivered"
                self.metrics.delivered.labels(channel, route.priority.value).inc()
                self.metrics.delivery_latency.labels(route.priority.value).observe(
                    event.seconds_since_first_received
                )
                log.info(
                    "study delivered",
                    study_instance_uid=event.study_instance_uid,
                    version=event.study_version,
                    destination_ura=event.destination_ura,
                    endpoint_id=event.endpoint_id,
                    sent=event.outcomes.sent,
                    already_present=event.outcomes.already_present,
                    failed=event.outcomes.failed,
                    attempts=event.attempts,
                )
            elif isinstance(event, DeliveryFailed):
                outcome = "dead" if event.final else "retry"
                self.metrics.failed_attempts.labels(channel, str(event.final).lower()).inc()
                (log.error if event.final else log.warning)(
                    "delivery attempt failed",
                    study_instance_uid=event.study_instance_uid,
                    version=event.study_version,
                    destination_ura=event.destination_ura,
                    endpoint_id=event.endpoint_id,
                    attempt=event.attempt,
                    final=event.final,
                    reason=event.reason,
                    next_attempt_at=event.next_attempt_at,
                )
        present = [
            o for o in attempt.results.outcomes if o.status is InstanceStatus.ALREADY_PRESENT
        ]
        if present:
            # Counted delivered and never sent again: as a rule our own copy from an attempt
            # whose answer was lost. The codes and UIDs are here in case it was not (another
            # system's instance under the same UID, whose content differs).
            log.info(
                "instances already held by the receiver; not sent again",
                study_instance_uid=route.study.study_instance_uid,
                version=route.study.version,
                destination_ura=route.destination.organisation_ura,
                endpoint_id=route.destination.endpoint_id,
                attempt=delivery.attempt,
                codes=sorted({o.code or "?" for o in present}),
                count=len(present),
                sop_instance_uids=[o.sop_instance_uid for o in present[:_UIDS_LOGGED]],
            )
        self.metrics.consumed(source, delivery.schema_name, outcome)
        if outcome != "unknown":
            destination = route.destination
            self.metrics.attempt_concluded(
                destination.organisation_ura,
                destination.endpoint_id,
                channel,
                outcome,
                retried=delivery.attempt > 1,
            )
        self.metrics.instances.labels(channel, "sent").inc(len(attempt.results.stored))
        self.metrics.instances.labels(channel, "failed").inc(
            len(attempt.results.failed) + len(attempt.unsendable)
        )


def _stored(uid: str) -> InstanceOutcome:
    return InstanceOutcome(uid, InstanceStatus.STORED, code=None, reason=None, transient=False)


def _refused(ref: InstanceRef, reason: str) -> RefusedInstance:
    return RefusedInstance(sop_instance_uid=ref.sop_instance_uid, code=None, reason=reason)
