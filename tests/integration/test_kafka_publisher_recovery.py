"""A publisher outlives a broker restart (found by tests/e2e/test_resilience.py).

aiokafka 0.14's idempotent producer gives a batch its sequence numbers when it leaves the
accumulator, also when it leaves only to be failed: a batch that expires (request timeout) while
its partition has no leader (what clients learn during a broker's controlled shutdown) burns its
sequence numbers. Every later batch to that partition is then refused by the broker with
OutOfOrderSequenceNumber, for as long as the producer lives (aio-libs/aiokafka#1017). The
publisher replaces such a producer (shared.kafka: ``renew``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import TopicPartition

from shared import topics
from shared.errors import TransientError
from shared.kafka import KafkaEventPublisher
from shared.settings import KafkaSettings
from shared.topics import TopicSpec
from tests.factories import make_study_received

pytestmark = pytest.mark.integration


async def test_a_publisher_recovers_from_a_batch_that_expired_while_its_partition_had_no_leader(
    kafka_settings: KafkaSettings,
    declare_topics: Callable[..., Awaitable[None]],
    tag: str,
) -> None:
    name = f"test-sequence-gap-{tag}"
    await declare_topics(TopicSpec(name, 1, topics.DAY_MS))
    settings = kafka_settings.model_copy(update={"request_timeout_ms": 1500})
    async with KafkaEventPublisher(settings, client_id=f"gap-{tag}") as publisher:
        await publisher.publish(make_study_received(), name)
        first = publisher.producer
        cluster = first.client.cluster
        real = cluster.leader_for_partition
        gone = TopicPartition(name, 0)
        cluster.leader_for_partition = lambda tp: -1 if tp == gone else real(tp)  # type: ignore[method-assign]
        with pytest.raises(TransientError):  # the batch expires: the broker is away
            await asyncio.wait_for(publisher.publish(make_study_received(), name), 10)
        cluster.leader_for_partition = real  # type: ignore[method-assign]
        assert publisher.renewals == 1, "the expired batch spent the producer: it is replaced"
        # The broker is back: the new producer publishes at once, every time.
        for _ in range(3):
            await publisher.publish(make_study_received(), name)
        assert publisher.producer is not first
        assert publisher.renewals == 1
