"""Migration 0005 on the real PostgreSQL: study times written in the ACR-NEMA form before
ingest dropped the colons are brought into their standard form, and nothing else changes."""

from __future__ import annotations

import random

import psycopg
import pytest

from services.timeline.adapters.store import DERIVE_ENTRIES, DERIVE_STUDIES, PROJECTION_LOCK
from shared import migrations
from tests.integration.timeline.test_derive_all import fill

pytestmark = pytest.mark.integration

_TABLES = ("timeline_sources", "timeline_studies", "timeline_entries")
_THE_MIGRATION = ("timeline", 5)


def _rows(conn: psycopg.Connection, table: str) -> list[tuple[object, ...]]:
    return conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()


def _without_colons(conn: psycopg.Connection, table: str) -> list[tuple[object, ...]]:
    """The rows of ``table`` with the colons of their study time dropped."""
    cursor = conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3")
    assert cursor.description is not None
    at = [column.name for column in cursor.description].index("study_time")
    return [
        (*row[:at], row[at].replace(":", "") if row[at] else row[at], *row[at + 1 :])
        for row in cursor.fetchall()
    ]


def test_study_times_written_with_colons_lose_them_and_nothing_else_changes(
    scratch_database: str,
) -> None:
    before = [
        m for m in migrations.project_migrations() if (m.component, m.version) != _THE_MIGRATION
    ]
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        migrations.apply(conn, before)
        fill(conn, random.Random(5))
        conn.execute(DERIVE_STUDIES)
        conn.execute(DERIVE_ENTRIES)
        # Rows as a projection before 2026-11-28 wrote them: some times with colons, some
        # without, some absent.
        for table in _TABLES:
            conn.execute(
                f"UPDATE {table} SET study_time = CASE "
                "WHEN hashtext(study_instance_uid) % 3 = 0 THEN '10:15:00.5' "
                "WHEN hashtext(study_instance_uid) % 3 = 1 THEN '101500' END"
            )
        expected = {table: _without_colons(conn, table) for table in _TABLES}
        colons = conn.execute(
            "SELECT count(*) FROM timeline_sources WHERE study_time LIKE '%:%'"
        ).fetchone()
        assert colons is not None and colons[0] > 0  # the test has something to change

    assert migrations.migrate(scratch_database) == ["timeline/0005_study_time_standard_form.sql"]

    with psycopg.connect(scratch_database) as conn:
        for table in _TABLES:
            assert _rows(conn, table) == expected[table], table
            assert conn.execute(
                f"SELECT count(*) FROM {table} WHERE study_time = '101500.5'"
            ).fetchone() != (0,), table
        # The study rows and entries are those the migrated sources give (as a rebuild would).
        conn.execute("TRUNCATE timeline_studies, timeline_entries")
        conn.execute(DERIVE_STUDIES)
        conn.execute(DERIVE_ENTRIES)
        for table in _TABLES[1:]:
            assert _rows(conn, table) == expected[table], table


def test_the_migration_waits_for_the_projection_lock() -> None:
    [migration] = [
        m for m in migrations.project_migrations() if (m.component, m.version) == _THE_MIGRATION
    ]
    assert f"pg_advisory_xact_lock({PROJECTION_LOCK})" in migration.sql
