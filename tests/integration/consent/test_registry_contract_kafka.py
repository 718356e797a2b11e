"""The consent registry contract, run on RegistryView and KafkaEventPublisher against the real
Kafka, on registry topics of this test's own (``registry_topics``) plus one the view does not
read."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from services.consent.adapters.registry_view import RegistryTopics, RegistryView
from shared import topics
from shared.kafka import KafkaEventPublisher
from shared.settings import KafkaSettings
from shared.topics import TopicSpec
from tests.contracts.consent_registry import ConsentRegistryContract, RegistryBackend

pytestmark = pytest.mark.integration


class TestKafkaRegistry(ConsentRegistryContract):
    @pytest.fixture
    async def backend(
        self,
        kafka_settings: KafkaSettings,
        registry_topics: RegistryTopics,
        declare_topics: Callable[..., Awaitable[None]],
        tag: str,
    ) -> AsyncIterator[RegistryBackend]:
        stray_topic = f"test-not-a-registry-topic-{tag}"
        await declare_topics(TopicSpec(stray_topic, 1, topics.DAY_MS))
        # As the API builds them (services/consent/bootstrap.py), named for this test.
        publisher = KafkaEventPublisher(kafka_settings, f"contract-{tag}", linger_ms=0)
        view = RegistryView(kafka_settings, registry_topics, name=f"contract-{tag}")

        def another_view() -> RegistryView:
            return RegistryView(kafka_settings, registry_topics, name=f"contract-{tag}-later")

        async with publisher, view:
            yield RegistryBackend(publisher, view, stray_topic, another_view)
