"""S3 object storage: versitygw (Apache-2.0) built with `go install` at a pinned version, cached."""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from minio import Minio

from deploy.local.config import BUCKETS, VERSITYGW_MODULE, VERSITYGW_VERSION, LocalConfig
from deploy.local.processes import ManagedProcess, PlatformError, run, wait_until


def _go() -> str:
    found = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    if found is None:
        raise PlatformError("go not found: versitygw is built with `go install` (Go >= 1.24)")
    return found


class S3Server:
    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.bin_dir = config.cache_dir / f"versitygw-{VERSITYGW_VERSION}"
        self.binary = self.bin_dir / "versitygw"
        self.dir = config.state_dir / "s3"
        self.root = self.dir / "data"
        self.process = ManagedProcess(
            "s3", self.dir / "versitygw.pid", self.dir / "versitygw.log", marker=str(self.root)
        )

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.config.s3_port}"

    def install(self) -> None:
        if self.binary.exists():
            return
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, GOBIN=str(self.bin_dir), CGO_ENABLED="0", GOFLAGS="-trimpath")
        run(
            [_go(), "install", f"{VERSITYGW_MODULE}@{VERSITYGW_VERSION}"],
            f"building versitygw {VERSITYGW_VERSION}",
            env=env,
        )
        if not self.binary.exists():
            raise PlatformError(f"versitygw not found at {self.binary} after go install")

    def start(self) -> str:
        if self.process.running():
            return "already running"
        self.install()
        self.root.mkdir(parents=True, exist_ok=True)
        env = self.config.client_env()
        child_env = dict(
            os.environ,
            ROOT_ACCESS_KEY=env["BEELDPORTAAL_S3_ACCESS_KEY"],
            ROOT_SECRET_KEY=env["BEELDPORTAAL_S3_SECRET_KEY"],
        )
        self.process.start(
            [
                str(self.binary),
                "--port",
                self.endpoint,
                "--quiet",
                "--keep-alive",
                "posix",
                str(self.root),
            ],
            env=child_env,
        )
        wait_until(self.ready, 60, "S3 (versitygw)", self.process)
        return "started"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # 403 for an anonymous request: it is up and answering S3
        except OSError:
            return False

    def client(self) -> Minio:
        env = self.config.client_env()
        return Minio(
            self.endpoint,
            access_key=env["BEELDPORTAAL_S3_ACCESS_KEY"],
            secret_key=env["BEELDPORTAAL_S3_SECRET_KEY"],
            region=env["BEELDPORTAAL_S3_REGION"],
            secure=False,
        )

    def create_buckets(self) -> list[str]:
        client, made = self.client(), []
        for bucket in BUCKETS:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
                made.append(bucket)
        return made

    def stop(self) -> bool:
        return self.process.stop()

    def status(self) -> str:
        if not self.process.running():
            return "stopped"
        return f"ready on http://{self.endpoint}" if self.ready() else "running, not ready"
