"""The study assembly worker on shared.stream: instance-stored in, stable studies announced.

The same rules and events as the faust agent it replaced (``benchmarks.faust_assembly``), on an
aiokafka consumer group (:class:`~shared.stream.StreamWorker`) with one Kafka transaction per
batch. How it fits together:

- **State in memory, per owned partition** (:class:`PartitionState`): the study rows
  (:class:`StudyAssemblies`), the record rows (the instance records an announcement lists, by
  ``record_row_key``) and the seen marks (duplicate and conflict detection), laid out as the
  domain module lays them out; the pure rules (``add_instance``, ``next_due_at``, ``due``,
  ``announce``) are used unchanged.
- **Durability: a compacted changelog** (``ingest-assembly-state``), co-partitioned with
  instance-stored: a study's rows go to the partition number of its instance-stored records
  (murmur2 of the Study Instance UID, checked per record: one elsewhere is poison). It holds
  the study rows and the record rows; the seen marks are derived from them when a partition is
  rebuilt. Only the last study row of a batch is written (a 500-instance batch of one study
  writes 500 record rows and one study row).
- **Exactly once, for read_committed readers**: a batch's changelog rows, its announcements and
  its offsets go in one transaction (``transactional=True``). A crash anywhere leaves either
  all of it or none of it; a replay starts from the state and offsets of the last commit. The
  limit: aiokafka cannot fence by group generation (KIP-447), only by transactional id (one per
  replica, shared.stream), so a member paused past its session whose partitions went to
  *another* replica could still commit once. Event ids stay deterministic (uuid5 of study,
  sender, recipient, version), so consumers deduplicating by id absorb even that (design.md).
- **Announcing** happens in ``tick`` (after every batch, and every
  ``assembly_check_interval_seconds`` when idle): due studies become ``study-received`` and
  their study rows (now announced) go into the same transaction. No consuming back of our own
  output (the faust worker's ``acknowledge``) and no "pending" marks are needed.
- **Rebalances**: a revoked partition's state is dropped; an assigned one is rebuilt from its
  changelog partition, read from the beginning up to its high watermark with
  ``read_committed`` (so it waits for a transaction a dead member left open to be aborted,
  rather than rebuilding without the transactions committed after it). Records of a partition
  are handled only once its state is rebuilt (shared.stream runs the hook under its batch
  lock). A failed transaction rebuilds the same way before its batch is replayed.
- **A backlog is not quiet**: a due study is not announced while its partition has records
  not yet handled, or was not fetched since it was assigned (:meth:`StreamWorker.unread`):
  after a restart, the instances that arrived meanwhile are taken in first. Except a study
  whose completing request ended (``CompletingRequestStored``, on the same topic and key after
  that request's instances): it is due at once and waits for nothing.

The changelog must be declared like every topic (shared.topics), compacted, with exactly as
many partitions as instance-stored; :func:`build_assembler` and :meth:`StudyAssembler.start`
refuse anything else. Its rows are never deleted yet: like the faust tables, the state (in
memory here, about 1.5 KB an instance) grows with every instance assembled until a retention
rule for announced studies exists.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from services.ingest.config import IngestSettings
from services.ingest.domain.assembly import (
    KEY_SEPARATOR,
    Added,
    Addition,
    InstanceRecord,
    Seen,
    StudyAssemblies,
    add_instance,
    announce,
    complete_request,
    confirmed_completion,
    due,
    key_of,
    next_due_at,
    read_records,
    record_row_key,
    seen_row_key,
)
from services.ingest.metrics import IngestMetrics
from shared import runtime
from shared.codec import Codec
from shared.errors import FatalError, PoisonEvent, TransientError
from shared.events import CompletingRequestStored, InstanceStored, StudyReceived
from shared.events.base import utcnow
from shared.kafka import CachedMurmur2Partitioner
from shared.logging import configure_logging, correlation_context, get_logger
from shared.stream import Outgoing, RawRecord, StreamWorker, Worker, decode_as, run_worker
from shared.topics import topic as declared_topic

log = get_logger(__name__)

SERVICE = "ingest-assembler"
# The events are the faust worker's, field for field, producer included.
PRODUCER = "ingest-assembly"
STATE_TOPIC = "ingest-assembly-state"
# A study whose announcement failed for a reason of its own (not Kafka's) is tried again after.
RETRY_SECONDS = 30.0
# How often a rebuild that waits (for a transaction a dead member left open) says so.
RESTORE_LOG_SECONDS = 10.0
# At most this many studies are announced per tick; the rest stay due for the next ticks (after
# the next batch, or assembly_check_interval_seconds later). After downtime thousands of studies
# can be due at once: announcing them all in one tick blocked the event loop past the group's
# session timeout, so the member was evicted, its transaction aborted and the same announcements
# began again on rejoining, a loop (seen in make bench-deliver on a platform with old studies).
MAX_ANNOUNCED_PER_TICK = 200
# How long start waits for the topics to appear in the cluster metadata.
METADATA_WAIT_SECONDS = 10.0
_SEPARATOR = KEY_SEPARATOR.encode()


class PartitionState:
    """The rows of one instance-stored partition's studies, and the rows not yet flushed."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.studies: dict[str, StudyAssemblies] = {}
        # record_row_key -> InstanceRecord JSON (the Rows port read_records reads).
        self.records: dict[bytes, bytes] = {}
        # seen_row_key -> Seen: derived from the records, never written to the changelog.
        self.seen: dict[bytes, Seen] = {}
        self._dirty_records: list[tuple[bytes, bytes]] = []
        self._dirty_studies: dict[str, None] = {}

    def take_in(self, event: InstanceStored, now: datetime) -> Addition:
        key = key_of(event)
        seen_key = seen_row_key(key, event.instance.sop_instance_uid)
        state = self.studies.get(event.study_instance_uid)
        addition = add_instance(state, event, now, self.seen.get(seen_key))
        if addition.record is not None and addition.seen is not None:
            row_key = record_row_key(key, addition.record.number)
            value = addition.record.model_dump_json().encode()
            self.records[row_key] = value
            self.seen[seen_key] = addition.seen
            self._dirty_records.append((row_key, value))
        if addition.state is not state:
            self.put_study(addition.state)
        return addition

    def complete_request(
        self, event: CompletingRequestStored, now: datetime
    ) -> StudyAssemblies | None:
        before = self.studies.get(event.study_instance_uid)
        after = complete_request(before, event, now)
        if after is not None and after is not before:
            self.put_study(after)
        return after

    def put_study(self, state: StudyAssemblies) -> None:
        self.studies[state.study_instance_uid] = state
        self._dirty_studies[state.study_instance_uid] = None

    def flush(self, topic: str) -> list[RawRecord]:
        """The changelog rows changed since the last flush (record rows first)."""
        rows = [RawRecord(topic, key, value, self.partition) for key, value in self._dirty_records]
        rows += [
            RawRecord(topic, uid.encode(), self.studies[uid].to_bytes(), self.partition)
            for uid in self._dirty_studies
        ]
        self._dirty_records.clear()
        self._dirty_studies.clear()
        return rows

    # --- rebuilding from the changelog ---------------------------------------------------------

    def load(self, key: bytes, value: bytes | None) -> None:
        """One changelog row, in log order: the later row of a key replaces the earlier."""
        if _SEPARATOR in key:
            if value is None:
                self.records.pop(key, None)
            else:
                self.records[key] = value
            return
        uid = key.decode()
        if value is None:
            self.studies.pop(uid, None)
        else:
            self.studies[uid] = StudyAssemblies.from_bytes(value)

    def index_seen(self) -> int:
        """Derive the seen marks from the study rows and their record rows; returns how many
        record rows are missing (a damaged changelog: those instances cannot be announced)."""
        self.seen.clear()
        missing = 0
        for state in self.studies.values():
            for assembly in state.assemblies.values():
                key = assembly.key
                for number in range(1, assembly.instances + 1):
                    raw = self.records.get(record_row_key(key, number))
                    if raw is None:
                        missing += 1
                        continue
                    record = InstanceRecord.model_validate_json(raw)
                    sop = record.instance.sop_instance_uid
                    self.seen[seen_row_key(key, sop)] = Seen(
                        number=number, sha256=record.instance.sha256
                    )
        return missing


