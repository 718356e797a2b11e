"""A real ingest service for tests: uvicorn on a free port, real Kafka, a private S3 bucket."""

from __future__ import annotations

import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from minio import Minio

from services.ingest.adapters.peers import PeerDirectory
from services.ingest.bootstrap import Ingest, build
from services.ingest.config import IngestSettings
from services.ingest.entrypoints.http import create_app
from shared.auth import AuthSettings, generate_dev_keypair, mint_token
from shared.events import InstanceStored
from shared.settings import KafkaSettings, PrivacySettings, S3Settings
from shared.storage.s3 import S3ObjectStore
from tests.kafka_tap import EventTap

SENDER_URA = "11111111"  # Ziekenhuis Oost sends ...
RECIPIENT_URA = "22222222"  # ... to Ziekenhuis West
OTHER_RECIPIENT_URA = "33333333"
PEERS = {
    "organisations": [
        {
            "ura": SENDER_URA,
            "name": "Ziekenhuis Oost",
            "receive_ae_title": "BP_ZHOOST",
            "dimse_senders": [{"ae_title": "ZHOOST_PACS", "hosts": ["127.0.0.1"]}],
        },
        {"ura": RECIPIENT_URA, "name": "Ziekenhuis West", "receive_ae_title": "BP_ZHWEST"},
        {"ura": OTHER_RECIPIENT_URA, "name": "Huisartsenpost Noord"},
    ]
}
PSEUDONYM_KEY = "test-pseudonym-key-" + "k" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def bucket(s3_settings: S3Settings) -> Iterator[S3Settings]:
    """A bucket of its own for one test (created by the service, emptied and removed after)."""
    settings = s3_settings.model_copy(update={"bucket": f"test-{uuid.uuid4().hex[:16]}"})
    yield settings
    client = Minio(
        settings.endpoint,
        access_key=settings.access_key,
        secret_key=settings.secret_key.get_secret_value(),
        region=settings.region,
        secure=False,
    )
    if client.bucket_exists(settings.bucket):
        for obj in client.list_objects(settings.bucket, recursive=True):
            client.remove_object(settings.bucket, obj.object_name)
        client.remove_bucket(settings.bucket)


@dataclass
class RunningIngest:
    ingest: Ingest
    base_url: str
    key_path: Path
    server: uvicorn.Server
    thread: threading.Thread

    def stow_url(self, ura: str = RECIPIENT_URA, study_uid: str | None = None) -> str:
        url = f"{self.base_url}/dicomweb/to/{ura}/studies"
        return f"{url}/{study_uid}" if study_uid else url

    def token(self, ura: str = SENDER_URA, **claims: object) -> str:
        return mint_token(self.key_path, ura=ura, **claims)  # type: ignore[arg-type]

    def auth_headers(self, ura: str = SENDER_URA) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(ura)}"}

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_ingest(
    kafka: KafkaSettings,
    s3: S3Settings,
    tmp_path: Path,
    objects: object | None = None,
    **overrides: object,
) -> RunningIngest:
    private, public = generate_dev_keypair(tmp_path / "keys")
    port = free_port()
    settings = IngestSettings(
        kafka=kafka,
        s3=s3,
        http_port=port,
        retrieve_base_url="http://timeline.example/dicomweb",
        spool_dir=tmp_path,
        **overrides,  # type: ignore[arg-type]
    )
    ingest = build(
        settings,
        privacy=PrivacySettings(pseudonym_key=PSEUDONYM_KEY),  # type: ignore[arg-type]
        auth=AuthSettings(public_keys=[public]),  # type: ignore[call-arg]
        objects=objects or S3ObjectStore.from_settings(s3),  # type: ignore[arg-type]
        peers=PeerDirectory.from_dict(PEERS),
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(ingest), host="127.0.0.1", port=port, log_config=None, lifespan="on"
        )
    )
    thread = threading.Thread(target=server.run, name="ingest-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the ingest service did not start")
        time.sleep(0.05)
    return RunningIngest(ingest, f"http://127.0.0.1:{port}", private, server, thread)


@pytest.fixture
def ingest_service(
    kafka_settings: KafkaSettings, bucket: S3Settings, tmp_path: Path
) -> Iterator[RunningIngest]:
    running = start_ingest(kafka_settings, bucket, tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def instance_stored_tap(kafka_settings: KafkaSettings) -> EventTap:
    return EventTap(kafka_settings, InstanceStored.topic)


def random_note() -> str:
    return "Graag beoordelen vóór MDO — " + secrets.token_hex(4)
