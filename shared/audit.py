"""NEN 7513 records from a service that discloses patient data outside the timeline.

Every service that lets someone read patient data records each attempt, allowed or refused, as
an :class:`~shared.events.AccessLogged` on ``access-logged`` (kept six years) and discloses
nothing until Kafka has acknowledged it: :meth:`KafkaAccessLog.record` returns only then, and
raises :class:`AuditUnavailable` otherwise, which the API answers with 503.

The timeline writes its own records to Kafka and PostgreSQL at once
(``services/timeline/adapters/audit.py``); the records of other services (notify's portal
pickup) reach PostgreSQL through the timeline's access-log archive, which loads the whole topic
into ``access_log`` (``services/timeline/entrypoints/access_archive.py``). Either way the
patient's access-log search finds them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from aiokafka.errors import KafkaError

from shared.errors import TransientError
from shared.events import AccessLogged, Event
from shared.logging import get_logger

log = get_logger(__name__)


class AuditUnavailable(RuntimeError):
    """The record is not (known to be) kept: answer 503, reveal nothing."""


class AuditPublisher(Protocol):
    """Port: KafkaEventPublisher's enqueue-then-acknowledge send."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, event: Event, topic: str | None = None) -> asyncio.Future[Any]: ...


class KafkaAccessLog:
    """Access records to Kafka (acks=all, idempotent producer), each acknowledged in time."""

    def __init__(
        self, publisher: AuditPublisher, *, topic: str = AccessLogged.topic, timeout: float = 10.0
    ) -> None:
        self._publisher = publisher
        self._topic = topic
        self._timeout = timeout
        self.written = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"KafkaAccessLog(topic={self._topic!r})"

    @property
    def topic(self) -> str:
        return self._topic

    async def start(self) -> None:
        await self._publisher.start()

    async def stop(self) -> None:
        await self._publisher.stop()

    async def publish(self, event: AccessLogged) -> None:
        """Return once Kafka acknowledged ``event``; raise TransientError if it refused it."""
        try:
            await (await self._publisher.send(event, self._topic))
        except KafkaError as exc:
            raise TransientError(f"Kafka did not acknowledge the audit record: {exc}") from exc

    async def record(self, event: AccessLogged) -> None:
        """Return once Kafka holds ``event``; raise :class:`AuditUnavailable` if it may not."""
        try:
            async with asyncio.timeout(self._timeout):
                await self.publish(event)
        except (TransientError, TimeoutError) as exc:
            self.failures += 1
            log_unwritten(event, exc)
            raise AuditUnavailable("the access could not be audited; nothing is disclosed") from exc
        self.written += 1


def log_unwritten(event: AccessLogged, failure: BaseException) -> None:
    log.error(
        "audit record not written",
        event_id=str(event.event_id),
        event_type=event.event_type,
        error=type(failure).__name__,
        detail=str(failure),
    )
