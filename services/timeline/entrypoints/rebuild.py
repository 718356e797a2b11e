"""Rebuild the timeline read model from the topics (``beeldportaal timeline rebuild``).

The topics the projection reads keep their history forever (``shared.topics``), and the store's
rows do not depend on the order events arrive in nor on how they are batched, so replaying
them from the start yields exactly the tables the running projection built.

How an operator runs it (with the projection stopped; the API keeps serving):

1. stop the projection worker (``beeldportaal timeline project``): the rebuild refuses to run
   while its consumer group has members, so the two never write at once;
2. ``beeldportaal timeline rebuild``; progress goes to stderr. It

   a. notes the end offsets of the four topics (what "caught up" means),
   b. reads every partition from its start to that offset, decodes the events as the projection
      does (``projection.decode_projected``) and loads their rows, a fetched chunk at a time,
      into the tables of the schema ``timeline_rebuild`` (``services/timeline/adapters/
      reload.py``); the next chunk is decoded while PostgreSQL takes in the last.
      ``BEELDPORTAAL_TIMELINE_REBUILD_PROCESSES`` processes (default one per CPU) do this, each
      for a share of the partition numbers; they are forked from the rebuild, so they start in
      milliseconds,
   c. builds the new projection tables there from what was loaded (never the append-only
      ``access_log``),
   d. checks again that the projection's group has no members and that its committed offsets
      are those of the start (a worker that ran and stopped meanwhile applied events past the
      end offsets to the tables the swap replaces: refused, nothing swapped), then swaps the
      new tables in for the live ones in ONE short transaction,
   e. moves the projection's consumer group to the offsets of (a): the projection has caught
      up, and its worker may start again,
   f. vacuums (freezing) and analyses the new tables, so that the planner has their
      statistics and autovacuum nothing left to do on them, and drops the replaced ones
      (seconds for gigabytes of them on this project's machine), which nothing waits for;
3. start the projection worker again: it continues from where the rebuild stopped.

The API serves the live tables throughout and waits only for the swap (milliseconds): it never
sees the timeline half-rebuilt. A rebuild that fails or is stopped before (d) commits changes
nothing; one that dies between (d) and (e) leaves the group where the worker left it, and the
worker then replays what the rebuild already applied, which changes nothing. The rebuild
refuses to run if the brokers cannot describe one of the topics (left out, its events would
be missing) or the group.

Why not the projection worker itself, replaying into emptied tables (as before 2026-11-26): it
applies a batch of a few thousand events per transaction with upserts, so it inserts a study's
rows once for its study-received and again for its timeline decision, and derives each study's
rows once per batch that touched it. On this project's 2-core machine that replayed 2,900-3,100
events/s of 10,000 studies; loading first and deriving once, with two loading processes,
7,200-7,700 (``benchmarks/README.md``).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import for_code
from pydantic import ValidationError

from services.timeline.adapters.reload import Loader, RebuildRefused, Reload
from services.timeline.adapters.store import SnapshotRef, snapshot_ref
from services.timeline.config import TimelineSettings
from services.timeline.entrypoints.projection import DELIVERY, SERVICE, TOPICS, decode_projected
from shared import runtime
from shared.codec import SCHEMA_HEADER, Codec, header, last_header, without
from shared.errors import FatalError, PoisonEvent, TransientError
from shared.events import (
    PURPOSE_HEADER,
    ConsentChecked,
    ConsentRevoked,
    Purpose,
    StudyReceived,
)
from shared.logging import get_logger
from shared.runtime import collector_paused, tune_gc
from shared.stream import position

log = get_logger(__name__)

PROGRESS_SECONDS = 2.0
# Events decoded per chunk, whose rows are loaded while the next chunk is decoded.
CHUNK_EVENTS = 5000
# A loader runs with the cyclic garbage collector paused (``runtime.collector_paused``) and
# collects after every this many chunks: ~700 unreachable objects per 12,500 studies.
COLLECT_EVERY_CHUNKS = 20
# A loader that gets no records for this long, with partitions left to read, fails the rebuild.
STALL_SECONDS = 60.0
# Bytes of snapshot texts a loader remembers having decoded (``_Decoding``; ~5.7 KB for a
# 10-instance study): past them it forgets those of the oldest keys.
REMEMBERED_BYTES = 128 * 2**20
# The events that carry a snapshot, by schema name.
_CARRYING: dict[bytes, type[StudyReceived | ConsentChecked]] = {
    model.schema_name.encode(): model for model in (StudyReceived, ConsentChecked)
}
# prctl(2): the signal a process gets when the thread that forked it exits.
PR_SET_PDEATHSIG = 1
# The rebuild's consumers' wait before asking again for what a broker could not answer yet.
# A new consumer's first offsets or fetch request waits for the metadata of the topics it
# names, which it learns only on that request: with aiokafka's default of 100 ms, noting the
# offsets of the four topics took 0.41 s, with 10 ms 0.05 s.
RETRY_BACKOFF_MS = 10


@dataclass(frozen=True)
class RebuildReport:
    # Records read (poison skipped included); the offsets they span, which also count the
    # markers of transactions.
    events: int
    offsets: int
    revocations: int
    poison: int
    # From the start until caught up (the group moved); of them reading, decoding and loading
    # the events; building the new tables from what was loaded; the one transaction swapping
    # them in (all the API waits for). Then vacuuming and analysing the new tables, dropping
    # the old ones.
    seconds: float
    load_seconds: float
    build_seconds: float
    swap_seconds: float
    cleanup_seconds: float
    sources: int
    studies: int
    entries: int

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "offsets": self.offsets,
            "revocations": self.revocations,
            "poison": self.poison,
            "seconds": round(self.seconds, 2),
            "load_seconds": round(self.load_seconds, 2),
            "build_seconds": round(self.build_seconds, 2),
            "swap_seconds": round(self.swap_seconds, 3),
            "cleanup_seconds": round(self.cleanup_seconds, 2),
            "events_per_second": round(self.events_per_second, 1),
            "sources": self.sources,
            "studies": self.studies,
            "entries": self.entries,
        }


def _stderr(message: str) -> None:
    print(f"[timeline rebuild] {message}", file=sys.stderr, flush=True)


async def rebuild(
    settings: TimelineSettings,
    *,
    group: str = SERVICE,
    rename: Mapping[str, str] | None = None,
    progress: Callable[[str], None] = _stderr,
    chunk_events: int = CHUNK_EVENTS,
    processes: int | None = None,
) -> RebuildReport:
    """Replace the projection's tables with what the topics up to their end offsets at start
    give, and move the projection's group there; the projection worker must be stopped (see
    the module docstring)."""
    tune_gc()
    started = time.monotonic()
    names = dict(rename or {})
    topics = [names.get(topic, topic) for topic in TOPICS]
    revoked_topic = names.get(ConsentRevoked.topic, ConsentRevoked.topic)
    group_id = f"{settings.kafka.client_id_prefix}-{group}"
    kafka = settings.kafka.bootstrap_list

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await _refuse_if_running(admin, group_id)
        committed = await _committed(admin, group_id)
        tps = _partitions(await admin.describe_topics(topics), topics)
        begin, end = await _offsets(kafka, tps)
        total = sum(end[tp] - begin[tp] for tp in tps)
        progress(
            f"{total} offsets (events and transaction markers) on {len(tps)} partitions of "
            f"{', '.join(topics)}"
        )
        shards = _shards(kafka, settings.postgres.conninfo, begin, end,
                         processes or settings.rebuild_processes or os.cpu_count() or 1,
                         chunk_events, revoked_topic)  # fmt: skip
        progress(f"loading with {len(shards)} process(es)")
        async with Reload(settings.postgres.conninfo) as reload:
            loaded = await _load(shards, progress, total)
            load_seconds = time.monotonic() - started
            progress(
                f"{loaded.decoded} events loaded ({loaded.rows} rows, {loaded.poison} poison "
                f"skipped) in {load_seconds:.1f} s; building the new tables"
            )
            build_started = time.monotonic()
            await reload.build()
            build_seconds = time.monotonic() - build_started
            progress(f"built in {build_seconds:.1f} s; swapping them in")
            await _refuse_if_running(admin, group_id)
            if await _committed(admin, group_id) != committed:
                # A worker ran meanwhile and stopped again: what it applied past the end
                # offsets went into the tables the swap would replace.
                raise RebuildRefused(
                    f"consumer group {group_id} committed offsets while the rebuild ran (its "
                    "projection worker ran meanwhile); nothing was swapped: stop the worker "
                    "and rebuild again"
                )
            swap_started = time.monotonic()
            counts = await reload.swap()
            swap_seconds = time.monotonic() - swap_started
            await _commit_offsets(kafka, group_id, end)
            seconds = time.monotonic() - started
            progress(
                f"consumer group {group_id} moved to the end offsets the rebuild read to: "
                "caught up, the projection worker may start again; vacuuming and analysing the new "
                "tables and dropping the replaced ones"
            )
            settled = await reload.settle()
        cleanup_seconds = time.monotonic() - started - seconds
    finally:
        await admin.close()
    report = RebuildReport(
        events=loaded.decoded + loaded.poison,
        offsets=total,
        revocations=loaded.revocations,
        poison=loaded.poison,
        seconds=seconds,
        load_seconds=load_seconds,
        build_seconds=build_seconds,
        swap_seconds=swap_seconds,
        cleanup_seconds=cleanup_seconds,
        sources=counts.sources,
        studies=counts.studies,
        entries=counts.entries,
    )
    cleanup = [
        "new tables vacuumed and analysed"
        if settled
        else "the new tables NOT vacuumed (see the log; autovacuum will in time)",
        "the replaced ones dropped"
        if reload.dropped
        else "the replaced tables NOT dropped (see the log; the next rebuild drops them)",
    ]
    progress(
        f"done: {report.events} events in {report.seconds:.1f} s "
        f"({report.events_per_second:.0f} events/s; swap {swap_seconds * 1000:.0f} ms): "
        f"{counts.studies} studies, {counts.entries} entries; {' and '.join(cleanup)} in "
        f"{cleanup_seconds:.1f} s; start the projection worker again"
    )
    return report


@dataclass
class _Loaded:
    decoded: int = 0
    revocations: int = 0
    poison: int = 0
    rows: int = 0

    def __add__(self, other: _Loaded) -> _Loaded:
        return _Loaded(
            self.decoded + other.decoded,
            self.revocations + other.revocations,
            self.poison + other.poison,
            self.rows + other.rows,
        )


@dataclass(frozen=True)
class _Shard:
    """What one loading process reads: partitions, each from ``begin`` to ``end``."""

    kafka: list[str]
    conninfo: str
    begin: dict[TopicPartition, int]
    end: dict[TopicPartition, int]
    index: int
    count: int
    chunk_events: int
    revoked_topic: str


def _shards(
    kafka: list[str],
    conninfo: str,
    begin: dict[TopicPartition, int],
    end: dict[TopicPartition, int],
    processes: int,
    chunk_events: int,
    revoked_topic: str,
) -> list[_Shard]:
    """The partitions holding events, by partition number over ``processes`` shards: the
    topics are keyed alike (a study's events share a partition number), so each loader sees
    both announcements of most snapshots and loads them once."""
    todo = sorted((tp for tp in begin if end[tp] > begin[tp]), key=lambda tp: tp.partition)
    numbers = sorted({tp.partition for tp in todo})
    if not numbers:
        return []
    count = min(max(processes, 1), len(numbers))
    shards = []
    for index in range(count):
        mine = [tp for tp in todo if numbers.index(tp.partition) % count == index]
        shards.append(
            _Shard(kafka, conninfo, {tp: begin[tp] for tp in mine}, {tp: end[tp] for tp in mine},
                   index, count, chunk_events, revoked_topic)
        )  # fmt: skip
    return shards


@dataclass(frozen=True)
class _Shared:
    """What the rebuild and its loading processes share (inherited through fork)."""

    read: Any  # events read, per shard
    stop: Any  # set when a loader failed: the others stop at their next chunk

    @classmethod
    def make(cls, shards: int) -> _Shared:
        context = multiprocessing.get_context("fork")
        return cls(context.Array("q", shards, lock=False), context.Value("b", 0, lock=False))


async def _load(shards: list[_Shard], progress: Callable[[str], None], total: int) -> _Loaded:
    """Run the shards' loaders: in this process for one, else one process each (forked, so
    they start in milliseconds with what this process imported); report progress meanwhile."""
    if not shards:
        return _Loaded()
    shared = _Shared.make(len(shards))
    started = time.monotonic()

    async def report() -> None:
        while True:
            await asyncio.sleep(PROGRESS_SECONDS)
            done = sum(shared.read)
            progress(
                f"{done}/{total} events read ({100 * done / max(total, 1):.0f} %), "
                f"{done / (time.monotonic() - started):.0f} events/s"
            )

    reporter = asyncio.create_task(report())
    try:
        if len(shards) == 1:
            return await _load_shard(shards[0], shared)
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(
            len(shards),
            mp_context=multiprocessing.get_context("fork"),
            initializer=_inherit,
            initargs=(shared,),
        ) as pool:
            loading = [loop.run_in_executor(pool, _load_shard_in_process, s) for s in shards]
            try:
                results = await asyncio.gather(*loading)
            except BaseException:
                # The others stop at their next chunk; wait for them here, not blocked in the
                # pool's shutdown, and take their errors so none is reported as unretrieved.
                shared.stop.value = 1
                await asyncio.gather(*loading, return_exceptions=True)
                raise
        return sum(results, _Loaded())
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)


_inherited: _Shared | None = None


def _inherit(shared: _Shared) -> None:
    """A loading process's start: the shared state, and its end when the rebuild's ends (a
    rebuild killed outright would otherwise leave its loaders loading, then waiting for work
    forever)."""
    global _inherited
    _inherited = shared
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        log.warning("loader not tied to the rebuild's life", errno=ctypes.get_errno())
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _load_shard_in_process(shard: _Shard) -> _Loaded:
    assert _inherited is not None, "the pool's initializer passes the shared state"
    return runtime.run(_load_shard(shard, _inherited))


async def _load_shard(shard: _Shard, shared: _Shared) -> _Loaded:
    """Read the shard's partitions to their end offsets and load their rows; the next chunk
    is decoded while PostgreSQL takes in the last."""
    loaded = _Loaded()
    todo = set(shard.begin)
    decoding = _Decoding(Codec())
    consumer = AIOKafkaConsumer(
        bootstrap_servers=shard.kafka,
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_bytes=52_428_800,
        # An offset gone (records deleted since the offsets were noted) fails the rebuild;
        # the default would skip to the end and commit the group past unapplied events.
        auto_offset_reset="none",
        retry_backoff_ms=RETRY_BACKOFF_MS,
    )
    loading: asyncio.Task[None] | None = None
    progressed = time.monotonic()
    chunks = 0
    try:
        await consumer.start()  # inside: a consumer that failed to start is stopped too
        consumer.assign(list(todo))
        for tp in todo:
            consumer.seek(tp, shard.begin[tp])
        with collector_paused():
            async with Loader(shard.conninfo, shard.index, shard.count) as loader:
                while todo:
                    if shared.stop.value:
                        raise FatalError("stopped: another loading process failed")
                    fetched = await consumer.getmany(
                        *todo, timeout_ms=500, max_records=shard.chunk_events
                    )
                    if fetched:
                        progressed = time.monotonic()
                    elif time.monotonic() - progressed > STALL_SECONDS:
                        raise TransientError(
                            f"no records from Kafka for {STALL_SECONDS:.0f} s with "
                            f"{len(todo)} partition(s) still to read"
                        )
                    _add_chunk(fetched, shard, decoding, loader, loaded)
                    if loading is not None:
                        await loading  # one chunk in PostgreSQL's hands at a time
                    loading = asyncio.create_task(loader.copy(loader.take()))
                    chunks += 1
                    if chunks % COLLECT_EVERY_CHUNKS == 0:
                        gc.collect()
                    for tp in list(todo):
                        if await consumer.position(tp) >= shard.end[tp]:
                            todo.discard(tp)
                            progressed = time.monotonic()
                    shared.read[shard.index] = loaded.decoded + loaded.poison
                if loading is not None:
                    await loading
                loaded.rows = loader.rows
    finally:
        if loading is not None and not loading.done():
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
        await consumer.stop()
    return loaded


def _add_chunk(
    fetched: Mapping[TopicPartition, list[Any]],
    shard: _Shard,
    decoding: _Decoding,
    loader: Loader,
    loaded: _Loaded,
) -> None:
    """Decode a fetched chunk's records up to the shard's end offsets into ``loader``,
    counting them in ``loaded``; a poison record is logged and skipped."""
    for tp, records in fetched.items():
        for record in records:
            if record.offset >= shard.end[tp]:
                continue  # published after the rebuild started: the worker's
            try:
                decoding.add(record, loader)
            except PoisonEvent as exc:
                loaded.poison += 1
                log.error("poison record skipped", position=position(record), reason=str(exc))
                continue
            loaded.decoded += 1
            loaded.revocations += record.topic == shard.revoked_topic


class _Decoding:
    """A loader's decoding: ``projection.decode_projected`` and ``Loader.add``, but a
    study-received or timeline decision whose snapshot is byte for byte one this loader has
    decoded before is decoded without it: its other members are validated, and its snapshot,
    the same value, was loaded then. Consent forwards a study-received's snapshot as received
    into both its decisions, so each snapshot is decoded once instead of twice, and the
    snapshot is most of a decision's bytes and of its decoding (50-70 us of a 10-instance one
    on this project's 2-core machine).

    A record decoded in full leaves its snapshot's text (``Codec.split``) under its key (both
    kinds are keyed by their study). A later record of that key ending with that text as its
    ``study`` member is decoded without it (``Codec.rest_before``: no search of its value for
    the member).

    Validity is unchanged: the other members are validated as an object of the model's other
    fields (``without``, which refuses unknown members, a ``study`` among them), so the record
    is that object's members and, last, the snapshot: it decodes exactly when they do. A
    record whose other members do not validate is decoded in full, which raises
    :class:`PoisonEvent` as the projection's decoding would.
    """

    def __init__(self, codec: Codec) -> None:
        self._codec = codec
        # A record key -> the snapshot texts decoded from records of that key and not yet
        # met again, with what a decision's row takes from each; oldest key first.
        self._decoded: OrderedDict[bytes | None, list[tuple[bytes, SnapshotRef]]] = OrderedDict()
        self._bytes = 0
        self.shortcuts = 0

    def add(self, record: Any, loader: Loader) -> None:
        """Decode ``record`` and add it to ``loader``; raises PoisonEvent."""
        # The schema as decoding reads it (the last header of that name, if repeated).
        model = _CARRYING.get(last_header(record, SCHEMA_HEADER) or b"")
        split = None
        if model is not None and header(record, PURPOSE_HEADER) != DELIVERY:
            if self._shortcut(record, model, loader):
                return
            split = self._codec.split(record, model, "study")
        event = decode_projected(self._codec, record)
        if event is None:
            return
        loader.add(event)
        # Only a snapshot the loader took: a delivery decision without the purpose header
        # (written before it existed) is decoded in full, but its snapshot is not loaded.
        if split is not None and (
            isinstance(event, StudyReceived)
            or (isinstance(event, ConsentChecked) and event.purpose is Purpose.TIMELINE)
        ):
            self._remember(record.key, split[1], snapshot_ref(event.study))

    def _shortcut(
        self, record: Any, model: type[StudyReceived | ConsentChecked], loader: Loader
    ) -> bool:
        """Add ``record`` decoded without its snapshot if it ends with one this loader decoded
        from a record of its key; False if it does not, or its other members are invalid."""
        held = self._decoded.get(record.key)
        if not held:
            return False
        for i, (text, study) in enumerate(held):
            rest = self._codec.rest_before(record, "study", text)
            if rest is None:
                continue
            try:
                others = without(model, "study").model_validate_json(rest)
            except ValidationError:
                return False  # decoded in full, which names what is wrong
            del held[i]
            if not held:
                del self._decoded[record.key]
            self._bytes -= len(text)
            self.shortcuts += 1
            if model is ConsentChecked:
                loader.add_decision(study, others)
            return True
        return False

    def _remember(self, key: bytes | None, text: bytes, study: SnapshotRef) -> None:
        self._decoded.setdefault(key, []).append((text, study))
        self._bytes += len(text)
        while self._bytes > REMEMBERED_BYTES:
            _, forgotten = self._decoded.popitem(last=False)
            self._bytes -= sum(len(text) for text, _ in forgotten)


def _partitions(described: list[dict[str, Any]], topics: list[str]) -> list[TopicPartition]:
    """Every partition of ``topics`` from the brokers' metadata; a topic they could not
    describe (unknown, not authorised, ...) refuses the rebuild: left out, its events would be
    missing from the new tables, and the projection's group would not move past them either."""
    by_name = {d["topic"]: d for d in described}
    for topic in topics:
        found = by_name.get(topic)
        if found is None:
            reason = "not in the brokers' answer"
        elif found["error_code"]:
            reason = _error_name(found["error_code"])
        elif not found["partitions"]:
            reason = "no partitions"
        else:
            continue
        raise RebuildRefused(f"topic {topic} could not be described ({reason})")
    return [
        TopicPartition(topic, p["partition"])
        for topic in topics
        for p in by_name[topic]["partitions"]
    ]


