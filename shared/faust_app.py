"""Faust app factory with the project's Kafka defaults; faust events decoded by the codec."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TopicT, TransportT
from yarl import URL

from shared.codec import Codec
from shared.errors import PoisonEvent
from shared.events import Event
from shared.kafka import provision_topics
from shared.settings import KafkaSettings
from shared.topics import BY_NAME, FOREVER, MAX_MESSAGE_BYTES, TOPICS, TopicSpec

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


class IdempotentTransport(aiokafka_driver.Transport):
    """faust's aiokafka transport whose producers are :class:`IdempotentProducer`."""

    Producer = IdempotentProducer


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
