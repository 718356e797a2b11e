"""Rebuild the timeline read model from the topics (``beeldportaal timeline rebuild``).

The topics the projection reads keep their history forever (``shared.topics``), and the store's
rows do not depend on the order events arrive in, so replaying them from the start into empty
tables yields exactly the tables the running projection built.

How an operator runs it (in place, with the projection stopped; the API keeps serving):

1. stop the projection worker (``beeldportaal timeline project``): the rebuild refuses to run
   while its consumer group has members, so the two never write at once;
2. ``beeldportaal timeline rebuild``; progress goes to stderr. It

   a. notes the end offsets of the four topics (what "caught up" means),
   b. moves the projection's consumer group back to the start of every partition,
   c. empties the projection's tables (never the append-only ``access_log``),
   d. applies every consent-revoked first, so no permit whose consent was revoked is ever
      visible during the rebuild, not even for a moment,
   e. runs the projection itself, in the projection's consumer group, until its committed offsets
      reach the end offsets noted in (a), and stops it (committed, group left);
3. start the projection worker again: it continues from where the rebuild stopped.

While it runs the timeline is incomplete (entries come back as the replay reaches them) but never
shows more than it should. Offsets are reset *before* the tables are emptied: a rebuild that
dies half-way leaves a group at some offset and tables holding at most what that offset gave,
and running the rebuild again (or even only the worker, which then replays everything into the
tables, changing nothing already there) converges to the right tables.

Why not shadow tables and a swap: the API would keep complete answers during the rebuild, but
the swap must happen with the projection paused at an offset both copies agree on, which needs
coordination with the running worker for an operation that is rare and, at the measured replay
rate (``make bench-timeline``), takes minutes for millions of events.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.timeline.adapters.store import PostgresTimeline, ProjectionBatch
from services.timeline.config import TimelineSettings
from services.timeline.entrypoints.projection import (
    SERVICE,
    TOPICS,
    ProjectionMetrics,
    build_projection,
)
from shared.codec import Codec
from shared.errors import FatalError, PoisonEvent
from shared.events import ConsentRevoked
from shared.logging import get_logger
from shared.runtime import tune_gc
from shared.stream import decode_as, position

log = get_logger(__name__)

PROGRESS_SECONDS = 2.0
POLL_SECONDS = 0.25


class RebuildRefused(FatalError):
    """The rebuild would race a running projection worker."""


@dataclass(frozen=True)
class RebuildReport:
    events: int
    revocations: int
    seconds: float
    # From starting the projection (group join included) until it caught up.
    replay_seconds: float
    # From the first batch applied until caught up, and the events applied in that time.
    steady_seconds: float = 0.0
    steady_events: int = 0

    @property
    def events_per_second(self) -> float:
        return self.events / self.replay_seconds if self.replay_seconds > 0 else 0.0

    @property
    def steady_events_per_second(self) -> float:
        return self.steady_events / self.steady_seconds if self.steady_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "revocations": self.revocations,
            "seconds": round(self.seconds, 2),
            "replay_seconds": round(self.replay_seconds, 2),
            "events_per_second": round(self.events_per_second, 1),
            "steady_events_per_second": round(self.steady_events_per_second, 1),
        }


def _stderr(message: str) -> None:
    print(f"[timeline rebuild] {message}", file=sys.stderr, flush=True)


async def rebuild(
    settings: TimelineSettings,
    *,
    group: str = SERVICE,
    rename: Mapping[str, str] | None = None,
    store: PostgresTimeline | None = None,
    progress: Callable[[str], None] = _stderr,
) -> RebuildReport:
    """Empty the projection's tables and replay the topics into them until caught up with the
    end offsets at start; the projection worker must be stopped (see the module docstring)."""
    tune_gc()
    started = time.monotonic()
    names = dict(rename or {})
    topics = [names.get(topic, topic) for topic in TOPICS]
    group_id = f"{settings.kafka.client_id_prefix}-{group}"
    kafka = settings.kafka.bootstrap_list

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await _refuse_if_running(admin, group_id)
        described = await admin.describe_topics(topics)
        tps = [
            TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]
        ]
        begin, end = await _offsets(kafka, tps)
        total = sum(end[tp] - begin[tp] for tp in tps)
        progress(f"{total} events on {len(tps)} partitions of {', '.join(topics)}")
        await _reset_group(kafka, group_id, begin)
        progress(f"consumer group {group_id} moved to the start of every partition")

        own_store = store is None
        store = store or PostgresTimeline(settings.postgres.conninfo, pool_size=2, name=group)
        if own_store:
            await store.open()
        try:
            await store.truncate()
            progress("projection tables emptied (access_log kept)")
            revoked_topic = names.get(ConsentRevoked.topic, ConsentRevoked.topic)
            revocations = await _revocations_first(
                kafka, store, [tp for tp in tps if tp.topic == revoked_topic], begin, end
            )
            progress(f"{revocations} revocations applied first")
            replay_seconds, steady_seconds, steady_events = await _replay(
                settings, group, names, store, admin, group_id, begin, end, progress
            )
        finally:
            if own_store:
                await store.close()
    finally:
        await admin.close()
    report = RebuildReport(
        events=total,
        revocations=revocations,
        seconds=time.monotonic() - started,
        replay_seconds=replay_seconds,
        steady_seconds=steady_seconds,
        steady_events=steady_events,
    )
    progress(
        f"done: {total} events in {report.replay_seconds:.1f} s "
        f"({report.events_per_second:.0f} events/s); start the projection worker again"
    )
    return report


async def _refuse_if_running(admin: AIOKafkaAdminClient, group_id: str) -> None:
    response = await admin.describe_consumer_groups([group_id])
    for _error, name, state, _type, _protocol, members in response[0].groups:
        if name == group_id and (members or state not in ("Empty", "Dead", "")):
            raise RebuildRefused(
                f"consumer group {group_id} is {state} with {len(members)} member(s): "
                "stop the projection worker before rebuilding"
            )


async def _offsets(
    kafka: list[str], tps: list[TopicPartition]
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def _reset_group(kafka: list[str], group_id: str, begin: dict[TopicPartition, int]) -> None:
    """Commit the first offset of every partition for the (memberless) group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(list(begin))
        await consumer.commit(dict(begin))
    finally:
        await consumer.stop()


