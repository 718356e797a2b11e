"""PostgreSQL 15 (Debian package): a project-owned cluster in the state directory, own port."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import psycopg

from deploy.local.config import (
    DATABASE,
    DB_USER,
    OPERATOR_USER,
    OUTSIDER_USER,
    POSTGRES_MAJOR,
    LocalConfig,
)
from deploy.local.processes import ManagedProcess, PlatformError, run, wait_until

BIN = Path(f"/usr/lib/postgresql/{POSTGRES_MAJOR}/bin")


class Postgres:
    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.dir = config.state_dir / "postgres"
        # PostgreSQL refuses to run as root: then the cluster belongs to the `postgres` user.
        self.user = "postgres" if os.geteuid() == 0 else None

    @property
    def home(self) -> Path:
        """Where the cluster lives: the state directory, unless the postgres user cannot reach it.

        Running as root in a checkout under a private directory (e.g. /root, mode 0700), the
        `postgres` user cannot traverse to .state/; the cluster then lives in a directory of its
        own under /var/lib/postgresql, keyed by this state directory, recorded in ``home``.
        """
        pointer = self.dir / "home"
        return Path(pointer.read_text().strip()) if pointer.exists() else self.dir

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def sockets(self) -> Path:
        return self.home / "run"

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(
            "postgres", self.dir / "postgres.pid", self.dir / "postgres.log", marker=str(self.data)
        )

    def _choose_home(self) -> None:
        pointer = self.dir / "home"
        if pointer.exists() or self.user is None:
            return
        reachable = subprocess.run(
            ["runuser", "-u", self.user, "--", "test", "-w", str(self.dir)], check=False
        )
        if reachable.returncode != 0:
            digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:12]
            home = Path(f"/var/lib/postgresql/beeldportaal/{digest}")
            home.mkdir(parents=True, exist_ok=True)
            self._own(home.parent, home)
            pointer.write_text(f"{home}\n")

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
        self.dir.mkdir(parents=True, exist_ok=True)
        self._own(self.dir)
        self._choose_home()
        self.sockets.mkdir(parents=True, exist_ok=True)
        self._own(self.home, self.sockets)
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
            for role in (OPERATOR_USER, OUTSIDER_USER):
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                    continue
                conn.execute(f'CREATE ROLE "{role}" LOGIN')
                if role == OPERATOR_USER:
                    conn.execute(f'GRANT "{DB_USER}" TO "{role}"')
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
