"""The rebuild's bulk path gives exactly the tables the projection gives, on random histories.

The projection folds batches into the tables with upserts (``store.py``); the rebuild loads rows
and reduces them in SQL (``reload.py``). Two implementations of one set of orders, so they are
held to each other here on the real PostgreSQL: random histories over few keys (so snapshot
keys, decisions and revocations tie and collide), applied by the projection in random batches
and orders, and by the rebuild's loaders (one to three, events dealt out at random, COPYed at
random points). Kafka plays no part: ``test_projection.py`` covers the rebuild end to end.
"""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import psycopg.conninfo
import pytest

from deploy.local.config import OPERATOR_USER, OUTSIDER_USER
from services.timeline.adapters import reload as reload_module
from services.timeline.adapters.reload import Loader, RebuildRefused, Reload
from services.timeline.adapters.store import PROJECTION_TABLES, PostgresTimeline, ProjectionBatch
from shared import migrations
from shared.errors import TransientError
from shared.events import (
    Basis,
    BsnStatus,
    ConsentChecked,
    ConsentRevoked,
    Decision,
    Delivered,
    DeliveryChannel,
    Event,
    InstanceOutcomes,
    InstanceRef,
    PatientRef,
    Purpose,
    ReportKind,
    ReportRef,
    SeriesSummary,
    StudyReceived,
    StudySnapshot,
)
from tests.factories import make_pseudonym
from tests.integration.conftest import as_role

pytestmark = pytest.mark.integration

HISTORIES = 20
T0 = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)
CT, BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.11"
PATIENTS = [make_pseudonym() for _ in range(2)]
SENDERS, RECIPIENTS = ("11111111", "22222222"), ("33333333", "44444444")
CONSENTS = ("consent-a", "consent-b")


def uid(*parts: object) -> str:
    return "2.25." + str(int(hashlib.sha256(repr(parts).encode()).hexdigest()[:30], 16))


STUDIES = [uid("study", n) for n in range(3)]


def snapshot(study: str, sender: str, version: int, last: int, recipient: str) -> StudySnapshot:
    """A function of the snapshot key, as ingest's are: equal keys, equal snapshots. The
    patient may be absent or, for one Study UID, differ between keys (a data error)."""
    rnd = random.Random(repr((study, sender, version, last, recipient)))
    patient = rnd.choice([*PATIENTS, None])
    series = [uid("series", study, n) for n in range(2)]
    instances, reports = [], []
    for n in range(version + rnd.randint(0, 2)):
        sop, in_series, report = uid("sop", study, n), series[n % 2], n % 3 == 2
        instances.append(
            InstanceRef(
                sop_instance_uid=sop, sop_class_uid=BASIC_TEXT_SR if report else CT,
                series_instance_uid=in_series, transfer_syntax_uid="1.2.840.10008.1.2.1",
                object_key=f"{sender}/{sop}.dcm", size=n, sha256="0" * 64,
            )
        )  # fmt: skip
        if report:
            reports.append(
                ReportRef(sop_instance_uid=sop, series_instance_uid=in_series,
                          kind=ReportKind.STRUCTURED_REPORT)
            )  # fmt: skip
    return StudySnapshot(
        study_instance_uid=study,
        version=version,
        sender_ura=sender,
        recipient_ura=recipient,
        patient=PatientRef(pseudonym=patient, bsn_status=BsnStatus.VERIFIED)
        if patient
        else PatientRef(bsn_status=BsnStatus.ABSENT),
        accession_number=f"A{rnd.randint(0, 9)}",
        study_date=rnd.choice([None, date(2025, 1, rnd.randint(1, 3))]),
        study_time=rnd.choice([None, "101010"]),
        study_description=rnd.choice([None, "one", "two"]),
        institution_name=rnd.choice(["Alpha", "beta", None]),
        modalities=tuple(sorted(rnd.sample(["CT", "MR", "SR"], rnd.randint(0, 2)))),
        series=tuple(
            SeriesSummary(
                series_instance_uid=s,
                modality="CT",
                series_number=n,
                number_of_instances=sum(i.series_instance_uid == s for i in instances),
            )
            for n, s in enumerate(series)
        ),
        instances=tuple(instances),
        reports=tuple(reports),
        first_received_at=T0 + timedelta(minutes=rnd.choice([0, 0, 1])),
        last_received_at=T0 + timedelta(minutes=10 + last),
    )


