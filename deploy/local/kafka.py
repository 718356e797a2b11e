"""Apache Kafka (KRaft, combined broker+controller) from Maven Central jars, cached by version."""

from __future__ import annotations

import asyncio
import base64
import shutil
import uuid
from pathlib import Path

from deploy.local.config import KAFKA_VERSION, LOG4J_VERSION, MAVEN_DEPENDENCY_PLUGIN, LocalConfig
from deploy.local.processes import ManagedProcess, PlatformError, run, wait_until
from shared.kafka import broker_ready, provision_topics
from shared.topics import TOPICS

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>nl.beeldportaal.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <!-- Kafka 4.x logs through SLF4J 1.x: bridge it to log4j2. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = out
logger.raft.name = kafka.server.KafkaRaftServer
logger.raft.level = INFO
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = INFO
"""


class Kafka:
    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.home = config.cache_dir / f"kafka-{KAFKA_VERSION}"
        self.libs = self.home / "libs"
        self.dir = config.state_dir / "kafka"
        self.properties = self.dir / "server.properties"
        self.process = ManagedProcess(
            "kafka", self.dir / "kafka.pid", self.dir / "kafka.log", marker=str(self.properties)
        )

    @property
    def bootstrap(self) -> list[str]:
        return [f"127.0.0.1:{self.config.kafka_port}"]

    def install(self) -> None:
        """Download the broker's jars once per version into the cache (Maven's repo caches too)."""
        stamp = self.home / ".complete"
        if stamp.exists():
            return
        for tool in ("java", "mvn"):
            if shutil.which(tool) is None:
                raise PlatformError(f"{tool} not found: install OpenJDK 17 and Maven (apt-get)")
        self.home.mkdir(parents=True, exist_ok=True)
        pom = self.home / "pom.xml"
        pom.write_text(POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
        shutil.rmtree(self.libs, ignore_errors=True)
        run(
            [
                "mvn", "-B", "-q", "-f", str(pom),
                f"{MAVEN_DEPENDENCY_PLUGIN}:copy-dependencies",
                "-DincludeScope=runtime", f"-DoutputDirectory={self.libs}",
            ],
            f"downloading Kafka {KAFKA_VERSION} from Maven Central",
        )  # fmt: skip
        if not any(self.libs.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
            raise PlatformError(f"Kafka jars missing in {self.libs} after download")
        stamp.write_text(KAFKA_VERSION + "\n")

    def _java(self, *args: str) -> list[str]:
        return [
            "java", *self.config.kafka_heap.split(), "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.dir / 'logs'}",
            "-cp", f"{self.libs}/*", *args,
        ]  # fmt: skip

    def _write_config(self) -> None:
        c = self.config
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{c.kafka_controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{c.kafka_port},CONTROLLER://127.0.0.1:{c.kafka_controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{c.kafka_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.dir / "data"),
            "num.partitions": "1",
            # Topics come from shared.topics only; a typo must fail, not create a topic.
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "12",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "message.max.bytes": str(16 * 1024 * 1024 + 1024),
            "replica.fetch.max.bytes": str(16 * 1024 * 1024 + 1024),
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        self.properties.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.dir / "log4j2.properties").write_text(LOG4J2)

    def start(self) -> str:
        if self.process.running():
            return "already running"
        self.install()
        self._write_config()
        if not (self.dir / "data" / "meta.properties").exists():
            self.format_storage()
        self.process.start(self._java("kafka.Kafka", str(self.properties)))
        wait_until(self.ready, 120, "Kafka", self.process)
        return "started"

    def format_storage(self, cluster_id: str | None = None) -> None:
        """Format the data directory once; a cluster id is 16 random bytes, URL-safe base64."""
        cluster_id = cluster_id or base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # One id in 64 starts with "-": passed as a separate argument, the option parser would
        # take it for an option, so it goes as `--cluster-id=<id>`.
        self._write_config()
        run(
            self._java("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                       "-c", str(self.properties), "--ignore-formatted"),
            "formatting Kafka storage",
        )  # fmt: skip

    def ready(self) -> bool:
        return asyncio.run(broker_ready(self.bootstrap))

    def provision(self) -> dict[str, str]:
        return asyncio.run(provision_topics(self.bootstrap, TOPICS))

    def stop(self) -> bool:
        # A clean shutdown lets the broker skip log recovery next time; it can take a while.
        return self.process.stop(timeout=60)

    def status(self) -> str:
        if not self.process.running():
            return "stopped"
        return f"ready on {self.bootstrap[0]}" if self.ready() else "running, not ready"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"
