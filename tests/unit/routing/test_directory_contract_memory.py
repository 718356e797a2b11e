"""The provider directory contract, run on InMemoryDirectory (the fake the API's tests use)."""

from __future__ import annotations

import asyncio

import pytest

from services.routing.adapters.directory_view import Written
from services.routing.adapters.memory import InMemoryDirectory
from services.routing.domain.directory import Provider
from shared.topic_view import ViewFailed
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


# --- the fake's test hook, no part of the contract --------------------------------------------


async def test_a_wait_pending_when_the_fake_breaks_raises_view_failed() -> None:
    """The API's 503 for a view stopped on a bad record, also for a request already waiting."""
    memory = InMemoryDirectory()
    await memory.start()
    never = Written(memory.topic, 0, 5)  # not written (yet)
    waiting = asyncio.create_task(memory.wait_for(never, timeout=5))
    await asyncio.sleep(0.02)
    assert not waiting.done()

    memory.broken = True

    with pytest.raises(ViewFailed):
        await asyncio.wait_for(waiting, 1)
