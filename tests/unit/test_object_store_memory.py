"""The ObjectStore contract, run on InMemoryObjectStore, plus the fake's own test hooks."""

from __future__ import annotations

import pytest

from shared.storage import InMemoryObjectStore, ObjectStore, ObjectStoreUnavailable
from tests.contracts.object_store import ObjectStoreContract


class TestInMemoryObjectStore(ObjectStoreContract):
    def make_store(self) -> ObjectStore:
        return InMemoryObjectStore(bucket_exists=False)

    def test_of_concurrent_put_if_absent_calls_exactly_one_creates(self) -> None:
        # The fake is atomic, like AWS S3; the contract only pins what versitygw also keeps.
        store = InMemoryObjectStore()
        candidates = [f"version {i}".encode() * 100 for i in range(8)]
        results = self._race_put_if_absent(store, "raced.dcm", candidates)
        assert sum(created for _, (_, created) in results) == 1


def test_the_in_memory_store_satisfies_the_object_store_protocol() -> None:
    assert isinstance(InMemoryObjectStore(), ObjectStore)


def test_a_simulated_outage_fails_the_next_calls_then_recovers() -> None:
    store = InMemoryObjectStore()
    store.put("k.dcm", b"x")
    store.fail_next_calls(2)
    for _ in range(2):
        with pytest.raises(ObjectStoreUnavailable):
            store.get("k.dcm")
    assert store.get("k.dcm") == b"x"
