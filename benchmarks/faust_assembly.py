"""The faust study assembly agent: the reference implementation the production assembler
(``services.ingest.entrypoints.assembler``, aiokafka on ``shared.stream``) replaced on
2026-11-26. It lives here, out of the product, for ``benchmarks/assembler.py`` (the two side by
side) and ``tests/integration/ingest/test_assembler.py`` (same studies announced by both); nothing
in ``make up``, compose or k8s runs it.

The study assembly worker: folds instance-stored into a faust table, announces stable studies.

How it fits together (the rules and the row layout are in ``services.ingest.domain.assembly``):

- ``assemble`` (agent on instance-stored) takes each instance into the table: a record row and
  a seen row of its own plus the study row of summaries, a few hundred bytes whatever the size of
  the study (linear cost; the first layout rewrote the whole study per instance). A study with
  something to announce gets a mark in a second, small table (written when that starts and
  ends, not per instance) and its due time in memory.
- ``announce_due`` (timer) announces due studies: it reads the study row and the record rows,
  publishes every due ``study-received`` and then waits for all their acknowledgements together
  (acks=all). It does **not** write the tables.
- ``acknowledge`` (agent on study-received, our own output) records each announcement: one
  study row write (the announced version and how many instances it listed).

Why the timer does not write the table: faust's rocksdb store writes into the RocksDB of the
*current stream event's* partition (``RocksDB._set`` asserts there is one), so a write from a
timer fails (AssertionError) after faust already sent the changelog record, leaving changelog and
local store apart. ``use_partitioner=True`` only fixes the changelog side. Recording the
announcement by consuming it back keeps every write in a stream, for both stores, and makes the
output topic itself the record of what was announced.

At-least-once, by design (design.md, Decisions): a crash after the broker acknowledged a
``study-received`` but before ``acknowledge`` stored it announces the same version again. Its
event id is uuid5(study, sender, recipient, version), so it is recognisably the same event;
consumers deduplicate by event id or by (study, sender, recipient, version). Only the first
announcement of a version is recorded, so an instance that only a repeated announcement listed
goes into the next version as new. Between publishing and ``acknowledge`` an in-memory
"pending" mark keeps the timer from announcing the same version on every tick. A crash in the
middle of taking in an instance is repaired by its replay (see ``add_instance``); faust flushes
the changelog before it commits the source offset, so nothing committed is half-written.

Co-partitioning (why the changelog partition is the source partition). Every row key starts
with the Study Instance UID (the study row and the mark are exactly the message key, the UTF-8
UID, ``raw`` serialised) and rows are written only while handling a record of that study, with
``use_partitioner=False``: faust then sends the changelog record to the partition of that
record, whatever the row's own key would hash to, and writes the RocksDB of that partition;
recovery puts changelog partition p back into the store of partition p (rocksdb: the database of
p; memory: one dict, entries remembered with p). That is only right if a study's instance-stored
records and its study-received records sit in the same partition number, so:

- instance-stored and study-received both have 12 partitions (shared.topics; checked here), and
  faust assigns same-sized, co-subscribed topics (changelogs included) as one co-partitioned group:
  partition p of all of them goes to the same worker;
- both are keyed by the Study Instance UID and partitioned with Kafka's murmur2 mapping:
  ingest's ``KafkaEventPublisher`` uses ``CachedMurmur2Partitioner`` (aiokafka's
  ``DefaultPartitioner`` mapping, memoised) and this app's faust producer is given the same
  partitioner (faust's default would be aiokafka's ``DefaultPartitioner``: the same mapping);
- each agent checks it: a record whose key or partition differs from murmur2(Study UID) is
  poison (logged with its position and skipped), never written into another partition's state.

Had the timer written with ``use_partitioner=True`` (memory store only), the changelog partition
would come from faust's producer partitioner over the *serialised* table key: with
``key_type=str`` faust serialises keys as JSON (``"1.2.3"`` with quotes), which hashes to
another partition. Keys here are ``bytes`` (raw) for that reason too; a record row's key would
hash elsewhere anyway, which is why nothing here may ever write with the partitioner.

Changelog topics are created before the worker starts (:func:`declare_changelogs`). Left to
faust, they are created while its consumer subscribes: a topic the broker reports a moment too
late stays missing from the consumer's metadata (for metadata.max.age, 5 minutes), and every
write to its table fails with PartitionsMismatch. The benchmark met exactly that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import faust
from faust.types import (
    TP,
    EventT,
    StreamT,
    TableT,
    TopicT,
)

from services.ingest.config import IngestSettings
from services.ingest.domain.assembly import (
    Added,
    AssemblyKey,
    StudyAssemblies,
    announce,
    due,
    next_due_at,
    read_records,
    read_state,
    record_announced,
    study_received_id,
    study_row_key,
    take_in,
)
from services.ingest.metrics import IngestMetrics
from shared.codec import Codec
from shared.errors import PoisonEvent
from shared.events import Event, InstanceStored, StudyReceived
from shared.events.base import utcnow
from shared.faust_app import App, bytes_table, decode_event, make_app
from shared.kafka import CachedMurmur2Partitioner
from shared.logging import correlation_context, get_logger, kafka_position
from shared.topics import topic as declared_topic

log = get_logger(__name__)

SERVICE = "ingest-assembly"
PRODUCER = "ingest-assembly"
STATE_TABLE = "study-assembly"
OPEN_TABLE = "study-assembly-open"
OPEN = b"1"
# An announcement not seen back on study-received within this long is announced again (same
# version, same event id): it was lost with a crash or a rebalance, or the echo is slow.
PENDING_TIMEOUT_SECONDS = 30.0


@dataclass
class StudyAssembler:
    """The glue between faust and the pure rules: decode, fold, index, announce."""

    table: TableT
    open_table: TableT
    source: TopicT
    sink: TopicT
    partitions: int
    stable_age: timedelta
    completion_quiet: timedelta
    metrics: IngestMetrics
    app: faust.App
    codec: Codec = field(default_factory=Codec)
    clock: Callable[[], datetime] = utcnow
    publish_timeout: float = 35.0
    # Study key -> when it becomes due, for studies of active partitions with something to announce.
    _due: dict[bytes, datetime] = field(default_factory=dict)
    # Published, not yet seen back on study-received: key -> (version, monotonic time sent).
    _pending: dict[AssemblyKey, tuple[int, float]] = field(default_factory=dict)
    _ready: bool = False
    _partitioner: CachedMurmur2Partitioner = field(default_factory=CachedMurmur2Partitioner)
    # Partition -> offset of the last instance-stored record this worker folded in.
    _processed: dict[int, int] = field(default_factory=dict)

    # --- the agents (synchronous: no await between reading and writing a table value) -----------

    def on_instance(self, faust_event: EventT) -> None:
        message = faust_event.message
        self._processed[message.partition] = message.offset
        event = self._decode(faust_event, InstanceStored)
        if event is None:
            return
        assert isinstance(event, InstanceStored)
        with correlation_context(event.correlation_id):
            addition = take_in(self.table, event, self.clock())
            self._sync_due(study_row_key(event.study_instance_uid), addition.state)
            outcome = addition.outcome
            self.metrics.consumed(self.source.get_topic_name(), event.schema_name, outcome.value)
            if outcome is Added.CONFLICT:
                log.warning(
                    "instance stored again with other bytes; the first copy is kept",
                    study_instance_uid=event.study_instance_uid,
                    sop_instance_uid=event.instance.sop_instance_uid,
                    position=_position(faust_event),
                )

    def on_announced(self, faust_event: EventT) -> None:
        event = self._decode(faust_event, StudyReceived)
        if event is None:
            return
        assert isinstance(event, StudyReceived)
        study = event.study
        key = AssemblyKey(study.study_instance_uid, study.sender_ura, study.recipient_ura)
        topic = self.sink.get_topic_name()
        if event.event_id != study_received_id(key, study.version):
            # Not an announcement of ours (a replay tool, a test): it says nothing about our state.
            self.metrics.consumed(topic, event.schema_name, "foreign")
            return
        state = read_state(self.table, study.study_instance_uid)
        if state is None:
            self.metrics.consumed(topic, event.schema_name, "unknown-study")
            return
        new = record_announced(state, study, event.occurred_at)
        table_key = study_row_key(study.study_instance_uid)
        if new is not state:
            self.table[table_key] = new.to_bytes()
        pending = self._pending.get(key)
        if pending is not None and pending[0] <= study.version:
            del self._pending[key]
        self._sync_due(table_key, new)
        self.metrics.consumed(topic, event.schema_name, "recorded" if new is not state else "seen")

    def _decode(self, faust_event: EventT, expected: type[Event]) -> Event | None:
        message = faust_event.message
        topic = message.topic
        try:
            event = decode_event(self.codec, faust_event)
            if not isinstance(event, expected):
                raise PoisonEvent(f"{event.schema_name} does not belong on {topic}")
            key = event.partition_key().encode()
            if message.key != key:
                raise PoisonEvent("record key is not the event's Study Instance UID")
            if message.partition != self.partition_of(key):
                raise PoisonEvent("record is not in murmur2(Study Instance UID)'s partition")
        except PoisonEvent as exc:
            # Never crash the agent: a record that can never succeed is logged and skipped.
            log.error("poison record skipped", position=_position(faust_event), reason=str(exc))
            self.metrics.failed(topic, "poison")
            self.metrics.consumed(topic, "unknown", "poison")
            return None
        return event

    def _sync_due(self, key: bytes, state: StudyAssemblies) -> None:
        # Also on a duplicate: a replay after a crash between the two tables' writes repairs it.
        # The open mark changes only when a study starts or stops having something to announce;
        # the due time itself moves with every instance and lives in memory only.
        at = next_due_at(state, self.stable_age, self.completion_quiet)
        if at is None:
            self._due.pop(key, None)
            if key in self.open_table:
                del self.open_table[key]
            return
        self._due[key] = at
        if key not in self.open_table:
            self.open_table[key] = OPEN

    # --- the timer -----------------------------------------------------------------------------

    async def announce_due(self) -> None:
        app = self.app
        if not self._ready or app.rebalancing or app.in_recovery:
            return
        now = self.clock()
        actives = self.active_partitions()
        announcements: list[StudyReceived] = []
        behind = self.lagging_partitions(actives)
        for key, at in sorted(self._due.items(), key=lambda item: item[1]):
            if at > now:
                break
            partition = self.partition_of(key)
            if partition not in actives:
                self._due.pop(key, None)  # another worker's now
                continue
            if partition in behind:
                # Fetched but not yet folded in: a backlog or a stall of this worker must not
                # look like a quiet study. Announce once the partition is caught up.
                continue
            try:
                announcements.extend(self._announcements(key, now))
            except Exception as exc:  # the timer must live on: next tick tries again
                log.exception("announcing a study failed", study=key.decode(), error=str(exc))
                self.metrics.failed(self.sink.get_topic_name(), "transient")
        if announcements:
            await self._publish_all(announcements, now)

    def _announcements(self, key: bytes, now: datetime) -> list[StudyReceived]:
        """The study's due announcements, read from the table (synchronously: one snapshot)."""
        state = read_state(self.table, key.decode())
        if state is None:
            self._due.pop(key, None)
            return []
        ready = due(state, now, self.stable_age, self.completion_quiet)
        if not ready:
            # Announced meanwhile (and recorded), or the index was stale.
            at = next_due_at(state, self.stable_age, self.completion_quiet)
            if at is None:
                self._due.pop(key, None)
            else:
                self._due[key] = at
            return []
        events = []
        for assembly_key in ready:
            assembly = state.assembly(assembly_key)
            if assembly is None or self._is_pending(assembly_key):
                continue
            records = read_records(self.table, assembly)
            event, _ = announce(state, assembly_key, records, now, PRODUCER)
            events.append(event)
        return events

    async def _publish_all(self, events: list[StudyReceived], now: datetime) -> None:
        """Send every announcement, then wait for all their acknowledgements (acks=all) at once."""
        topic = self.sink.get_topic_name()
        sent: list[asyncio.Future[Any]] = []
        for event in events:
            record = self.codec.encode(event)
            # force: sent now, not attached to (and delayed until the commit of) a stream event.
            future = await self.sink.send(
                key=record.key, value=record.value, headers=list(record.headers), force=True
            )
            sent.append(asyncio.ensure_future(future))
        results = await asyncio.wait_for(
            asyncio.gather(*sent, return_exceptions=True), self.publish_timeout
        )
        for event, result in zip(events, results, strict=True):
            study = event.study
            with correlation_context(event.correlation_id):
                if isinstance(result, BaseException):
                    # Not pending: the next tick announces it again, under the same event id.
                    log.error(
                        "announcing a study failed",
                        study_instance_uid=study.study_instance_uid,
                        version=study.version,
                        error=repr(result),
                    )
                    self.metrics.failed(topic, "transient")
                    continue
                key = AssemblyKey(study.study_instance_uid, study.sender_ura, study.recipient_ura)
                self._pending[key] = (study.version, time.monotonic())
                self.metrics.produced(topic, event.schema_name)
                kind = "first" if study.version == 1 else "follow-up"
                self.metrics.studies_assembled.labels(kind).inc()
                waited = (now - study.first_received_at).total_seconds()
                self.metrics.assembly_wait.observe(max(waited, 0.0))
                log.info(
                    "study announced",
                    study_instance_uid=study.study_instance_uid,
                    version=study.version,
                    instances=len(study.instances),
                    new_instances=len(study.new_sop_instance_uids),
                    event_id=str(event.event_id),
                )

    def _is_pending(self, key: AssemblyKey) -> bool:
        pending = self._pending.get(key)
        if pending is None:
            return False
        if time.monotonic() - pending[1] < PENDING_TIMEOUT_SECONDS:
            return True
        del self._pending[key]
        log.warning("announcement not seen back in time; announcing again", slot=key.slot)
        return False

    # --- partitions and recovery ---------------------------------------------------------------

    def partition_of(self, key: bytes) -> int:
        every = list(range(self.partitions))
        return self._partitioner(key, every, every)

    def lagging_partitions(self, actives: set[int]) -> set[int]:
        """Active partitions whose known end (high watermark) is beyond what was folded in.

        What was folded in is the later of this worker's last processed offset and the group's
        committed position (a partition taken over with nothing new to read is not behind).
        """
        topic = self.source.get_topic_name()
        consumer = self.app.consumer
        behind = set()
        for partition in actives:
            tp = TP(topic, partition)
            try:
                highwater = consumer.highwater(tp)
            except (KeyError, AttributeError):
                continue  # nothing fetched for it yet: no known backlog
            committed = consumer._committed_offset.get(tp) or 0
            folded_up_to = max(self._processed.get(partition, -1) + 1, committed)
            if highwater and folded_up_to < highwater:
                behind.add(partition)
        return behind

    def active_partitions(self) -> set[int]:
        topic = self.source.get_topic_name()
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == topic}

    async def on_recover(self) -> None:
        """After every rebalance: rebuild the due index from the open studies now ours.

        Only marked studies are read (one small row each), never the whole table. The memory
        store also keeps standby partitions' rows, hence the filter on active partitions.
        """
        self._check_changelogs()
        actives = self.active_partitions()
        index: dict[bytes, datetime] = {}
        for key in list(self.open_table.keys()):
            if self.partition_of(key) not in actives:
                continue
            state = read_state(self.table, key.decode())
            at = next_due_at(state, self.stable_age, self.completion_quiet) if state else None
            if at is not None:
                index[key] = at
        self._due = index
        self._pending = {
            k: v
            for k, v in self._pending.items()
            if self.partition_of(k.study_instance_uid.encode()) in actives
        }
        self._ready = True
        log.info("assembly state recovered", partitions=sorted(actives), open_studies=len(index))

    def _check_changelogs(self) -> None:
        # Loud, not silent: a changelog the consumer does not know fails every write to its table.
        for table in (self.table, self.open_table):
            name = table.changelog_topic.get_topic_name()
            known = self.app.consumer.topic_partitions(name)
            if known != self.partitions:
                log.error(
                    "changelog topic unknown to the consumer; table writes will fail",
                    topic=name,
                    partitions=known,
                    hint="create it before the worker starts (declare_changelogs)",
                )


