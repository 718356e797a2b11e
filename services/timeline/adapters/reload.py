"""The rebuild's bulk path into the timeline read model: build the projection's tables anew
beside the live ones, then swap them in (``services/timeline/entrypoints/rebuild.py``).

The running projection applies a batch of a few thousand events per transaction with upserts
and refreshes the studies each batch touched (``store.py``). Replaying a whole history that way
inserts a study's instance rows twice (its snapshot arrives in study-received and again in its
timeline decision, usually in another batch) and refreshes each study once per batch that
touched it. A rebuild starts from nothing, so it does each once, out of the API's way:

1. :class:`Reload` (the rebuild's own session) takes the rebuild lock and makes the schema
   ``timeline_rebuild``: a table for each projection table, shaped like the live one (columns,
   defaults, checks; indexes come later), and UNLOGGED load tables for snapshots, decisions,
   revocations and deliveries, shaped like the staging tables.
2. Each loading process's :class:`Loader` turns events into rows (:meth:`Loader.add`) and COPYs
   them in chunks (:meth:`Loader.copy`): snapshots, decisions, revocations and deliveries into
   the load tables, series, instances and reports straight into the new tables, where they
   stay. A snapshot no greater than one that loader already loaded for its source
   (``snapshot_key``) is not loaded again, nor are its children; each loaded snapshot gets a
   serial ``load_n`` that its children rows carry (a column the new children tables have
   until step 3 drops it).
3. :meth:`Reload.build`, on two sessions, each taking the next step whose inputs are ready:
   keeps the greatest snapshot of each source, the first loaded among equals (as the fold
   keeps the one it holds), deletes the others and their children and drops ``load_n``;
   writes the other new tables with one plain INSERT each, into empty tables without
   indexes: revocations (the earliest of each), deliveries (greatest version and time),
   sources (the kept snapshot with its greatest decision, withdrawn if its consent was
   revoked) reduced with the orders ``ProjectionBatch`` folds by, then every study and entry
   row set-based (``store.DERIVE_STUDIES``, ``store.DERIVE_ENTRIES``); and makes the indexes,
   with the names the live ones have, each once the steps reading its table are done (the
   children tables' keys, the instances' the largest, meanwhile). The result is what
   applying all events as one batch gives, which is what applying them in any batches gives
   (see ``store.py``);
   ``tests/integration/timeline/test_rebuild_equivalence.py`` holds the two paths equal.
4. :meth:`Reload.swap`, in ONE short transaction under ``PROJECTION_LOCK``: moves the live
   tables aside (schema ``timeline_retired``) and the new ones into their place, with the live
   tables' grants (on the tables and on their columns).
5. Leaving the ``Reload`` block drops the schemas ``timeline_rebuild`` and
   ``timeline_retired``: the replaced tables' files go after the swap, not during it.

The API reads the live tables throughout; it waits only for the swap's locks (milliseconds).
If anything fails before the swap commits, nothing changed; the schemas a dead rebuild left
behind are dropped by the next one. The rebuild's role must own the
projection tables (it drops them), as the role that ran the migrations does, or be a member of
their owner (an operator's role): the swapped-in tables are then given to that owner, with the
live tables' grants, so the API and the worker see no change.

Why not empty the live tables and fill them in one transaction (as until 2026-11-27): the API
waited 6-12 s for that transaction's locks, and every instance row was written twice (into a
load table, then into the live one), on the single core one transaction uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from services.timeline.adapters.store import (
    DERIVE_ENTRIES,
    DERIVE_STUDIES,
    PROJECTION_LOCK,
    PROJECTION_TABLES,
    STAGING_TABLES,
    SnapshotKey,
    SnapshotRef,
    SourceKey,
    children_rows,
    configure_connection,
    database_error,
    decision_row,
    decision_row_of,
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

Connection = psycopg.AsyncConnection[Any]

# pg_advisory_lock key held by a rebuild's session: one rebuild at a time (its schema).
REBUILD_LOCK = 0x7153_7A12
# Where the swap moves the replaced tables, dropped once it committed.
RETIRED_SCHEMA = "timeline_retired"
# Where a rebuild builds the new tables and keeps its load tables (shaped like the staging
# tables of ``store.py``, which the rows of ``snapshot_row`` and ``decision_row`` fill).
SCHEMA = "timeline_rebuild"
# Snapshot keys remembered to skip reloading a snapshot (and its children): a source costs a
# few hundred bytes here, so past this many the memory is cleared. That only costs rows: the
# build step keeps the greatest snapshot of each source however often it was loaded.
REMEMBERED_SOURCES = 500_000
# A swap that loses a deadlock to an API reader (it locks eight tables), or waits longer than
# this for a lock (the API's reads queue behind it meanwhile), is tried again, a few times.
SWAP_ATTEMPTS = 3
SWAP_LOCK_TIMEOUT = "2s"

# The rebuild's sessions (but the swap) do not wait for their commits to reach the disk: until
# the swap commits, the new tables are nobody's, and a server crash before it fails the
# rebuild, whose schema the next one drops. The swap's commit flushes the log up to itself.
_NO_FLUSH_WAIT = "SET synchronous_commit = off"

_CHILDREN = ("series", "instances", "reports")
_KEYED = ("snapshots", *_CHILDREN)  # rows carrying the snapshot's serial load_n
_PLAIN = ("decisions", "revocations", "deliveries")
_LOADED = ("snapshots", *_PLAIN)  # the load tables proper; children go to the new tables
_CHILD_TABLES = frozenset(f"timeline_{table}" for table in _CHILDREN)


# A source's row: its greatest snapshot (the one ``_keep_greatest_snapshots`` kept) with its
# greatest timeline decision (its snapshot's key, then deny before permit, then decided_by), a
# permit withdrawn when its consent was revoked; a decision for a source of no snapshot is not
# kept (the projection's update finds no row for it).
_SOURCES = """
INSERT INTO {sources} (
    study_instance_uid, sender_ura, version, last_received_at, recipient_ura, first_received_at,
    patient_pseudonym, accession_number, study_date, study_time, study_description,
    institution_name, modalities, number_of_series, number_of_instances, number_of_images,
    decision_version, decision_last_received_at, decision_recipient_ura, permitted, basis,
    decided_by, decision_patient, withdrawn)
