"""Read what services published: a topic from the offsets it had when the tap was made."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.codec import Codec
from shared.events import Event
from shared.settings import KafkaSettings


@dataclass
class EventTap:
    """Reads one topic from the offsets it had when the tap was made (sync, for sync tests)."""

    kafka: KafkaSettings
    topic: str
    start: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.start = asyncio.run(self._end_offsets())

    async def _end_offsets(self) -> dict[int, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.kafka.bootstrap_list)
        await consumer.start()
        try:
            parts = [
                TopicPartition(self.topic, p)
                for p in consumer.partitions_for_topic(self.topic) or ()
            ]
            if not parts:
                await consumer._client.force_metadata_update()  # first use of the topic
                parts = [
                    TopicPartition(self.topic, p)
                    for p in consumer.partitions_for_topic(self.topic) or ()
                ]
            ends = await consumer.end_offsets(parts)
            return {tp.partition: off for tp, off in ends.items()}
        finally:
            await consumer.stop()

    def read(
        self, keep: Callable[[Event], bool], expect: int, timeout: float = 20.0, settle: float = 1.0
    ) -> list[Event]:
        """Events since the tap was made that ``keep`` accepts: waits for ``expect`` of them,
        then ``settle`` seconds more so that an unexpected extra one is seen too."""
        return asyncio.run(self._read(keep, expect, timeout, settle))

    async def _read(
        self, keep: Callable[[Event], bool], expect: int, timeout: float, settle: float
    ) -> list[Event]:
        codec = Codec()
        consumer = AIOKafkaConsumer(bootstrap_servers=self.kafka.bootstrap_list)
        await consumer.start()
        found: list[Event] = []
        try:
            parts = [TopicPartition(self.topic, p) for p in self.start]
            consumer.assign(parts)
            for tp in parts:
                consumer.seek(tp, self.start[tp.partition])
            deadline = time.monotonic() + timeout
            settle_until: float | None = None
            while time.monotonic() < (settle_until or deadline):
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        event = codec.decode_record(record)
                        if keep(event):
                            found.append(event)
                if len(found) >= expect and settle_until is None:
                    settle_until = time.monotonic() + settle
        finally:
            await consumer.stop()
        return found
