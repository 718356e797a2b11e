"""Faust app factory with the project's Kafka defaults; faust events decoded by the codec."""

from __future__ import annotations

import asyncio
import tempfile
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TopicT, TransportT
from yarl import URL

from shared.codec import Codec
from shared.errors import PoisonEvent
from shared.events import Event
from shared.kafka import provision_topics
from shared.logging import get_logger
from shared.settings import KafkaSettings
from shared.topics import BY_NAME, FOREVER, MAX_MESSAGE_BYTES, TOPICS, TopicSpec

T = TypeVar("T")
log = get_logger(__name__)

KAFKA_SCHEMES = frozenset({"kafka", "aiokafka"})
STORE_SCHEMES = frozenset({"memory", "rocksdb"})  # rocksdb:// uses rocksdict when installed
RAW = "raw"


class IdempotentProducer(aiokafka_driver.Producer):
    """faust's aiokafka producer, idempotent under at-least-once too.

    faust only asks aiokafka for ``enable_idempotence`` in exactly-once (transaction) mode. Both
    the plain and the threaded producer build their ``AIOKafkaProducer`` kwargs from
    ``_settings_extra()``, so adding it here covers every producer faust creates. Idempotence
    makes the broker drop the duplicates a producer retry would otherwise write.
    """

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class _ReadOffsets(defaultdict):  # type: ignore[type-arg]
    """faust's per-partition "last offset read", which holds still while a partition rewinds."""

    def __init__(self, rewinding: dict[Any, bool]) -> None:
        super().__init__(lambda: None)
        self.rewinding = rewinding

    def __setitem__(self, tp: Any, offset: int | None) -> None:
        # A message dropped while rewinding must not count as read: the re-read that follows
        # starts below it, and faust drops any message below the last offset read.
        super().__setitem__(tp, None if tp in self.rewinding else offset)


class GapSafeConsumer(aiokafka_driver.Consumer):
    """faust's consumer, except that it re-reads what faust skipped instead of committing past it.

    faust 0.15 drops fetched records in several places around a rebalance or table recovery
    (a batch cut short when flow stops or the generation changes, stream queues cleared when
    flow resumes) while the Kafka position has already moved past them. The next record it
    reads is then more than one offset ahead, and faust records the missing offsets as a "gap"
    that later commits count as processed: those records are never handled. (Gaps are
    legitimate in compacted or transactional topics, which agents here never consume.)
    faust-streaming issues #596 and #606 describe the same races.

    Two repairs: when flow resumes, every partition is first sought back to its committed
    offset; and a gap rewinds the partition to the first missing offset, dropping records of
    the old fetch (neither delivered nor acked, so never committed) until the re-read begins.
    Handlers are idempotent, so a record seen twice is harmless.

    Measured with the consent worker restarted mid-stream (200 studies): without this, every
    run lost records; with it (and one partition count per app), most runs lose nothing, but
    about one run in four still stalls or loses records. That residue is not understood yet.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Partitions sought back, each with whether a fetch after the seek has begun: until it
        # has, records of the partition still come from the batch fetched before the seek.
        self._rewinding: dict[Any, bool] = {}
        self._read_offset = _ReadOffsets(self._rewinding)
        deliver = self.callback

        async def deliver_unless_stale(message: Any) -> None:
            refetched = self._rewinding.get(message.tp)
            if refetched is not None:
                if not refetched:
                    return  # fetched before the rewind: it comes again, in order
                del self._rewinding[message.tp]
            await deliver(message)

        self.callback = deliver_unless_stale
        self._resuming: asyncio.Future[None] | None = None

    def resume_flow(self) -> None:
        # faust resumes flow after a rebalance or a table recovery *after* it cleared its
        # stream queues, which may have held records it had already read (and moved the Kafka
        # position past). Seeking every partition back to its committed offset first makes
        # everything not yet committed come again; the flow resumes once the seek is done.
        if self._resuming is not None and not self._resuming.done():
            return
        self._resuming = asyncio.ensure_future(self._seek_then_resume())

    async def _seek_then_resume(self) -> None:
        try:
            await self.perform_seek()
        except Exception as exc:  # the flow must resume whatever happens
            log.warning("seek to committed offsets before resuming failed", error=str(exc))
        finally:
            super().resume_flow()

    async def perform_seek(self) -> None:
        self._rewinding.clear()
        await super().perform_seek()

    async def getmany(self, timeout: float) -> AsyncIterator[Any]:
        # A new batch: records of rewound partitions in it were fetched after their seek.
        for tp in self._rewinding:
            self._rewinding[tp] = True
        async for item in super().getmany(timeout):
            yield item

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        # ``offset_to`` is the record about to be delivered, ``offset_from`` the first missing.
        committed = self._committed_offset[tp]
        if committed is not None and offset_from < committed:
            offset_from = committed
        log.warning(
            "faust skipped records; re-reading them",
            topic=tp.topic,
            partition=tp.partition,
            first_missing=offset_from,
            next_read=offset_to,
        )
        self._rewinding[tp] = False
        await self._seek(tp, offset_from)


class IdempotentTransport(aiokafka_driver.Transport):
    """faust's aiokafka transport: :class:`IdempotentProducer`, :class:`GapSafeConsumer`."""

    Producer = IdempotentProducer
    Consumer = GapSafeConsumer