SELECT x.u, x.s, x.v, x.lra, x.r, x.fra, x.p, x.acc, x.d, x.tm, x.descr, x.inst,
       CASE WHEN x.m = '' THEN '{{}}'::text[] ELSE string_to_array(x.m, E'\\\\') END,
       x.ns, x.ni, x.nim, d.v, d.lra, d.r, d.permitted, d.basis, d.by, d.p,
       COALESCE(d.permitted AND EXISTS (
           SELECT 1 FROM {revocations} rv
           WHERE rv.patient_pseudonym = d.p AND rv.consent_id = d.by), false)
FROM {snapshots} x
LEFT JOIN (
    SELECT DISTINCT ON (u, s) * FROM {decisions}
    ORDER BY u, s, v DESC, lra DESC, r DESC, permitted, by DESC
) d ON d.u = x.u AND d.s = x.s
"""


def _empty_rows() -> dict[str, list[tuple[Any, ...]]]:
    return {table: [] for table in (*_KEYED, *_PLAIN)}


def _target(table: str) -> sql.Identifier:
    """Where a loader COPYs the rows of ``table`` (a key of ``Loader.take()``)."""
    return sql.Identifier(SCHEMA, f"timeline_{table}" if table in _CHILDREN else f"load_{table}")


def _load(table: str) -> sql.Identifier:
    return sql.Identifier(SCHEMA, f"load_{table}")


def _new(table: str) -> sql.Identifier:
    """The new copy of projection table ``table``."""
    return sql.Identifier(SCHEMA, table)


def _stage(table: str) -> sql.Identifier:
    return sql.Identifier(f"timeline_stage_{table}")


async def _column_types(conn: Connection) -> dict[str, list[int]]:
    """The column type OIDs, in order, of every table a loader COPYs into."""
    tables = [*_KEYED, *_PLAIN]
    cursor = await conn.execute(
        "SELECT t.name, a.atttypid::int "
        "FROM unnest(%s::text[], %s::text[]) AS t(name, relation) "
        "JOIN pg_attribute a ON a.attrelid = t.relation::regclass "
        "WHERE a.attnum > 0 AND NOT a.attisdropped ORDER BY t.name, a.attnum",
        (tables, [_target(t).as_string(conn) for t in tables]),
    )
    types: dict[str, list[int]] = {table: [] for table in tables}
    for table, oid in await cursor.fetchall():
        types[table].append(oid)
    return types


@dataclass(frozen=True)
class ReloadCounts:
    """What the swapped-in tables hold."""

    sources: int
    studies: int
    entries: int


class Loader:
    """One loading process's connection: turns events into rows and COPYs them into the
    rebuild's tables (which :class:`Reload` made).

    ``async with Loader(conninfo, index, count) as loader:``, ``loader.add(event)`` for every
    event (in any order), ``await loader.copy(loader.take())`` now and then. ``index`` of
    ``count`` loaders: their snapshot serials never collide. Raises :class:`TransientError`
    when PostgreSQL is away.
    """

    def __init__(self, conninfo: str, index: int = 0, count: int = 1) -> None:
        self._conninfo = conninfo
        self._conn: Connection | None = None
        self._loaded: dict[SourceKey, SnapshotKey] = {}
        self._serial = index + 1
        self._step = count
        self._rows = _empty_rows()
        self._types: dict[str, list[int]] = {}
        self.rows = 0

    async def __aenter__(self) -> Loader:
        try:
            self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            await self._conn.execute(_NO_FLUSH_WAIT)
            self._types = await _column_types(self._conn)
        except psycopg.OperationalError as exc:
            await self.__aexit__()
            raise TransientError(
                f"PostgreSQL unavailable for the rebuild: {database_error(exc)}"
            ) from None
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def add(self, event: Event) -> None:
        """Turn one event into rows at once, so its decoded model is freed (holding a chunk of
        decoded 10-instance snapshots made decoding them 1.5-2x as slow: fresh memory for
        every one); ``take()`` hands the rows over for ``copy()``."""
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

    def add_decision(self, study: SnapshotRef, decision: Any) -> None:
        """A consent-checked decoded without its snapshot, which is one added before (see
        ``rebuild._Decoding``): ``study`` its ``snapshot_ref``, ``decision`` its other fields
        (purpose, decision, basis, decided_by)."""
        if decision.purpose is Purpose.TIMELINE:
            self._rows["decisions"].append(
                decision_row_of(study, decision.decision, decision.basis, decision.decided_by)
            )

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
        """COPY rows (from ``take()``) into the rebuild's tables."""
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
                statement = sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(_target(table))
                async with cursor.copy(statement) as copy:
                    copy.set_types(self._types[table])
                    for row in table_rows:
                        await copy.write_row(row)
        except psycopg.OperationalError as exc:
            raise TransientError(
                f"loading the rebuild's rows failed: {database_error(exc)}"
            ) from None


