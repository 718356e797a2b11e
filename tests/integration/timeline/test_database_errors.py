"""What the timeline says of a PostgreSQL error (``store.database_error``), on the real server:
the kind and SQLSTATE always, the server's message only where it cannot quote a row."""

from __future__ import annotations

import psycopg
import pytest

from services.timeline.adapters.store import database_error

pytestmark = pytest.mark.integration

# A value as a patient's data would be quoted back.
VALUE = "Jansen^Piet 1970"


def refused(dsn: str, statement: str) -> psycopg.Error:
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as raised:
            conn.execute(statement)
        return raised.value


def test_an_error_that_quotes_a_value_is_named_without_it(scratch_database: str) -> None:
    exc = refused(scratch_database, f"SELECT '{VALUE}'::date")
    assert VALUE in str(exc)  # what the server said

    assert database_error(exc) == "InvalidDatetimeFormat (SQLSTATE 22007)"


def test_a_failing_row_is_not_shown(scratch_database: str) -> None:
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE t (name text, n int NOT NULL)")
        with pytest.raises(psycopg.Error) as raised:
            conn.execute("INSERT INTO t VALUES (%s, NULL)", (VALUE,))
    assert VALUE in str(raised.value)  # "Failing row contains (...)"

    assert database_error(raised.value) == "NotNullViolation (SQLSTATE 23502)"


def test_the_servers_state_is_told_in_its_own_words(scratch_database: str) -> None:
    exc = refused(scratch_database, "SET statement_timeout = 10; SELECT pg_sleep(1)")

    assert database_error(exc) == (
        "QueryCanceled (SQLSTATE 57014): canceling statement due to statement timeout"
    )


def test_a_connection_that_fails_is_told_in_libpqs_words() -> None:
    with pytest.raises(psycopg.OperationalError) as raised:
        psycopg.connect("postgresql://nobody@127.0.0.1:9/none", connect_timeout=2)

    said = database_error(raised.value)
    assert said.startswith("OperationalError: ") and "\n" not in said
