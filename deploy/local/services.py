"""`beeldportaal services up|down|status`: the services as their own processes on the platform.

Each service runs as `beeldportaal <service> <action> --tag <state>/services/<name>` with the
platform's settings in its environment, logs to `<state>/services/<name>.log` and is tracked by
pid (the tag in its argv proves a pid is still ours). Ports are fixed per service so the URLs
printed by `make up` stay the same; override them with the usual BEELDPORTAAL_* settings.
`down` also stops the Orthanc that `beeldportaal demo` starts as the demo's receiving PACS.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.config import LocalConfig
from deploy.local.processes import ManagedProcess, PlatformError, http_ready, wait_until

DEMO_PEERS = Path(__file__).with_name("demo-peers.json")
DEMO_DIRECTORY = Path(__file__).with_name("demo-directory.yaml")


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    ready_url: str | None = None
    urls: tuple[str, ...] = ()
    metrics_url: str | None = None  # what Prometheus scrapes


# The HTTP APIs: service -> (the setting naming its port, the default port).
API_PORTS: dict[str, tuple[str, int]] = {
    "ingest": ("BEELDPORTAAL_INGEST_HTTP_PORT", 8081),
    "consent": ("BEELDPORTAAL_CONSENT_HTTP_PORT", 8082),
    "routing": ("BEELDPORTAAL_ROUTING_HTTP_PORT", 8083),
    "notify": ("BEELDPORTAAL_NOTIFY_HTTP_PORT", 8084),
    "timeline": ("BEELDPORTAAL_TIMELINE_HTTP_PORT", 8085),
}
DIMSE_PORT = ("BEELDPORTAAL_INGEST_DIMSE_PORT", 11112)


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def api_port(service: str) -> int:
    return _port(*API_PORTS[service])


def api_base_url(service: str) -> str:
    """Where `services up` runs a service's HTTP API (the same settings decide)."""
    return f"http://127.0.0.1:{api_port(service)}"


def dimse_port() -> int:
    return _port(*DIMSE_PORT)


def _public_base_url(setting: str, port: int) -> dict[str, str]:
    return {setting: os.environ.get(setting, f"http://127.0.0.1:{port}")}


def directory_seed() -> Path:
    """The provider directory seed `services up` publishes (and `demo` builds its PACS from)."""
    return Path(os.environ.get("BEELDPORTAAL_ROUTING_DIRECTORY_SEED", str(DEMO_DIRECTORY)))


def _worker(name: str, args: tuple[str, ...], setting: str, default_port: int, env=None):  # type: ignore[no-untyped-def]
    """A stream worker: no API, but /healthz, /readyz and /metrics on its probe port."""
    port = _port(setting, default_port)
    base = f"http://127.0.0.1:{port}"
    return ServiceSpec(
        name,
        args,
        {**(env or {}), setting: str(port)},
        ready_url=f"{base}/readyz",
        metrics_url=f"{base}/metrics",
    )


