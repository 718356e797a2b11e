"""A real consent API for tests: uvicorn on a free port, real Kafka, registry topics of its own."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from services.consent.adapters.registry_view import RegistryTopics
from services.consent.bootstrap import ConsentApi, build
from services.consent.config import ConsentSettings
from services.consent.entrypoints.http import FHIR_JSON, create_app
from shared import topics
from shared.auth import AuthSettings, generate_dev_keypair, mint_token
from shared.settings import KafkaSettings, PrivacySettings
from shared.topics import TopicSpec

PSEUDONYM_KEY = "integration-pseudonym-key-" + "p" * 32
HOSPITAL = "11111111"
OTHER_HOSPITAL = "22222222"
MITZ_URA = "00000001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def registry_topics(
    declare_topics: Callable[..., Awaitable[None]], tag: str
) -> RegistryTopics:
    names = RegistryTopics(
        f"test-consent-registered-{tag}",
        f"test-consent-revoked-{tag}",
        f"test-treatment-relationships-{tag}",
    )
    await declare_topics(*(TopicSpec(name, 3, topics.DAY_MS) for name in names.names))
    return names


@dataclass
class RunningConsent:
    api: ConsentApi
    base_url: str
    key_path: Path
    server: uvicorn.Server
    thread: threading.Thread

    def token(self, ura: str = HOSPITAL, roles: tuple[str, ...] = ("provider",)) -> str:
        return mint_token(self.key_path, ura=ura, roles=roles)

    def auth(self, ura: str = HOSPITAL, roles: tuple[str, ...] = ("provider",)) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(ura, roles)}"}

    def post(self, path: str, body: Any, **kw: Any) -> requests.Response:
        headers = kw.pop("headers", None) or self.auth()
        return requests.post(f"{self.base_url}{path}", json=body, headers=headers, timeout=30)

    def mitz(self, bundle: Any) -> requests.Response:
        headers = {"Content-Type": FHIR_JSON, **self.auth(MITZ_URA, ("consent-authority",))}
        return requests.post(
            f"{self.base_url}/mitz/notifications",
            data=json.dumps(bundle),
            headers=headers,
            timeout=30,
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_consent(
    kafka: KafkaSettings, registry_topics: RegistryTopics, key_dir: Path
) -> RunningConsent:
    private, public = generate_dev_keypair(key_dir)
    port = free_port()
    settings = ConsentSettings(kafka=kafka, http_port=port, view_sync_timeout_seconds=15)
    api = build(
        settings,
        privacy=PrivacySettings(pseudonym_key=PSEUDONYM_KEY),  # type: ignore[arg-type]
        auth=AuthSettings(public_keys=[public]),  # type: ignore[call-arg]
        topics=registry_topics,
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(api), host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="consent-under-test", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    # Generous: a loaded broker (other suites running) can take a while to assign and fetch.
    deadline = time.monotonic() + 90
    while True:
        if not thread.is_alive():
            raise RuntimeError("the consent API stopped while starting (see its log)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the consent API did not become ready within 90 s")
        if server.started:
            try:
                if requests.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
        time.sleep(0.05)
    return RunningConsent(api, base_url, private, server, thread)


@pytest.fixture
def consent_service(
    kafka_settings: KafkaSettings, registry_topics: RegistryTopics, tmp_path: Path
) -> Iterator[RunningConsent]:
    running = start_consent(kafka_settings, registry_topics, tmp_path / "keys")
    try:
        yield running
    finally:
        running.stop()


def read_topics(kafka: KafkaSettings, names: tuple[str, ...]) -> list[ConsumerRecord]:
    """Every record on ``names`` from offset 0 to the current end."""

    async def read() -> list[ConsumerRecord]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap_list, enable_auto_commit=False, group_id=None
        )
        await consumer.start()
        try:
            await consumer._client.force_metadata_update()
            parts = [
                TopicPartition(t, p) for t in names for p in consumer.partitions_for_topic(t) or ()
            ]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            ends = await consumer.end_offsets(parts)
            records: list[ConsumerRecord] = []
            deadline = time.monotonic() + 20
            while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
                if time.monotonic() > deadline:
                    raise TimeoutError("could not read the topics to their end")
                batch = await consumer.getmany(timeout_ms=200)
                for batch_records in batch.values():
                    records.extend(batch_records)
            return records
        finally:
            await consumer.stop()

    return asyncio.run(read())