def history(rnd: random.Random) -> list[Event]:
    common = {"correlation_id": "c", "producer": "test"}
    events: list[Event] = []
    for _ in range(rnd.randint(5, 40)):
        roll = rnd.random()
        if roll < 0.7:
            study = snapshot(rnd.choice(STUDIES), rnd.choice(SENDERS), rnd.randint(1, 2),
                             rnd.randint(0, 1), rnd.choice(RECIPIENTS))  # fmt: skip
            if rnd.random() < 0.4:
                events.append(StudyReceived(study=study, **common))
                continue
            permit = rnd.random() < 0.5
            events.append(
                ConsentChecked(
                    study=study,
                    purpose=rnd.choice([Purpose.TIMELINE, Purpose.TIMELINE, Purpose.DELIVERY]),
                    decision=Decision.PERMIT if permit else Decision.DENY,
                    basis=Basis.EXPLICIT_CONSENT if permit else Basis.NO_EXPLICIT_CONSENT,
                    decided_by=rnd.choice(CONSENTS if permit else ("rule:x", "consent-a")),
                    registry_version=0,
                    **common,
                )
            )
        elif roll < 0.85:
            events.append(
                ConsentRevoked(
                    consent_id=rnd.choice(CONSENTS), patient=rnd.choice(PATIENTS),
                    occurred_at=T0 + timedelta(minutes=rnd.randint(0, 3)), **common,
                )
            )  # fmt: skip
        else:
            events.append(
                Delivered(
                    study_instance_uid=rnd.choice(STUDIES), study_version=rnd.randint(1, 3),
                    destination_ura=rnd.choice(RECIPIENTS), endpoint_id=rnd.choice(["e1", "e2"]),
                    channel=DeliveryChannel.DICOMWEB,
                    outcomes=InstanceOutcomes(sent=1, already_present=0), attempts=1,
                    seconds_since_first_received=1.0,
                    delivered_at=T0 + timedelta(minutes=rnd.randint(0, 3)), **common,
                )
            )  # fmt: skip
    return events


async def project(dsn: str, events: list[Event], rnd: random.Random) -> dict[str, list[str]]:
    """Emptied tables, then the events in random batches of 1-6, as the projection applies."""
    async with PostgresTimeline(dsn, pool_size=1) as store:
        await store.truncate()
        start = 0
        while start < len(events):
            size = rnd.randint(1, 6)
            batch = ProjectionBatch()
            for event in events[start : start + size]:
                batch.add(event)
            await store.apply(batch)
            start += size
    return dump(dsn)


async def rebuilt(dsn: str, events: list[Event], rnd: random.Random) -> dict[str, list[str]]:
    """The events dealt out to one to three loaders, each COPYing at random points."""
    count = rnd.randint(1, 3)
    shares: list[list[Event]] = [[] for _ in range(count)]
    for event in events:
        shares[rnd.randrange(count)].append(event)
    async with Reload(dsn) as reload:
        for index, share in enumerate(shares):
            async with Loader(dsn, index, count) as loader:
                for event in share:
                    loader.add(event)
                    if rnd.random() < 0.3:
                        await loader.copy(loader.take())
                await loader.copy(loader.take())
        await reload.replace()
    return dump(dsn)


def dump(dsn: str) -> dict[str, list[str]]:
    with psycopg.connect(dsn) as conn:
        return {
            table: [r[0] for r in conn.execute(f"SELECT t::text FROM {table} t ORDER BY 1")]
            for table in PROJECTION_TABLES
        }


def differences(first: dict[str, list[str]], second: dict[str, list[str]]) -> dict[str, Any]:
    return {
        table: {"first only": sorted(set(rows) - set(second[table])),
                "second only": sorted(set(second[table]) - set(rows))}
        for table, rows in first.items()
        if rows != second[table]
    }  # fmt: skip


