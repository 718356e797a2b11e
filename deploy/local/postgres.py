"""PostgreSQL 15 (Debian package): a project-owned cluster in the state directory, own port."""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

import psycopg

from deploy.local.config import DATABASE, DB_USER, POSTGRES_MAJOR, LocalConfig
from deploy.local.processes import ManagedProcess, PlatformError, run, wait_until

BIN = Path(f"/usr/lib/postgresql/{POSTGRES_MAJOR}/bin")


class Postgres:
    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.dir = config.state_dir / "postgres"
        self.data = self.dir / "data"
        self.sockets = self.dir / "run"
        self.process = ManagedProcess(
            "postgres", self.dir / "postgres.pid", self.dir / "postgres.log", marker=str(self.data)
        )
        # PostgreSQL refuses to run as root: then the cluster belongs to the `postgres` user.
        self.user = "postgres" if os.geteuid() == 0 else None

    def install(self) -> None:
        if (BIN / "postgres").exists():
            return
        if os.geteuid() != 0:
            raise PlatformError(f"PostgreSQL {POSTGRES_MAJOR} missing: apt-get install postgresql")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-q"], "apt-get update", env=env)
        run(
            [
                "apt-get",
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                f"postgresql-{POSTGRES_MAJOR}",
            ],
            "installing PostgreSQL",
            env=env,
        )

    def _own(self, *paths: Path) -> None:
        if self.user is None:
            return
        entry = pwd.getpwnam(self.user)
        for path in paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> str:
        if self.process.running():
            return "already running"
        self.install()
        for path in (self.dir, self.sockets):
            path.mkdir(parents=True, exist_ok=True)
        self._own(self.dir, self.sockets)
        if not (self.data / "PG_VERSION").exists():
            shutil.rmtree(self.data, ignore_errors=True)
            run(
                [str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                 "--encoding=UTF8", "--locale=C.UTF-8"],
                "initialising the PostgreSQL cluster",
                user=self.user,
            )  # fmt: skip
        self.process.log_file.touch()
        self._own(self.process.log_file)
        self.process.start(
            [str(BIN / "postgres"), "-D", str(self.data), "-p", str(self.config.postgres_port),
             "-h", "127.0.0.1", "-k", str(self.sockets), "-c", "fsync=on",
             "-c", "max_connections=200", "-c", "shared_buffers=128MB"],
            user=self.user,
        )  # fmt: skip
        wait_until(self.ready, 60, "PostgreSQL", self.process)
        self._create_database()
        return "started"

    def _connect(self, dbname: str = "postgres", user: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1", port=self.config.postgres_port, user=user, dbname=dbname,
            connect_timeout=2, autocommit=True,
        )  # fmt: skip

    def ready(self) -> bool:
        try:
            with self._connect() as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def _create_database(self) -> None:
        with self._connect() as conn:
            if (
                conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DB_USER,)).fetchone()
                is None
            ):
                conn.execute(f'CREATE ROLE "{DB_USER}" LOGIN CREATEDB')
            if (
                conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
                is None
            ):
                conn.execute(f'CREATE DATABASE "{DATABASE}" OWNER "{DB_USER}"')

    def stop(self) -> bool:
        return self.process.stop()

    def status(self) -> str:
        if not self.process.running():
            return "stopped"
        return (
            f"ready on 127.0.0.1:{self.config.postgres_port}"
            if self.ready()
            else "running, not ready"
        )
