"""The rebuild's bulk path into the timeline read model: load every event's rows, then replace
the projection's tables in one transaction (``services/timeline/entrypoints/rebuild.py``).

The running projection applies a batch of a few thousand events per transaction with upserts
and refreshes the studies each batch touched (``store.py``). Replaying a whole history that way
inserts a study's instance rows twice (its snapshot arrives in study-received and again in its
timeline decision, usually in another batch) and refreshes each study once per batch that
touched it. A rebuild starts from empty tables, so it does it once:

1. :class:`Reload` (the rebuild's own session) takes the rebuild lock and makes the load
   tables: UNLOGGED tables shaped like the staging tables, without keys or indexes.
2. Each loading process's :class:`Loader` turns events into rows (:meth:`Loader.add`) and COPYs
   them in chunks into the load tables (:meth:`Loader.copy`). A snapshot no greater than one
   that loader already loaded for its source (``snapshot_key``) is not loaded again, nor are
   its children; each loaded snapshot gets a serial ``load_n`` that its children rows carry.
3. :meth:`Reload.replace`, in ONE transaction under ``PROJECTION_LOCK``: empties the
   projection's tables, reduces the load tables to one row per natural key into the staging
   tables with the orders ``ProjectionBatch`` folds by (greatest snapshot with its own
   children, greatest decision, earliest revocation, greatest delivery version and time), and
   applies them with the projection's own statements (``store.apply_staged``), which also
   derive every study and entry row. The result is what applying all events as one batch
   gives, which is what applying them in any batches gives (see ``store.py``).
4. Leaving the ``Reload`` block drops the load tables.

Until that transaction commits, the API reads the tables as they were; it waits for the replace
step's table lock, not for the load. If anything fails before the commit, nothing changed; load
tables a dead rebuild left behind are dropped by the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from services.timeline.adapters.store import (
    PROJECTION_LOCK,
    PROJECTION_TABLES,
    STAGING_TABLES,
    SnapshotKey,
    SourceKey,
    apply_staged,
    children_rows,
    configure_connection,
    decision_row,
    snapshot_key,
    snapshot_row,
)
from shared.errors import FatalError, TransientError
from shared.events import (
    ConsentChecked,
    ConsentRevoked,
    Delivered,
    Event,
    Purpose,
    StudyReceived,
    StudySnapshot,
)
from shared.logging import get_logger

log = get_logger(__name__)

# pg_advisory_lock key held by a rebuild's session: one rebuild at a time (its load tables).
REBUILD_LOCK = 0x7153_7A12
# Snapshot keys remembered to skip reloading a snapshot (and its children): a source costs a
# few hundred bytes here, so past this many the memory is cleared. That only costs rows: the
# replace step keeps the greatest snapshot of each source however often it was loaded.
REMEMBERED_SOURCES = 500_000

_CHILDREN = ("series", "instances", "reports")
_KEYED = ("snapshots", *_CHILDREN)  # load tables whose rows carry the snapshot's serial load_n
_PLAIN = ("decisions", "revocations", "deliveries")


def _empty_rows() -> dict[str, list[tuple[Any, ...]]]:
    return {table: [] for table in (*_KEYED, *_PLAIN)}


async def _columns(
    conn: psycopg.AsyncConnection[Any], prefix: str
) -> dict[str, list[tuple[str, int]]]:
    """The columns (name, type OID), in order, of the tables ``prefix`` + snapshots, series,
    ... (the staging or the load tables), from the catalog in one round trip."""
    tables = [*_KEYED, *_PLAIN]
    cursor = await conn.execute(
        "SELECT t.name, a.attname, a.atttypid::int "
        "FROM unnest(%s::text[]) AS t(name) "
        "JOIN pg_attribute a ON a.attrelid = (%s || t.name)::regclass "
        "WHERE a.attnum > 0 AND NOT a.attisdropped ORDER BY t.name, a.attnum",
        (tables, prefix),
    )
    columns: dict[str, list[tuple[str, int]]] = {table: [] for table in tables}
    for table, name, oid in await cursor.fetchall():
        columns[table].append((name, oid))
    return columns


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


class Loader:
    """One loading process's connection: turns events into rows and COPYs them into the load
    tables (which :class:`Reload` made).

    ``async with Loader(conninfo, index, count) as loader:``, ``loader.add(event)`` for every
    event (in any order), ``await loader.copy(loader.take())`` now and then. ``index`` of
    ``count`` loaders: their snapshot serials never collide. Raises :class:`TransientError`
    when PostgreSQL is away.
    """

    def __init__(self, conninfo: str, index: int = 0, count: int = 1) -> None:
        self._conninfo = conninfo
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._loaded: dict[SourceKey, SnapshotKey] = {}
        self._serial = index + 1
        self._step = count
        self._rows = _empty_rows()
        self._types: dict[str, list[int]] = {}
        self.rows = 0

    async def __aenter__(self) -> Loader:
        try:
            self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            columns = await _columns(self._conn, "timeline_load_")
            self._types = {table: [oid for _, oid in cols] for table, cols in columns.items()}
        except psycopg.OperationalError as exc:
            await self.__aexit__()
            raise TransientError(f"PostgreSQL unavailable for the rebuild: {exc}") from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

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
            rows["decisions"].append(decision_row(event))
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
        serial, self._serial = self._serial, self._serial + self._step
        self._rows["snapshots"].append((*snapshot_row(study), serial))
        for table, children in children_rows(study, serial).items():
            self._rows[table] += children

    def take(self) -> dict[str, list[tuple[Any, ...]]]:
        """The rows added since the last ``take()``."""
        rows, self._rows = self._rows, _empty_rows()
        return rows

    async def copy(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        """COPY rows (from ``take()``) into the load tables."""
        if self._conn is None:
            raise RuntimeError("Loader is used outside its `async with` block")
        try:
            cursor = self._conn.cursor()
            for table, table_rows in rows.items():
                if not table_rows:
                    continue
                self.rows += len(table_rows)
                # Binary: half the CPU per row of text here (1.4 against 2.9 us for an
                # instance row), and less parsing for the server.
                statement = sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(_load(table))
                async with cursor.copy(statement) as copy:
                    copy.set_types(self._types[table])
                    for row in table_rows:
                        await copy.write_row(row)
        except psycopg.OperationalError as exc:
            raise TransientError(f"loading the rebuild's rows failed: {exc}") from exc


class RebuildRefused(FatalError):
    """The rebuild would race a running projection worker or another rebuild."""


class Reload:
    """The rebuild's own session: holds the rebuild lock, makes the load tables (UNLOGGED,
    so every loading process's connection can COPY into them without writing WAL), replaces
    the projection's tables from them, and drops them.

    ``async with Reload(conninfo) as reload:``, loaders fill the tables, then
    ``await reload.replace()``; leaving the block without it changes nothing. Raises
    :class:`RebuildRefused` when another rebuild holds the lock, :class:`TransientError` when
    PostgreSQL is away.
    """

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._columns: dict[str, list[str]] = {}

    async def __aenter__(self) -> Reload:
        try:
            self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            await configure_connection(self._conn)
            row = await (
                await self._conn.execute("SELECT pg_try_advisory_lock(%s)", (REBUILD_LOCK,))
            ).fetchone()
            if not (row and row[0]):
                raise RebuildRefused("another timeline rebuild is running")
            await self._conn.execute(STAGING_TABLES)
            # Left by a rebuild that died: ours to drop, as we hold the lock.
            await self._drop_load_tables()
            columns = await _columns(self._conn, "timeline_stage_")
            self._columns = {table: [name for name, _ in cols] for table, cols in columns.items()}
            for table in (*_KEYED, *_PLAIN):
                extra = sql.SQL(", load_n bigint") if table in _KEYED else sql.SQL("")
                await self._conn.execute(
                    sql.SQL("CREATE UNLOGGED TABLE {} (LIKE {}{})").format(
                        _load(table), _stage(table), extra
                    )
                )
        except psycopg.OperationalError as exc:
            await self._close()
            raise TransientError(f"PostgreSQL unavailable for the rebuild: {exc}") from exc
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._conn is not None and not self._conn.closed:
                await self._drop_load_tables()
        except psycopg.Error as exc:  # dropped by the next rebuild then
            log.warning("the rebuild's load tables were not dropped", reason=str(exc))
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._conn is not None:
            await self._conn.close()  # also releases the rebuild lock
            self._conn = None

    async def _drop_load_tables(self) -> None:
        await self.conn.execute(
            sql.SQL("DROP TABLE IF EXISTS {}").format(
                sql.SQL(", ").join(_load(t) for t in (*_KEYED, *_PLAIN))
            )
        )

    @property
    def conn(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None:
            raise RuntimeError("Reload is used outside its `async with` block")
        return self._conn

    async def _holds_rows(self, table: str) -> bool:
        statement = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(_load(table))
        row = await (await self.conn.execute(statement)).fetchone()
        return bool(row and row[0])

    # --- replace ----------------------------------------------------------------------------

    async def replace(self) -> ReloadCounts:
        """Empty the projection's tables and fill them from the load tables, in one
        transaction (see the module docstring)."""
        conn = self.conn
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PROJECTION_LOCK,))
                # Index builds, and the reductions' sorts, in memory up to these (the
                # defaults are 64 MB and 4 MB): one session, used once.
                await conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
                await conn.execute("SET LOCAL work_mem = '64MB'")
                await conn.execute(
                    sql.SQL("TRUNCATE {}").format(
                        sql.SQL(", ").join(sql.Identifier(t) for t in PROJECTION_TABLES)
                    )
                )
                await self._reduce()
                # The derived tables' other indexes (not their keys: the upserts' arbiters)
                # are made again once they are filled.
                remake = [
                    statement
                    for table in ("timeline_sources", "timeline_entries")
                    for statement in await _drop_indexes(conn, table, keys=False)
                ]
                await apply_staged(
                    conn,
                    revocations=await self._holds_rows("revocations"),
                    snapshots=await self._holds_rows("snapshots"),
                    decisions=await self._holds_rows("decisions"),
                    deliveries=await self._holds_rows("deliveries"),
                    children=False,  # inserted by _reduce
                )
                for statement in remake:
                    await conn.execute(statement)
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


async def _drop_indexes(
    conn: psycopg.AsyncConnection[Any], table: str, *, keys: bool = True
) -> list[str]:
    """Drop ``table``'s indexes (and the key constraints they back; with ``keys=False`` only
    the indexes that back none); returns the statements that make them again, as the catalog
    defines them (the migrations stay their one source)."""
    cursor = await conn.execute(
        """
        SELECT format('ALTER TABLE %%I DROP CONSTRAINT %%I', %(table)s::text, c.conname),
               format('ALTER TABLE %%I ADD CONSTRAINT %%I %%s', %(table)s::text, c.conname,
                      pg_get_constraintdef(c.oid))
        FROM pg_constraint c
        WHERE c.conrelid = %(table)s::regclass AND c.contype IN ('p', 'u') AND %(keys)s
        UNION ALL
        SELECT format('DROP INDEX %%s', i.indexrelid::regclass), pg_get_indexdef(i.indexrelid)
        FROM pg_index i
        WHERE i.indrelid = %(table)s::regclass
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
        """,
        {"table": table, "keys": keys},
    )
    pairs = await cursor.fetchall()
    for drop, _ in pairs:
        await conn.execute(drop)
    return [make for _, make in pairs]
