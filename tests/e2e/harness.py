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
from unittest import mock

from minio import Minio

from deploy.local.config import LocalConfig, read_env_file

# Settings the shell that runs the tests may export for the shared platform (`make test` does);
# none of them may leak into a private platform, except where the downloads are cached.
KEEP_SETTINGS = ("BEELDPORTAAL_LOCAL_CACHE_DIR",)
# Every port setting of the processes `make up` runs (deploy.local.services.specs()).
SERVICE_PORT_SETTINGS = (
    "BEELDPORTAAL_INGEST_HTTP_PORT",
    "BEELDPORTAAL_INGEST_DIMSE_PORT",
    "BEELDPORTAAL_CONSENT_HTTP_PORT",
    "BEELDPORTAAL_ROUTING_HTTP_PORT",
    "BEELDPORTAAL_NOTIFY_HTTP_PORT",
    "BEELDPORTAAL_TIMELINE_HTTP_PORT",
    "BEELDPORTAAL_INGEST_ASSEMBLY_METRICS_PORT",
    "BEELDPORTAAL_CONSENT_DECISIONS_METRICS_PORT",
    "BEELDPORTAAL_ROUTING_WORKER_METRICS_PORT",
    "BEELDPORTAAL_NOTIFY_WORKER_METRICS_PORT",
    "BEELDPORTAAL_TIMELINE_PROJECTION_METRICS_PORT",
)

_handed_out: set[int] = set()


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1, none of them handed out before in this run.

    A port is only taken once its process listens, so two calls shortly after each other (the
    platform's ports, then the services') could otherwise be told the same one.
    """
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            sock = socket.socket()
            sockets.append(sock)  # held until all are found: the kernel gives each one once
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port not in _handed_out:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    _handed_out.update(ports)
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def service_ports() -> dict[str, str]:
    """Every service port setting on a free port, so `make up`'s processes run beside others."""
    ports = free_ports(len(SERVICE_PORT_SETTINGS))
    return {name: str(port) for name, port in zip(SERVICE_PORT_SETTINGS, ports, strict=True)}


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a zombie has exited (its parent only did not reap it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def processes_mentioning(text: str) -> list[int]:
    """The live processes with ``text`` (a state directory, say) in their command line: how a
    test sees that `down` left nothing of its platform running, whoever started it."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if text.encode() in cmdline and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def inherited_env() -> dict[str, str]:
    """This process's environment without the shared platform's settings (but KEEP_SETTINGS)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BEELDPORTAAL_") or k in KEEP_SETTINGS
    }


class PrivatePlatform:
    """Kafka, S3, PostgreSQL and Prometheus of one test alone, through `beeldportaal platform`.

    Its own state directory under ``root`` and free ports, so it runs beside the shared platform
    (and a developer's) without touching it, and `purge` stops and deletes only what it started.
    """

    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # the postgres user must reach its cluster under here when we are root
        kafka, controller, s3, postgres, prometheus = free_ports(5)
        # What every `beeldportaal ...` of this platform runs with.
        self.env = {
            **inherited_env(),
            "BEELDPORTAAL_LOCAL_STATE_DIR": str(self.state),
            "BEELDPORTAAL_LOCAL_KAFKA_PORT": str(kafka),
            "BEELDPORTAAL_LOCAL_KAFKA_CONTROLLER_PORT": str(controller),
            "BEELDPORTAAL_LOCAL_S3_PORT": str(s3),
            "BEELDPORTAAL_LOCAL_POSTGRES_PORT": str(postgres),
            "BEELDPORTAAL_LOCAL_PROMETHEUS_PORT": str(prometheus),
        }
        with mock.patch.dict(os.environ, self.env, clear=True):
            self.config = LocalConfig.from_env()  # as the CLI sees it

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """`beeldportaal <args>` on this platform (``env`` on top); the caller judges the exit."""
        return subprocess.run(
            [sys.executable, "-m", "deploy.cli", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def cli(self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 600) -> str:
        """The output of `beeldportaal <args>`; a failure raises with the output, to show why."""
        result = self.run(*args, env=env, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(
                f"beeldportaal {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result.stdout

    def up(self) -> str:
        return self.cli("platform", "up")

    @property
    def client_env(self) -> dict[str, str]:
        """The settings that point a service or a client at this platform (once it is up)."""
        return read_env_file(self.config.env_file)

    def purge(self) -> None:
        """Stop what runs from the state directory and delete it. A failure is reported, not
        raised: clean-up must not hide how the test itself ended."""
        try:
            self.cli("platform", "purge")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"private platform purge: {exc}", file=sys.stderr)


@contextmanager
def private_platform(root: Path, *, start: bool = True) -> Iterator[PrivatePlatform]:
    """A PrivatePlatform under ``root``, purged however the test ends. ``start=False`` is for a
    test that starts it itself (with `make up`, or the CLI it tests)."""
    platform = PrivatePlatform(root)
    try:
        if start:
            platform.up()
        yield platform
    finally:
        platform.purge()


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


def terminate(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """Stop ``proc`` as an operator would (SIGTERM, so it shuts down cleanly), SIGKILL if it has
    not exited within ``timeout`` seconds; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)


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
        return terminate(self.proc, timeout)


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
        BEELDPORTAAL_INGEST_DIMSE_PORT=str(dimse_port),
        BEELDPORTAAL_INGEST_PEERS_FILE=str(peers_file),
        BEELDPORTAAL_INGEST_SPOOL_DIR=str(workdir),
        BEELDPORTAAL_INGEST_STABLE_AGE_SECONDS=str(stable_age),
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