async def test_the_rebuild_gives_the_projections_tables_for_random_histories(
    scratch_database: str,
) -> None:
    migrations.migrate(scratch_database)
    visible = 0
    for seed in range(HISTORIES):
        rnd = random.Random(seed)
        events = history(rnd)
        projected = await project(scratch_database, events, rnd)
        rnd.shuffle(events)
        assert await project(scratch_database, events, rnd) == projected, f"history {seed}"
        rnd.shuffle(events)
        again = await rebuilt(scratch_database, events, rnd)
        assert again == projected, f"history {seed}: {differences(projected, again)}"
        visible += len(projected["timeline_entries"])
    # The histories are not vacuous: entries were visible in some of them.
    assert visible > 0


def schema_of(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    """The projection tables as the catalog describes them: columns in order, constraints,
    indexes (by name), and who else may read them."""
    tables = list(PROJECTION_TABLES)
    return {
        "columns": conn.execute(
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, "
            "pg_get_expr(d.adbin, d.adrelid), a.attgenerated, a.attcollation::regcollation "
            "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
            "WHERE c.relname = ANY(%s) AND c.relnamespace = 'public'::regnamespace "
            "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY c.relname, a.attnum",
            (tables,),
        ).fetchall(),
        "constraints": conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE conrelid::regclass::text = ANY(%s) ORDER BY 1, 2",
            (tables,),
        ).fetchall(),
        "indexes": conn.execute(
            "SELECT tablename, indexname, indexdef FROM pg_indexes "
            "WHERE schemaname = 'public' AND tablename = ANY(%s) ORDER BY 1, 2",
            (tables,),
        ).fetchall(),
        "grants": conn.execute(
            "SELECT table_name, grantee, privilege_type FROM information_schema.table_privileges "
            "WHERE table_schema = 'public' AND table_name = ANY(%s) ORDER BY 1, 2, 3",
            (tables,),
        ).fetchall(),
        "column grants": conn.execute(
            "SELECT table_name, column_name, grantee, privilege_type, is_grantable "
            "FROM information_schema.column_privileges "
            "WHERE table_schema = 'public' AND table_name = ANY(%s) ORDER BY 1, 2, 3, 4",
            (tables,),
        ).fetchall(),
    }


async def test_the_swapped_in_tables_are_the_migrations_tables_and_keep_their_grants(
    scratch_database: str,
) -> None:
    migrations.migrate(scratch_database)
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        conn.execute("GRANT SELECT ON timeline_entries, timeline_instances TO PUBLIC")
        # Some columns only, to everyone; one to a role (a predefined one: our role may not
        # create roles), which may pass it on.
        conn.execute("GRANT SELECT (study_instance_uid, study_date) ON timeline_studies TO PUBLIC")
        conn.execute("GRANT UPDATE (basis) ON timeline_sources TO pg_monitor WITH GRANT OPTION")
        before = schema_of(conn)
    assert {
        ("timeline_studies", "study_date", "PUBLIC", "SELECT", "NO"),
        ("timeline_sources", "basis", "pg_monitor", "UPDATE", "YES"),
    } <= set(before["column grants"])
    assert len(before["indexes"]) == len(PROJECTION_TABLES) + 2  # the keys, search, consent
    rnd = random.Random(7)
    await rebuilt(scratch_database, history(rnd), rnd)
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        assert schema_of(conn) == before
        assert conn.execute(  # the rebuild's own, and the replaced tables', dropped
            "SELECT count(*) FROM pg_namespace "
            "WHERE nspname IN ('timeline_rebuild', 'timeline_retired')"
        ).fetchone() == (0,)


async def test_a_reader_of_the_live_tables_reads_the_new_ones_after_the_swap(
    scratch_database: str,
) -> None:
    migrations.migrate(scratch_database)
    rnd = random.Random(3)
    events = history(rnd)
    # A reader as the API's pool keeps them: a statement prepared on the server (psycopg
    # prepares one from its fifth run), before the rebuild.
    with psycopg.connect(scratch_database, autocommit=True, prepare_threshold=0) as reader:
        count = "SELECT count(*) FROM timeline_sources WHERE version > %s"
        assert reader.execute(count, (0,)).fetchone() == (0,)
        after = await rebuilt(scratch_database, events, rnd)
        assert reader.execute(count, (0,)).fetchone() == (len(after["timeline_sources"]),)
    assert after["timeline_sources"]


