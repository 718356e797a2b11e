"""Schema migrations: numbered SQL files per component, applied once each, in order, recorded.

A component (e.g. ``timeline``) keeps ``NNNN_description.sql`` files in its ``migrations``
folder. Each file runs in its own transaction together with its bookkeeping row, so a failed
migration leaves nothing half-applied. An applied file whose text changed is refused: history
is fixed, a change is a new migration.

Two database roles (production): the schema's owner applies the migrations
(``beeldportaal migrate --grant-to <service role>``) and the services connect as a role that
owns nothing. A component's ``grants.sql`` (``{role}`` standing for the service role) gives that
role what the service needs, and no more: the timeline's may add to the append-only
``access_log`` but, not owning it, can neither disable its triggers nor drop it. The services
still call :func:`migrate` at start: with nothing pending it only reads the ledger, and with
something pending it says to run the migrations as the owner. One role that owns everything
(the local platform) works too, but can switch the audit table's protection off.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# A component's grants to the service role, applied after its migrations (not one itself).
GRANTS_FILE = "grants.sql"

LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component   text        NOT NULL,
    version     integer     NOT NULL,
    name        text        NOT NULL,
    sha256      text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    component: str
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(component: str, folder: Path) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(folder.glob("*.sql")):
        if path.name == GRANTS_FILE:
            continue
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: name must look like 0001_what_it_does.sql")
        found.append(Migration(component, int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{folder}: two migrations share a version number")
    return found


def apply(conn: psycopg.Connection, migrations: list[Migration]) -> list[str]:
    """Apply what is not applied yet; returns the names applied now. Safe to run concurrently."""
    applied_now: list[str] = []
    with conn.transaction():
        # Made if missing only: a service role may read the ledger but not create in the schema.
        if conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,):
            conn.execute(LEDGER)
    for migration in sorted(migrations, key=lambda m: (m.component, m.version)):
        with conn.transaction():
            # One migrator at a time per component, across processes.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (migration.component,))
            row = conn.execute(
                "SELECT sha256 FROM schema_migrations WHERE component = %s AND version = %s",
                (migration.component, migration.version),
            ).fetchone()
            if row is not None:
                if row[0] != migration.sha256:
                    raise MigrationError(
                        f"{migration.component}/{migration.name} was applied with other content; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            try:
                conn.execute(migration.sql)  # type: ignore[arg-type]
            except psycopg.errors.InsufficientPrivilege as exc:
                raise MigrationError(
                    f"{migration.component}/{migration.name} is not applied yet and this role "
                    f"may not apply it ({exc}); run `beeldportaal migrate --grant-to <service "
                    "role>` as the schema's owner"
                ) from exc
            conn.execute(
                "INSERT INTO schema_migrations (component, version, name, sha256) "
                "VALUES (%s, %s, %s, %s)",
                (migration.component, migration.version, migration.name, migration.sha256),
            )
            applied_now.append(f"{migration.component}/{migration.name}")
    return applied_now


def _migration_folders() -> list[Path]:
    """Every service's migrations folder (``services/<name>/migrations``)."""
    return sorted((Path(__file__).resolve().parent.parent / "services").glob("*/migrations"))


def project_migrations() -> list[Migration]:
    found: list[Migration] = []
    for folder in _migration_folders():
        found.extend(discover(folder.parent.name, folder))
    return found


def grant(conn: psycopg.Connection, role: str) -> None:
    """Give ``role`` (the services' role) the ledger to read and each component's
    ``grants.sql``; run as the owner. Idempotent."""
    with conn.transaction():
        conn.execute(
            sql.SQL("GRANT SELECT ON schema_migrations TO {}").format(sql.Identifier(role))
        )
        for folder in _migration_folders():
            grants = folder / GRANTS_FILE
            if grants.exists():
                conn.execute(sql.SQL(grants.read_text()).format(role=sql.Identifier(role)))


def migrate(dsn: str, *, grant_to: str | None = None) -> list[str]:
    """Apply the project's pending migrations; with ``grant_to``, then give that role the
    components' grants (see the module docstring)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        applied = apply(conn, project_migrations())
        if grant_to is not None:
            grant(conn, grant_to)
        return applied