class RebuildRefused(FatalError):
    """The rebuild would race a running projection worker or another rebuild."""


@dataclass(frozen=True)
class _Index:
    """An index of a live projection table, and the statement that makes it (same name, same
    definition; with its constraint if it backs one) on the table's new copy."""

    table: str
    make: sql.Composable


@dataclass(frozen=True)
class _Step:
    """A part of the build, run on whichever build session is free once the steps named in
    ``after`` are done."""

    name: str
    after: tuple[str, ...]
    run: Callable[[Connection], Awaitable[None]]


async def _run_steps(steps: list[_Step], sessions: list[Connection]) -> None:
    """Run ``steps`` on ``sessions`` at once: each session takes the first step, in list
    order, whose ``after`` steps are done. The first failure stops the others and is raised."""
    done: set[str] = set()
    pending = list(steps)
    running = 0
    changed = asyncio.Condition()

    async def work(conn: Connection) -> None:
        nonlocal running
        while True:
            async with changed:
                while True:
                    if not pending:
                        return
                    step = next((s for s in pending if done.issuperset(s.after)), None)
                    if step is not None:
                        break
                    if not running:
                        raise RuntimeError(f"build steps wait for steps that never run: {pending}")
                    await changed.wait()
                pending.remove(step)
                running += 1
            await step.run(conn)
            async with changed:
                running -= 1
                done.add(step.name)
                changed.notify_all()

    workers = [asyncio.create_task(work(conn)) for conn in sessions]
    try:
        finished, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    for worker in finished:
        worker.result()


