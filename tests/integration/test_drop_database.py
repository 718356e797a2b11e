"""drop_database (tests' scratch databases): a session FORCE may not end does not fail the drop."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg

from shared.settings import PostgresSettings
from tests.integration.conftest import drop_database


def test_a_session_of_a_role_we_may_not_end_is_waited_out_not_failed_on(
    postgres_settings: PostgresSettings,
) -> None:
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_settings.conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        # The local platform's superuser (trust on loopback), standing in for an autovacuum
        # worker: our role may not terminate its session, so FORCE is refused.
        other = psycopg.connect(conn.info.dsn, user="postgres", dbname=name, autocommit=True)
    closer = threading.Timer(1.5, other.close)
    closer.start()
    started = time.monotonic()
    try:
        drop_database(postgres_settings.conninfo, name)
    finally:
        closer.cancel()
        other.close()
    assert time.monotonic() - started >= 1.0  # it waited for the session to go
    with psycopg.connect(postgres_settings.conninfo, autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert row is None
