"""The provider directory contract, run on InMemoryDirectory (the fake the API's tests use)."""

from __future__ import annotations

import pytest

from services.routing.adapters.memory import InMemoryDirectory
from services.routing.domain.directory import Provider
from tests.contracts.provider_directory import (
    DirectoryBackend,
    DirectoryPorts,
    ProviderDirectoryContract,
)


class InMemoryDirectories:
    """One fake per directory, reader and writer at once, as the API's unit tests wire it;
    ``existing`` goes in through its constructor, as test_seed does."""

    async def create(self, *existing: Provider) -> DirectoryPorts:
        memory = InMemoryDirectory(existing)
        return DirectoryPorts(reader=memory, writer=memory, topic=memory.topic)


class TestInMemoryDirectory(ProviderDirectoryContract):
    @pytest.fixture
    def backend(self) -> DirectoryBackend:
        return InMemoryDirectories()
