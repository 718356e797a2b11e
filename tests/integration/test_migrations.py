"""Schema migrations on the real PostgreSQL: applied once, in order, never half, never edited."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest

from shared import migrations
from shared.migrations import Migration, MigrationError, discover

pytestmark = pytest.mark.integration


def _tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


def test_the_project_migrations_apply_once_and_then_report_nothing_to_do(
    scratch_database: str,
) -> None:
    first = migrations.migrate(scratch_database)
    assert "timeline/0001_access_log.sql" in first
    assert {"access_log", "schema_migrations"} <= _tables(scratch_database)
    assert migrations.migrate(scratch_database) == []


def test_the_access_log_refuses_updates_deletes_and_truncation(scratch_database: str) -> None:
    migrations.migrate(scratch_database)
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO access_log (event_id, occurred_at, event_type, action, outcome, "
            "organisation_ura, access_point) VALUES (%s, now(), 'timeline-search', 'query', "
            "'denied', '12345678', 'POST /timeline/_search')",
            (uuid.uuid4(),),
        )
        for statement in (
            "UPDATE access_log SET outcome = 'allowed'",
            "DELETE FROM access_log",
            "TRUNCATE access_log",
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(statement)
        assert conn.execute("SELECT outcome FROM access_log").fetchall() == [("denied",)]


def _write(folder: Path, name: str, sql: str) -> None:
    (folder / name).write_text(sql)


def test_a_failing_migration_leaves_nothing_half_applied(
    scratch_database: str, tmp_path: Path
) -> None:
    _write(tmp_path, "0001_first.sql", "CREATE TABLE first (id int);")
    _write(tmp_path, "0002_broken.sql", "CREATE TABLE second (id int); SELECT * FROM nowhere;")
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            migrations.apply(conn, discover("demo", tmp_path))
        applied = conn.execute("SELECT name FROM schema_migrations").fetchall()
    assert applied == [("0001_first.sql",)]
    assert "first" in _tables(scratch_database)
    assert "second" not in _tables(scratch_database)


def test_an_applied_migration_that_was_edited_is_refused(
    scratch_database: str, tmp_path: Path
) -> None:
    _write(tmp_path, "0001_first.sql", "CREATE TABLE first (id int);")
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        migrations.apply(conn, discover("demo", tmp_path))
        edited = [Migration("demo", 1, "0001_first.sql", "CREATE TABLE first (id bigint);")]
        with pytest.raises(MigrationError, match="applied with other content"):
            migrations.apply(conn, edited)


def test_migrations_run_in_version_order_whatever_order_they_are_given(
    scratch_database: str,
) -> None:
    given = [
        Migration("demo", 2, "0002_b.sql", "ALTER TABLE a ADD COLUMN b int;"),
        Migration("demo", 1, "0001_a.sql", "CREATE TABLE a (id int);"),
    ]
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        assert migrations.apply(conn, given) == ["demo/0001_a.sql", "demo/0002_b.sql"]


def test_badly_named_or_duplicate_migration_files_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, "first.sql", "SELECT 1;")
    with pytest.raises(MigrationError, match=r"0001_what_it_does\.sql"):
        discover("demo", tmp_path)
    (tmp_path / "first.sql").unlink()
    _write(tmp_path, "0001_a.sql", "SELECT 1;")
    _write(tmp_path, "0001_b.sql", "SELECT 1;")
    with pytest.raises(MigrationError, match="share a version"):
        discover("demo", tmp_path)
