"""A read model of whole topics: every partition consumed from the beginning, folded in memory.

For small reference state that every replica needs in full (the provider directory) and for the
query side of a service whose write side is a topic (the consent API's view of the registry).
It is what faust calls a global table, written with aiokafka directly: no consumer group, no
committed offsets, no changelog; a restart rebuilds it by reading the topics again.

The owner supplies ``apply(record)``, which folds one ``aiokafka.ConsumerRecord`` into its own
state. Records are applied in offset order within each partition, from one task, so ``apply``
needs no locking. A record ``apply`` rejects with :class:`PoisonEvent` is logged (position and
reason, never the value) and skipped; any other exception stops the view and fails every waiter
and readiness check, because a read model that silently skipped a record would answer wrongly.

Freshness, for read-your-writes and for "do not act on a half-read directory":

- :meth:`wait_caught_up` waits until the view holds everything that was on the topics when it
  started (services wait for this before they serve or route);
- :meth:`sync` waits until it holds everything on the topics at the moment of the call (an API
  calls it after publishing a write, before answering a read that must see it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from shared.errors import PoisonEvent, TransientError
from shared.logging import get_logger
from shared.settings import KafkaSettings

log = get_logger(__name__)

Apply = Callable[[Any], None]
# How long a view waits for its topics to appear in the cluster metadata before it gives up.
METADATA_WAIT_SECONDS = 10.0


class ViewFailed(RuntimeError):
    """The view stopped on a record it could not apply; it answers nothing until restarted."""


class TopicView:
    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Sequence[str],
        apply: Apply,
        *,
        name: str,
        poll_timeout_ms: int = 200,
    ) -> None:
        if not topics:
            raise ValueError("a view needs at least one topic")
        self.name = name
        self._kafka = kafka
        self._topics = tuple(topics)
        self._apply = apply
        self._poll_timeout_ms = poll_timeout_ms
        self._consumer: AIOKafkaConsumer | None = None
        # Asks for the topics' end offsets. Not the reading consumer: its offset requests wait
        # behind its own long-polling fetch (up to fetch_max_wait_ms, measured 500 ms a sync).
        self._offsets: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._partitions: list[TopicPartition] = []
        # Next offset to apply per partition, as far as this view got.
        self._positions: dict[TopicPartition, int] = {}
        self._start_ends: dict[TopicPartition, int] = {}
        self._progress = asyncio.Condition()
        self._failure: BaseException | None = None
        self.applied = 0
        self.skipped = 0

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Assign every partition of the topics and start reading from offset 0."""
        if self._consumer is not None:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._kafka.bootstrap_list,
            client_id=f"{self._kafka.client_id_prefix}-view-{self.name}",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Records of an aborted transaction (a replayed batch) are never folded in.
            isolation_level="read_committed",
            max_partition_fetch_bytes=self._kafka.max_message_bytes,
            fetch_max_bytes=max(self._kafka.max_message_bytes, 52_428_800),
        )
        try:
            await consumer.start()
            # The consumer's own metadata only covers subscribed topics: ask for all of it. A
            # topic created a moment ago may not be in every broker's metadata yet: ask again
            # for a few seconds before calling it missing.
            deadline = asyncio.get_running_loop().time() + METADATA_WAIT_SECONDS
            while True:
                cluster = await consumer._client.fetch_all_metadata()
                missing = [t for t in self._topics if not cluster.partitions_for_topic(t)]
                if not missing or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.25)
            if missing:
                raise TransientError(f"view {self.name}: topics not provisioned: {missing}")
            partitions = [
                TopicPartition(topic, p)
                for topic in self._topics
                for p in sorted(cluster.partitions_for_topic(topic) or ())
            ]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            beginnings = await consumer.beginning_offsets(partitions)
            ends = await consumer.end_offsets(partitions)
        except KafkaError as exc:
            await consumer.stop()
            raise TransientError(f"view {self.name}: Kafka unavailable: {exc}") from exc
        except BaseException:
            await consumer.stop()
            raise
        offsets = AIOKafkaConsumer(
            bootstrap_servers=self._kafka.bootstrap_list,
            client_id=f"{self._kafka.client_id_prefix}-view-{self.name}-offsets",
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",  # end offsets = last stable offsets
        )
        try:
            await offsets.start()
        except BaseException:
            await consumer.stop()
            await offsets.stop()
            raise
        self._consumer = consumer
        self._offsets = offsets
        self._partitions = partitions
        self._positions = {tp: beginnings[tp] for tp in partitions}
        self._start_ends = dict(ends)
        self._task = asyncio.create_task(self._run(), name=f"view-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
        offsets, self._offsets = self._offsets, None
        if offsets is not None:
            await offsets.stop()

    async def __aenter__(self) -> TopicView:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- freshness --------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self._failure is not None

    @property
    def is_caught_up(self) -> bool:
        """Holds at least what the topics held when the view started (and has not failed); a
        view not started, or stopped, holds nothing it can vouch for."""
        started = self._consumer is not None
        return started and not self.failed and self._reached(self._start_ends)

    def lag(self) -> int:
        """Records on the topics (as far as the last fetch saw) that the view has not applied."""
        consumer = self._consumer
        if consumer is None:
            return 0
        total = 0
        for tp in self._partitions:
            high = consumer.highwater(tp)
            if high is not None:
                total += max(0, high - self._positions.get(tp, 0))
        return total

    async def wait_caught_up(self, timeout: float) -> None:
        await self._wait_for(self._start_ends, timeout)

    async def sync(self, timeout: float) -> None:
        """Wait until the view holds everything published to its topics before this call."""
        self._require_consumer()
        assert self._offsets is not None
        try:
            ends = await self._offsets.end_offsets(self._partitions)
        except KafkaError as exc:
            raise TransientError(f"view {self.name}: Kafka unavailable: {exc}") from exc
        await self._wait_for(dict(ends), timeout)

    async def wait_for_offset(
        self, topic: str, partition: int, offset: int, timeout: float
    ) -> None:
        """Wait until the record at ``offset`` (e.g. one just published) has been applied."""
        await self._wait_for({TopicPartition(topic, partition): offset + 1}, timeout)

    # --- internals --------------------------------------------------------------------------

    def _require_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError(f"view {self.name} is not started")
        return self._consumer

    def _reached(self, targets: dict[TopicPartition, int]) -> bool:
        return all(self._positions.get(tp, 0) >= end for tp, end in targets.items())

    async def _wait_for(self, targets: dict[TopicPartition, int], timeout: float) -> None:
        self._require_consumer()

        def done() -> bool:
            return self._failure is not None or self._reached(targets)

        async with self._progress:
            try:
                await asyncio.wait_for(self._progress.wait_for(done), timeout)
            except TimeoutError:
                raise TimeoutError(
                    f"view {self.name} did not catch up within {timeout:g}s (lag {self.lag()})"
                ) from None
        if self._failure is not None:
            raise ViewFailed(f"view {self.name} failed: {self._failure}") from self._failure

    async def _run(self) -> None:
        consumer = self._require_consumer()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=self._poll_timeout_ms)
                for tp, records in batches.items():
                    for record in records:
                        self._apply_one(record)
                    if records:
                        self._positions[tp] = records[-1].offset + 1
                # Compaction and transaction markers leave gaps: the consumer's position is the
                # truth about how far a partition has been read.
                for tp in self._partitions:
                    with contextlib.suppress(Exception):
                        self._positions[tp] = max(self._positions[tp], await consumer.position(tp))
                async with self._progress:
                    self._progress.notify_all()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failure = exc
            log.error("view stopped", view=self.name, error=str(exc))
            async with self._progress:
                self._progress.notify_all()

    def _apply_one(self, record: Any) -> None:
        try:
            self._apply(record)
        except PoisonEvent as exc:
            self.skipped += 1
            log.warning(
                "view skipped a record it cannot apply",
                view=self.name,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                reason=str(exc),
            )
            return
        self.applied += 1