async def _live_indexes(conn: Connection, live: str) -> list[_Index]:
    """The projection tables' indexes as the catalog defines them: the migrations stay their
    one source."""
    cursor = await conn.execute(
        """
        SELECT t.relname, i.relname, pg_get_indexdef(x.indexrelid), x.indisunique,
               c.conname, pg_get_constraintdef(c.oid)
        FROM pg_index x
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_class i ON i.oid = x.indexrelid
        LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = t.oid
        WHERE t.relnamespace = %s::regnamespace AND t.relname = ANY(%s)
        ORDER BY t.relname, i.relname
        """,
        (live, list(PROJECTION_TABLES)),
    )
    indexes = []
    for table, name, definition, unique, constraint, constraint_def in await cursor.fetchall():
        target = _new(table)
        if constraint is not None:
            make: sql.Composable = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                target, sql.Identifier(constraint), sql.SQL(constraint_def)
            )
        else:
            # "CREATE [UNIQUE] INDEX name ON [ONLY] schema.table USING method (...) ..."
            _, using = definition.split(" USING ", 1)
            make = sql.SQL("CREATE {}INDEX {} ON {} USING {}").format(
                sql.SQL("UNIQUE " if unique else ""), sql.Identifier(name), target, sql.SQL(using)
            )
        indexes.append(_Index(table, make))
    return indexes


