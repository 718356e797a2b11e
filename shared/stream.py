"""At-least-once consumer-group workers on aiokafka: fetch a batch, handle it, publish, commit.

The loop, per batch of records:

1. ``getmany`` takes up to ``max_records`` records from the partitions this member owns;
2. ``prepare()`` runs once (a worker brings its read models up to date here, e.g. a
   :class:`~shared.topic_view.TopicView` ``sync``, so a batch is decided on state at least as
   new as the batch);
3. ``handle(record)`` runs for each record, in offset order per partition (with
   ``parallel_keys``: per key, the keys of a partition side by side), and returns the events
   the record causes; they go to the idempotent producer (acks=all) as one batch per topic
   partition, not awaited one by one;
4. when every acknowledgement is in, the batch's offsets are committed.

So no offset is committed before what its record caused is on the broker, and a crash anywhere
replays at most the batch in hand: handlers must be deterministic and idempotent (design.md,
Processing guarantee), which they are by deterministic event ids that consumers recognise.

Why not faust for these workers: the stateless-per-record workers (consent decisions, routing,
delivery) need nothing faust offers beyond a consumer group, and faust cost them correctness
and speed. Measured on faust-streaming 0.15.3: a restarted multi-topic consent worker lost
records in about one run in four, even with ``shared.faust_app.GapSafeConsumer``; and faust's
per-record overhead capped a bare agent sending two events at ~1,390 records/s on a 2-core box,
below the 2,000 decisions/s the consent issue asks for. faust remains where its tables and
timers earn their keep (study assembly).

Errors, with the one policy of ``shared.errors``:

- :class:`PoisonEvent` from ``handle``: logged with the record's position (never its value),
  counted, skipped; its offset is committed with the batch.
- :class:`TransientError` (or a Kafka error while publishing): the whole batch is handled again
  after a growing delay, holding its partitions; handlers are idempotent, so the events a
  half-published batch already sent are sent again with the same ids. A skipped record would
  be a study silently never decided. A transactional worker first asks the group which of
  the batch's records a transaction committed although the client saw it fail (its answer
  lost with a broker restarting) and handles only the others: the committed offsets travel
  in the transaction with the events, so a read_committed reader sees each event once.
- anything else (:class:`FatalError`, a bug): the worker stops *without* committing the batch
  and :meth:`StreamWorker.run` raises; the process exits non-zero and its supervisor restarts
  it, which replays the batch.

A rebalance waits for the batch in hand to be committed before partitions are given up; stop
(SIGTERM) finishes the batch in hand, commits it and leaves the group.

Stateful workers (study assembly keeps its studies per owned partition) have three more hooks:

- ``on_revoked(partitions)`` and ``on_assigned(partitions)`` run under the batch lock: revoked
  once the batch in hand is committed, assigned before any record of the new assignment is
  handled (the worker rebuilds that partition's state there, e.g. from its changelog);
  ``assigned`` is set after it. A failing hook is fatal: :meth:`StreamWorker.run` raises it
  (aiokafka itself would log it and go on with the partitions' state missing). A batch fetched
  before a rebalance is not handled: its partitions are rewound and fetched again.
- ``tick()`` runs under the batch lock after every batch's records, its outputs joining the
  batch's (in its transaction, before its offsets), and on its own every ``tick_interval_ms``
  when no batch came, its outputs then published alone (a transaction without offsets; none at
  all when there is nothing to publish). A worker flushes its state changes here and publishes
  what time made due.
- an output may be a :class:`RawRecord` (a changelog row: bytes to a partition of choice).

When a batch (or a tick) is handled again after a transient error, the partition hooks run
first (revoked, then assigned, for every owned partition): the state changes of the aborted
transaction are undone by rebuilding, so the replay starts from what was committed.

Metrics (on the worker's :class:`~shared.metrics.ServiceMetrics`, labelled by consumer group):
``consumer_lag`` per owned partition after every fetch (highwater minus position: records not
fetched yet; a partition paused on a retry tier counts the records waiting there; a worker
retrying a batch fetches nothing, so its lag stands still meanwhile), ``events_failed`` with
``error_class="transient"`` per topic for every failed attempt at a batch,
``consumer_assigned_partitions``, and ``stream_record_latency_seconds`` per topic, from a
record's append to the end of the batch that handled it (one hop). The series of the group's
topics exist at zero from construction on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from shared.codec import Codec, Record
from shared.errors import FatalError, PoisonEvent, TransientError
from shared.events.base import Event
from shared.kafka import KafkaEventPublisher, WireRecord
from shared.logging import get_logger, kafka_position
from shared.metrics import ServiceMetrics, safe_label
from shared.probes import ProbeServer
from shared.runtime import tune_gc
from shared.settings import KafkaSettings

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RawRecord:
    """An output that is not an event (a state changelog row): sent as is, never renamed."""

    topic: str
    key: bytes
    value: bytes | None
    partition: int | None = None


@dataclass(frozen=True, slots=True)
class Encoded:
    """An event already written as its record by a hot path's own writer (whose tests hold it
    byte-equal to :meth:`Codec.encode`), for its declared topic: renamed as events are."""

    schema_name: str
    record: Record


# What a record causes: events for their declared topic, (topic, event) for another one, an
# event already encoded, or raw.
Outgoing = Event | tuple[str, Event] | Encoded | RawRecord
Handle = Callable[[Any], Awaitable[Iterable[Outgoing]]]
Prepare = Callable[[], Awaitable[None]]
Tick = Callable[[], Awaitable[Iterable[Outgoing]]]
PartitionsHook = Callable[[set[TopicPartition]], Awaitable[None]]
MAX_BACKOFF_SECONDS = 30.0
# A batch's transaction only spans publishing (the work is done before it begins): an open one
# older than this belongs to a dead process, and the broker aborts it.
TRANSACTION_TIMEOUT_MS = 15_000
# How long a replay waits for the group's committed offsets before it counts as failed again.
COMMITTED_TIMEOUT_SECONDS = 10.0
E = TypeVar("E", bound=Event)


def decode_as(codec: Codec, record: Any, *expected: type[E]) -> E:
    """Decode a record into one of the ``expected`` event types, or raise :class:`PoisonEvent`."""
    event = codec.decode_record(record)  # raises PoisonEvent for what does not decode
    if not isinstance(event, expected):
        raise PoisonEvent(f"{event.schema_name} does not belong on {record.topic}")
    return event


class NotDue(Exception):
    """Raised by ``handle`` for a record that must wait ``seconds`` before it is handled.

    The worker commits what came before it in its partition, rewinds the partition to it and
    pauses the partition for that long; other partitions go on (non-blocking retry tiers).
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"not due for {seconds:.1f}s")
        self.seconds = max(seconds, 0.0)


