"""Prometheus (Debian package) in the local platform: scrapes every service, evaluates the rules.

It runs in the foreground as a process of the platform (pid and log under
``<state>/prometheus``, stopped by its recorded pid only) on 127.0.0.1:``prometheus_port``,
with its TSDB in the state directory. ``start()`` writes its configuration every time:

- ``rule_files``: ``deploy/prometheus/rules/*.yml``, loaded in place (recording and alert rules);
- job ``prometheus``: itself;
- every service process of :func:`deploy.local.services.specs` through file-based service
  discovery over ``<state>/prometheus/targets/*.json``: ``services.json`` holds one target
  group per process (``job`` = its name, ``instance`` = host:port, its metrics path).
  Another file in that directory (a test's exporters) is scraped by the same Prometheus
  within seconds, without a restart, and forgotten when the file is removed.

The scrape and evaluation interval is short (5 s) so that tests see series quickly. A second
``platform up`` reloads a running Prometheus (SIGHUP): edited rules take effect.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from deploy.local.config import LocalConfig
from deploy.local.processes import ManagedProcess, PlatformError, apt_install, run, wait_until

PROMETHEUS_BINARY = Path("/usr/bin/prometheus")
PROMTOOL_BINARY = Path("/usr/bin/promtool")
APT_PACKAGES = ("prometheus",)
RULES_DIR = Path(__file__).resolve().parents[1] / "prometheus" / "rules"
SCRAPE_INTERVAL = "5s"
RETENTION = "15d"


@dataclass(frozen=True)
class Target:
    """One process to scrape: ``job`` names the service, ``url`` is its metrics URL."""

    job: str
    url: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def group(self) -> dict[str, object]:
        """A file_sd target group: address, scheme and path from the URL, the job as a label."""
        parts = urlsplit(self.url)
        if not parts.scheme or not parts.netloc:
            raise ValueError(f"not an absolute metrics URL: {self.url!r}")
        labels = {
            **self.labels,
            "job": self.job,
            "__scheme__": parts.scheme,
            "__metrics_path__": parts.path or "/metrics",
        }
        return {"targets": [parts.netloc], "labels": labels}


def installed() -> bool:
    return PROMETHEUS_BINARY.exists() and PROMTOOL_BINARY.exists()


def install() -> str:
    """Install Debian's prometheus when missing (root only), without starting its service.

    The package's maintainer scripts would start a system Prometheus on :9090: :func:`apt_install`
    keeps it from starting.
    """
    if installed():
        return "already installed"
    apt_install(APT_PACKAGES, "Prometheus")
    if not installed():
        raise PlatformError(f"{PROMETHEUS_BINARY} or {PROMTOOL_BINARY} missing after apt-get")
    return "installed"


def promtool() -> str:
    """The path of ``promtool`` (installing the package when missing and allowed)."""
    install()
    return str(PROMTOOL_BINARY)


def service_targets(config: LocalConfig) -> list[Target]:
    """One target per service process that exports metrics (``ServiceSpec.metrics_url``)."""
    from deploy.local.services import specs

    return [Target(spec.name, spec.metrics_url) for spec in specs(config) if spec.metrics_url]


class Prometheus:
    SERVICES = "services"

    def __init__(self, config: LocalConfig, rules_dir: Path = RULES_DIR) -> None:
        self.config = config
        self.rules_dir = rules_dir
        self.dir = config.state_dir / "prometheus"
        self.config_file = self.dir / "prometheus.yml"
        self.data = self.dir / "data"
        self.targets_dir = self.dir / "targets"
        self.process = ManagedProcess(
            "prometheus",
            self.dir / "prometheus.pid",
            self.dir / "prometheus.log",
            marker=str(self.config_file),
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.config.prometheus_port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    # --- configuration --------------------------------------------------------------------

    def config_document(self) -> dict[str, object]:
        return {
            "global": {
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": "4s",
                "evaluation_interval": SCRAPE_INTERVAL,
            },
            "rule_files": [str(self.rules_dir / "*.yml")],
            "scrape_configs": [
                {"job_name": "prometheus", "static_configs": [{"targets": [self.address]}]},
                {
                    # Each target group names its own job (the service); this is the default.
                    "job_name": "beeldportaal",
                    "file_sd_configs": [
                        {"files": [str(self.targets_dir / "*.json")], "refresh_interval": "5s"}
                    ],
                },
            ],
        }

    def write_config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        self.write_targets(self.SERVICES, service_targets(self.config))
        header = "# Generated by deploy/local/prometheus.py at `beeldportaal platform up`.\n"
        self.config_file.write_text(
            header + yaml.safe_dump(self.config_document(), sort_keys=False)
        )
        return self.config_file

    def write_targets(self, name: str, targets: Sequence[Target]) -> Path:
        """``<targets>/<name>.json`` (atomically: Prometheus may read it at any moment)."""
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        path = self.targets_dir / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([t.group() for t in targets], indent=2) + "\n")
        tmp.replace(path)
        return path

    def remove_targets(self, name: str) -> None:
        (self.targets_dir / f"{name}.json").unlink(missing_ok=True)

    def check_config(self) -> str:
        """``promtool check config`` on the generated file (which also checks the rule files)."""
        result = run(
            [promtool(), "check", "config", str(self.config_file)], "promtool check config"
        )
        return (result.stdout + result.stderr).strip()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> str:
        install()
        self.write_config()
        self.check_config()
        pid = self.process.pid()
        if pid is not None:
            os.kill(pid, signal.SIGHUP)  # rereads the configuration and the rules
            return "already running"
        self.data.mkdir(parents=True, exist_ok=True)
        self.process.start(
            [
                str(PROMETHEUS_BINARY),
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={self.data}",
                f"--storage.tsdb.retention.time={RETENTION}",
                f"--web.listen-address={self.address}",
            ],
            cwd=self.dir,
        )
        wait_until(self.ready, 60, "Prometheus", self.process)
        return "started"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> bool:
        return self.process.stop()

    def status(self) -> str:
        if not self.process.running():
            return "stopped"
        return f"ready on {self.url}" if self.ready() else "running, not ready"