def specs(config: LocalConfig) -> list[ServiceSpec]:
    http = api_port("ingest")
    dimse = dimse_port()
    base = api_base_url("ingest")
    consent_port = api_port("consent")
    notify_port = api_port("notify")
    timeline_port = api_port("timeline")
    routing_port = api_port("routing")
    ingest_env = {
        "BEELDPORTAAL_INGEST_HTTP_PORT": str(http),
        # STOW-RS answers name the timeline's WADO-RS as where a stored study is retrieved.
        "BEELDPORTAAL_INGEST_RETRIEVE_BASE_URL": f"{api_base_url('timeline')}/dicomweb",
        "BEELDPORTAAL_INGEST_DIMSE_PORT": str(dimse),
        "BEELDPORTAAL_INGEST_PEERS_FILE": os.environ.get(
            "BEELDPORTAAL_INGEST_PEERS_FILE", str(DEMO_PEERS)
        ),
        "BEELDPORTAAL_INGEST_SPOOL_DIR": str(config.state_dir / "services" / "spool"),
    }
    return [
        ServiceSpec(
            "ingest",
            ("ingest", "serve"),
            ingest_env,
            ready_url=f"{base}/readyz",
            metrics_url=f"{base}/metrics",
            urls=(
                f"STOW-RS    {base}/dicomweb/to/{{URA}}/studies  (demo URAs 00000101, 00000202)",
                f"C-STORE    127.0.0.1:{dimse}  called AE BP_DEMO_OOST | BP_DEMO_WEST,"
                " calling AE OOST_PACS | WEST_PACS",
                f"API docs   {base}/docs",
            ),
        ),
        _worker(
            "ingest-assembly",
            ("ingest", "assemble"),
            "BEELDPORTAAL_INGEST_ASSEMBLY_METRICS_PORT",
            8091,
            ingest_env,
        ),
        ServiceSpec(
            "consent",
            ("consent", "serve"),
            {"BEELDPORTAAL_CONSENT_HTTP_PORT": str(consent_port)},
            ready_url=f"http://127.0.0.1:{consent_port}/readyz",
            metrics_url=f"http://127.0.0.1:{consent_port}/metrics",
            urls=(
                f"consent    http://127.0.0.1:{consent_port}/docs  (Mitz notifications, "
                "treatment relationships, the closed question)",
            ),
        ),
        _worker(
            "consent-decisions",
            ("consent", "decide"),
            "BEELDPORTAAL_CONSENT_DECISIONS_METRICS_PORT",
            8092,
        ),
        ServiceSpec(
            "routing",
            ("routing", "serve"),
            {"BEELDPORTAAL_ROUTING_HTTP_PORT": str(routing_port)},
            ready_url=f"http://127.0.0.1:{routing_port}/readyz",
            metrics_url=f"http://127.0.0.1:{routing_port}/metrics",
            urls=(f"directory  http://127.0.0.1:{routing_port}/docs  (GET /providers?q=)",),
        ),
        _worker(
            "routing-worker", ("routing", "route"), "BEELDPORTAAL_ROUTING_WORKER_METRICS_PORT", 8093
        ),
        _worker(
            "notify-worker",
            ("notify", "deliver"),
            "BEELDPORTAAL_NOTIFY_WORKER_METRICS_PORT",
            8094,
            # Portal pickup links in webhooks point at the notify API, wherever it listens.
            _public_base_url("BEELDPORTAAL_NOTIFY_PUBLIC_BASE_URL", notify_port),
        ),
        ServiceSpec(
            "notify",
            ("notify", "serve"),
            {"BEELDPORTAAL_NOTIFY_HTTP_PORT": str(notify_port)},
            ready_url=f"http://127.0.0.1:{notify_port}/readyz",
            metrics_url=f"http://127.0.0.1:{notify_port}/metrics",
            urls=(
                f"notify     http://127.0.0.1:{notify_port}/docs  (study status for senders, "
                "dead letters, portal pickup)",
            ),
        ),
        _worker(
            "timeline-projection",
            ("timeline", "project"),
            "BEELDPORTAAL_TIMELINE_PROJECTION_METRICS_PORT",
            8095,
        ),
        ServiceSpec(
            "timeline",
            ("timeline", "serve"),
            {
                "BEELDPORTAAL_TIMELINE_HTTP_PORT": str(timeline_port),
                **_public_base_url("BEELDPORTAAL_TIMELINE_PUBLIC_BASE_URL", timeline_port),
            },
            ready_url=f"http://127.0.0.1:{timeline_port}/readyz",
            metrics_url=f"http://127.0.0.1:{timeline_port}/metrics",
            urls=(
                f"timeline   http://127.0.0.1:{timeline_port}/docs  (FHIR ImagingStudy _search, "
                "access log, DICOMweb for viewers)",
            ),
        ),
    ]


