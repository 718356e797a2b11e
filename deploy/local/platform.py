"""`beeldportaal platform up|down|status`: the local Kafka, S3, PostgreSQL and Prometheus as one
unit."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable

from deploy.local.config import LocalConfig
from deploy.local.kafka import Kafka
from deploy.local.postgres import Postgres
from deploy.local.processes import PlatformError
from deploy.local.prometheus import Prometheus
from deploy.local.s3 import S3Server
from shared import migrations
from shared.auth import ensure_dev_keypair


class Platform:
    def __init__(
        self, config: LocalConfig | None = None, out: Callable[[str], None] = print
    ) -> None:
        self.config = config or LocalConfig.from_env()
        self.kafka = Kafka(self.config)
        self.s3 = S3Server(self.config)
        self.postgres = Postgres(self.config)
        self.prometheus = Prometheus(self.config)
        self.out = out

    def up(self) -> None:
        """Install what is missing, start what is not running, provision; safe to repeat."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.config.state_dir.chmod(0o755)
        env = self.config.client_env()
        try:
            self.out(f"kafka:    {self.kafka.start()}")
            actions = self.kafka.provision()
            changed = {k: v for k, v in actions.items() if v != "up to date"}
            self.out(f"topics:   {len(actions)} declared" + (f", {changed}" if changed else ""))
            self.out(f"s3:       {self.s3.start()}")
            made = self.s3.create_buckets()
            self.out("buckets:  " + (f"created {made}" if made else "present"))
            self.out(f"postgres: {self.postgres.start()}")
            applied = migrations.migrate(env["BEELDPORTAAL_POSTGRES_DSN"])
            self.out("schema:   " + (f"applied {applied}" if applied else "up to date"))
            self.out(f"prometheus: {self.prometheus.start()}")
        except PlatformError:
            self.out("start-up failed; `beeldportaal platform down` stops what did start")
            raise
        ensure_dev_keypair(self.config.dev_jwt_dir)
        env_file = self.config.write_env_file()
        self.out("")
        self.out(f"Kafka      {env['BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS']}")
        bucket = env["BEELDPORTAAL_S3_BUCKET"]
        self.out(f"S3         http://{env['BEELDPORTAAL_S3_ENDPOINT']}  (bucket {bucket})")
        self.out(f"PostgreSQL {env['BEELDPORTAAL_POSTGRES_DSN']}")
        self.out(f"Prometheus {self.prometheus.url}  (rules: {self.prometheus.rules_dir})")
        self.out(f"settings   {env_file}  (source it, or `eval $(beeldportaal platform env)`)")

    def down(self) -> None:
        # Reverse order of start; each stops only the pid it recorded.
        for name, component in (
            ("prometheus", self.prometheus),
            ("postgres", self.postgres),
            ("s3", self.s3),
            ("kafka", self.kafka),
        ):
            self.out(f"{name + ':':11} {'stopped' if component.stop() else 'was not running'}")

    def purge(self) -> None:
        """Stop everything, then delete every byte of state (data, logs, secrets). The services
        `make up` started go first: their pid files are in the state, and once it is gone
        nothing could stop their supervisors, which would start them again for ever."""
        from deploy.local.services import Services

        Services(self.config, out=self.out).down()
        self.down()
        homes = {self.config.state_dir, self.postgres.home}
        for path in homes:
            shutil.rmtree(path, ignore_errors=True)
            self.out(f"removed   {path}")

    def status(self) -> bool:
        healthy = True
        for name, component in (
            ("kafka", self.kafka),
            ("s3", self.s3),
            ("postgres", self.postgres),
            ("prometheus", self.prometheus),
        ):
            state = component.status()
            healthy &= state.startswith("ready")
            self.out(f"{name + ':':11} {state}")
        return healthy

    def env(self) -> dict[str, str]:
        return self.config.client_env()


def main(action: str) -> int:
    platform = Platform()
    try:
        if action == "up":
            platform.up()
        elif action == "down":
            platform.down()
        elif action == "status":
            return 0 if platform.status() else 1
        elif action == "purge":
            platform.purge()
        elif action == "env":
            for key, value in sorted(platform.env().items()):
                print(f"export {key}={value}")
        return 0
    except PlatformError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
