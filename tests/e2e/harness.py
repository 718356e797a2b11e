"""Run beeldportaal's own processes for end-to-end tests, the way an operator runs them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from minio import Minio

from deploy.local.config import LocalConfig, read_env_file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def platform_env() -> dict[str, str]:
    """The running platform's settings (as `make test` exports them, or from its env file)."""
    if "BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS" in os.environ:
        return {k: v for k, v in os.environ.items() if k.startswith("BEELDPORTAAL_")}
    return read_env_file(LocalConfig.from_env().env_file)


def s3_client(env: Mapping[str, str]) -> Minio:
    return Minio(
        env["BEELDPORTAAL_S3_ENDPOINT"],
        access_key=env["BEELDPORTAAL_S3_ACCESS_KEY"],
        secret_key=env["BEELDPORTAAL_S3_SECRET_KEY"],
        region=env.get("BEELDPORTAAL_S3_REGION", "us-east-1"),
        secure=False,
    )


def drop_bucket(env: Mapping[str, str], bucket: str) -> None:
    client = s3_client(env)
    if client.bucket_exists(bucket):
        for obj in client.list_objects(bucket, recursive=True):
            client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)


@dataclass
class ServiceProcess:
    """One `beeldportaal ...` process with its log file; stopped with SIGTERM (then SIGKILL)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def wait_ready(self, url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready at {url}:\n{self.log()}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


@contextmanager
def service(
    name: str, args: list[str], env: Mapping[str, str], workdir: Path
) -> Iterator[ServiceProcess]:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", *args],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    running = ServiceProcess(name, proc, log_path)
    try:
        yield running
    finally:
        running.stop()


@dataclass
class IngestDeployment:
    """`beeldportaal ingest serve` + `ingest assemble` against the running platform."""

    env: dict[str, str]
    http_port: int
    dimse_port: int
    bucket: str
    server: ServiceProcess
    assembler: ServiceProcess | None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def dicomweb_root(self, recipient: str) -> str:
        return f"{self.base_url}/dicomweb/to/{recipient}/"


@contextmanager
def ingest_deployment(
    workdir: Path,
    peers: Mapping[str, object],
    *,
    stable_age: float = 3.0,
    assemble: bool = True,
) -> Iterator[IngestDeployment]:
    env = platform_env()
    bucket = f"e2e-{uuid.uuid4().hex[:12]}"
    peers_file = workdir / "peers.json"
    peers_file.write_text(json.dumps(peers))
    http_port, dimse_port = free_port(), free_port()
    env.update(
        BEELDPORTAAL_S3_BUCKET=bucket,
        BEELDPORTAAL_INGEST_HTTP_PORT=str(http_port),
        BEELDPORTAAL_INGEST_PUBLIC_BASE_URL=f"http://127.0.0.1:{http_port}",
        BEELDPORTAAL_INGEST_DIMSE_PORT=str(dimse_port),
        BEELDPORTAAL_INGEST_PEERS_FILE=str(peers_file),
        BEELDPORTAAL_INGEST_SPOOL_DIR=str(workdir),
        BEELDPORTAAL_INGEST_STABLE_AGE_SECONDS=str(stable_age),
        BEELDPORTAAL_INGEST_STATE_DIR=str(workdir / "assembly-state"),
    )
    try:
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(service("ingest", ["ingest", "serve"], env, workdir))
            assembler = (
                stack.enter_context(service("assembly", ["ingest", "assemble"], env, workdir))
                if assemble
                else None
            )
            server.wait_ready(f"http://127.0.0.1:{http_port}/readyz")
            yield IngestDeployment(env, http_port, dimse_port, bucket, server, assembler)
    finally:
        drop_bucket(env, bucket)
