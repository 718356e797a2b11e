"""A real routing service for tests: the directory API on a free port over this test's topics."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from services.routing.bootstrap import Routing, build
from services.routing.config import RoutingSettings
from services.routing.entrypoints.http import create_app
from shared import topics
from shared.auth import AuthSettings, generate_dev_keypair, mint_token
from shared.settings import KafkaSettings
from shared.topics import TopicSpec
from tests.integration.ingest.conftest import free_port

OPERATOR_URA = "00000001"
READER_URA = "87654321"


@pytest.fixture
async def directory_topic(declare_topics: Callable[..., Awaitable[None]], tag: str) -> str:
    """This test's provider-directory: one partition, compacted, like the real one."""
    spec = topics.topic("provider-directory")
    test_spec = TopicSpec(
        f"test-provider-directory-{tag}", spec.partitions, spec.retention_ms, compacted=True
    )
    await declare_topics(test_spec)
    return test_spec.name


@dataclass
class RunningRouting:
    routing: Routing
    base_url: str
    key_path: Path
    server: uvicorn.Server
    thread: threading.Thread

    def headers(self, *roles: str, ura: str = OPERATOR_URA) -> dict[str, str]:
        token = mint_token(self.key_path, ura=ura, roles=roles or ("operator",))
        return {"Authorization": f"Bearer {token}"}

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_routing_api(
    kafka: KafkaSettings, directory_topic: str, tmp_path: Path, **overrides: Any
) -> RunningRouting:
    private, public = generate_dev_keypair(tmp_path / "keys")
    port = free_port()
    settings = RoutingSettings(kafka=kafka, http_port=port, **overrides)
    routing = build(
        settings,
        auth=AuthSettings(public_keys=[public]),  # type: ignore[call-arg]
        directory_topic=directory_topic,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(routing), host="127.0.0.1", port=port, log_config=None, lifespan="on"
        )
    )
    thread = threading.Thread(target=server.run, name="routing-api-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the routing API did not start")
        time.sleep(0.05)
    return RunningRouting(routing, f"http://127.0.0.1:{port}", private, server, thread)


@pytest.fixture
def routing_api(
    kafka_settings: KafkaSettings, directory_topic: str, tmp_path: Path
) -> Iterator[RunningRouting]:
    running = start_routing_api(kafka_settings, directory_topic, tmp_path)
    try:
        yield running
    finally:
        running.stop()
