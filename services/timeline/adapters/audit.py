"""The NEN 7513 audit trail: every access attempt to Kafka ``access-logged`` and PostgreSQL.

:meth:`PostgresAuditTrail.record` writes both, concurrently, and returns only when both hold
the record: Kafka has acknowledged it (acks=all, idempotent producer) and the ``access_log`` row
is committed. Either failing raises :class:`AuditUnavailable`, and the API then answers 503
without the patient's data: no access without its audit record. A retried write of the same
event is harmless (``ON CONFLICT (event_id) DO NOTHING``; consumers deduplicate on event id).

The table is append-only (a trigger refuses UPDATE, DELETE and TRUNCATE, migration 0001); this
adapter only ever inserts and selects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services.timeline.adapters.store import database_error
from shared.audit import AuditPublisher, AuditUnavailable, KafkaAccessLog, log_unwritten
from shared.errors import TransientError
from shared.events import AccessLogged, AuditAction, AuditOutcome
from shared.logging import get_logger

log = get_logger(__name__)

PRODUCER: Final = "timeline-api"
# AccessLogged needs a correlation id, which the table does not keep: a record read back
# carries its event id as correlation id. A record from before the table kept the producer
# (migration 0004) was the timeline's own.
READ_BACK_PRODUCER: Final = "timeline"

_COLUMNS: Final = (
    "event_id, occurred_at, event_type, action, outcome, patient_pseudonym, user_uzi, "
    "user_role, on_behalf_of_uzi, organisation_ura, access_point, authorisation_basis, "
    "consent_profile, emergency, reason, study_instance_uids, purpose_of_use, producer"
)
_INSERT: Final = (
    f"INSERT INTO access_log ({_COLUMNS}) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (event_id) DO NOTHING"
)
# count(*) OVER (): every match in the period, counted before the LIMIT cuts the page.
_SEARCH: Final = (
    f"SELECT {_COLUMNS}, count(*) OVER () FROM access_log WHERE patient_pseudonym = %s "
    "AND occurred_at >= coalesce(%s::timestamptz, '-infinity') "
    "AND occurred_at <= coalesce(%s::timestamptz, 'infinity') "
    "ORDER BY occurred_at DESC, event_id LIMIT %s"
)


class PostgresAuditTrail:
    """The :class:`~services.timeline.domain.ports.AuditTrail`: Kafka and PostgreSQL, both."""

    def __init__(
        self,
        conninfo: str,
        publisher: AuditPublisher,
        *,
        topic: str = AccessLogged.topic,
        pool_size: int = 4,
        timeout: float = 10.0,
    ) -> None:
        # Opened in start() without waiting: the API comes up while PostgreSQL does, /readyz
        # says when it answers, and until then every access is refused with 503.
        self._pool = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=max(pool_size, 1),
            open=False,
            name="timeline-audit",
            kwargs={"autocommit": True},
            # A connection the server dropped while idle is replaced, not handed out.
            check=AsyncConnectionPool.check_connection,
            timeout=timeout,
        )
        self._kafka = KafkaAccessLog(publisher, topic=topic, timeout=timeout)
        self._timeout = timeout
        self.written = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"PostgresAuditTrail(topic={self.topic!r})"  # never the DSN: it may hold a password

    @property
    def topic(self) -> str:
        return self._kafka.topic

    async def start(self) -> None:
        await self._kafka.start()
        await self._pool.open(wait=False)

    async def stop(self) -> None:
        try:
            await self._kafka.stop()
        finally:
            await self._pool.close()

    async def record(self, event: AccessLogged) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                results = await asyncio.gather(
                    self._kafka.publish(event), self._insert(event), return_exceptions=True
                )
        except TimeoutError:
            results = [TimeoutError("the audit record was not written in time")]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            self.failures += 1
            for failure in failures:
                log_unwritten(event, failure)
            raise AuditUnavailable("the access could not be audited; nothing was disclosed")
        self.written += 1

    async def _insert(self, event: AccessLogged) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(_INSERT, _row(event))

    async def search(
        self, patient: str, since: datetime | None, until: datetime | None, limit: int
    ) -> tuple[list[AccessLogged], int]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_SEARCH, (patient, since, until, limit))
            rows = await cursor.fetchall()
        return [_from_row(row[:-1]) for row in rows], int(rows[0][-1]) if rows else 0

    async def ready(self, timeout: float = 2.0) -> bool:
        """PostgreSQL answers and the access log is there (``/readyz``)."""
        try:
            async with asyncio.timeout(timeout), self._pool.connection(timeout=timeout) as conn:
                cursor = await conn.execute("SELECT to_regclass('access_log') IS NOT NULL")
                row = await cursor.fetchone()
        except (TimeoutError, psycopg.Error, PoolTimeout, OSError):
            return False
        return bool(row and row[0])


class AccessLogArchive:
    """Loads records from ``access-logged`` into ``access_log``: those of the other services
    that disclose patient data (notify's portal pickup), and the timeline's own, already there.

    A batch is inserted in one transaction, ``ON CONFLICT (event_id) DO NOTHING``: a record
    loaded twice, or written by the API before, is kept once, and a record is never changed.
    """

    def __init__(self, conninfo: str, *, name: str = "timeline-access-archive") -> None:
        self._pool = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=1,
            open=False,
            name=name,
            check=AsyncConnectionPool.check_connection,
        )

    def __repr__(self) -> str:
        return "AccessLogArchive()"  # never the DSN: it may hold a password

    async def start(self) -> None:
        await self._pool.open(wait=False)

    async def stop(self) -> None:
        await self._pool.close()

    async def add(self, events: Sequence[AccessLogged]) -> int:
        """Insert ``events``; returns how many were new. Raises TransientError when PostgreSQL
        is away: the caller inserts the same batch again."""
        if not events:
            return 0
        try:
            try:
                return await self._insert([_row(e) for e in events])
            except (psycopg.DataError, psycopg.IntegrityError):
                # One record PostgreSQL will never take: keep the others, one by one.
                return await self._one_by_one(events)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise TransientError(
                f"PostgreSQL did not take the access records: {database_error(exc)}"
            ) from None

    async def _insert(self, rows: list[tuple[Any, ...]]) -> int:
        async with (
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor() as cursor,
        ):
            # rowcount: the rows inserted over the whole executemany (psycopg >= 3.1).
            await cursor.executemany(_INSERT, rows)
            return max(cursor.rowcount, 0)

    async def _one_by_one(self, events: Sequence[AccessLogged]) -> int:
        new = 0
        for event in events:
            try:
                new += await self._insert([_row(event)])
            except (psycopg.DataError, psycopg.IntegrityError) as exc:
                # It stays on the topic (six years); the operator learns which one.
                log.error(
                    "access record refused by PostgreSQL, not archived",
                    event_id=str(event.event_id),
                    error=type(exc).__name__,
                )
        return new


def _row(event: AccessLogged) -> tuple[Any, ...]:
    return (
        event.event_id,
        event.occurred_at,
        event.event_type,
        event.action.value,
        event.outcome.value,
        event.patient,
        event.user_uzi,
        event.user_role,
        event.on_behalf_of_uzi,
        event.organisation_ura,
        event.access_point,
        event.authorisation_basis,
        event.consent_profile,
        event.emergency,
        event.reason,
        list(event.study_instance_uids),
        event.purpose_of_use,
        event.producer,
    )


def _from_row(row: tuple[Any, ...]) -> AccessLogged:
    (
        event_id, occurred_at, event_type, action, outcome, patient, user_uzi, user_role,
        on_behalf_of_uzi, organisation_ura, access_point, basis, profile, emergency, reason,
        uids, purpose, producer,
    ) = row  # fmt: skip
    return AccessLogged(
        event_id=event_id,
        occurred_at=occurred_at,
        correlation_id=str(event_id),
        producer=producer or READ_BACK_PRODUCER,
        event_type=event_type,
        action=AuditAction(action),
        outcome=AuditOutcome(outcome),
        patient=patient,
        user_uzi=user_uzi,
        user_role=user_role,
        on_behalf_of_uzi=on_behalf_of_uzi,
        organisation_ura=organisation_ura,
        access_point=access_point,
        authorisation_basis=basis,
        consent_profile=profile,
        emergency=emergency,
        reason=reason,
        study_instance_uids=tuple(uids or ()),
        purpose_of_use=purpose,
    )
