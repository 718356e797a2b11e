"""Wires the ingest service from its settings: adapters, the store use case, auth, metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from services.ingest.adapters.peers import PeerDirectory
from services.ingest.config import IngestSettings
from services.ingest.handlers.store import InstanceStore
from services.ingest.metrics import IngestMetrics
from shared.auth import AuthSettings, Principal, TokenVerifier, bearer_principal, load_public_keys
from shared.identifiers import Pseudonymizer
from shared.kafka import KafkaEventPublisher, broker_ready
from shared.settings import PrivacySettings
from shared.storage.port import ObjectStore, ObjectStoreError
from shared.storage.s3 import S3ObjectStore


@dataclass
class Ingest:
    """Everything the entrypoints need, built once per process."""

    settings: IngestSettings
    peers: PeerDirectory
    objects: ObjectStore
    publisher: KafkaEventPublisher
    metrics: IngestMetrics
    store: InstanceStore
    principal_dependency: Callable[..., Any]
    # The C-STORE SCP, when this process also serves DIMSE (started after the producer,
    # stopped before it, so no association ever meets a stopped producer).
    scp: Any = None
    _ready_cache: tuple[float, dict[str, bool]] = field(default=(0.0, {}))

    @property
    def retrieve_base(self) -> str | None:
        """WADO-RS base of the stored studies (``settings.retrieve_base_url``), if any."""
        base = self.settings.retrieve_base_url
        return base.rstrip("/") if base else None

    @asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        # asyncio's default pool has cpu+4 threads: too few for S3 round trips of many
        # concurrent instances, which then queue behind each other.
        executor = ThreadPoolExecutor(self.settings.io_threads, thread_name_prefix="ingest-io")
        asyncio.get_running_loop().set_default_executor(executor)
        await asyncio.to_thread(self.objects.ensure_bucket)
        await self.publisher.start()
        if self.scp is not None:
            self.scp.start(self, asyncio.get_running_loop())
        try:
            yield
        finally:
            if self.scp is not None:
                await self.scp.stop()
            await self.publisher.stop()
            await self.objects.aclose()

    async def readiness(self) -> dict[str, bool]:
        """Kafka and S3 reachable; cached for two seconds so probes cannot hammer them."""
        checked_at, checks = self._ready_cache
        if time.monotonic() - checked_at < 2.0 and checks:
            return checks

        def s3_ok() -> bool:
            try:
                self.objects.exists("readiness-probe")
                return True
            except ObjectStoreError:
                return False

        kafka, s3 = await asyncio.gather(
            broker_ready(self.settings.kafka.bootstrap_list, timeout_ms=2000),
            asyncio.to_thread(s3_ok),
        )
        checks = {"kafka": kafka, "s3": s3}
        self._ready_cache = (time.monotonic(), checks)
        return checks


def build(
    settings: IngestSettings,
    *,
    privacy: PrivacySettings | None = None,
    auth: AuthSettings | None = None,
    objects: ObjectStore | None = None,
    peers: PeerDirectory | None = None,
) -> Ingest:
    privacy = privacy or PrivacySettings()  # type: ignore[call-arg]
    auth = auth or AuthSettings()
    metrics = IngestMetrics()
    # 8 MiB parts (S3's minimum is 5 MiB): what a large instance holds in memory on its way out.
    objects = objects or S3ObjectStore.from_settings(settings.s3, part_size=8 * 1024 * 1024)
    # No linger: a C-STORE association waits for each instance's acknowledgement before sending
    # the next, so waiting for a batch to fill only adds latency (measured: half the rate).
    publisher = KafkaEventPublisher(settings.kafka, "ingest", linger_ms=0)
    pseudonymizer = Pseudonymizer(privacy.pseudonym_key.get_secret_value().encode())
    store = InstanceStore(
        objects,
        publisher,
        pseudonymizer,
        metrics,
        inline_threshold=settings.inline_store_bytes,
    )
    verifier = TokenVerifier(
        load_public_keys(auth.public_keys),
        issuer=auth.issuer,
        audience=auth.audience,
        leeway_s=auth.leeway_s,
    )
    principal: Callable[..., Principal] = bearer_principal(verifier)
    return Ingest(
        settings=settings,
        peers=peers if peers is not None else PeerDirectory.load(settings.peers_file),
        objects=objects,
        publisher=publisher,
        metrics=metrics,
        store=store,
        principal_dependency=principal,
    )
