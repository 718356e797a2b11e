"""KafkaAccessLog: a record counts as kept only once Kafka acknowledged it, in time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, NotEnoughReplicasError

from shared.audit import AuditUnavailable, KafkaAccessLog
from shared.events import Event
from tests.factories import make_access_logged


class Publisher:
    """Answers each send with a future settled as told: acknowledged, failed, or never."""

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome
        self.sent: list[tuple[Event, str | None]] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, event: Event, topic: str | None = None) -> asyncio.Future[Any]:
        if self.outcome == "refused":
            raise KafkaTimeoutError("the producer's buffer is full")
        self.sent.append((event, topic))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.outcome == "acknowledged":
            future.set_result(None)
        elif self.outcome == "failed":
            future.set_exception(NotEnoughReplicasError("2 in sync, 3 required"))
        return future  # "silent": never settled


async def test_a_record_kafka_acknowledged_is_kept_on_its_topic() -> None:
    publisher = Publisher("acknowledged")
    log = KafkaAccessLog(publisher, topic="test-access-logged")
    record = make_access_logged()

    await log.record(record)

    assert publisher.sent == [(record, "test-access-logged")]
    assert (log.written, log.failures) == (1, 0)


@pytest.mark.parametrize("outcome", ["refused", "failed", "silent"])
async def test_a_record_not_acknowledged_in_time_raises_so_nothing_is_disclosed(
    outcome: str,
) -> None:
    log = KafkaAccessLog(Publisher(outcome), timeout=0.2)

    with pytest.raises(AuditUnavailable, match="nothing is disclosed"):
        await log.record(make_access_logged())

    assert (log.written, log.failures) == (0, 1)
