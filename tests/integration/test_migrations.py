"""Schema migrations on the real PostgreSQL: applied once, in order, never half, never edited."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest

from shared import migrations
from shared.migrations import Migration, MigrationError, discover
from tests.integration.conftest import SERVICE_ROLE, as_role

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


_AUDIT_ROW = (
    "INSERT INTO access_log (event_id, occurred_at, event_type, action, outcome, "
    "organisation_ura, access_point) VALUES (%s, now(), 'timeline-search', 'query', "
    "'denied', '12345678', 'POST /timeline/_search') ON CONFLICT (event_id) DO NOTHING"
)


def test_the_service_role_adds_to_the_access_log_but_cannot_alter_or_remove_it(
    scratch_database: str,
) -> None:
    """Run by its owner the triggers are a lock with the key in it (the owner may disable
    them); the services' own role, given grants.sql, holds no key."""
    assert "timeline/0001_access_log.sql" in migrations.migrate(
        scratch_database, grant_to=SERVICE_ROLE
    )
    service = as_role(scratch_database, SERVICE_ROLE)
    # Starting, a service finds nothing to apply: reading the ledger is all it needs.
    assert migrations.migrate(service) == []
    with psycopg.connect(service, autocommit=True) as conn:
        conn.execute(_AUDIT_ROW, (uuid.uuid4(),))
        for statement in (
            "DELETE FROM access_log",
            "UPDATE access_log SET outcome = 'allowed'",
            "TRUNCATE access_log",
            "ALTER TABLE access_log DISABLE TRIGGER access_log_append_only",
            "ALTER TABLE access_log DISABLE TRIGGER ALL",
            "DROP TRIGGER access_log_append_only ON access_log",
            "DROP TABLE access_log",
            "CREATE OR REPLACE FUNCTION access_log_is_append_only() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN RETURN OLD; END $$",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        assert conn.execute("SELECT outcome FROM access_log").fetchall() == [("denied",)]
    # Granting again (every `beeldportaal migrate --grant-to`) changes nothing.
    assert migrations.migrate(scratch_database, grant_to=SERVICE_ROLE) == []


def test_a_migration_the_service_role_may_not_apply_says_who_may(
    scratch_database: str, tmp_path: Path
) -> None:
    migrations.migrate(scratch_database, grant_to=SERVICE_ROLE)
    _write(tmp_path, "0001_more.sql", "CREATE TABLE more_tables (id int);")

    with (
        psycopg.connect(as_role(scratch_database, SERVICE_ROLE), autocommit=True) as conn,
        pytest.raises(MigrationError, match="beeldportaal migrate --grant-to"),
    ):
        migrations.apply(conn, discover("extra", tmp_path))
    assert "more_tables" not in _tables(scratch_database)


def test_the_grants_file_is_no_migration(tmp_path: Path) -> None:
    _write(tmp_path, "0001_first.sql", "CREATE TABLE first (id int);")
    _write(tmp_path, migrations.GRANTS_FILE, "GRANT SELECT ON first TO {role};")

    assert [m.name for m in discover("x", tmp_path)] == ["0001_first.sql"]


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