class Reload:
    """The rebuild's own session: holds the rebuild lock, makes the schema the new tables are
    built in, builds them (:meth:`build`), swaps them in (:meth:`swap`) and drops the schema;
    :meth:`replace` is the two in a row.

    ``async with Reload(conninfo) as reload:``, loaders fill the tables, then
    ``await reload.build()`` and ``await reload.swap()``; leaving the block before the swap
    changes nothing. Raises :class:`RebuildRefused` when another rebuild holds the lock,
    :class:`TransientError` when PostgreSQL is away.
    """

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._conn: Connection | None = None
        self._live = "public"  # the live tables' schema (as the search path finds them)
        self._indexes: list[_Index] = []
        self._built = False
        # Whether leaving the block dropped the rebuild's schema and the replaced tables.
        self.dropped = False

    async def __aenter__(self) -> Reload:
        try:
            self._conn = await self._connect()
            row = await (
                await self._conn.execute("SELECT pg_try_advisory_lock(%s)", (REBUILD_LOCK,))
            ).fetchone()
            if not (row and row[0]):
                raise RebuildRefused("another timeline rebuild is running")
            await self._conn.execute(STAGING_TABLES)
            # Left by a rebuild that died: ours to drop, as we hold the lock.
            await self._drop_schema()
            await self._make_schema()
        except psycopg.OperationalError as exc:
            await self._close()
            raise TransientError(
                f"PostgreSQL unavailable for the rebuild: {database_error(exc)}"
            ) from None
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._conn is not None and not self._conn.closed:
                await self._drop_schema()
                self.dropped = True
        except psycopg.Error as exc:  # dropped by the next rebuild then
            log.warning("the rebuild's schema was not dropped", reason=database_error(exc))
        finally:
            await self._close()

    async def _connect(self) -> Connection:
        conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        try:
            await configure_connection(conn)
            # Index builds and the reductions' sorts in memory up to these (the defaults are
            # 64 MB and 4 MB): a session used once.
            await conn.execute("SET maintenance_work_mem = '256MB'")
            await conn.execute("SET work_mem = '64MB'")
            await conn.execute(_NO_FLUSH_WAIT)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _close(self) -> None:
        if self._conn is not None:
            await self._conn.close()  # also releases the rebuild lock
            self._conn = None

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("Reload is used outside its `async with` block")
        return self._conn

    async def _drop_schema(self) -> None:
        """Drop the rebuild's schema and the tables a swap replaced."""
        await self.conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {}, {} CASCADE").format(
                sql.Identifier(SCHEMA), sql.Identifier(RETIRED_SCHEMA)
            )
        )

    async def _make_schema(self) -> None:
        conn = self.conn
        row = await (
            await conn.execute(
                "SELECT relnamespace::regnamespace::text FROM pg_class "
                "WHERE oid = 'timeline_sources'::regclass"
            )
        ).fetchone()
        assert row is not None
        self._live = row[0]
        await _refuse_unless_owner(conn, self._live)
        self._indexes = await _live_indexes(conn, self._live)
        async with conn.transaction():
            await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
            for table in PROJECTION_TABLES:
                # Columns, defaults, generated columns, checks, comments; the indexes are
                # made once the rows are in.
                await conn.execute(
                    sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL EXCLUDING INDEXES)").format(
                        _new(table), sql.Identifier(self._live, table)
                    )
                )
            for table in _CHILDREN:
                await conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN load_n bigint").format(_target(table))
                )
            for table in _LOADED:
                extra = sql.SQL(", load_n bigint") if table in _KEYED else sql.SQL("")
                await conn.execute(
                    sql.SQL("CREATE UNLOGGED TABLE {} (LIKE {}{})").format(
                        _load(table), _stage(table), extra
                    )
                )

    # --- build ------------------------------------------------------------------------------

    async def build(self) -> None:
        """Turn what the loaders loaded into the complete new tables (see the module
        docstring); the live tables are not touched."""
        try:
            second = await self._connect()
            try:
                await _run_steps(self._build_steps(), [self.conn, second])
            finally:
                await second.close()
        except psycopg.OperationalError as exc:
            raise TransientError(
                f"building the timeline tables failed: {database_error(exc)}"
            ) from None
        self._built = True

    @staticmethod
    async def _keep_greatest_snapshots(conn: Connection) -> None:
        """Of each source's loaded snapshots the greatest, the first loaded among equals (as
        the fold keeps the one it holds): the others and their children deleted (usually
        none), ``load_n`` dropped from the children tables."""
        await conn.execute(
            sql.SQL(
                "CREATE UNLOGGED TABLE {} AS "
                "SELECT DISTINCT ON (u, s) load_n FROM {} "
                "ORDER BY u, s, v DESC, lra DESC, r DESC, load_n"
            ).format(_load("winners"), _load("snapshots"))
        )
        row = await (
            await conn.execute(
                sql.SQL("SELECT (SELECT count(*) FROM {}) > (SELECT count(*) FROM {})").format(
                    _load("snapshots"), _load("winners")
                )
            )
        ).fetchone()
        if row and row[0]:
            for table in _KEYED:
                await conn.execute(
                    sql.SQL(
                        "DELETE FROM {} x WHERE NOT EXISTS "
                        "(SELECT 1 FROM {} w WHERE w.load_n = x.load_n)"
                    ).format(_target(table), _load("winners"))
                )
        for table in _CHILDREN:
            # Only marks the column dropped: the rows keep its 8 bytes until rewritten.
            await conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN load_n").format(_target(table)))

    def _build_steps(self) -> list[_Step]:
        """The load tables reduced to one row per natural key, with the orders
        ``ProjectionBatch`` folds by, into the new tables; every study and entry row derived
        from them; the indexes. The tables are empty and have no indexes yet, so each is one
        plain INSERT: what the projection's upserts and updates (``store.apply_staged``) give
        when every event is in one batch. In the order a free session takes them: the
        longest chain (sources, then studies and entries) first; an index once every step
        reading its table is done (making a key locks its table)."""

        def statement(query: sql.Composable) -> Callable[[Connection], Awaitable[None]]:
            async def run(conn: Connection) -> None:
                await conn.execute(query)

            return run

        async def studies_and_entries(conn: Connection) -> None:
            async with conn.transaction():
                # The statements name the tables unqualified: the new ones here.
                await conn.execute(
                    sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(SCHEMA))
                )
                await conn.execute(DERIVE_STUDIES)
                await conn.execute(DERIVE_ENTRIES)

        steps = [
            _Step("greatest snapshots", (), self._keep_greatest_snapshots),
            # The earliest revocation of each (patient, consent).
            _Step("revocations", (), statement(
                sql.SQL(
                    "INSERT INTO {} (patient_pseudonym, consent_id, revoked_at) "
                    "SELECT p, c, min(at) FROM {} GROUP BY p, c"
                ).format(_new("timeline_revocations"), _load("revocations"))
            )),
            # The greatest delivery version and time of each (study, destination, endpoint).
            _Step("deliveries", (), statement(
                sql.SQL(
                    "INSERT INTO {} (study_instance_uid, destination_ura, endpoint_id, "
                    "study_version, delivered_at) "
                    "SELECT u, dest, endpoint, max(v), max(at) FROM {} "
                    "GROUP BY u, dest, endpoint"
                ).format(_new("timeline_deliveries"), _load("deliveries"))
            )),
            _Step("sources", ("greatest snapshots", "revocations"), statement(
                sql.SQL(_SOURCES).format(
                    sources=_new("timeline_sources"),
                    snapshots=_load("snapshots"),
                    decisions=_load("decisions"),
                    revocations=_new("timeline_revocations"),
                )
            )),
            _Step("studies and entries", ("sources", "deliveries"), studies_and_entries),
        ]  # fmt: skip
        # The instances' key, the largest index there is, first.
        for index in sorted(self._indexes, key=lambda i: i.table != "timeline_instances"):
            if index.table in _CHILD_TABLES:
                after: tuple[str, ...] = ("greatest snapshots",)
            elif index.table == "timeline_revocations":
                after = ("sources",)
            else:
                after = ("studies and entries",)
            steps.append(_Step(f"index of {index.table}", after, statement(index.make)))
        return steps

    # --- swap -------------------------------------------------------------------------------

    async def swap(self) -> ReloadCounts:
        """Replace the live projection tables with the built ones, in one short transaction;
        the live tables' grants (table and column) are given on the new ones."""
        if not self._built:
            raise RuntimeError("swap() before build()")
        conn = self.conn
        live, retired = sql.Identifier(self._live), sql.Identifier(RETIRED_SCHEMA)
        for attempt in range(1, SWAP_ATTEMPTS + 1):
            try:
                async with conn.transaction():
                    # Waiting for a lock, the swap would queue every API read behind it.
                    await conn.execute(f"SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'")
                    # Durable before the rebuild moves the projection's group past what it
                    # loaded; its flush takes all the rebuild wrote before with it.
                    await conn.execute("SET LOCAL synchronous_commit = on")
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PROJECTION_LOCK,))
                    grants = await _grants(conn, self._live)
                    owners = await _foreign_owners(conn, self._live)
                    # Moved aside, not dropped: dropping gigabytes of files at commit kept
                    # the API waiting for seconds (3.9 s after bench-timeline's fill). The
                    # Reload block's end drops them, out of the API's way.
                    await conn.execute(sql.SQL("CREATE SCHEMA {}").format(retired))
                    for table in PROJECTION_TABLES:
                        await conn.execute(
                            sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                                sql.Identifier(self._live, table), retired
                            )
                        )
                        await conn.execute(
                            sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(_new(table), live)
                        )
                    for grant in grants:
                        await conn.execute(grant)
                    # A rebuild run by a member of the owning role (as _refuse_unless_owner
                    # allows) made the new tables its own: they go back to the live owner,
                    # or the API and the worker, connecting as that owner, could not use them.
                    for table, owner in owners:
                        await conn.execute(
                            sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                                sql.Identifier(self._live, table), sql.Identifier(owner)
                            )
                        )
                break
            except (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable) as exc:
                if attempt == SWAP_ATTEMPTS:
                    raise TransientError(
                        f"the live timeline tables stayed locked ({database_error(exc)}); "
                        "nothing was swapped"
                    ) from None
                log.warning("the rebuild's swap waited too long for a lock; trying again",
                            attempt=attempt, reason=database_error(exc))  # fmt: skip
                await asyncio.sleep(attempt)
            except psycopg.OperationalError as exc:
                raise TransientError(
                    f"swapping the timeline tables in failed: {database_error(exc)}"
                ) from None
        counts = await (
            await conn.execute(
                sql.SQL(
                    "SELECT (SELECT count(*) FROM {}.timeline_sources), "
                    "(SELECT count(*) FROM {}.timeline_studies), "
                    "(SELECT count(*) FROM {}.timeline_entries)"
                ).format(live, live, live)
            )
        ).fetchone()
        assert counts is not None
        return ReloadCounts(*(int(c) for c in counts))

    async def settle(self) -> bool:
        """Vacuum (freezing) and analyse the swapped-in tables, online (the API and the
        projection read and write meanwhile): the planner gets their statistics, which they
        were made without, and the pages no older snapshot still needs are marked all-visible
        and frozen. Otherwise autovacuum comes for every one of them soon after (they are all
        fresh inserts), and a swap that finds it working on a live table waits
        ``deadlock_timeout`` (1 s) for it to give way, with the API's reads queued behind
        (seen in back-to-back rebuilds). False, and logged, if that failed: the rebuild is
        done all the same."""
        try:
            for table in PROJECTION_TABLES:
                await self.conn.execute(
                    sql.SQL("VACUUM (FREEZE, ANALYZE) {}").format(sql.Identifier(self._live, table))
                )
        except psycopg.Error as exc:
            log.warning("the new timeline tables were not vacuumed", reason=database_error(exc))
            return False
        return True

    async def replace(self) -> ReloadCounts:
        """Build the new tables and swap them in."""
        await self.build()
        return await self.swap()


