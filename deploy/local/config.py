"""Where the local platform keeps its state and cache, which ports and versions it uses.

Everything is overridable with ``BEELDPORTAAL_LOCAL_*`` environment variables so several
checkouts (or a CI run beside a developer's platform) can coexist on one machine.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"
MAVEN_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.11.0"
VERSITYGW_MODULE = "github.com/versity/versitygw/cmd/versitygw"
VERSITYGW_VERSION = "v1.7.0"
POSTGRES_MAJOR = "15"

BUCKETS = ("dicom",)
DATABASE = "beeldportaal"
DB_USER = "beeldportaal"
# Two more login roles of the local cluster, for what a hospital's DBA sets up around the
# owner: an operator role that is a member of it (runs e.g. the timeline rebuild as itself),
# and one that is not (which such commands must refuse; the tests also run the timeline's
# services as it, given the service grants, as production would: docs/operations.md).
OPERATOR_USER = "beeldportaal_operator"
OUTSIDER_USER = "beeldportaal_outsider"


def _repo_root() -> Path:
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class LocalConfig:
    state_dir: Path
    cache_dir: Path
    kafka_port: int
    kafka_controller_port: int
    s3_port: int
    postgres_port: int
    prometheus_port: int = 19090
    kafka_heap: str = "-Xms256m -Xmx1g"

    @classmethod
    def from_env(cls) -> LocalConfig:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return cls(
            state_dir=Path(
                os.environ.get("BEELDPORTAAL_LOCAL_STATE_DIR", _repo_root() / ".state")
            ).resolve(),
            cache_dir=Path(
                os.environ.get("BEELDPORTAAL_LOCAL_CACHE_DIR", Path(xdg) / "beeldportaal")
            ).resolve(),
            kafka_port=_env_int("BEELDPORTAAL_LOCAL_KAFKA_PORT", 19092),
            kafka_controller_port=_env_int("BEELDPORTAAL_LOCAL_KAFKA_CONTROLLER_PORT", 19093),
            s3_port=_env_int("BEELDPORTAAL_LOCAL_S3_PORT", 19000),
            postgres_port=_env_int("BEELDPORTAAL_LOCAL_POSTGRES_PORT", 15432),
            prometheus_port=_env_int("BEELDPORTAAL_LOCAL_PROMETHEUS_PORT", 19090),
        )

    @property
    def env_file(self) -> Path:
        """The connection settings of the running platform, in ``KEY=value`` lines."""
        return self.state_dir / "platform.env"

    def secret(self, name: str, nbytes: int = 32) -> str:
        """A random secret generated once per state directory (S3 keys, pseudonym key)."""
        path = self.state_dir / "secrets" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.write_text(secrets.token_urlsafe(nbytes))
            path.chmod(0o600)
        return path.read_text().strip()

    def client_env(self) -> dict[str, str]:
        """Settings (shared.settings) that point a service or test at this platform."""
        return {
            "BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{self.kafka_port}",
            "BEELDPORTAAL_S3_ENDPOINT": f"127.0.0.1:{self.s3_port}",
            "BEELDPORTAAL_S3_ACCESS_KEY": "beeldportaal",
            "BEELDPORTAAL_S3_SECRET_KEY": self.secret("s3-secret-key"),
            "BEELDPORTAAL_S3_REGION": "us-east-1",
            "BEELDPORTAAL_S3_SECURE": "false",
            "BEELDPORTAAL_S3_BUCKET": BUCKETS[0],
            "BEELDPORTAAL_POSTGRES_DSN": (
                f"postgresql://{DB_USER}@127.0.0.1:{self.postgres_port}/{DATABASE}"
            ),
            "BEELDPORTAAL_PSEUDONYM_KEY": self.secret("pseudonym-key", 48),
            # notify signs portal pickup links with it (worker) and verifies them (API).
            "BEELDPORTAAL_NOTIFY_PICKUP_KEY": self.secret("pickup-key", 48),
            # Services verify bearer tokens minted by `beeldportaal token mint` (dev issuer).
            "BEELDPORTAAL_AUTH_PUBLIC_KEYS": str(self.dev_jwt_dir / "dev-jwt.pub"),
            # Where `beeldportaal observability check` and the tests find the local Prometheus.
            "BEELDPORTAAL_PROMETHEUS_URL": self.prometheus_url,
        }

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def dev_jwt_dir(self) -> Path:
        return self.state_dir / "secrets" / "dev-jwt"

    def write_env_file(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{k}={v}" for k, v in sorted(self.client_env().items())]
        self.env_file.write_text("\n".join(lines) + "\n")
        self.env_file.chmod(0o600)
        return self.env_file


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip()
    return env
