"""Integration tier: adapters against the real Kafka, S3 and PostgreSQL of `platform up`.

Connection settings come from BEELDPORTAAL_* variables (exported by `make test`) or else from
the running platform's env file. A missing platform fails the tests: nothing skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import string
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from deploy.local.config import OUTSIDER_USER, LocalConfig, read_env_file
from shared import topics
from shared.kafka import broker_ready, delete_topics_containing, provision_topics
from shared.settings import KafkaSettings, PostgresSettings, S3Settings
from shared.topics import TopicSpec

pytestmark = pytest.mark.integration


def _platform_env() -> dict[str, str]:
    if "BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS" in os.environ:
        return {k: v for k, v in os.environ.items() if k.startswith("BEELDPORTAAL_")}
    env_file = LocalConfig.from_env().env_file
    if not env_file.exists():
        pytest.fail(
            f"no platform settings ({env_file} missing): run `beeldportaal platform up` "
            "or `make test`",
            pytrace=False,
        )
    return read_env_file(env_file)


@pytest.fixture(scope="session")
def platform_env() -> dict[str, str]:
    return _platform_env()


@pytest.fixture(scope="session")
def kafka_settings(platform_env: dict[str, str]) -> KafkaSettings:
    settings = KafkaSettings(bootstrap_servers=platform_env["BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS"])
    if not asyncio.run(broker_ready(settings.bootstrap_list)):
        pytest.fail(f"Kafka at {settings.bootstrap_servers} is not reachable", pytrace=False)
    return settings


@pytest.fixture(scope="session")
def s3_settings(platform_env: dict[str, str]) -> S3Settings:
    return S3Settings(
        endpoint=platform_env["BEELDPORTAAL_S3_ENDPOINT"],
        access_key=platform_env["BEELDPORTAAL_S3_ACCESS_KEY"],
        secret_key=platform_env["BEELDPORTAAL_S3_SECRET_KEY"],
        region=platform_env.get("BEELDPORTAAL_S3_REGION", "us-east-1"),
        bucket=platform_env.get("BEELDPORTAAL_S3_BUCKET", "dicom"),
    )


@pytest.fixture(scope="session")
def postgres_settings(platform_env: dict[str, str]) -> PostgresSettings:
    settings = PostgresSettings(dsn=platform_env["BEELDPORTAAL_POSTGRES_DSN"])
    try:
        psycopg.connect(settings.conninfo, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable: {exc}", pytrace=False)
    return settings


# The services' own role in a database migrated with ``grant_to=SERVICE_ROLE``: it owns
# nothing, so the timeline's API and projection worker run with only what ``grants.sql`` gives
# (as in production; see shared/migrations.py). Not a member of the owner's role.
SERVICE_ROLE = OUTSIDER_USER


def as_role(dsn: str, role: str) -> str:
    """``dsn`` connecting as ``role`` (the local cluster trusts its login roles)."""
    return psycopg.conninfo.make_conninfo(dsn, user=role)


@contextlib.contextmanager
def temporary_database(conninfo: str, *, template: str | None = None) -> Iterator[str]:
    """A database of its own (a copy of ``template``, if named), dropped when the block ends;
    yields its DSN."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    copy = "" if template is None else f' TEMPLATE "{template}"'
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{copy}')
    base, _, _ = conninfo.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        drop_database(conninfo, name)


@pytest.fixture
def scratch_database(postgres_settings: PostgresSettings) -> Iterator[str]:
    """A database of its own for one test, dropped afterwards; yields its DSN."""
    with temporary_database(postgres_settings.conninfo) as dsn:
        yield dsn


def drop_database(conninfo: str, name: str, attempts: int = 10) -> None:
    """Drop database ``name``, ending the sessions still in it (a pool the test left open).

    FORCE may not end an autovacuum worker busy in it: that fails with InsufficientPrivilege
    (our role is no superuser, nor in pg_signal_backend; seen once in CI). A plain DROP cancels
    autovacuum itself and waits a few seconds for other sessions, so that is tried next.
    """
    with psycopg.connect(conninfo, autocommit=True) as conn:
        try:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg.errors.InsufficientPrivilege:
            pass
        for attempt in range(attempts):
            try:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
                return
            except psycopg.errors.ObjectInUse:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5)


@pytest.fixture
async def make_topic(kafka_settings: KafkaSettings) -> AsyncIterator[object]:
    """Factory: ``await make_topic(partitions=3)`` creates a unique topic, deleted afterwards."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_list)
    await admin.start()
    created: list[str] = []

    async def make(partitions: int = 1, prefix: str = "test") -> str:
        # Letters only, like ``tag``: topic names become metric labels, and a hex name
        # sometimes held nine digits passing the 11-proof (refused as a BSN; a flaky failure).
        name = f"{prefix}-{letters(12)}"
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        created.append(name)
        return name

    try:
        yield make
    finally:
        if created:
            await admin.delete_topics(created)
        await admin.close()


@pytest.fixture
def tag() -> str:
    """A unique tag for names of this test's topics, groups and app ids.

    Letters only: a hex tag sometimes held nine digits passing the 11-proof, and a topic name
    with a "BSN" in it is (rightly) refused as a metric label.
    """
    return letters(12)


def letters(n: int) -> str:
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(n))


@pytest.fixture
async def declare_topics(
    kafka_settings: KafkaSettings, tag: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[object]:
    """``await declare_topics(spec, ...)``: declare topics for this test only and provision them.

    Afterwards every topic whose name holds ``tag`` is deleted, so faust's own changelog and
    leader topics of an app named with the tag go too.
    """

    async def declare(*specs: TopicSpec) -> None:
        for spec in specs:
            monkeypatch.setitem(topics.BY_NAME, spec.name, spec)
        await provision_topics(kafka_settings.bootstrap_list, specs)

    try:
        yield declare
    finally:
        await delete_topics_containing(kafka_settings.bootstrap_list, tag)