async def _refuse_unless_owner(conn: Connection, live: str) -> None:
    """Refuse, before anything is loaded, a rebuild whose role could not swap the tables in
    (moving a table needs its owner) or make its schema."""
    cursor = await conn.execute(
        "SELECT c.relname, pg_get_userbyid(c.relowner), current_user FROM pg_class c "
        "WHERE c.relnamespace = %s::regnamespace AND c.relname = ANY(%s) "
        "AND NOT pg_has_role(current_user, c.relowner, 'USAGE') ORDER BY 1",
        (live, list(PROJECTION_TABLES)),
    )
    foreign = await cursor.fetchall()
    if foreign:
        table, owner, user = foreign[0]
        raise RebuildRefused(
            f"role {user} does not own {table} (owner {owner}) nor {len(foreign) - 1} other "
            "projection table(s): run the rebuild as the role that owns them (that ran the "
            "migrations)"
        )
    row = await (
        await conn.execute("SELECT has_database_privilege(current_database(), 'CREATE')")
    ).fetchone()
    if not (row and row[0]):
        raise RebuildRefused(
            "the rebuild's role may not create a schema in this database "
            "(GRANT CREATE ON DATABASE ... TO it)"
        )


async def _foreign_owners(conn: Connection, live: str) -> list[tuple[str, str]]:
    """The live projection tables owned by a role other than this session's, with it."""
    cursor = await conn.execute(
        "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c "
        "WHERE c.relnamespace = %s::regnamespace AND c.relname = ANY(%s) "
        "AND pg_get_userbyid(c.relowner) <> current_user ORDER BY 1",
        (live, list(PROJECTION_TABLES)),
    )
    return [(table, owner) for table, owner in await cursor.fetchall()]


