"""The faust app factory's configuration and decode_event, without a broker."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

import aiokafka
import faust
import pytest
from faust.stores import by_url as store_by_url
from faust.stores import rocksdb as faust_rocksdb
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import ProcessingGuarantee
from faust.types.tuples import Message
from yarl import URL

from shared.codec import Codec
from shared.errors import PoisonEvent
from shared.events import ConsentRevoked
from shared.faust_app import (
    App,
    IdempotentProducer,
    IdempotentTransport,
    broker_url,
    decode_event,
    make_app,
)
from shared.settings import KafkaSettings
from shared.topics import MAX_MESSAGE_BYTES, topic

PATIENT = "psn1-" + "a" * 52


def kafka(bootstrap_servers: str = "k1:9092, k2:9093") -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=bootstrap_servers)


@pytest.fixture
def app(tmp_path: Path) -> App:
    return make_app("consent", kafka(), data_dir=tmp_path)


class RecordingProducer:
    """Stands in for AIOKafkaProducer and keeps the kwargs faust built for it."""

    calls: list[dict[str, Any]] = []

    def __init__(self, **kwargs: Any) -> None:
        RecordingProducer.calls.append(kwargs)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(RecordingProducer, "calls", calls)
    monkeypatch.setattr(aiokafka_driver.aiokafka, "AIOKafkaProducer", RecordingProducer)
    return calls


def test_the_broker_url_lists_every_bootstrap_server_from_the_settings(app: App) -> None:
    assert app.conf.broker == [URL("kafka://k1:9092"), URL("kafka://k2:9093")]
    assert broker_url(kafka("h:1")) == "kafka://h:1"


def test_no_bootstrap_servers_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="bootstrap"):
        broker_url(kafka(" , "))


def test_the_app_id_and_client_id_name_the_service(app: App) -> None:
    assert app.conf.id == "beeldportaal-consent"
    assert app.conf.broker_client_id == "beeldportaal-consent"


def test_processing_is_at_least_once_with_acks_all(app: App) -> None:
    assert app.conf.processing_guarantee is ProcessingGuarantee.AT_LEAST_ONCE
    assert app.conf.producer_acks == -1
    assert not app.in_transaction


def test_the_app_builds_the_idempotent_transport_and_producer(app: App) -> None:
    assert type(app.transport) is IdempotentTransport
    assert type(app.producer_transport) is IdempotentTransport
    assert type(app.producer) is IdempotentProducer


def test_idempotence_reaches_the_aiokafka_producer_kwargs(
    app: App, recorded: list[dict[str, Any]]
) -> None:
    app.producer._new_producer()

    (kwargs,) = recorded
    assert kwargs["enable_idempotence"] is True
    assert kwargs["acks"] == "all"
    assert kwargs["transactional_id"] is None
    assert kwargs["bootstrap_servers"] == ["k1:9092", "k2:9093"]
    assert kwargs["max_request_size"] == MAX_MESSAGE_BYTES
    assert kwargs["client_id"] == "beeldportaal-consent"


def test_the_threaded_producer_is_idempotent_too(
    tmp_path: Path, recorded: list[dict[str, Any]]
) -> None:
    app = make_app("consent", kafka(), data_dir=tmp_path, producer_threaded=True)
    threaded = app.producer.threaded_producer
    try:
        threaded._new_producer()
    finally:
        threaded.thread_loop.close()  # mode.ServiceThread makes its loop up front

    (kwargs,) = recorded
    assert kwargs["enable_idempotence"] is True
    assert kwargs["acks"] == "all"


async def test_aiokafka_accepts_the_kwargs_as_an_idempotent_acks_all_producer(app: App) -> None:
    producer = app.producer._new_producer()
    try:
        assert isinstance(producer, aiokafka.AIOKafkaProducer)
        # aiokafka keeps a transaction manager (producer id + sequence numbers) only when
        # idempotence is on; acks "all" is stored as -1.
        assert producer._txn_manager is not None
        assert producer._txn_manager.transactional_id is None
        assert producer._sender._acks == -1
    finally:
        await producer.stop()


def test_exactly_once_keeps_faust_transactional_settings(tmp_path: Path) -> None:
    app = make_app("x", kafka(), data_dir=tmp_path, processing_guarantee="exactly_once")

    assert app.producer._settings_extra() == {"acks": "all", "enable_idempotence": True}


def test_a_non_kafka_broker_is_refused(tmp_path: Path) -> None:
    app = make_app("x", kafka(), data_dir=tmp_path, broker="memory://")

    with pytest.raises(ValueError, match="kafka://"):
        app.transport  # noqa: B018


def test_records_up_to_the_topic_limit_can_be_produced_and_fetched(app: App) -> None:
    assert app.conf.producer_max_request_size == MAX_MESSAGE_BYTES
    assert app.conf.consumer_max_fetch_size >= MAX_MESSAGE_BYTES


def test_offsets_are_committed_every_second(app: App) -> None:
    assert app.conf.broker_commit_interval == 1.0


def test_the_web_server_is_off_by_default(app: App) -> None:
    assert app.conf.web_enabled is False


def test_an_enabled_web_server_listens_on_loopback_only(tmp_path: Path) -> None:
    app = make_app("x", kafka(), data_dir=tmp_path, web_enabled=True, web_port=16066)

    assert app.conf.web_enabled is True
    assert app.conf.web_bind == "127.0.0.1"
    assert app.conf.web_port == 16066


def test_faust_may_declare_its_own_internal_topics(app: App) -> None:
    assert app.conf.topic_allow_declare is True
    assert app.conf.topic_partitions == 12


def test_the_default_store_is_memory_in_a_per_service_temp_dir() -> None:
    app = make_app("consent", kafka())

    assert app.conf.store == URL("memory://")
    assert app.conf.datadir == Path(tempfile.gettempdir()) / "beeldportaal-consent"


def test_a_rocksdb_store_uses_the_rocksdict_backend(tmp_path: Path) -> None:
    app = make_app("consent", kafka(), store="rocksdb://", data_dir=tmp_path)

    assert app.conf.store == URL("rocksdb://")
    assert app.conf.datadir == tmp_path
    assert store_by_url(app.conf.store) is faust_rocksdb.Store
    assert faust_rocksdb.USE_ROCKSDICT is True


def test_a_rocksdb_store_needs_a_data_dir() -> None:
    with pytest.raises(ValueError, match="data_dir"):
        make_app("consent", kafka(), store="rocksdb://")


def test_an_unknown_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="store"):
        make_app("consent", kafka(), store="aerospike://", data_dir=tmp_path)


def test_overrides_win_over_the_defaults(tmp_path: Path) -> None:
    app = make_app("x", kafka(), data_dir=tmp_path, broker_commit_interval=5.0)

    assert app.conf.broker_commit_interval == 5.0


def test_a_declared_topic_gets_its_partitions_raw_serializers_and_config(app: App) -> None:
    spec = topic("consent-revoked")

    t = app.topic("consent-revoked")

    assert t.partitions == spec.partitions
    assert t.key_serializer == "raw"
    assert t.value_serializer == "raw"
    assert t.config == spec.config()
    assert t.internal is False


def test_a_declared_topic_with_another_partition_count_is_refused(app: App) -> None:
    with pytest.raises(ValueError, match="partitions"):
        app.topic("consent-revoked", partitions=3)


def test_an_agent_on_a_declared_topic_name_never_makes_faust_own_it(app: App) -> None:
    @app.agent("consent-revoked")
    async def agent(stream: faust.StreamT) -> None:
        async for _ in stream:
            pass

    channel = agent.channel
    assert channel.internal is False
    assert channel.partitions == topic("consent-revoked").partitions
    assert channel.value_serializer == "raw"


def test_declared_and_undeclared_topics_do_not_mix(app: App) -> None:
    with pytest.raises(ValueError, match="mixes"):
        app.topic("consent-revoked", "scratch")


def test_an_undeclared_topic_is_left_to_faust(app: App) -> None:
    t = app.topic("scratch")

    assert t.partitions is None
    assert t.value_serializer is None


def revoked() -> ConsentRevoked:
    return ConsentRevoked(
        consent_id="consent-1", patient=PATIENT, correlation_id="corr-1", producer="test"
    )


def faust_event(app: faust.App, value: bytes | None, headers: Any) -> faust.Event:
    message = Message(
        topic="consent-revoked",
        partition=2,
        offset=41,
        timestamp=0.0,
        timestamp_type=0,
        headers=headers,
        key=b"k",
        value=value,
        checksum=None,
    )
    return app.create_event(b"k", value, headers, message)


def test_decode_event_reads_list_of_tuple_headers(app: App) -> None:
    event = revoked()
    record = Codec().encode(event)

    decoded = decode_event(Codec(), faust_event(app, record.value, list(record.headers)))

    assert decoded == event


def test_decode_event_reads_dict_headers(app: App) -> None:
    event = revoked()
    record = Codec().encode(event)

    decoded = decode_event(Codec(), faust_event(app, record.value, dict(record.headers)))

    assert decoded == event


def test_decode_event_reads_bytes_header_names_and_str_header_values(app: App) -> None:
    event = revoked()
    record = Codec().encode(event)
    headers = [(k.encode(), v.decode()) for k, v in record.headers]

    assert decode_event(Codec(), faust_event(app, record.value, headers)) == event


def test_decode_event_uses_the_wire_bytes_whatever_faust_deserialized(app: App) -> None:
    event = revoked()
    record = Codec().encode(event)
    decoded_by_faust = faust_event(app, record.value, list(record.headers))
    decoded_by_faust.value = {"consent_id": "not what was on the wire"}

    assert decode_event(Codec(), decoded_by_faust) == event


def test_a_record_without_schema_header_is_poison_naming_where_it_is(app: App) -> None:
    with pytest.raises(PoisonEvent, match=r"consent-revoked\[2\]@41: .*schema"):
        decode_event(Codec(), faust_event(app, b"{}", None))


def test_a_tombstone_is_poison(app: App) -> None:
    headers = [("schema", b"consent.revoked.v1")]

    with pytest.raises(PoisonEvent, match="tombstone"):
        decode_event(Codec(), faust_event(app, None, headers))


def test_apps_are_independent(tmp_path: Path) -> None:
    one = make_app(f"a-{uuid.uuid4().hex}", kafka(), data_dir=tmp_path)
    two = make_app(f"b-{uuid.uuid4().hex}", kafka(), data_dir=tmp_path)

    assert one.conf.id != two.conf.id
    assert one.transport is not two.transport


def test_read_offsets_hold_still_for_a_partition_that_is_rewinding() -> None:
    from shared.faust_app import _ReadOffsets

    rewinding: dict[str, bool] = {}
    offsets = _ReadOffsets(rewinding)
    assert offsets["tp-0"] is None  # faust's default: nothing read yet
    offsets["tp-0"] = 41
    assert offsets["tp-0"] == 41
    rewinding["tp-0"] = False
    offsets["tp-0"] = 57  # a record of the old fetch, dropped: must not count as read
    assert offsets["tp-0"] is None
    del rewinding["tp-0"]
    offsets["tp-0"] = 42
    assert offsets["tp-0"] == 42
