"""The study assembly worker: folds instance-stored into a faust table, announces stable studies.

How it fits together (the rules themselves are in ``services.ingest.domain.assembly``):

- ``assemble`` (agent on instance-stored) adds each instance to the table value of its Study
  Instance UID and records when that study becomes due in a second, small table.
- ``announce_due`` (timer) announces due studies: it publishes ``study-received`` and waits for
  the broker's acknowledgement (acks=all). It does **not** write the table.
- ``acknowledge`` (agent on study-received, our own output) records each announcement in the
  table: announced version, and which instances that version listed.

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
"pending" mark keeps the timer from announcing the same version on every tick.

Co-partitioning (why the changelog partition is the source partition). Tables are keyed by the
message key of instance-stored (the Study Instance UID as UTF-8 bytes, ``raw`` serialised) and
written only while handling an event, with ``use_partitioner=False``: faust then sends the
changelog record to the partition of that event, and reads the RocksDB of that partition.
That is only right if a study's instance-stored records and its study-received records sit in
the same partition number, so:

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
another partition. Keys here are ``bytes`` (raw) for that reason too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import faust
from faust.types import EventT, StreamT, TableT, TopicT

from services.ingest.config import IngestSettings
from services.ingest.domain.assembly import (
    COMPLETION_QUIET,
    Added,
    AssemblyKey,
    StudyAssemblies,
    add_instance,
    announce,
    due,
    next_due_at,
    record_announced,
    study_received_id,
)
from services.ingest.metrics import IngestMetrics
from shared.codec import Codec
from shared.errors import PoisonEvent
from shared.events import Event, InstanceStored, StudyReceived
from shared.events.base import utcnow
from shared.faust_app import App, decode_event, make_app
from shared.kafka import CachedMurmur2Partitioner
from shared.logging import configure_logging, correlation_context, get_logger, kafka_position
from shared.topics import MAX_MESSAGE_BYTES
from shared.topics import topic as declared_topic

log = get_logger(__name__)

SERVICE = "ingest-assembly"
PRODUCER = "ingest-assembly"
STATE_TABLE = "study-assembly"
DUE_TABLE = "study-assembly-due"
# An announcement not seen back on study-received within this long is announced again (same
# version, same event id): it was lost with a crash or a rebalance, or the echo is slow.
PENDING_TIMEOUT_SECONDS = 30.0


@dataclass
class StudyAssembler:
    """The glue between faust and the pure rules: decode, fold, index, announce."""

    table: TableT
    due_table: TableT
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

    # --- the agents (synchronous: no await between reading and writing a table value) -----------

    def on_instance(self, faust_event: EventT) -> None:
        event = self._decode(faust_event, InstanceStored)
        if event is None:
            return
        assert isinstance(event, InstanceStored)
        key = event.study_instance_uid.encode()
        with correlation_context(event.correlation_id):
            raw = self.table.get(key)
            state = StudyAssemblies.from_bytes(raw) if raw is not None else None
            new, outcome = add_instance(state, event, self.clock())
            if new is not state:
                self.table[key] = new.to_bytes()
            self._sync_due(key, new)
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
        table_key = study.study_instance_uid.encode()
        raw = self.table.get(table_key)
        if raw is None:
            self.metrics.consumed(topic, event.schema_name, "unknown-study")
            return
        state = StudyAssemblies.from_bytes(raw)
        new = record_announced(state, study, event.occurred_at)
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
        at = next_due_at(state, self.stable_age, self.completion_quiet)
        if at is None:
            self._due.pop(key, None)
            if key in self.due_table:
                del self.due_table[key]
            return
        self._due[key] = at
        encoded = at.isoformat().encode()
        if self.due_table.get(key) != encoded:
            self.due_table[key] = encoded

    # --- the timer -----------------------------------------------------------------------------

    async def announce_due(self) -> None:
        app = self.app
        if not self._ready or app.rebalancing or app.in_recovery:
            return
        now = self.clock()
        actives = self.active_partitions()
        for key, at in sorted(self._due.items(), key=lambda item: item[1]):
            if at > now:
                break
            if self.partition_of(key) not in actives:
                self._due.pop(key, None)  # another worker's now
                continue
            try:
                await self._announce_study(key, now)
            except Exception as exc:  # the timer must live on: next tick tries again
                log.exception("announcing a study failed", study=key.decode(), error=str(exc))
                self.metrics.failed(self.sink.get_topic_name(), "transient")

    async def _announce_study(self, key: bytes, now: datetime) -> None:
        raw = self.table.get(key)
        if raw is None:
            self._due.pop(key, None)
            return
        state = StudyAssemblies.from_bytes(raw)
        ready = due(state, now, self.stable_age, self.completion_quiet)
        if not ready:
            # Announced meanwhile (and recorded), or the index was stale.
            at = next_due_at(state, self.stable_age, self.completion_quiet)
            if at is None:
                self._due.pop(key, None)
            else:
                self._due[key] = at
            return
        for assembly_key in ready:
            if self._is_pending(assembly_key):
                continue
            event, _ = announce(state, assembly_key, now, PRODUCER)
            with correlation_context(event.correlation_id):
                await self._publish(event)
                self._pending[assembly_key] = (event.study.version, time.monotonic())
                study = event.study
                self.metrics.produced(self.sink.get_topic_name(), event.schema_name)
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

    async def _publish(self, event: StudyReceived) -> None:
        record = self.codec.encode(event)
        # force: sent now, not attached to (and delayed until the commit of) a stream event.
        sent = await self.sink.send(
            key=record.key, value=record.value, headers=list(record.headers), force=True
        )
        # Wait for the broker's acknowledgement (acks=all) before counting it as announced.
        await asyncio.wait_for(asyncio.ensure_future(sent), self.publish_timeout)

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

    def active_partitions(self) -> set[int]:
        topic = self.source.get_topic_name()
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == topic}

    async def on_recover(self) -> None:
        """After every rebalance: rebuild the due index from the partitions now ours."""
        actives = self.active_partitions()
        index: dict[bytes, datetime] = {}
        for key, raw in self.due_table.items():
            if self.partition_of(key) in actives:
                index[key] = datetime.fromisoformat(raw.decode())
        self._due = index
        self._pending = {
            k: v
            for k, v in self._pending.items()
            if self.partition_of(k.study_instance_uid.encode()) in actives
        }
        self._ready = True
        log.info("assembly state recovered", partitions=sorted(actives), open_studies=len(index))


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
    completion_quiet: timedelta = COMPLETION_QUIET,
    clock: Callable[[], datetime] = utcnow,
    **faust_overrides: Any,
) -> App:
    """The assembly worker's faust app (``beeldportaal-<app_id>``) on the declared topics."""
    source_spec, sink_spec = declared_topic(source_topic), declared_topic(sink_topic)
    if source_spec.partitions != sink_spec.partitions:
        raise ValueError(
            f"{source_topic} and {sink_topic} must be co-partitioned: "
            f"{source_spec.partitions} != {sink_spec.partitions} partitions"
        )
    partitions = source_spec.partitions
    store = "rocksdb://" if settings.state_dir is not None else "memory://"
    app = make_app(
        app_id,
        settings.kafka,
        store=store,
        data_dir=settings.state_dir,
        # The mapping ingest's publisher uses; faust's default (aiokafka's) is the same mapping.
        producer_partitioner=CachedMurmur2Partitioner(),
        **faust_overrides,
    )
    source, sink = app.topic(source_topic), app.topic(sink_topic)
    changelog_config = {
        # A study's state holds its whole manifest: as large as an event may be.
        "max.message.bytes": str(MAX_MESSAGE_BYTES),
        "min.insync.replicas": str(settings.kafka.min_insync_replicas),
    }
    table = app.Table(
        STATE_TABLE,
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
        extra_topic_configs=changelog_config,
        help="Assembly state per Study Instance UID (JSON of StudyAssemblies).",
    )
    due_table = app.Table(
        DUE_TABLE,
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
        extra_topic_configs=changelog_config,
        help="When each study with unannounced instances becomes due (ISO time).",
    )
    assembler = StudyAssembler(
        table=table,
        due_table=due_table,
        source=source,
        sink=sink,
        partitions=partitions,
        stable_age=timedelta(seconds=settings.stable_age_seconds),
        completion_quiet=completion_quiet,
        metrics=metrics or IngestMetrics(),
        app=app,
        clock=clock,
        publish_timeout=settings.kafka.request_timeout_ms / 1000 + 5,
    )
    due_table.on_recover(assembler.on_recover)

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


def main(settings: IngestSettings) -> None:
    """Run the assembly worker until stopped (``beeldportaal ingest assemble``)."""
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    app = build_assembly_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level, override_logging=False)
    worker.execute_from_commandline()