def replica_id() -> str:
    """This replica's stable name: ``BEELDPORTAAL_REPLICA_ID`` (e.g. a StatefulSet pod name),
    else the host name. Two live replicas of one group must not share it."""
    return os.environ.get("BEELDPORTAAL_REPLICA_ID") or socket.gethostname()


def position(record: Any) -> str:
    return kafka_position(record.topic, record.partition, record.offset)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: StreamWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # The batch in hand finishes and commits before its partitions go to another member.
        async with self._worker._batch_lock:
            self._worker._generation += 1
            if revoked:
                await self._worker._partitions_hook("revoked", set(revoked))
            self._worker._assignment_changed(set(revoked))
        if revoked:
            log.info("partitions revoked", worker=self._worker.name, partitions=len(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned", worker=self._worker.name, partitions=len(assigned))
        async with self._worker._batch_lock:
            self._worker._generation += 1
            await self._worker._partitions_hook("assigned", set(assigned))
            self._worker._assignment_changed()
        self._worker.assigned.set()


class StreamWorker:
    """One member of consumer group ``beeldportaal-<group>`` handling ``topics``.

    ``rename`` maps an event's declared topic to the topic it is published on (tests and
    benchmarks run workers on their own copies of the topics).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        name: str,
        group: str,
        topics: Sequence[str],
        handle: Handle,
        metrics: ServiceMetrics,
        prepare: Prepare | None = None,
        rename: Mapping[str, str] | None = None,
        max_records: int = 500,
        poll_timeout_ms: int = 200,
        codec: Codec | None = None,
        transactional: bool = False,
        transactional_id: str | None = None,
        tick: Tick | None = None,
        tick_interval_ms: int = 1000,
        on_assigned: PartitionsHook | None = None,
        on_revoked: PartitionsHook | None = None,
        parallel_keys: bool = False,
    ) -> None:
        self.name = name
        # Records of one partition with different keys are handled side by side (those of one
        # key in order): for workers whose records of different keys are independent and slow
        # (notify's deliveries, one key per delivery), so that a batch is not as slow as its
        # longest partition.
        self.parallel_keys = parallel_keys
        self.assigned = asyncio.Event()
        self._kafka = kafka
        self._group = f"{kafka.client_id_prefix}-{group}"
        self._topics = tuple(topics)
        self._handle = handle
        self._prepare = prepare
        self._metrics = metrics
        self._rename = dict(rename or {})
        self._max_records = max_records
        self._poll_timeout_ms = poll_timeout_ms
        # Transactional: a batch's events and its offsets are committed atomically, so a
        # replayed batch's first events are never seen by read_committed consumers. The id
        # outlives the process (one per replica): a restarted replica's init_transactions fences
        # its predecessor and aborts the transaction a crash left open, which would otherwise
        # hold back every read_committed reader of its topics until the transaction times out,
        # and which a paused zombie could still commit.
        self._transactional = transactional
        overrides: dict[str, Any] = {}
        if transactional:
            overrides = {
                "transactional_id": transactional_id or f"{self._group}-{replica_id()}",
                "transaction_timeout_ms": TRANSACTION_TIMEOUT_MS,
            }
        self._codec = codec or Codec()
        self._publisher = KafkaEventPublisher(kafka, name, self._codec, **overrides)
        self._consumer: AIOKafkaConsumer | None = None
        self._batch_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._tick = tick
        self._tick_interval = tick_interval_ms / 1000
        self._next_tick = 0.0
        self._hooks = {"assigned": on_assigned, "revoked": on_revoked}
        # Bumped by every rebalance callback: a batch fetched under an older one is stale.
        self._generation = 0
        self._failure: BaseException | None = None
        self.batches = 0
        self.records = 0
        # The lag gauge's child per owned partition (removed when the partition goes).
        self._lag_gauges: dict[TopicPartition, Any] = {}
        metrics.expect_stream(self._group, self._topics)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self._publisher.start()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._kafka.bootstrap_list,
            client_id=f"{self._kafka.client_id_prefix}-{self.name}",
            group_id=self._group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=self._kafka.max_message_bytes,
            fetch_max_bytes=max(self._kafka.max_message_bytes, 52_428_800),
            isolation_level="read_committed",
        )
        try:
            await consumer.start()
            consumer.subscribe(self._topics, listener=_Rebalance(self))
        except KafkaError as exc:
            await consumer.stop()
            await self._publisher.stop()
            raise TransientError(f"{self.name}: Kafka unavailable: {exc}") from exc
        self._consumer = consumer

    def request_stop(self) -> None:
        """Finish the batch in hand, commit it, and return from :meth:`run` (SIGTERM)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def stop(self) -> None:
        self._stopping.set()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            async with self._batch_lock:
                await consumer.stop()  # leaves the group: its partitions move at once
            self._forget_partitions(set(self._lag_gauges))
            self._metrics.consumer_partitions.labels(self._group).set(0)
        await self._publisher.stop()

    async def __aenter__(self) -> StreamWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Handle batches until :meth:`request_stop`; raises on a fatal error, uncommitted."""
        consumer = self._require_consumer()
        self._next_tick = time.monotonic() + self._tick_interval
        while not self._stopping.is_set():
            generation = self._generation
            fetch = asyncio.ensure_future(
                consumer.getmany(timeout_ms=self._fetch_timeout_ms(), max_records=self._max_records)
            )
            stop = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not fetch.done():
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fetch
                break
            batch: dict[TopicPartition, list[Any]] = fetch.result()
            await self._record_lag(consumer)
            if not any(batch.values()):
                if self._tick is None or time.monotonic() < self._next_tick:
                    continue
                batch = {}  # a tick on its own
            async with self._batch_lock:
                if self._failure is not None:
                    break
                if generation != self._generation:
                    self._fetch_again(consumer, batch)
                    continue
                waits = await self._until_done(batch)
                if waits is None:
                    break  # stopped while the batch waited to be retried: it is replayed
                if batch and not self._transactional:
                    await self._commit(consumer, batch, waits)
                for tp, (record, seconds) in waits.items():
                    self._pause(consumer, tp, record.offset, seconds)
        if self._failure is not None:
            raise self._failure

    def _fetch_timeout_ms(self) -> int:
        if self._tick is None:
            return self._poll_timeout_ms
        until_tick = (self._next_tick - time.monotonic()) * 1000
        return max(0, min(self._poll_timeout_ms, int(until_tick)))

    def _fetch_again(
        self, consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[Any]]
    ) -> None:
        """Rewind the partitions of a batch fetched before a rebalance that are still ours (a
        partition taken over restarts at its committed offset anyway)."""
        assignment = consumer.assignment()
        for tp, records in batch.items():
            if records and tp in assignment:
                consumer.seek(tp, records[0].offset)

    async def _partitions_hook(self, which: str, partitions: set[TopicPartition]) -> None:
        hook = self._hooks[which]
        if hook is None or self._failure is not None:
            return
        try:
            await hook(partitions)
        except Exception as exc:
            log.exception("partitions hook failed; stopping", worker=self.name, hook=which)
            self._failure = exc
            self._stopping.set()

    async def _rebuild_state(self) -> None:
        """Revoked, then assigned again: a stateful worker drops what the failed attempt
        changed and rebuilds what was committed (its errors count as the attempt's)."""
        consumer = self._require_consumer()
        partitions = set(consumer.assignment())
        for which in ("revoked", "assigned"):
            hook = self._hooks[which]
            if hook is not None:
                await hook(partitions)

    async def _until_done(
        self, batch: dict[TopicPartition, list[Any]]
    ) -> dict[TopicPartition, tuple[Any, float]] | None:
        """The batch handled (with its not-due partitions), or None when a stop came while it
        waited for a retry (uncommitted: the next owner replays it)."""
        delay = 0.5
        rebuild = False
        again = False
        while True:
            try:
                if rebuild:
                    await self._rebuild_state()
                if again and self._transactional and batch:
                    batch = await self._not_committed(batch)
                    if not batch:
                        return {}
                return await self._handle_batch(batch)
            except TransientError as exc:
                again = True
                rebuild = self._hooks["assigned"] is not None
                # Counted per attempt: a worker stuck on a batch fetches nothing, so its lag
                # stops growing while its input grows (BeeldportaalStreamStalled watches this).
                for topic in {tp.topic for tp in batch} or self._topics:  # a tick: all
                    self._metrics.failed(topic, "transient")
                wait = exc.retry_after or delay
                log.warning(
                    "batch failed for now; handling it again",
                    worker=self.name,
                    error=str(exc),
                    retry_in_seconds=round(wait, 1),
                )
                # A stop during the wait abandons the batch uncommitted: it is replayed.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), wait)
                if self._stopping.is_set():
                    return None
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)

    async def _not_committed(
        self, batch: dict[TopicPartition, list[Any]]
    ) -> dict[TopicPartition, list[Any]]:
        """The records of a batch whose transaction looked failed that it did not commit.

        A commit can succeed on the broker while its answer is lost (the connection dropped
        with the broker restarting): the client raises, yet the events and the offsets are
        committed. Handling such a batch again would publish its events a second time, visible
        to read_committed readers. The offsets committed with the events tell: records below
        the group's committed offset are done. The producer is made ready first, since its
        init_transactions completes (or aborts) what the previous one left in doubt, and on
        Kafka 4 (its group coordinator) a completed transaction's offsets are in place when
        the commit is: aiokafka's OffsetFetch (v3) cannot ask for stable offsets. On Kafka 3's
        classic coordinator they land a moment later, and a batch could be handled twice.
        """
        await self._publisher.ready()
        consumer = self._require_consumer()
        remaining: dict[TopicPartition, list[Any]] = {}
        for tp, records in batch.items():
            try:
                done = await asyncio.wait_for(consumer.committed(tp), COMMITTED_TIMEOUT_SECONDS)
            except (KafkaError, TimeoutError) as exc:
                raise TransientError(f"committed offset of {tp} unknown: {exc!r}") from exc
            left = [r for r in records if done is None or r.offset >= done]
            if len(left) < len(records):
                log.warning(
                    "a transaction that looked failed was committed; not handled again",
                    worker=self.name,
                    partition=f"{tp.topic}[{tp.partition}]",
                    records=len(records) - len(left),
                )
            if left:
                remaining[tp] = left
        return remaining

    async def _handle_batch(
        self, batch: dict[TopicPartition, list[Any]]
    ) -> dict[TopicPartition, tuple[Any, float]]:
        """Handle every partition's records (partitions side by side, records in order) and
        wait for all acknowledgements; returns the partitions that hit a record not yet due.
        An empty batch is a tick on its own."""
        if self._prepare is not None and batch:
            await self._prepare()
        by_partition = self._handle_by_key if self.parallel_keys else self._handle_partition
        handled = await asyncio.gather(*(by_partition(records) for records in batch.values()))
        waits = {tp: wait for tp, (_, wait) in zip(batch, handled, strict=True) if wait}
        outgoing = [item for items, _ in handled for item in items]
        if self._tick is not None:
            outgoing += await self._tick()
            self._next_tick = time.monotonic() + self._tick_interval
        offsets = self._offsets(batch, waits)
        if not outgoing and not offsets:
            return waits
        records = [self._wire(item) for item in outgoing]
        producer = await self._publisher.ready()
        try:
            if self._transactional:
                async with producer.transaction():
                    await asyncio.gather(*await self._publisher.send_many(producer, records))
                    if offsets:
                        await producer.send_offsets_to_transaction(offsets, self._group)
            else:
                await asyncio.gather(*await self._publisher.send_many(producer, records))
        except ProducerFenced as exc:
            # Another member runs under this transactional id (a replica started with the same
            # BEELDPORTAAL_REPLICA_ID, or this one was presumed dead): stop, never fence it back.
            raise FatalError(f"{self.name}: producer fenced: {exc}") from exc
        except TransientError as exc:
            await self._publisher.failed(producer, exc.__cause__ or exc)
            raise
        except (KafkaError, AssertionError) as exc:
            # AssertionError: aiokafka's transaction manager asserts its state machine, and a
            # transaction whose connection dropped is left in a state it refuses to leave.
            await self._publisher.failed(producer, exc)
            raise TransientError(f"publishing failed: {exc!r}") from exc
        if not batch:
            return waits
        self.batches += 1
        self.records += sum(len(records) for records in batch.values())
        self._record_latency(batch, waits)
        return waits

    async def _handle_partition(
        self, records: list[Any]
    ) -> tuple[list[Outgoing], tuple[Any, float] | None]:
        done, wait = await self._handle_in_order(records)
        return [item for _, items in done for item in items], wait

    async def _handle_by_key(
        self, records: list[Any]
    ) -> tuple[list[Outgoing], tuple[Any, float] | None]:
        """``_handle_partition`` with the records of each key side by side. Every key's records
        run to their end before an error is raised (nothing goes on in the background). A
        record not yet due stops the partition at the earliest such record: what records after
        it caused is dropped (they are handled again once it is due, a repeat the handlers'
        idempotency absorbs)."""
        keys: dict[Any, list[Any]] = {}
        for record in records:
            keys.setdefault(record.key, []).append(record)
        if len(keys) == 1:
            return await self._handle_partition(records)
        results = await asyncio.gather(
            *(self._handle_in_order(group) for group in keys.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        done = sorted(
            (entry for handled, _ in results for entry in handled),  # type: ignore[union-attr]
            key=lambda entry: entry[0],
        )
        waits = [wait for _, wait in results if wait is not None]  # type: ignore[misc]
        stop = min(waits, key=lambda wait: wait[0].offset) if waits else None
        outgoing = [
            item
            for offset, items in done
            if stop is None or offset < stop[0].offset
            for item in items
        ]
        return outgoing, stop

    async def _handle_in_order(
        self, records: list[Any]
    ) -> tuple[list[tuple[int, Iterable[Outgoing]]], tuple[Any, float] | None]:
        """Each record's offset and outputs, one after the other, up to a record not yet due
        (returned with its wait)."""
        done: list[tuple[int, Iterable[Outgoing]]] = []
        for record in records:
            try:
                done.append((record.offset, await self._handle_one(record)))
            except NotDue as wait:
                return done, (record, wait.seconds)
        return done, None

    async def _handle_one(self, record: Any) -> Iterable[Outgoing]:
        try:
            return list(await self._handle(record))
        except PoisonEvent as exc:
            log.error("poison record skipped", position=position(record), reason=str(exc))
            self._metrics.failed(record.topic, "poison")
            self._metrics.consumed(record.topic, "unknown", "poison")
            return ()

    def _wire(self, item: Outgoing) -> WireRecord:
        """An output as its record: an event encoded for its (renamed) topic (or as its writer
        encoded it), or raw as is."""
        if isinstance(item, RawRecord):
            return WireRecord(item.topic, item.key, item.value, (), item.partition)
        if isinstance(item, Encoded):
            record, topic, schema_name = item.record, item.record.topic, item.schema_name
        else:
            topic, event = item if isinstance(item, tuple) else (item.topic, item)
            record, schema_name = self._codec.encode(event), event.schema_name
        topic = self._rename.get(topic, topic)
        self._metrics.produced(topic, schema_name)
        return WireRecord(topic, record.key, record.value, record.headers)

    async def _commit(
        self,
        consumer: AIOKafkaConsumer,
        batch: dict[Any, list[Any]],
        waits: dict[TopicPartition, tuple[Any, float]],
    ) -> None:
        offsets = self._offsets(batch, waits)
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            # The group moved on (rebalance) or the coordinator is away: the next owner
            # replays these records, which the handlers' idempotency absorbs.
            log.warning("commit failed; records will be replayed", worker=self.name, error=str(exc))

    @staticmethod
    def _offsets(
        batch: dict[Any, list[Any]], waits: dict[TopicPartition, tuple[Any, float]]
    ) -> dict[Any, int]:
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items() if records}
        # A partition that stopped at a record not yet due commits up to that record.
        offsets.update({tp: record.offset for tp, (record, _) in waits.items()})
        return offsets

    def _pause(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, seconds: float
    ) -> None:
        """Rewind ``tp`` to ``offset`` and fetch nothing from it for ``seconds``."""
        consumer.seek(tp, offset)
        consumer.pause(tp)

        def resume() -> None:
            if self._consumer is consumer and tp in consumer.assignment():
                consumer.resume(tp)

        asyncio.get_running_loop().call_later(seconds, resume)

    async def committed(self, tp: TopicPartition) -> int | None:
        """The group's committed offset of ``tp`` (None: none yet); for a partitions hook."""
        return await self._require_consumer().committed(tp)  # type: ignore[no-any-return]

    def _require_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError(f"worker {self.name} is not started")
        return self._consumer

    # --- metrics ----------------------------------------------------------------------------

    async def _record_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Highwater minus position for every owned partition a fetch has seen (its highwater
        is known only then)."""
        for tp in consumer.assignment():
            try:
                high = consumer.highwater(tp)
                if high is None:
                    continue
                # Known once the partition was fetched: returns without waiting.
                lag = max(0, high - await consumer.position(tp))
            except (KafkaError, AssertionError):
                continue  # the partition went in a rebalance meanwhile
            gauge = self._lag_gauges.get(tp)
            if gauge is None:
                gauge = self._lag_gauges[tp] = self._metrics.consumer_lag.labels(
                    self._group, safe_label(tp.topic), str(tp.partition)
                )
            gauge.set(lag)

    def _assignment_changed(self, revoked: Collection[TopicPartition] = ()) -> None:
        self._forget_partitions(revoked)
        consumer = self._consumer
        owned = len(consumer.assignment()) if consumer is not None else 0
        self._metrics.consumer_partitions.labels(self._group).set(owned)

    def _forget_partitions(self, partitions: Collection[TopicPartition]) -> None:
        """A partition no longer owned has no lag here (its new owner reports it)."""
        for tp in partitions:
            if self._lag_gauges.pop(tp, None) is not None:
                with contextlib.suppress(KeyError):
                    self._metrics.consumer_lag.remove(self._group, tp.topic, str(tp.partition))

    def _record_latency(
        self, batch: dict[TopicPartition, list[Any]], waits: dict[TopicPartition, tuple[Any, float]]
    ) -> None:
        """Each handled record's hop: from its append (the record's timestamp) to now, when
        what it caused is acknowledged. A record left waiting (not due) is not handled yet."""
        now_ms = time.time() * 1000
        for tp, records in batch.items():
            stop_at = waits[tp][0].offset if tp in waits else None
            histogram = self._metrics.stream_latency.labels(self._group, safe_label(tp.topic))
            for record in records:
                if stop_at is not None and record.offset >= stop_at:
                    break
                timestamp = getattr(record, "timestamp", None)
                if isinstance(timestamp, int) and timestamp > 0:
                    histogram.observe(max(0.0, (now_ms - timestamp) / 1000))

    # --- operations -------------------------------------------------------------------------

    async def unread(self) -> set[TopicPartition]:
        """Owned partitions with records not yet given to ``handle``, as far as the fetches so
        far saw; one not fetched since it was assigned counts as unread (its end is unknown)."""
        consumer = self._consumer
        if consumer is None:
            return set()
        unread = set()
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None or await consumer.position(tp) < high:
                unread.add(tp)
        return unread

    async def lag(self) -> int:
        """Records on the owned partitions, as far as the last fetch saw, not yet fetched."""
        consumer = self._consumer
        if consumer is None:
            return 0
        total = 0
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                total += max(0, high - await consumer.position(tp))
        return total


class Startable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Worker:
    """Stream workers with the read models they consult: views start first and stop last.

    Several streams (e.g. notify's urgent, routine and retry queues) run side by side in one
    process; when one fails, the others are stopped and the failure is raised.
    """

    def __init__(
        self, streams: StreamWorker | Sequence[StreamWorker], views: Sequence[Startable] = ()
    ) -> None:
        self.streams = (streams,) if isinstance(streams, StreamWorker) else tuple(streams)
        if not self.streams:
            raise ValueError("a worker needs at least one stream")
        self.views = tuple(views)

    @property
    def stream(self) -> StreamWorker:
        return self.streams[0]

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.streams)

    async def start(self) -> None:
        started: list[Startable] = []
        try:
            for part in (*self.views, *self.streams):
                await part.start()
                started.append(part)
        except BaseException:
            for part in reversed(started):
                await part.stop()
            raise

    async def stop(self) -> None:
        for part in (*reversed(self.streams), *reversed(self.views)):
            await part.stop()

    async def run(self) -> None:
        tasks = [asyncio.create_task(s.run(), name=s.name) for s in self.streams]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            self.request_stop()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def wait_assigned(self, timeout: float) -> None:
        await asyncio.wait_for(asyncio.gather(*(s.assigned.wait() for s in self.streams)), timeout)

    def request_stop(self) -> None:
        for stream in self.streams:
            stream.request_stop()

    def ready(self) -> bool:
        """Every stream has joined its group (had partitions assigned, maybe none) and runs."""
        return all(s.assigned.is_set() and not s.stopping for s in self.streams)

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def run_worker(
    worker: Worker,
    *,
    metrics: ServiceMetrics,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> None:
    """Run ``worker`` until SIGTERM/SIGINT, serving ``/healthz``, ``/readyz`` and ``/metrics`` on
    ``metrics_host``:``metrics_port`` (:mod:`shared.probes`; a container binds 0.0.0.0 so the
    kubelet and Prometheus reach it).

    A signal finishes and commits the batch in hand before the process exits; a fatal error
    propagates (the process exits non-zero and its supervisor restarts it).
    """
    tune_gc()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    async with contextlib.AsyncExitStack() as stack:
        if metrics_port is not None:
            await stack.enter_async_context(
                ProbeServer(metrics_port, metrics.registry, ready=worker.ready, host=metrics_host)
            )
        async with worker:
            log.info("worker running", worker=worker.name)
            try:
                await worker.run()
            except Exception:
                log.exception("worker failed; exiting so the supervisor restarts it")
                raise
    log.info("worker stopped", worker=worker.name)