async def _revocations_first(
    kafka: list[str],
    store: PostgresTimeline,
    tps: list[TopicPartition],
    begin: dict[TopicPartition, int],
    end: dict[TopicPartition, int],
) -> int:
    todo = {tp for tp in tps if end[tp] > begin[tp]}
    if not todo:
        return 0
    codec = Codec()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    applied = 0
    try:
        consumer.assign(list(todo))
        for tp in todo:
            consumer.seek(tp, begin[tp])
        while todo:
            fetched = await consumer.getmany(*todo, timeout_ms=500, max_records=5000)
            batch = ProjectionBatch()
            for tp, records in fetched.items():
                for record in records:
                    if record.offset >= end[tp]:
                        continue
                    try:
                        batch.add(decode_as(codec, record, ConsentRevoked))
                        applied += 1
                    except PoisonEvent as exc:
                        log.error(
                            "poison record skipped", position=position(record), reason=str(exc)
                        )
            await store.apply(batch)
            for tp in list(todo):
                if await consumer.position(tp) >= end[tp]:
                    todo.discard(tp)
    finally:
        await consumer.stop()
    return applied


async def _replay(
    settings: TimelineSettings,
    group: str,
    names: dict[str, str],
    store: PostgresTimeline,
    admin: AIOKafkaAdminClient,
    group_id: str,
    begin: dict[TopicPartition, int],
    end: dict[TopicPartition, int],
    progress: Callable[[str], None],
) -> tuple[float, float, int]:
    """Run the projection (in the group) until its committed offsets reach ``end``; returns the
    seconds that took, those from its first applied batch on, and the events applied in them."""
    total = sum(end[tp] - begin[tp] for tp in end)
    pending = {tp for tp in end if end[tp] > begin[tp]}
    worker = build_projection(
        settings, group=group, rename=names, store=store, metrics=ProjectionMetrics()
    )
    async with worker:
        task = asyncio.create_task(worker.run())
        started = last_report = time.monotonic()
        first: tuple[float, int] | None = None
        try:
            while pending:
                if task.done():
                    task.result()  # a fatal error: raise it
                    raise FatalError("the projection stopped before it caught up")
                committed = await admin.list_consumer_group_offsets(group_id)
                for tp in list(pending):
                    meta = committed.get(tp)
                    if meta is not None and meta.offset >= end[tp]:
                        pending.discard(tp)
                now = time.monotonic()
                if first is None and worker.stream.records:
                    first = (now, worker.stream.records)
                if now - last_report >= PROGRESS_SECONDS or not pending:
                    done = min(worker.stream.records, total)
                    rate = done / max(now - started, 1e-9)
                    share = 100 * done / max(total, 1)
                    progress(f"{done}/{total} events ({share:.0f} %), {rate:.0f} events/s")
                    last_report = now
                if pending:
                    await asyncio.sleep(POLL_SECONDS)
            finished = time.monotonic()
        finally:
            worker.request_stop()
            await asyncio.gather(task, return_exceptions=True)
    if first is None:
        return finished - started, 0.0, 0
    return finished - started, finished - first[0], min(worker.stream.records, total) - first[1]
