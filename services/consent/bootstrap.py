"""Wires the consent API from its settings: the registry view, the publisher, auth, metrics.

Writes go to Kafka and are answered once the API's own view has applied them (read-your-
writes); reads are answered from the view after it has caught up with the topics.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Protocol

from aiokafka.errors import KafkaError

from services.consent.adapters.registry_view import RegistryTopics, RegistryView
from services.consent.config import ConsentSettings
from services.consent.domain.checks import decision_day
from services.consent.domain.registry import PatientRegistry, RegistryEvent
from services.consent.metrics import ConsentMetrics
from shared.auth import AuthSettings, Principal, TokenVerifier, bearer_principal
from shared.errors import TransientError
from shared.events import Event
from shared.identifiers import Pseudonymizer
from shared.kafka import KafkaEventPublisher
from shared.logging import get_logger
from shared.settings import PrivacySettings
from shared.topic_view import ViewFailed

log = get_logger(__name__)

PRODUCER = "consent-api"


class Unavailable(RuntimeError):
    """Kafka or the registry view cannot serve the request now (503); nothing was done."""


class RegistryReader(Protocol):
    """Port: the registry as far as the API has read it (RegistryView, or a fake in tests)."""

    topics: RegistryTopics
    applied: int
    skipped: int

    @property
    def failed(self) -> bool: ...

    @property
    def is_caught_up(self) -> bool: ...

    @property
    def patients(self) -> int: ...

    def lag(self) -> int: ...

    def get(self, pseudonym: str) -> PatientRegistry | None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def sync(self, timeout: float) -> None: ...

    async def wait_for_offset(
        self, topic: str, partition: int, offset: int, timeout: float
    ) -> None: ...


class Publisher(Protocol):
    """Port: KafkaEventPublisher's enqueue-then-acknowledge send."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, event: Event, topic: str | None = None) -> asyncio.Future[Any]: ...


def today_in_the_netherlands() -> date:
    return decision_day(datetime.now(UTC))


@dataclass
class ConsentApi:
    """Everything the HTTP entrypoint needs, built once per process."""

    settings: ConsentSettings
    view: RegistryReader
    publisher: Publisher
    metrics: ConsentMetrics
    pseudonymizer: Pseudonymizer
    principal_dependency: Callable[..., Any]
    today: Callable[[], date] = today_in_the_netherlands

    @property
    def timeout(self) -> float:
        return self.settings.view_sync_timeout_seconds

    @asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        await self.publisher.start()
        try:
            # Reading the history happens in the background: /readyz says when it is done and
            # every route answers 503 until then.
            await self.view.start()
            try:
                yield
            finally:
                await self.view.stop()
        finally:
            await self.publisher.stop()

    def readiness(self) -> dict[str, bool]:
        return {"registry_view": self.view.is_caught_up and not self.view.failed}

    async def current_registry(self, pseudonym: str) -> PatientRegistry | None:
        """The patient's registry including everything on the topics at this moment."""
        if self.view.failed:
            raise Unavailable("the registry view stopped; the service needs a restart")
        if not self.view.is_caught_up:
            raise Unavailable("the registry view is still reading the registry topics")
        try:
            async with asyncio.timeout(self.timeout):
                await self.view.sync(self.timeout)
        except (TimeoutError, TransientError, KafkaError, ViewFailed) as exc:
            log.warning("registry view could not sync", error=str(exc))
            raise Unavailable("the registry could not be read from Kafka in time") from None
        return self.view.get(pseudonym)

    async def record(self, event: RegistryEvent) -> bool:
        """Publish ``event``; True once the view applied it, False when it is acknowledged by
        Kafka (durable) but not yet visible. Raises :class:`Unavailable` when Kafka did not
        acknowledge it: then the request is not done (a retry yields the same event id)."""
        topic = self.view.topics.for_event(event)
        try:
            async with asyncio.timeout(self.timeout):
                metadata = await (await self.publisher.send(event, topic))
        except (TimeoutError, TransientError, KafkaError) as exc:
            log.warning("publishing a registry event failed", topic=topic, error=str(exc))
            raise Unavailable("Kafka did not acknowledge the write; it may be retried") from None
        self.metrics.produced(topic, type(event).schema_name)
        try:
            await self.view.wait_for_offset(
                topic, metadata.partition, metadata.offset, self.timeout
            )
        except (TimeoutError, ViewFailed) as exc:
            log.warning("a registry write is not yet visible", topic=topic, error=str(exc))
            return False
        return True


def build(
    settings: ConsentSettings,
    *,
    privacy: PrivacySettings | None = None,
    auth: AuthSettings | None = None,
    verifier: TokenVerifier | None = None,
    topics: RegistryTopics | None = None,
    view: RegistryReader | None = None,
    publisher: Publisher | None = None,
    metrics: ConsentMetrics | None = None,
    today: Callable[[], date] | None = None,
) -> ConsentApi:
    """No client connects here: the view and the producer start in the app's lifespan."""
    privacy = privacy or PrivacySettings()  # type: ignore[call-arg]
    if verifier is None:
        verifier = (auth or AuthSettings()).build_verifier()  # type: ignore[call-arg]
    metrics = metrics or ConsentMetrics()
    view = view or RegistryView(settings.kafka, topics)
    metrics.watch_view(view)
    # No linger: each write waits for its own acknowledgement before the request is answered.
    publisher = publisher or KafkaEventPublisher(settings.kafka, PRODUCER, linger_ms=0)
    principal: Callable[..., Principal] = bearer_principal(verifier)
    return ConsentApi(
        settings=settings,
        view=view,
        publisher=publisher,
        metrics=metrics,
        pseudonymizer=Pseudonymizer(privacy.pseudonym_key.get_secret_value().encode()),
        principal_dependency=principal,
        today=today or today_in_the_netherlands,
    )
