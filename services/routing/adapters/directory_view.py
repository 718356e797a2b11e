"""The provider directory on Kafka: a read model folded from the compacted topic, and its writer.

``provider-directory`` is a table: one partition, compacted, keyed by URA, each value a
:meth:`Provider.to_record` (JSON *with* secrets: the topic is access-controlled) and a tombstone
(value ``None``) for a removed provider. Every routing process holds the whole directory in
memory (:class:`DirectoryView`, a :class:`~shared.topic_view.TopicView`): it is small reference
data every replica needs in full, which is what faust calls a global table (design.md, Keys).

The writer returns where its record landed so the API can wait until its own view has applied
it before answering (read-your-writes), instead of answering from a view that is a moment behind.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from services.routing.domain.directory import Directory, Provider, validation_problems
from services.routing.metrics import RoutingMetrics
from shared.errors import PoisonEvent, TransientError
from shared.kafka import CachedMurmur2Partitioner, start_producer
from shared.settings import KafkaSettings
from shared.topic_view import TopicView

PROVIDER_DIRECTORY = "provider-directory"
RECORD_HEADERS = [("content-type", b"application/json"), ("record", b"provider.v1")]
_URA = re.compile(r"[0-9]{8}")


@dataclass(frozen=True, slots=True)
class Written:
    """Where a directory record landed: wait for it to be applied to read your own write."""

    topic: str
    partition: int
    offset: int


# --- the fold (pure) ------------------------------------------------------------------------------


class DirectoryFold:
    """The directory as the records of the topic say it is, applied one at a time in order.

    A record it cannot read is :class:`PoisonEvent`: the view logs its position and skips it,
    keeping what the URA had before. The reasons never quote the value (it holds secrets).
    Providers are kept in a dict, so folding n records costs O(n); the domain
    :class:`Directory` (immutable, sorted) is built for a search only after a change.
    """

    def __init__(self) -> None:
        self._providers: dict[str, Provider] = {}
        self._directory: Directory | None = None

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        ura, provider = read_record(key, value)
        if provider is None:  # tombstone: the provider was removed
            if self._providers.pop(ura, None) is not None:
                self._directory = None
            return
        self._providers[ura] = provider
        self._directory = None

    def get(self, ura: str) -> Provider | None:
        return self._providers.get(ura)

    def search(self, query: str, *, limit: int = 20) -> list[Provider]:
        return self.directory().search(query, limit=limit)

    def directory(self) -> Directory:
        if self._directory is None:
            self._directory = Directory(self._providers.values())
        return self._directory

    def __len__(self) -> int:
        return len(self._providers)


def read_record(key: bytes | None, value: bytes | None) -> tuple[str, Provider | None]:
    """A directory record's URA and provider (None for a tombstone: removed); raises
    :class:`PoisonEvent` for a record that is no provider keyed by its own URA. Every reader of
    the topic reads it so (consent's ``ProviderTypes`` too), or two services would disagree on
    what the directory says."""
    ura = _ura_of(key)
    if value is None:
        return ura, None
    try:
        provider = Provider.from_record(value)
    except ValidationError as exc:
        problems = "; ".join(validation_problems(exc)[:5])
        raise PoisonEvent(f"provider record for URA {ura} is invalid: {problems}") from None
    if provider.ura != ura:
        raise PoisonEvent(f"provider record keyed {ura} describes another URA")
    return ura, provider


def _ura_of(key: bytes | None) -> str:
    if key is None:
        raise PoisonEvent("provider record has no key (a URA)")
    try:
        ura = key.decode("ascii")
    except UnicodeDecodeError:
        raise PoisonEvent("provider record key is not a URA") from None
    if not _URA.fullmatch(ura):
        raise PoisonEvent("provider record key is not a URA (8 digits)")
    return ura


# --- the ports the API and the worker use ---------------------------------------------------------


class DirectoryReader(Protocol):
    """A directory read model that can say how fresh it is (a view, or the in-memory one)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def is_caught_up(self) -> bool: ...

    @property
    def failed(self) -> bool: ...

    def get(self, ura: str) -> Provider | None: ...

    def search(self, query: str, *, limit: int = 20) -> list[Provider]: ...

    async def sync(self, timeout: float) -> None:
        """Wait until every record on the topic before this call has been applied."""

    async def wait_for(self, written: Written, timeout: float) -> None:
        """Wait until ``written`` (a record just published) has been applied."""


class DirectoryWriter(Protocol):
    """Publishes directory records and answers once the broker has them (acks=all)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def put(self, provider: Provider) -> Written: ...

    async def remove(self, ura: str) -> Written: ...


# --- Kafka ----------------------------------------------------------------------------------------


class DirectoryView:
    """The directory folded from ``provider-directory``, from offset 0, in this process.

    Implements :class:`~services.routing.domain.directory.ProviderLookup` (``get``) for
    routing and search for the API. ``wait_caught_up`` may be called before ``start`` (the
    worker's agent can see its first record before the view's service started): it waits
    for the start as well.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str = PROVIDER_DIRECTORY,
        *,
        metrics: RoutingMetrics | None = None,
        name: str = "provider-directory",
    ) -> None:
        self.topic = topic
        self._fold = DirectoryFold()
        self._metrics = metrics
        self._view = TopicView(kafka, [topic], self._apply, name=name)
        self._started = asyncio.Event()

    def _apply(self, record: Any) -> None:
        try:
            self._fold.apply(record.key, record.value)
        except PoisonEvent:
            if self._metrics is not None:
                self._metrics.directory_records_skipped.inc()
            raise
        if self._metrics is not None:
            self._metrics.directory_providers.set(len(self._fold))

    async def start(self) -> None:
        await self._view.start()
        self._started.set()

    async def stop(self) -> None:
        self._started.clear()
        await self._view.stop()

    @property
    def is_caught_up(self) -> bool:
        return self._view.is_caught_up  # not before start nor after stop (TopicView)

    @property
    def failed(self) -> bool:
        return self._view.failed

    def lag(self) -> int:
        return self._view.lag()

    async def wait_caught_up(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self._started.wait()
        await self._view.wait_caught_up(timeout)

    async def sync(self, timeout: float) -> None:
        await self._view.sync(timeout)

    async def wait_for(self, written: Written, timeout: float) -> None:
        await self._view.wait_for_offset(written.topic, written.partition, written.offset, timeout)

    def get(self, ura: str) -> Provider | None:
        return self._fold.get(ura)

    def search(self, query: str, *, limit: int = 20) -> list[Provider]:
        return self._fold.search(query, limit=limit)

    def __len__(self) -> int:
        return len(self._fold)


class KafkaDirectoryWriter:
    """Writes provider records and tombstones with an idempotent, acks=all producer.

    Directory records are table rows, not codec events, so this has its own producer with the
    settings of :class:`~shared.kafka.KafkaEventPublisher` (and its murmur2 partitioner, so a
    URA lands where any other Kafka client would put it should the topic ever grow).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str = PROVIDER_DIRECTORY,
        *,
        client_id: str = "routing-directory",
    ) -> None:
        self.topic = topic
        self._config: dict[str, Any] = {
            "bootstrap_servers": kafka.bootstrap_list,
            "client_id": f"{kafka.client_id_prefix}-{client_id}",
            "acks": "all",
            "enable_idempotence": True,
            "compression_type": kafka.compression,
            "max_request_size": kafka.max_message_bytes,
            "request_timeout_ms": kafka.request_timeout_ms,
            "linger_ms": 0,  # one record per API call: nothing to batch
            "partitioner": CachedMurmur2Partitioner(),
        }
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        if self._producer is None:
            self._producer = await start_producer(self._config)

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def __aenter__(self) -> KafkaDirectoryWriter:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def put(self, provider: Provider) -> Written:
        return await self._send(provider.ura, provider.to_record().encode())

    async def remove(self, ura: str) -> Written:
        return await self._send(ura, None)

    async def _send(self, ura: str, value: bytes | None) -> Written:
        if self._producer is None:
            raise RuntimeError("directory writer not started")
        try:
            meta = await self._producer.send_and_wait(
                self.topic, value=value, key=ura.encode(), headers=list(RECORD_HEADERS)
            )
        except KafkaError as exc:
            raise TransientError(f"writing the directory entry of {ura} failed: {exc}") from exc
        return Written(meta.topic, meta.partition, meta.offset)
