"""A second, private platform through the real CLI: up prints where, down leaves nothing running.

It runs beside the platform the other tests use (own state directory, own free ports), so it
proves what a fresh `make up` / `make down` does without disturbing anything else.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from deploy.local.config import LocalConfig
from deploy.local.kafka import Kafka
from tests.e2e.harness import (
    PrivatePlatform,
    alive,
    private_platform,
    processes_mentioning,
    s3_client,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[PrivatePlatform]:
    """Not started: starting and stopping it is what these tests are about."""
    with private_platform(tmp_path, start=False) as platform:
        yield platform


def _recorded_pids(state: Path) -> dict[str, int]:
    files = {
        "kafka": "kafka/kafka.pid",
        "s3": "s3/versitygw.pid",
        "postgres": "postgres/postgres.pid",
        "prometheus": "prometheus/prometheus.pid",
    }
    return {name: int((state / f).read_text()) for name, f in files.items()}


def test_up_prints_where_everything_listens_and_down_leaves_nothing_running(
    platform: PrivatePlatform,
) -> None:
    state, config = platform.state, platform.config
    up = platform.cli("platform", "up")
    assert f"Kafka      127.0.0.1:{config.kafka_port}" in up
    assert f"S3         http://127.0.0.1:{config.s3_port}" in up
    assert f"127.0.0.1:{config.postgres_port}/beeldportaal" in up
    assert f"Prometheus http://127.0.0.1:{config.prometheus_port}" in up
    platform.cli("platform", "status")  # exits 0: everything is ready
    pids = _recorded_pids(state)
    assert all(alive(pid) for pid in pids.values())
    postgres_home = (
        (state / "postgres" / "home").read_text().strip()
        if (state / "postgres" / "home").exists()
        else str(state)
    )

    again = platform.cli("platform", "up")  # idempotent: nothing new is started
    assert again.count("already running") == 4
    assert _recorded_pids(state) == pids

    down = platform.cli("platform", "down")
    assert down.count("stopped") == 4
    assert not any(alive(pid) for pid in pids.values())
    assert processes_mentioning(str(state)) == []
    assert processes_mentioning(postgres_home) == []
    status = platform.run("platform", "status")
    assert status.returncode == 1
    assert status.stdout.count("stopped") == 4


def test_a_restarted_platform_keeps_its_data_and_is_not_reformatted(
    platform: PrivatePlatform,
) -> None:
    state = platform.state
    platform.up()
    env = platform.client_env
    meta = (state / "kafka" / "data" / "meta.properties").read_text()
    dsn = env["BEELDPORTAAL_POSTGRES_DSN"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (id int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    s3_client(env).put_object("dicom", "kept/object", io.BytesIO(b"bytes"), 5)

    platform.cli("platform", "down")
    platform.up()

    assert (state / "kafka" / "data" / "meta.properties").read_text() == meta
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT id FROM kept").fetchall() == [(42,)]
    response = s3_client(env).get_object("dicom", "kept/object")
    try:
        assert response.read() == b"bytes"
    finally:
        response.close()
        response.release_conn()
    assert platform.client_env == env  # secrets are generated once


def test_kafka_storage_formats_with_a_cluster_id_that_starts_with_a_dash(tmp_path: Path) -> None:
    # URL-safe base64 ids start with "-" one time in 64; the option parser must not take the id
    # for an option (this failed a CI run once).
    config = dataclasses.replace(LocalConfig.from_env(), state_dir=tmp_path)
    kafka = Kafka(config)
    kafka.install()
    kafka.format_storage("-oFizk9AR_C90H1FMYRC2Q")
    meta = (tmp_path / "kafka" / "data" / "meta.properties").read_text()
    assert "cluster.id=-oFizk9AR_C90H1FMYRC2Q" in meta.splitlines()
