"""The consent registry contract, run on FakeView and FakePublisher: the fakes the consent
API's unit tests (test_http_api.py) stand in for Kafka with."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.contracts.consent_registry import ConsentRegistryContract, RegistryBackend
from tests.fakes.consent import FakePublisher, FakeView


class TestFakeRegistry(ConsentRegistryContract):
    @pytest.fixture
    async def backend(self) -> AsyncIterator[RegistryBackend]:
        view = FakeView()
        publisher = FakePublisher(view)
        await publisher.start()
        await view.start()
        yield RegistryBackend(
            publisher, view, "not-a-registry-topic", another_view=publisher.another_view
        )
        await view.stop()
        await publisher.stop()
