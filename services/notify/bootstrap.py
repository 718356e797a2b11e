"""Wires the notify API from its settings: the journey view, the dead letters, the audit log,
S3, auth, metrics.

No client connects here: the audit producer, the views (and the re-drive producer) start in the
app's lifespan and the views read their topics' history in the background; /readyz says when
they hold it.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from services.notify.adapters.dead_letters import (
    DeadLetter,
    DeadLetters,
    DeadLetterTopics,
    Redriven,
)
from services.notify.adapters.journey_view import (
    JourneyTopics,
    JourneyView,
    Pickup,
    StudyJourney,
)
from services.notify.api_config import NotifyApiSettings
from services.notify.metrics import NotifyApiMetrics
from shared.audit import KafkaAccessLog
from shared.auth import AuthSettings, TokenVerifier, bearer_principal
from shared.events import AccessLogged
from shared.kafka import KafkaEventPublisher
from shared.storage.port import ObjectStore
from shared.storage.s3 import S3ObjectStore


class _View(Protocol):
    applied: int
    skipped: int

    @property
    def is_caught_up(self) -> bool: ...

    @property
    def failed(self) -> bool: ...

    def lag(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def sync(self, timeout: float) -> None: ...


class JourneyReader(_View, Protocol):
    """Port: the journeys as far as the API has read them (JourneyView, or a fake)."""

    @property
    def studies(self) -> int: ...

    def get(self, study_instance_uid: str) -> StudyJourney | None: ...

    def pickup(
        self, study_instance_uid: str, version: int, recipient_ura: str, sender_ura: str | None
    ) -> Pickup | None: ...


class DeadLetterQueue(_View, Protocol):
    """Port: the dead letters and their re-drive (DeadLetters, or a fake)."""

    def __len__(self) -> int: ...

    def list(self) -> builtins.list[DeadLetter]: ...

    def get(self, key: str) -> DeadLetter | None: ...

    async def redrive(self, key: str, timeout: float = ...) -> Redriven | None: ...

    async def redrive_all(self, timeout: float = ...) -> builtins.list[Redriven]: ...


class AccessAudit(Protocol):
    """Port: NEN 7513 records, each kept before anything is disclosed (KafkaAccessLog)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def record(self, event: AccessLogged) -> None: ...


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class NotifyApi:
    """Everything the HTTP entrypoint needs, built once per process."""

    settings: NotifyApiSettings
    journey: JourneyReader
    dead_letters: DeadLetterQueue
    objects: ObjectStore
    metrics: NotifyApiMetrics
    principal_dependency: Callable[..., Any]
    pickup_keys: tuple[bytes, ...]
    audit: AccessAudit
    clock: Callable[[], datetime] = utcnow

    @asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        # The audit producer first and last: no download may start that could not be audited.
        async with AsyncExitStack() as stack:
            for part in (self.audit, self.dead_letters, self.journey):
                await part.start()
                stack.push_async_callback(part.stop)
            yield

    def readiness(self) -> dict[str, bool]:
        """Ready once both views hold their topics' history and neither stopped on a record."""
        return {
            "journey_view": self.journey.is_caught_up and not self.journey.failed,
            "dead_letters_view": self.dead_letters.is_caught_up and not self.dead_letters.failed,
        }


def build(
    settings: NotifyApiSettings,
    *,
    auth: AuthSettings | None = None,
    verifier: TokenVerifier | None = None,
    journey_topics: JourneyTopics | None = None,
    dead_letter_topics: DeadLetterTopics | None = None,
    journey: JourneyReader | None = None,
    dead_letters: DeadLetterQueue | None = None,
    objects: ObjectStore | None = None,
    audit: AccessAudit | None = None,
    audit_topic: str = AccessLogged.topic,
    metrics: NotifyApiMetrics | None = None,
    clock: Callable[[], datetime] | None = None,
) -> NotifyApi:
    """``*_topics`` rename the topics (integration tests); ``journey``/``dead_letters``/
    ``objects``/``audit`` replace the adapters."""
    if verifier is None:
        verifier = (auth or AuthSettings()).build_verifier()  # type: ignore[call-arg]
    metrics = metrics or NotifyApiMetrics()
    journey = journey or JourneyView(settings.kafka, journey_topics)
    dead_letters = dead_letters or DeadLetters(settings.kafka, dead_letter_topics)
    metrics.watch_view("journeys", journey)
    metrics.watch_view("dead-letters", dead_letters)
    metrics.journey_studies.set_function(lambda: float(journey.studies))
    metrics.dead_letters.set_function(lambda: float(len(dead_letters)))
    principal = bearer_principal(verifier)
    return NotifyApi(
        settings=settings,
        journey=journey,
        dead_letters=dead_letters,
        # Read only: the API never writes objects, nor creates the bucket.
        objects=objects or S3ObjectStore.from_settings(settings.s3),
        metrics=metrics,
        principal_dependency=principal,
        pickup_keys=settings.pickup_keys,
        # No linger: each record waits for its own acknowledgement before the download starts.
        audit=audit
        or KafkaAccessLog(
            KafkaEventPublisher(settings.kafka, settings.service_name, linger_ms=0),
            topic=audit_topic,
            timeout=settings.audit_timeout_seconds,
        ),
        clock=clock or utcnow,
    )