class App(faust.App):
    """A faust app that builds :class:`IdempotentTransport` and knows the declared topics.

    faust has no setting for the transport class: it picks one from the broker URL's scheme in
    a process-wide registry. Choosing it here instead keeps the broker URL ``kafka://``, honours
    a broker changed later (``faust -b``) and touches no global state.
    """

    def _new_transport(self) -> TransportT:
        return _idempotent_transport(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> TransportT:
        return _idempotent_transport(self.conf.broker_producer, self)

    def topic(self, *topics: str, **kwargs: Any) -> TopicT:
        """``faust.App.topic``; a topic declared in shared.topics gets its declared shape.

        Declared topics carry codec-encoded events: key and value stay bytes (``raw``) for
        :func:`decode_event`, and the partition count and config are the declared ones. They
        are never faust-internal (which ``@app.agent("name")`` asks for): provisioning owns
        them, and even a faust declare (``stream.through``) could only create what it would.
        """
        declared = [BY_NAME[name] for name in topics if name in BY_NAME]
        if declared:
            if len(declared) != len(topics):
                raise ValueError(f"mixes declared and undeclared topics: {topics}")
            if len({spec.partitions for spec in declared}) != 1:
                raise ValueError(f"declared topics differ in partition count: {topics}")
            spec = declared[0]
            partitions = kwargs.get("partitions") or spec.partitions
            if partitions != spec.partitions:
                raise ValueError(
                    f"{topics} are declared with {spec.partitions} partitions, not {partitions}"
                )
            kwargs["partitions"] = partitions
            kwargs["internal"] = False
            defaults: dict[str, Any] = {"key_serializer": RAW, "value_serializer": RAW}
            if len(declared) == 1:
                defaults["config"] = spec.config()
            for option, default in defaults.items():
                if kwargs.get(option) is None:
                    kwargs[option] = default
        return super().topic(*topics, **kwargs)


def _idempotent_transport(urls: list[URL], app: faust.App) -> TransportT:
    schemes = {url.scheme for url in urls}
    if not schemes <= KAFKA_SCHEMES:
        raise ValueError(f"broker must be kafka:// (aiokafka), not {sorted(schemes)}")
    return IdempotentTransport(urls, app)


def broker_url(kafka: KafkaSettings) -> str:
    """``kafka://host:port;host:port`` from the bootstrap servers in the settings."""
    if not kafka.bootstrap_list:
        raise ValueError("no Kafka bootstrap servers configured")
    return ";".join(f"kafka://{server}" for server in kafka.bootstrap_list)


def make_app(
    service: str,
    kafka: KafkaSettings,
    *,
    store: str = "memory://",
    data_dir: Path | None = None,
    **overrides: Any,
) -> App:
    """A faust app for ``service`` with the project's defaults; ``overrides`` are faust settings.

    At-least-once with idempotent handlers and an idempotent acks=all producer (design.md,
    Decisions). ``data_dir`` holds table state; ``rocksdb://`` needs one, ``memory://`` keeps
    faust's (empty) directories in a per-service temp directory instead of the working directory.
    """
    scheme = URL(store).scheme
    if scheme not in STORE_SCHEMES:
        raise ValueError(f"store must be memory:// or rocksdb://, not {store!r}")
    if data_dir is None:
        if scheme == "rocksdb":
            raise ValueError("a rocksdb:// store needs a data_dir to keep its state in")
        data_dir = Path(tempfile.gettempdir()) / f"beeldportaal-{service}"
    settings: dict[str, Any] = {
        "broker": broker_url(kafka),
        "broker_client_id": f"{kafka.client_id_prefix}-{service}",
        "processing_guarantee": "at_least_once",
        # Offsets are committed this often; a crash replays at most this much (handlers are
        # idempotent, so a replay costs time, not correctness).
        "broker_commit_interval": 1.0,
        "consumer_auto_offset_reset": "earliest",
        # A record can be as large as the topics allow (shared.topics).
        "consumer_max_fetch_size": max(MAX_MESSAGE_BYTES, kafka.max_message_bytes),
        "producer_acks": -1,
        "producer_max_request_size": kafka.max_message_bytes,
        "producer_compression_type": kafka.compression,
        "producer_request_timeout": kafka.request_timeout_ms / 1000,
        "producer_linger": 0.005,
        # faust's default batch (16 KB) holds two or three events that carry a study snapshot;
        # the sender then spends its time on many small produce requests (profiled).
        "producer_max_batch_size": kafka.max_batch_bytes,
        "store": store,
        "datadir": data_dir,
        # faust creates only what it owns (changelog, repartition, leader topics); ours are
        # provisioned from shared.topics. Faust's own topics default to the largest declared
        # count, so a table keyed like a 12-partition event topic is co-partitioned with it.
        "topic_allow_declare": True,
        "topic_partitions": max(spec.partitions for spec in TOPICS),
        "topic_replication_factor": kafka.replication_factor,
        # Services serve HTTP with FastAPI; faust's own server stays off unless asked for,
        # and then listens on loopback only.
        "web_enabled": False,
        "web_bind": "127.0.0.1",
        "web_host": "127.0.0.1",
    }
    settings.update(overrides)
    return App(f"beeldportaal-{service}", **settings)


def decode_event(codec: Codec, faust_event: Any) -> Event:
    """Decode a faust ``EventT`` (from ``stream.events()``) into a project event.

    The bytes come from ``event.message.value``, exactly as on the wire whatever serializer the
    topic has. Headers may be a list of ``(str, bytes)`` pairs (aiokafka) or a mapping (faust's
    ``event.headers``). A :class:`PoisonEvent` names the record's ``topic[partition]@offset``.
    """
    message = faust_event.message
    try:
        return codec.decode(message.value, header_pairs(message.headers))
    except PoisonEvent as exc:
        where = f"{message.topic}[{message.partition}]@{message.offset}"
        raise PoisonEvent(f"{where}: {exc}") from exc


def header_pairs(headers: Any) -> list[tuple[str, bytes]]:
    """A record's headers as ``(name, bytes)`` pairs, from aiokafka's pairs or faust's mapping."""
    if headers is None:
        return []
    items: Iterable[Any] = headers.items() if isinstance(headers, Mapping) else headers
    pairs = []
    for key, value in items:
        name = key.decode(errors="replace") if isinstance(key, bytes | bytearray) else str(key)
        raw = value.encode() if isinstance(value, str) else value
        pairs.append((name, raw))
    return pairs


async def declare_changelogs(app: faust.App, kafka: KafkaSettings) -> None:
    """Create the app's changelog topics (compacted) unless they exist; call before it starts.

    Left to faust, they are created while its consumer subscribes, and a topic the broker reports
    a moment too late stays missing from the consumer's metadata for metadata.max.age (5 min):
    every write to its table then fails with PartitionsMismatch.
    """
    specs = [
        TopicSpec(
            table.changelog_topic.get_topic_name(),
            table.partitions or app.conf.topic_partitions,
            FOREVER,
            compacted=True,
            extra=dict(table.extra_topic_configs),
        )
        for table in app.tables.values()
    ]
    await provision_topics(
        kafka.bootstrap_list, specs, kafka.replication_factor, kafka.min_insync_replicas
    )


async def complete(handling: Awaitable[T]) -> T:
    """Run the handling of one stream event to its end, even when the agent is cancelled.

    faust acks the current event when the agent's loop body exits *for any reason*: a
    cancellation in the middle of the body (``app.stop()``, a rebalance) acks an event whose
    handling stopped halfway, and its offset is committed. For a handler with several awaited
    sends (two consent-checked, or several route-resolved) that loses the sends not yet made:
    at-least-once broken (a restart test caught it). Shielded, the handling finishes first, then
    the cancellation goes on; faust flushes the producer before it commits, so the offset is
    committed only with everything the event caused.
    """
    task = asyncio.ensure_future(handling)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            await asyncio.wait([task])
        raise


def bytes_table(
    app: faust.App, name: str, *, partitions: int, kafka: KafkaSettings, help: str
) -> Any:
    """A table of raw ``bytes`` keys and values whose changelog takes any row an event could.

    Keys are bytes so that a row written while handling a record keyed the same way goes to
    that record's partition (``use_partitioner=False``; faust would JSON-encode a ``str`` key).
    """
    return app.Table(
        name,
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
        extra_topic_configs={
            "max.message.bytes": str(MAX_MESSAGE_BYTES),
            "min.insync.replicas": str(kafka.min_insync_replicas),
        },
        help=help,
    )
