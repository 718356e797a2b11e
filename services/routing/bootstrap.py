"""Wires the routing service's directory API from its settings: the view, the writer, auth."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from services.routing.adapters.directory_view import (
    PROVIDER_DIRECTORY,
    DirectoryReader,
    DirectoryView,
    DirectoryWriter,
    KafkaDirectoryWriter,
)
from services.routing.config import RoutingSettings
from services.routing.metrics import RoutingMetrics
from shared.auth import AuthSettings, bearer_principal


@dataclass
class Routing:
    """Everything the directory API needs, built once per process."""

    settings: RoutingSettings
    directory: DirectoryReader
    writer: DirectoryWriter
    metrics: RoutingMetrics
    principal_dependency: Callable[..., Any]

    @asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        # The writer first: a view that fails to start (topic not provisioned) stops it again.
        await self.writer.start()
        try:
            await self.directory.start()
            try:
                yield
            finally:
                await self.directory.stop()
        finally:
            await self.writer.stop()

    def readiness(self) -> dict[str, bool]:
        """Ready once the view holds the whole directory and has not stopped on a bad record."""
        return {
            "directory_caught_up": self.directory.is_caught_up,
            "directory_ok": not self.directory.failed,
        }


def build(
    settings: RoutingSettings,
    *,
    auth: AuthSettings | None = None,
    directory_topic: str = PROVIDER_DIRECTORY,
    directory: DirectoryReader | None = None,
    writer: DirectoryWriter | None = None,
    metrics: RoutingMetrics | None = None,
) -> Routing:
    """``directory``/``writer`` replace the Kafka adapters (unit tests pass one in-memory
    directory as both); ``directory_topic`` replaces the topic (integration tests)."""
    auth = auth or AuthSettings()  # type: ignore[call-arg]
    metrics = metrics or RoutingMetrics()
    return Routing(
        settings=settings,
        directory=directory
        or DirectoryView(settings.kafka, directory_topic, metrics=metrics, name="directory-api"),
        writer=writer or KafkaDirectoryWriter(settings.kafka, directory_topic),
        metrics=metrics,
        principal_dependency=bearer_principal(auth.build_verifier()),
    )