class Services:
    def __init__(self, config: LocalConfig, out=print) -> None:  # type: ignore[no-untyped-def]
        self.config = config
        self.dir = config.state_dir / "services"
        self.out = out

    def _process(self, spec: ServiceSpec) -> ManagedProcess:
        tag = str(self.dir / spec.name)
        return ManagedProcess(
            spec.name, self.dir / f"{spec.name}.pid", self.dir / f"{spec.name}.log", marker=tag
        )

    def up(self) -> None:
        if not self.config.env_file.exists():
            raise PlatformError("the platform is not up: run `beeldportaal platform up` first")
        (self.dir / "spool").mkdir(parents=True, exist_ok=True)
        from deploy.local.config import read_env_file

        base_env = {**os.environ, **read_env_file(self.config.env_file)}
        self._seed_directory(base_env)
        for spec in specs(self.config):
            process = self._process(spec)
            if process.running():
                self.out(f"{spec.name + ':':17} already running")
                continue
            service = [sys.executable, "-m", "deploy.cli", *spec.args, "--tag", process.marker]
            # Under a supervisor that starts it again when it exits by itself (a worker's fatal
            # error, a crash), as a container platform would.
            supervised = [
                *(sys.executable, "-m", "deploy.local.supervisor", "--name", spec.name),
                *("--tag", process.marker, "--", *service),
            ]
            process.start(supervised, env={**base_env, **spec.env})
            if spec.ready_url:
                wait_until(lambda url=spec.ready_url: http_ready(url), 60, spec.name, process)
            self.out(f"{spec.name + ':':17} started (pid {process.pid()}, log {process.log_file})")
        self.out("")
        for spec in specs(self.config):
            for url in spec.urls:
                self.out(url)
        self.out("")
        self.out("/healthz, /readyz and /metrics of every process:")
        for spec in specs(self.config):
            if spec.metrics_url:
                self.out(f"  {spec.name:20} {spec.metrics_url.removesuffix('/metrics')}")
        prometheus = self.config.prometheus_url
        self.out(f"Prometheus {prometheus}  (alerts: {prometheus}/alerts)")

    def _seed_directory(self, env: dict[str, str]) -> None:
        """The demo providers into the directory (unchanged entries are not written again)."""
        seed = directory_seed()
        result = subprocess.run(
            [sys.executable, "-m", "deploy.cli", "routing", "seed", "--file", seed],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise PlatformError(f"seeding the provider directory failed:\n{result.stderr}")
        self.out(f"{'directory:':17} seeded from {seed}")

    def down(self) -> None:
        from deploy.local.demo import stop_demo_orthanc

        for spec in reversed(specs(self.config)):
            stopped = self._process(spec).stop(timeout=45)
            self.out(f"{spec.name + ':':17} {'stopped' if stopped else 'was not running'}")
        # The demo's receiving PACS last, so that a delivery notify finishes on its way out lands.
        if stop_demo_orthanc(self.config):
            self.out(f"{'demo-orthanc:':17} stopped")

    def status(self) -> bool:
        healthy = True
        for spec in specs(self.config):
            process = self._process(spec)
            if not process.running():
                state, healthy = "stopped", False
            elif spec.ready_url and not http_ready(spec.ready_url):
                state, healthy = "running, not ready", False
            else:
                state = f"running (pid {process.pid()})"
            self.out(f"{spec.name + ':':17} {state}")
        from deploy.local.demo import demo_orthanc_pid

        pid = demo_orthanc_pid(self.config)
        if pid is not None:  # started by `beeldportaal demo`; not part of the services' health
            self.out(f"{'demo-orthanc:':17} running (pid {pid})")
        return healthy


def main(action: str) -> int:
    services = Services(LocalConfig.from_env())
    try:
        if action == "up":
            services.up()
        elif action == "down":
            services.down()
        else:
            return 0 if services.status() else 1
        return 0
    except PlatformError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