def _error_name(code: int) -> str:
    return f"{for_code(code).__name__}, error code {code}"


async def _committed(admin: AIOKafkaAdminClient, group_id: str) -> dict[TopicPartition, int]:
    """The group's committed offsets."""
    offsets = await admin.list_consumer_group_offsets(group_id)
    return {tp: meta.offset for tp, meta in offsets.items()}


async def _refuse_if_running(admin: AIOKafkaAdminClient, group_id: str) -> None:
    response = await admin.describe_consumer_groups([group_id])
    for error, name, state, _type, _protocol, members in response[0].groups:
        if name == group_id and error:
            # Unanswered, the question whether the projection's worker runs stays open.
            raise RebuildRefused(
                f"consumer group {group_id} could not be described ({_error_name(error)})"
            )
        if name == group_id and (members or state not in ("Empty", "Dead", "")):
            raise RebuildRefused(
                f"consumer group {group_id} is {state} with {len(members)} member(s): "
                "stop the projection worker before rebuilding"
            )


async def _offsets(
    kafka: list[str], tps: list[TopicPartition]
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    # read_committed: the end is the last stable offset, not inside a transaction still open.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka,
        enable_auto_commit=False,
        isolation_level="read_committed",
        retry_backoff_ms=RETRY_BACKOFF_MS,
    )
    try:
        await consumer.start()
        return await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def _commit_offsets(
    kafka: list[str], group_id: str, offsets: dict[TopicPartition, int]
) -> None:
    """Commit ``offsets`` for the (memberless) group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka, group_id=group_id, enable_auto_commit=False
    )
    try:
        await consumer.start()
        consumer.assign(list(offsets))
        await consumer.commit(dict(offsets))
    finally:
        await consumer.stop()