def _position(faust_event: EventT) -> str:
    message = faust_event.message
    return kafka_position(message.topic, message.partition, message.offset)


def build_assembly_app(
    settings: IngestSettings,
    *,
    app_id: str = SERVICE,
    source_topic: str = InstanceStored.topic,
    sink_topic: str = StudyReceived.topic,
    metrics: IngestMetrics | None = None,
    clock: Callable[[], datetime] = utcnow,
    state_dir: Path | None = None,
    **faust_overrides: Any,
) -> App:
    """The assembly agent's faust app (``beeldportaal-<app_id>``) on the declared topics; its
    tables in RocksDB under ``state_dir``, or in memory without one."""
    source_spec, sink_spec = declared_topic(source_topic), declared_topic(sink_topic)
    if source_spec.partitions != sink_spec.partitions:
        raise ValueError(
            f"{source_topic} and {sink_topic} must be co-partitioned: "
            f"{source_spec.partitions} != {sink_spec.partitions} partitions"
        )
    partitions = source_spec.partitions
    store = "rocksdb://" if state_dir is not None else "memory://"
    app = make_app(
        app_id,
        settings.kafka,
        store=store,
        data_dir=state_dir,
        # The mapping ingest's publisher uses; faust's default (aiokafka's) is the same mapping.
        producer_partitioner=CachedMurmur2Partitioner(),
        **faust_overrides,
    )
    source, sink = app.topic(source_topic), app.topic(sink_topic)
    table = bytes_table(
        app,
        STATE_TABLE,
        partitions=partitions,
        kafka=settings.kafka,
        help="Assembly rows per study: summaries, one record and one seen mark per instance.",
    )
    open_table = bytes_table(
        app,
        OPEN_TABLE,
        partitions=partitions,
        kafka=settings.kafka,
        help="Studies with instances not announced yet (by Study Instance UID).",
    )
    assembler = StudyAssembler(
        table=table,
        open_table=open_table,
        source=source,
        sink=sink,
        partitions=partitions,
        stable_age=timedelta(seconds=settings.stable_age_seconds),
        completion_quiet=timedelta(seconds=settings.assembly_completion_quiet_seconds),
        metrics=metrics or IngestMetrics(),
        app=app,
        clock=clock,
        publish_timeout=settings.kafka.request_timeout_ms / 1000 + 5,
    )
    open_table.on_recover(assembler.on_recover)

    @app.agent(source, name=f"{app_id}-assemble")
    async def assemble(stream: StreamT[Any]) -> None:
        async for faust_event in stream.events():
            _guarded(assembler.on_instance, faust_event)

    @app.agent(sink, name=f"{app_id}-acknowledge")
    async def acknowledge(stream: StreamT[Any]) -> None:
        async for faust_event in stream.events():
            _guarded(assembler.on_announced, faust_event)

    @app.timer(settings.assembly_check_interval_seconds, name=f"{app_id}-announce-due")
    async def announce_due() -> None:
        await assembler.announce_due()

    return app


def _guarded(handle: Callable[[EventT], None], faust_event: EventT) -> None:
    # Anything unexpected is logged with the record's position and skipped, never crashes the
    # agent (a crashed agent would stop assembling every study of its partitions).
    try:
        handle(faust_event)
    except Exception as exc:
        log.exception(
            "record could not be handled; skipped", position=_position(faust_event), error=str(exc)
        )