async def _grants(conn: Connection, live: str) -> list[sql.Composable]:
    """The GRANTs (to roles other than the owner) on the live projection tables and on their
    columns (``GRANT SELECT (col) ON ...``, e.g. for a reporting role that may read some
    columns only), as statements that give them again on the tables of the same names."""
    cursor = await conn.execute(
        """
        SELECT c.relname, NULL::name, a.privilege_type, a.is_grantable,
               CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END
        FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
        WHERE c.relnamespace = %(live)s::regnamespace AND c.relname = ANY(%(tables)s)
          AND a.grantee <> c.relowner
        UNION ALL
        SELECT c.relname, t.attname, a.privilege_type, a.is_grantable,
               CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END
        FROM pg_class c
        JOIN pg_attribute t ON t.attrelid = c.oid AND t.attnum > 0 AND NOT t.attisdropped
        CROSS JOIN LATERAL aclexplode(t.attacl) a
        WHERE c.relnamespace = %(live)s::regnamespace AND c.relname = ANY(%(tables)s)
          AND a.grantee <> c.relowner
        """,
        {"live": live, "tables": list(PROJECTION_TABLES)},
    )
    return [
        sql.SQL("GRANT {} {}ON {} TO {}{}").format(
            sql.SQL(privilege),
            sql.SQL("({}) ").format(sql.Identifier(column)) if column else sql.SQL(""),
            sql.Identifier(live, table),
            sql.Identifier(grantee) if grantee is not None else sql.SQL("PUBLIC"),
            sql.SQL(" WITH GRANT OPTION" if grantable else ""),
        )
        for table, column, privilege, grantable, grantee in await cursor.fetchall()
    ]