async def test_a_rebuild_that_could_not_swap_its_tables_in_is_refused_before_it_loads(
    scratch_database: str,
) -> None:
    migrations.migrate(scratch_database)
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        revoke = conn.execute(
            "SELECT format('REVOKE CREATE ON DATABASE %I FROM %I', current_database(), "
            "current_user)"
        ).fetchone()
        assert revoke is not None
        conn.execute(revoke[0])
    with pytest.raises(RebuildRefused, match="may not create a schema"):
        async with Reload(scratch_database):
            pass


async def test_a_swap_kept_from_its_locks_gives_up_and_changes_nothing(
    scratch_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrations.migrate(scratch_database)
    rnd = random.Random(11)
    events = history(rnd)
    before = await project(scratch_database, events, rnd)
    monkeypatch.setattr(reload_module, "SWAP_LOCK_TIMEOUT", "50ms")
    with psycopg.connect(scratch_database) as reader:  # its transaction stays open
        reader.execute("SELECT count(*) FROM timeline_entries")
        async with Reload(scratch_database) as reload:
            async with Loader(scratch_database) as loader:
                for event in events:
                    loader.add(event)
                await loader.copy(loader.take())
            await reload.build()
            with pytest.raises(TransientError, match="stayed locked"):
                await reload.swap()
        reader.rollback()
    assert dump(scratch_database) == before


def sessions_in(dsn: str) -> int:
    """The sessions connected to ``dsn``'s database but the one asking."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_loader_or_rebuild_session_that_fails_to_start_leaves_no_session_behind(
    scratch_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrations.migrate(scratch_database)
    assert sessions_in(scratch_database) == 0
    # No rebuild made its tables: the loader's first query fails (not a lost connection).
    with pytest.raises(psycopg.errors.InvalidSchemaName):
        async with Loader(scratch_database):
            pass
    assert sessions_in(scratch_database) == 0
    # A build session whose set-up fails after connecting.
    monkeypatch.setattr(reload_module, "_NO_FLUSH_WAIT", "SET no_such_setting = 1")
    with pytest.raises(psycopg.errors.UndefinedObject):
        async with Reload(scratch_database):
            pass
    assert sessions_in(scratch_database) == 0


def owners(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class "
                "WHERE relname = ANY(%s) AND relnamespace = 'public'::regnamespace",
                (list(PROJECTION_TABLES),),
            )
        }


async def test_a_rebuild_by_a_member_of_the_owning_role_leaves_the_tables_to_their_owner(
    scratch_database: str,
) -> None:
    # An operator's own role, a member of the owner (as a DBA grants it): the swapped-in
    # tables are the owner's again, so the API and the worker, connecting as the owner, go on.
    migrations.migrate(scratch_database)
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        conn.execute("GRANT SELECT ON timeline_entries TO PUBLIC")
        before = schema_of(conn)
    owner = owners(scratch_database)
    assert owner != {OPERATOR_USER}
    rnd = random.Random(5)
    events = history(rnd)
    rebuilt_rows = await rebuilt(as_role(scratch_database, OPERATOR_USER), events, rnd)
    assert owners(scratch_database) == owner
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        assert schema_of(conn) == before
    # The owner's own sessions use them as before: the projection applies the history again,
    # which changes nothing.
    assert await project(scratch_database, events, rnd) == rebuilt_rows


async def test_a_rebuild_by_a_role_that_could_not_swap_the_tables_in_is_refused(
    scratch_database: str,
) -> None:
    migrations.migrate(scratch_database)
    with pytest.raises(RebuildRefused, match=f"role {OUTSIDER_USER} does not own"):
        async with Reload(as_role(scratch_database, OUTSIDER_USER)):
            pass
