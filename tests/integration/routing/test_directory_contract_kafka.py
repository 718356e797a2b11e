"""The provider directory contract, run on the real adapters: a DirectoryView reading and a
KafkaDirectoryWriter writing this test's own compacted provider-directory topic."""

from __future__ import annotations

import itertools

import pytest

from services.routing.adapters.directory_view import DirectoryView, KafkaDirectoryWriter
from services.routing.domain.directory import Provider
from shared.settings import KafkaSettings
from tests.contracts.provider_directory import (
    DirectoryBackend,
    DirectoryPorts,
    ProviderDirectoryContract,
)

pytestmark = pytest.mark.integration


class KafkaDirectories:
    """Directories over one topic (``directory_topic``: per test, deleted afterwards).

    ``existing`` is published by a writer of its own before the ports are made, so the view
    finds it on the topic when it starts, as a replica started after a seed does.
    """

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.kafka = kafka
        self.topic = topic
        self._numbers = itertools.count(1)

    async def create(self, *existing: Provider) -> DirectoryPorts:
        number = next(self._numbers)
        if existing:
            async with KafkaDirectoryWriter(
                self.kafka, self.topic, client_id=f"contract-seed-{number}"
            ) as seeder:
                for provider in existing:
                    await seeder.put(provider)
        return DirectoryPorts(
            reader=DirectoryView(self.kafka, self.topic, name=f"contract-{number}"),
            writer=KafkaDirectoryWriter(self.kafka, self.topic, client_id=f"contract-{number}"),
            topic=self.topic,
        )


class TestKafkaDirectory(ProviderDirectoryContract):
    @pytest.fixture
    def backend(self, kafka_settings: KafkaSettings, directory_topic: str) -> DirectoryBackend:
        return KafkaDirectories(kafka_settings, directory_topic)