@dataclass
class StudyAssembler:
    """The glue between the stream worker and the pure rules: take in, flush, announce."""

    source_topic: str
    sink_topic: str
    state_topic: str
    partitions: int
    stable_age: timedelta
    completion_quiet: timedelta
    metrics: IngestMetrics
    kafka_bootstrap: list[str]
    codec: Codec = field(default_factory=Codec)
    clock: Callable[[], datetime] = utcnow
    stream: StreamWorker | None = None
    max_announced_per_tick: int = MAX_ANNOUNCED_PER_TICK
    _owned: dict[int, PartitionState] = field(default_factory=dict)
    # (partition, study) -> when it becomes due; _heap holds (due, partition, study) entries,
    # an entry counting only while it matches _due (moved due times leave stale entries).
    _due: dict[tuple[int, str], datetime] = field(default_factory=dict)
    _heap: list[tuple[datetime, int, str]] = field(default_factory=list)
    _partitioner: CachedMurmur2Partitioner = field(default_factory=CachedMurmur2Partitioner)
    _restorer: AIOKafkaConsumer | None = None

    # --- lifecycle (a view of the Worker: started before the stream, stopped after it) ----------

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            # An empty changelog partition answers after this long: it bounds an empty rebuild.
            fetch_max_wait_ms=100,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
        )
        try:
            await consumer.start()
            # As shared.topic_view does: all of the metadata, asked again for a few seconds
            # while a topic created a moment ago is not in it yet.
            deadline = time.monotonic() + METADATA_WAIT_SECONDS
            while True:
                cluster = await consumer._client.fetch_all_metadata()
                counts = {t: len(cluster.partitions_for_topic(t) or ()) for t in self._topics}
                if all(counts.values()) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
        except KafkaError as exc:
            await consumer.stop()
            raise TransientError(f"Kafka unavailable: {exc}") from exc
        if set(counts.values()) != {self.partitions}:
            await consumer.stop()
            raise FatalError(
                f"{self.state_topic} must exist with the partitions of {self.source_topic}: "
                f"found {counts}, expected {self.partitions} each"
            )
        self._restorer = consumer

    async def stop(self) -> None:
        consumer, self._restorer = self._restorer, None
        if consumer is not None:
            await consumer.stop()

    @property
    def owned(self) -> set[int]:
        """The instance-stored partitions whose state this member holds."""
        return set(self._owned)

    @property
    def _topics(self) -> tuple[str, str]:
        return (self.source_topic, self.state_topic)

    # --- the stream worker's hooks --------------------------------------------------------------

    async def handle(self, record: Any) -> Iterable[Outgoing]:
        """Take one instance-stored into its partition's state; what it changes is flushed by
        the tick at the end of the batch, in the batch's transaction."""
        event = decode_as(self.codec, record, InstanceStored, CompletingRequestStored)
        key = event.partition_key().encode()
        if record.key != key:
            raise PoisonEvent("record key is not the event's Study Instance UID")
        if record.partition != self.partition_of(key):
            raise PoisonEvent("record is not in murmur2(Study Instance UID)'s partition")
        state = self._owned.get(record.partition)
        if state is None:  # shared.stream hands over only records of rebuilt partitions
            raise FatalError(f"partition {record.partition} has no state on this member")
        if isinstance(event, CompletingRequestStored):
            with correlation_context(event.correlation_id):
                study = state.complete_request(event, self.clock())
                if study is not None:
                    self._schedule(state.partition, event.study_instance_uid, study)
                self.metrics.consumed(record.topic, event.schema_name, "ok")
            return ()
        with correlation_context(event.correlation_id):
            addition = state.take_in(event, self.clock())
            self._schedule(state.partition, event.study_instance_uid, addition.state)
            outcome = addition.outcome
            self.metrics.consumed(record.topic, event.schema_name, outcome.value)
            if outcome is Added.CONFLICT:
                log.warning(
                    "instance stored again with other bytes; the first copy is kept",
                    study_instance_uid=event.study_instance_uid,
                    sop_instance_uid=event.instance.sop_instance_uid,
                    position=f"{record.topic}[{record.partition}]@{record.offset}",
                )
        return ()

    async def tick(self) -> list[Outgoing]:
        """Announce what is due, then flush every changed row: one transaction with the batch."""
        outgoing: list[Outgoing] = []
        now = self.clock()
        if self._heap and self._heap[0][0] <= now:
            outgoing += await self._announce_due(now)
        for state in self._owned.values():
            outgoing += state.flush(self.state_topic)
        return outgoing

    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        numbers = sorted(tp.partition for tp in partitions if tp.topic == self.source_topic)
        new = [p for p in numbers if p not in self._owned]
        if not new:
            return
        started = time.monotonic()
        restored = await self._restore(new)
        self._owned.update(restored)
        for number, state in restored.items():
            for uid, study in state.studies.items():
                self._schedule(number, uid, study)
        self._heap = [(at, p, uid) for (p, uid), at in self._due.items()]
        heapq.heapify(self._heap)
        log.info(
            "assembly state rebuilt",
            partitions=new,
            studies=sum(len(s.studies) for s in restored.values()),
            instances=sum(len(s.records) for s in restored.values()),
            open_studies=sum(1 for p, _ in self._due if p in restored),
            seconds=round(time.monotonic() - started, 3),
        )

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        numbers = {tp.partition for tp in partitions if tp.topic == self.source_topic}
        for number in numbers:
            self._owned.pop(number, None)
        self._due = {k: at for k, at in self._due.items() if k[0] not in numbers}
        self._heap = [(at, p, uid) for (p, uid), at in self._due.items()]
        heapq.heapify(self._heap)

    # --- announcing -----------------------------------------------------------------------------

    async def _announce_due(self, now: datetime) -> list[Outgoing]:
        assert self.stream is not None
        unread = {tp.partition for tp in await self.stream.unread()}
        events: list[Outgoing] = []
        held = []
        announced = 0
        while self._heap and self._heap[0][0] <= now and announced < self.max_announced_per_tick:
            entry = heapq.heappop(self._heap)
            at, number, uid = entry
            if self._due.get((number, uid)) != at:
                continue  # moved since this entry was pushed
            state = self._owned.get(number)
            if state is None:
                self._due.pop((number, uid), None)
                continue
            if number in unread and not _confirmed_complete(state.studies[uid]):
                # Fetched but not yet taken in (or not fetched yet): a backlog or a restart must
                # not look like a quiet study. Announced once the partition is caught up. A
                # study whose completing request ended needs no quiet: its instances came first.
                held.append(entry)
                continue
            events += self._announce(state, uid, now)
            announced += 1
        for entry in held:
            heapq.heappush(self._heap, entry)
        return events

    def _announce(self, state: PartitionState, uid: str, now: datetime) -> list[StudyReceived]:
        study = state.studies[uid]
        events = []
        try:
            for key in due(study, now, self.stable_age, self.completion_quiet):
                assembly = study.assembly(key)
                assert assembly is not None
                records = read_records(state.records, assembly)
                event, study = announce(study, key, records, now, PRODUCER)
                events.append(event)
        except Exception as exc:  # this study's rows, not Kafka: the others go on
            log.exception("announcing a study failed", study_instance_uid=uid, error=str(exc))
            self.metrics.failed(self.sink_topic, "transient")
            at = now + timedelta(seconds=RETRY_SECONDS)
            self._due[(state.partition, uid)] = at
            heapq.heappush(self._heap, (at, state.partition, uid))
            return []
        state.put_study(study)
        self._schedule(state.partition, uid, study)
        for event in events:
            self._announced(event, now)
        return events

    def _announced(self, event: StudyReceived, now: datetime) -> None:
        study = event.study
        kind = "first" if study.version == 1 else "follow-up"
        self.metrics.studies_assembled.labels(kind).inc()
        waited = (now - study.first_received_at).total_seconds()
        self.metrics.assembly_wait.observe(max(waited, 0.0))
        with correlation_context(event.correlation_id):
            log.info(
                "study announced",
                study_instance_uid=study.study_instance_uid,
                version=study.version,
                instances=len(study.instances),
                new_instances=len(study.new_sop_instance_uids),
                event_id=str(event.event_id),
            )

    def _schedule(self, number: int, uid: str, study: StudyAssemblies) -> None:
        at = next_due_at(study, self.stable_age, self.completion_quiet)
        key = (number, uid)
        if at is None:
            self._due.pop(key, None)
        elif self._due.get(key) != at:
            self._due[key] = at
            heapq.heappush(self._heap, (at, number, uid))

    # --- partitions -----------------------------------------------------------------------------

    def partition_of(self, key: bytes) -> int:
        every = list(range(self.partitions))
        return self._partitioner(key, every, every)

    async def _restore(self, numbers: list[int]) -> dict[int, PartitionState]:
        """Read the changelog partitions from the beginning to their high watermarks."""
        consumer = self._restorer
        if consumer is None:
            raise RuntimeError("the assembler is not started")
        tps = [TopicPartition(self.state_topic, n) for n in numbers]
        states = {n: PartitionState(n) for n in numbers}
        try:
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            pending = set(tps)
            next_log = time.monotonic() + RESTORE_LOG_SECONDS
            while pending:
                batches = await consumer.getmany(*pending, timeout_ms=200, max_records=10_000)
                for tp, records in batches.items():
                    state = states[tp.partition]
                    for r in records:
                        state.load(r.key, r.value)
                for tp in list(pending):
                    high = consumer.highwater(tp)
                    # read_committed: a transaction left open holds the position below the
                    # high watermark until it is aborted (its member restarted, or timed out).
                    if high is not None and await consumer.position(tp) >= high:
                        pending.discard(tp)
                if pending and time.monotonic() >= next_log:
                    next_log = time.monotonic() + RESTORE_LOG_SECONDS
                    log.warning(
                        "rebuilding assembly state waits for the changelog's end",
                        partitions=sorted(tp.partition for tp in pending),
                    )
        except KafkaError as exc:
            raise TransientError(f"reading {self.state_topic} failed: {exc}") from exc
        finally:
            consumer.unsubscribe()
        for number, state in states.items():
            missing = await asyncio.to_thread(state.index_seen)
            if missing:
                log.error(
                    "assembly changelog lacks record rows; those studies cannot be announced",
                    partition=number,
                    missing=missing,
                )
        return states


