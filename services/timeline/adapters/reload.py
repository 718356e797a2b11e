"""The rebuild's bulk path into the timeline read model: load every event's rows, then replace
the projection's tables in one transaction (``services/timeline/entrypoints/rebuild.py``).

The running projection applies a batch of a few thousand events per transaction with upserts
and refreshes the studies each batch touched (``store.py``). Replaying a whole history that way
inserts a study's instance rows twice (its snapshot arrives in study-received and again in its
timeline decision, usually in another batch) and refreshes each study once per batch that
touched it. A rebuild starts from empty tables, so it does it once:

1. :meth:`Reload.add` turns each event into rows, which :meth:`Reload.copy` COPYs in chunks
   into load tables: temporary tables of this session, shaped like the staging tables, without
   keys or indexes. A snapshot no greater
   than one already loaded for its source (``snapshot_key``) is not loaded again, nor are its
   children; each loaded snapshot gets a serial ``load_n`` that its children rows carry.
2. :meth:`Reload.replace`, in ONE transaction under ``PROJECTION_LOCK``: empties the projection's
   tables, reduces the load tables to one row per natural key into the staging tables with the
   orders ``ProjectionBatch`` folds by (greatest snapshot with its own children, greatest
   decision, earliest revocation, greatest delivery version and time), and applies them with
   the projection's own statements (``store.apply_staged``), which also derive every study and
   entry row. The result is what applying all events as one batch gives, which is what applying
   them in any batches gives (see ``store.py``).

Until that transaction commits, the API reads the tables as they were; it waits for the replace
step's table lock, not for the load. If anything fails before the commit, nothing changed: the
load tables are the session's and vanish with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

from services.timeline.adapters.store import (
    _STAGING,
    PROJECTION_LOCK,
    PROJECTION_TABLES,
    SnapshotKey,
    SourceKey,
    _children_rows,
    _configure,
    _decision_row,
    _snapshot_row,
    apply_staged,
    snapshot_key,
)
from shared.errors import TransientError
from shared.events import (
    ConsentChecked,
    ConsentRevoked,
    Delivered,
    Event,
    Purpose,
    StudyReceived,
    StudySnapshot,
)

# Snapshot keys remembered to skip reloading a snapshot (and its children): a source costs a
# few hundred bytes here, so past this many the memory is cleared. That only costs rows: the
# replace step keeps the greatest snapshot of each source however often it was loaded.
REMEMBERED_SOURCES = 500_000

_CHILDREN = ("series", "instances", "reports")
_KEYED = ("snapshots", *_CHILDREN)  # load tables whose rows carry the snapshot's serial load_n
_PLAIN = ("decisions", "revocations", "deliveries")


def _empty_rows() -> dict[str, list[tuple[Any, ...]]]:
    return {table: [] for table in (*_KEYED, *_PLAIN)}


def _load(table: str) -> sql.Identifier:
    return sql.Identifier(f"timeline_load_{table}")


def _stage(table: str) -> sql.Identifier:
    return sql.Identifier(f"timeline_stage_{table}")


@dataclass(frozen=True)
class ReloadCounts:
    """What the replace step wrote."""

    sources: int
    studies: int
    entries: int


class Reload:
    """One rebuild's load tables on a connection of its own.

    ``async with Reload(conninfo) as reload:``, ``reload.add(event)`` for every event (in any
    order), ``await reload.copy(reload.take())`` now and then, then ``await reload.replace()``;
    leaving the block without it changes nothing. Raises :class:`TransientError` when
    PostgreSQL is away.
    """

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._loaded: dict[SourceKey, SnapshotKey] = {}
        self._serial = 0
        self._columns: dict[str, list[str]] = {}
        self._has = dict.fromkeys(("snapshots", *_PLAIN), False)
        self._rows = _empty_rows()
        self.rows = 0

    async def __aenter__(self) -> Reload:
        try:
            self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            await _configure(self._conn)
            # A fresh session, so its temporary tables may get more local buffers than the
            # default 8 MB: the load tables are written once and read once by the replace step.
            await self._conn.execute("SET temp_buffers = '256MB'")
            await self._conn.execute(_STAGING)
            for table in (*_KEYED, *_PLAIN):
                self._columns[table] = await self._stage_columns(table)
                extra = sql.SQL(", load_n int") if table in _KEYED else sql.SQL("")
                await self._conn.execute(
                    sql.SQL("CREATE TEMP TABLE {} (LIKE {}{})").format(
                        _load(table), _stage(table), extra
                    )
                )
        except psycopg.OperationalError as exc:
            await self._close()
            raise TransientError(f"PostgreSQL unavailable for the rebuild: {exc}") from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @property
    def conn(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None:
            raise RuntimeError("Reload is used outside its `async with` block")
        return self._conn

    async def _stage_columns(self, table: str) -> list[str]:
        cursor = await self.conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum",
            (f"timeline_stage_{table}",),
        )
        return [row[0] for row in await cursor.fetchall()]

    # --- load -------------------------------------------------------------------------------

    def add(self, event: Event) -> None:
        """Turn one event into load-table rows at once, so its decoded model is freed (holding
        a chunk of decoded 10-instance snapshots made decoding them 1.5-2x as slow: fresh
        memory for every one); ``take()`` hands the rows over for ``copy()``."""
        rows = self._rows
        if isinstance(event, StudyReceived):
            self._snapshot(event.study)
        elif isinstance(event, ConsentChecked):
            if event.purpose is not Purpose.TIMELINE:
                return
            self._snapshot(event.study)
            rows["decisions"].append(_decision_row(event))
        elif isinstance(event, ConsentRevoked):
            rows["revocations"].append((event.patient, event.consent_id, event.occurred_at))
        elif isinstance(event, Delivered):
            rows["deliveries"].append(
                (event.study_instance_uid, event.destination_ura, event.endpoint_id,
                 event.study_version, event.delivered_at)
            )  # fmt: skip
        else:
            raise TypeError(f"the timeline does not project {type(event).__name__}")

    def _snapshot(self, study: StudySnapshot) -> None:
        key = (study.study_instance_uid, study.sender_ura)
        order = snapshot_key(study)
        held = self._loaded.get(key)
        if held is not None and order <= held:
            return  # this snapshot (or a greater one) is loaded already
        if len(self._loaded) >= REMEMBERED_SOURCES:
            self._loaded.clear()
        self._loaded[key] = order
        self._serial += 1
        self._rows["snapshots"].append((*_snapshot_row(study), self._serial))
        for table, children in _children_rows(study, self._serial).items():
            self._rows[table] += children

    def take(self) -> dict[str, list[tuple[Any, ...]]]:
        """The rows added since the last ``take()``."""
        rows, self._rows = self._rows, _empty_rows()
        return rows

    async def copy(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        """COPY rows (from ``take()``) into the load tables."""
        try:
            cursor = self.conn.cursor()
            for table, table_rows in rows.items():
                if not table_rows:
                    continue
                if table in self._has:
                    self._has[table] = True
                self.rows += len(table_rows)
                statement = sql.SQL("COPY {} FROM STDIN").format(_load(table))
                async with cursor.copy(statement) as copy:
                    for row in table_rows:
                        await copy.write_row(row)
        except psycopg.OperationalError as exc:
            raise TransientError(f"loading the rebuild's rows failed: {exc}") from exc

    # --- replace ----------------------------------------------------------------------------

    async def replace(self) -> ReloadCounts:
        """Empty the projection's tables and fill them from the load tables, in one
        transaction (see the module docstring)."""
        conn = self.conn
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PROJECTION_LOCK,))
                # Index builds sort in memory up to this (the default is 64 MB).
                await conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
                await conn.execute(
                    sql.SQL("TRUNCATE {}").format(
                        sql.SQL(", ").join(sql.Identifier(t) for t in PROJECTION_TABLES)
                    )
                )
                await self._reduce()
                await apply_staged(
                    conn,
                    revocations=self._has["revocations"],
                    snapshots=self._has["snapshots"],
                    decisions=self._has["decisions"],
                    deliveries=self._has["deliveries"],
                    children=False,  # inserted by _reduce
                )
                counts = await (
                    await conn.execute(
                        "SELECT (SELECT count(*) FROM timeline_sources), "
                        "(SELECT count(*) FROM timeline_studies), "
                        "(SELECT count(*) FROM timeline_entries)"
                    )
                ).fetchone()
        except psycopg.OperationalError as exc:
            raise TransientError(f"replacing the timeline tables failed: {exc}") from exc
        assert counts is not None
        return ReloadCounts(*(int(c) for c in counts))

    async def _reduce(self) -> None:
        """The load tables reduced into the staging tables: one row per natural key."""
        conn = self.conn

        def columns(table: str, alias: str = "") -> sql.Composable:
            prefix = [alias] if alias else []
            return sql.SQL(", ").join(sql.Identifier(*prefix, c) for c in self._columns[table])

        # The greatest snapshot of each source, the first loaded among equals (as the fold
        # keeps the one it holds), and exactly its children.
        await conn.execute(
            "CREATE TEMP TABLE timeline_load_winners ON COMMIT DROP AS "
            "SELECT DISTINCT ON (u, s) load_n FROM timeline_load_snapshots "
            "ORDER BY u, s, v DESC, lra DESC, r DESC, load_n"
        )
        await conn.execute(
            sql.SQL(
                "INSERT INTO timeline_stage_snapshots SELECT {cols} FROM timeline_load_snapshots x "
                "JOIN timeline_load_winners w ON w.load_n = x.load_n"
            ).format(cols=columns("snapshots", "x"))
        )
        # The children go straight into the (emptied) tables, their indexes dropped and made
        # again after: 100,000 instance rows took 1.3 s with the primary key in place and
        # 0.7 s this way (0.44 s to insert, 0.27 s to build the index by sorting).
        for table in _CHILDREN:
            target = sql.Identifier(f"timeline_{table}")
            remake = await _drop_indexes(conn, f"timeline_{table}")
            await conn.execute(
                sql.SQL(
                    "INSERT INTO {target} SELECT {cols} FROM {load} x "
                    "JOIN timeline_load_winners w ON w.load_n = x.load_n"
                ).format(target=target, cols=columns(table, "x"), load=_load(table))
            )
            for statement in remake:
                await conn.execute(statement)
        # The greatest decision: its snapshot's key, then deny before permit, then decided_by.
        await conn.execute(
            sql.SQL(
                "INSERT INTO timeline_stage_decisions SELECT DISTINCT ON (u, s) {cols} "
                "FROM timeline_load_decisions "
                "ORDER BY u, s, v DESC, lra DESC, r DESC, permitted, by DESC"
            ).format(cols=columns("decisions"))
        )
        await conn.execute(
            "INSERT INTO timeline_stage_revocations "
            "SELECT p, c, min(at) FROM timeline_load_revocations GROUP BY p, c"
        )
        await conn.execute(
            "INSERT INTO timeline_stage_deliveries SELECT u, dest, endpoint, max(v), max(at) "
            "FROM timeline_load_deliveries GROUP BY u, dest, endpoint"
        )


async def _drop_indexes(conn: psycopg.AsyncConnection[Any], table: str) -> list[str]:
    """Drop ``table``'s indexes (and the key constraints they back); returns the statements
    that make them again, as the catalog defines them (the migrations stay their one source)."""
    cursor = await conn.execute(
        """
        SELECT format('ALTER TABLE %%I DROP CONSTRAINT %%I', %(table)s::text, c.conname),
               format('ALTER TABLE %%I ADD CONSTRAINT %%I %%s', %(table)s::text, c.conname,
                      pg_get_constraintdef(c.oid))
        FROM pg_constraint c
        WHERE c.conrelid = %(table)s::regclass AND c.contype IN ('p', 'u')
        UNION ALL
        SELECT format('DROP INDEX %%s', i.indexrelid::regclass), pg_get_indexdef(i.indexrelid)
        FROM pg_index i
        WHERE i.indrelid = %(table)s::regclass
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
        """,
        {"table": table},
    )
    pairs = await cursor.fetchall()
    for drop, _ in pairs:
        await conn.execute(drop)
    return [make for _, make in pairs]
