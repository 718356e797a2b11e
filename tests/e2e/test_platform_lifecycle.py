"""A second, private platform through the real CLI: up prints where, down leaves nothing running.

It runs beside the platform the other tests use (own state directory, own free ports), so it
proves what a fresh `make up` / `make down` does without disturbing anything else.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from deploy.local.config import LocalConfig, read_env_file
from deploy.local.kafka import Kafka

pytestmark = pytest.mark.e2e


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if text.encode() in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


@pytest.fixture
def private_platform(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    tmp_path.chmod(0o755)  # the postgres user must reach its cluster under here when we are root
    kafka, controller, s3, pg, prometheus = _free_ports(5)
    env = {
        **os.environ,
        "BEELDPORTAAL_LOCAL_STATE_DIR": str(state),
        "BEELDPORTAAL_LOCAL_KAFKA_PORT": str(kafka),
        "BEELDPORTAAL_LOCAL_KAFKA_CONTROLLER_PORT": str(controller),
        "BEELDPORTAAL_LOCAL_S3_PORT": str(s3),
        "BEELDPORTAAL_LOCAL_POSTGRES_PORT": str(pg),
        "BEELDPORTAAL_LOCAL_PROMETHEUS_PORT": str(prometheus),
    }

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "deploy.cli", "platform", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check and result.returncode != 0:
            pytest.fail(f"platform {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    try:
        yield cli, state, {"kafka": kafka, "s3": s3, "postgres": pg, "prometheus": prometheus}
    finally:
        cli("purge", check=False)


def _recorded_pids(state: Path) -> dict[str, int]:
    files = {
        "kafka": "kafka/kafka.pid",
        "s3": "s3/versitygw.pid",
        "postgres": "postgres/postgres.pid",
        "prometheus": "prometheus/prometheus.pid",
    }
    return {name: int((state / f).read_text()) for name, f in files.items()}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_up_prints_where_everything_listens_and_down_leaves_nothing_running(
    private_platform,
) -> None:
    cli, state, ports = private_platform
    up = cli("up")
    assert f"Kafka      127.0.0.1:{ports['kafka']}" in up.stdout
    assert f"S3         http://127.0.0.1:{ports['s3']}" in up.stdout
    assert f"127.0.0.1:{ports['postgres']}/beeldportaal" in up.stdout
    assert f"Prometheus http://127.0.0.1:{ports['prometheus']}" in up.stdout
    assert cli("status").returncode == 0
    pids = _recorded_pids(state)
    assert all(_alive(pid) for pid in pids.values())
    postgres_home = (
        (state / "postgres" / "home").read_text().strip()
        if (state / "postgres" / "home").exists()
        else str(state)
    )

    again = cli("up")  # idempotent: nothing new is started
    assert again.stdout.count("already running") == 4
    assert _recorded_pids(state) == pids

    down = cli("down")
    assert down.stdout.count("stopped") == 4
    assert not any(_alive(pid) for pid in pids.values())
    assert _processes_mentioning(str(state)) == []
    assert _processes_mentioning(postgres_home) == []
    status = cli("status", check=False)
    assert status.returncode == 1
    assert status.stdout.count("stopped") == 4


def test_a_restarted_platform_keeps_its_data_and_is_not_reformatted(private_platform) -> None:
    cli, state, _ports = private_platform
    cli("up")
    env = read_env_file(state / "platform.env")
    meta = (state / "kafka" / "data" / "meta.properties").read_text()
    dsn = env["BEELDPORTAAL_POSTGRES_DSN"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (id int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    from minio import Minio

    def s3() -> Minio:
        return Minio(
            env["BEELDPORTAAL_S3_ENDPOINT"],
            access_key=env["BEELDPORTAAL_S3_ACCESS_KEY"],
            secret_key=env["BEELDPORTAAL_S3_SECRET_KEY"],
            region="us-east-1",
            secure=False,
        )

    import io

    s3().put_object("dicom", "kept/object", io.BytesIO(b"bytes"), 5)

    cli("down")
    cli("up")

    assert (state / "kafka" / "data" / "meta.properties").read_text() == meta
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT id FROM kept").fetchall() == [(42,)]
    response = s3().get_object("dicom", "kept/object")
    try:
        assert response.read() == b"bytes"
    finally:
        response.close()
        response.release_conn()
    assert read_env_file(state / "platform.env") == env  # secrets are generated once


def test_kafka_storage_formats_with_a_cluster_id_that_starts_with_a_dash(tmp_path: Path) -> None:
    # URL-safe base64 ids start with "-" one time in 64; the option parser must not take the id
    # for an option (this failed a CI run once).
    config = dataclasses.replace(LocalConfig.from_env(), state_dir=tmp_path)
    kafka = Kafka(config)
    kafka.install()
    kafka.format_storage("-oFizk9AR_C90H1FMYRC2Q")
    meta = (tmp_path / "kafka" / "data" / "meta.properties").read_text()
    assert "cluster.id=-oFizk9AR_C90H1FMYRC2Q" in meta.splitlines()