def _confirmed_complete(study: StudyAssemblies) -> bool:
    """Every assembly of the study with something to announce has seen its completing request
    end after its newest instance."""
    assemblies = [a for a in study.assemblies.values() if a.unannounced > 0]
    return bool(assemblies) and all(confirmed_completion(a) is not None for a in assemblies)


def build_assembler(
    settings: IngestSettings,
    *,
    group: str = SERVICE,
    source_topic: str = InstanceStored.topic,
    sink_topic: str = StudyReceived.topic,
    state_topic: str = STATE_TOPIC,
    metrics: IngestMetrics | None = None,
    clock: Callable[[], datetime] = utcnow,
    max_records: int = 500,
    transactional_id: str | None = None,
    max_announced_per_tick: int = MAX_ANNOUNCED_PER_TICK,
) -> Worker:
    """The assembly worker (consumer group ``beeldportaal-<group>``) on the declared topics."""
    source_spec, state_spec = declared_topic(source_topic), declared_topic(state_topic)
    if not state_spec.compacted:
        raise ValueError(f"{state_topic} must be compacted: it is the assembly state")
    if source_spec.partitions != state_spec.partitions:
        raise ValueError(
            f"{state_topic} must be co-partitioned with {source_topic}: "
            f"{state_spec.partitions} != {source_spec.partitions} partitions"
        )
    metrics = metrics or IngestMetrics()
    assembler = StudyAssembler(
        source_topic=source_topic,
        sink_topic=sink_topic,
        state_topic=state_topic,
        partitions=source_spec.partitions,
        stable_age=timedelta(seconds=settings.stable_age_seconds),
        completion_quiet=timedelta(seconds=settings.assembly_completion_quiet_seconds),
        metrics=metrics,
        kafka_bootstrap=settings.kafka.bootstrap_list,
        clock=clock,
        max_announced_per_tick=max_announced_per_tick,
    )
    stream = StreamWorker(
        settings.kafka,
        name=group,
        group=group,
        topics=[source_topic],
        handle=assembler.handle,
        metrics=metrics,
        rename={StudyReceived.topic: sink_topic},
        max_records=max_records,
        transactional=True,
        transactional_id=transactional_id,
        tick=assembler.tick,
        tick_interval_ms=max(1, round(settings.assembly_check_interval_seconds * 1000)),
        on_assigned=assembler.on_assigned,
        on_revoked=assembler.on_revoked,
    )
    assembler.stream = stream
    return Worker(stream, views=(assembler,))


def main(settings: IngestSettings) -> None:
    """Run the assembly worker until SIGTERM (``beeldportaal ingest assemble``)."""
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    metrics = IngestMetrics()
    worker = build_assembler(settings, metrics=metrics)
    runtime.run(
        run_worker(
            worker,
            metrics=metrics,
            metrics_port=settings.assembly_metrics_port,
            metrics_host=settings.assembly_metrics_host,
        )
    )
