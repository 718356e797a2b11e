"""The publisher's producer defaults and its memoising partitioner (no broker needed)."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from shared.kafka import CachedMurmur2Partitioner, KafkaEventPublisher, murmur2
from shared.settings import KafkaSettings


@given(
    keys=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=50),
    partitions=st.integers(min_value=1, max_value=64),
)
def test_the_cached_partitioner_maps_every_key_exactly_as_aiokafka_does(
    keys: list[bytes], partitions: int
) -> None:
    cached, default = CachedMurmur2Partitioner(size=8), DefaultPartitioner()
    all_partitions = list(range(partitions))
    for key in keys * 2:  # the second pass is served from the cache (or after an eviction)
        assert cached(key, all_partitions, all_partitions) == default(
            key, all_partitions, all_partitions
        )


@given(st.binary(max_size=300))
def test_our_murmur2_gives_aiokafkas_values_for_any_bytes(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data)


def test_murmur2_matches_the_java_clients_known_values() -> None:
    # org.apache.kafka.common.utils.UtilsTest.testMurmur2 (signed ints there).
    cases = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for data, signed in cases.items():
        assert murmur2(data) == signed & 0xFFFFFFFF, data


def test_the_cache_never_grows_past_its_bound() -> None:
    cached = CachedMurmur2Partitioner(size=10)
    for i in range(1000):
        cached(f"key-{i}".encode(), [0, 1, 2], [0, 1, 2])
    assert len(cached._hashes) <= 10


def test_the_publisher_is_idempotent_with_acks_all_and_batches_for_throughput() -> None:
    publisher = KafkaEventPublisher(KafkaSettings(bootstrap_servers="a:1,b:2"), "ingest")
    config = publisher._config
    assert config["acks"] == "all"
    assert config["enable_idempotence"] is True
    assert config["bootstrap_servers"] == ["a:1", "b:2"]
    assert config["client_id"] == "beeldportaal-ingest"
    assert config["compression_type"] == "zstd"
    assert config["max_batch_size"] == 256 * 1024
    assert config["max_request_size"] == 16 * 1024 * 1024
    assert isinstance(config["partitioner"], CachedMurmur2Partitioner)


def test_overrides_win_over_the_defaults() -> None:
    publisher = KafkaEventPublisher(KafkaSettings(), "x", linger_ms=0, compression_type="gzip")
    assert publisher._config["linger_ms"] == 0
    assert publisher._config["compression_type"] == "gzip"
