"""Schema migrations: numbered SQL files per component, applied once each, in order, recorded.

A component (e.g. ``timeline``) keeps ``NNNN_description.sql`` files in its ``migrations``
folder. Each file runs in its own transaction together with its bookkeeping row, so a failed
migration leaves nothing half-applied. An applied file whose text changed is refused: history
is fixed, a change is a new migration.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

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
            conn.execute(migration.sql)  # type: ignore[arg-type]
            conn.execute(
                "INSERT INTO schema_migrations (component, version, name, sha256) "
                "VALUES (%s, %s, %s, %s)",
                (migration.component, migration.version, migration.name, migration.sha256),
            )
            applied_now.append(f"{migration.component}/{migration.name}")
    return applied_now


def project_migrations() -> list[Migration]:
    """Every service's migrations folder (``services/<name>/migrations``)."""
    services = Path(__file__).resolve().parent.parent / "services"
    found: list[Migration] = []
    for folder in sorted(services.glob("*/migrations")):
        found.extend(discover(folder.parent.name, folder))
    return found


def migrate(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return apply(conn, project_migrations())
