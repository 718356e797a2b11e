"""The ObjectStore contract: one suite, subclassed per adapter, so the fake cannot drift from S3."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import threading
from collections.abc import Iterator

import pytest

from shared.storage import (
    BucketNotFound,
    ChecksumMismatch,
    InvalidObjectKey,
    ObjectNotFound,
    ObjectStore,
)

MiB = 1024 * 1024
# Adapters under contract split uploads into parts of at most 5 MiB (S3's minimum), so this is
# three parts: enough to exercise multipart paths with a partial last part.
MULTIPART_BYTES = 2 * 5 * MiB + 12_345

INVALID_KEYS = [
    "",
    "/studies/1.2.3",
    "studies//1.2.3",
    "studies/1.2.3/",
    "studies/../etc/passwd",
    "studies/./1.2.3",
    "..",
    "studies/1.2.3 4",
    "studies/Jansen^Piet",
    "studies/123456782%2F",
    "studies/\u00e9",
    "studies/1.2.3\n",
    "studies\\1.2.3",
    "a" * 1025,
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


class UnknownLengthStream(io.RawIOBase):
    """A non-seekable stream that hands out ``data`` in uneven reads, like a socket."""

    def __init__(self, data: bytes, max_read: int = 64 * 1024 + 7) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._max_read = max_read

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = self._max_read if size is None or size < 0 else min(size, self._max_read)
        chunk = bytes(self._data[self._pos : self._pos + n])
        self._pos += len(chunk)
        return chunk


class ObjectStoreContract:
    """Subclass as ``Test...`` and implement ``make_store``.

    ``make_store()`` returns a store on a bucket of its own that does not exist yet; the ``store``
    fixture creates it. Adapters must split uploads into parts of at most 5 MiB (MULTIPART_BYTES).
    """

    def make_store(self) -> ObjectStore:
        raise NotImplementedError

    @pytest.fixture
    def store(self) -> Iterator[ObjectStore]:
        store = self.make_store()
        store.ensure_bucket()
        yield store

    # -- round trips ------------------------------------------------------------------------------

    def test_bytes_put_come_back_from_get(self, store: ObjectStore) -> None:
        data = random_bytes(70_000)
        store.put("studies/1.2.3/1.2.3.4.dcm", data)
        assert store.get("studies/1.2.3/1.2.3.4.dcm") == data

    def test_put_reports_the_size_and_sha256_of_the_bytes(self, store: ObjectStore) -> None:
        data = random_bytes(4096)
        info = store.put("a/b.dcm", data)
        assert (info.key, info.size, info.sha256) == ("a/b.dcm", 4096, sha256(data))
        assert info.etag

    def test_stat_reports_size_sha256_content_type_and_metadata(self, store: ObjectStore) -> None:
        data = random_bytes(1234)
        store.put("a/b.dcm", data, metadata={"Sop-Class": "1.2.840.10008.5.1.4.1.1.2"})
        info = store.stat("a/b.dcm")
        assert info is not None
        assert (info.size, info.sha256) == (1234, sha256(data))
        assert info.content_type == "application/dicom"
        assert info.metadata == {"sop-class": "1.2.840.10008.5.1.4.1.1.2"}

    def test_a_content_type_given_to_put_is_kept(self, store: ObjectStore) -> None:
        store.put("reports/1.txt", b"verslag", content_type="text/plain")
        info = store.stat("reports/1.txt")
        assert info is not None and info.content_type == "text/plain"

    def test_an_empty_object_is_stored_and_read_back_empty(self, store: ObjectStore) -> None:
        info = store.put("empty.dcm", b"")
        assert (info.size, info.sha256) == (0, sha256(b""))
        assert store.get("empty.dcm") == b""
        with store.open("empty.dcm") as chunks:
            assert b"".join(chunks) == b""
        stat = store.stat("empty.dcm")
        assert stat is not None and (stat.size, stat.sha256) == (0, sha256(b""))

    def test_put_replaces_an_existing_object(self, store: ObjectStore) -> None:
        store.put("k.dcm", b"first")
        info = store.put("k.dcm", b"second")
        assert store.get("k.dcm") == b"second"
        stat = store.stat("k.dcm")
        assert stat is not None and stat.sha256 == info.sha256 == sha256(b"second")

    # -- streamed writes --------------------------------------------------------------------------

    def test_a_stream_of_unknown_length_spanning_several_parts_round_trips(
        self, store: ObjectStore
    ) -> None:
        data = random_bytes(MULTIPART_BYTES)
        info = store.put("big/1.dcm", UnknownLengthStream(data))
        assert (info.size, info.sha256) == (len(data), sha256(data))
        stat = store.stat("big/1.dcm")
        assert stat is not None and (stat.size, stat.sha256) == (len(data), sha256(data))
        assert store.get("big/1.dcm") == data

    def test_a_stream_of_unknown_length_smaller_than_a_part_round_trips(
        self, store: ObjectStore
    ) -> None:
        data = random_bytes(300_000)
        info = store.put("small/1.dcm", UnknownLengthStream(data))
        assert (info.size, info.sha256) == (len(data), sha256(data))
        assert store.get("small/1.dcm") == data

    def test_a_stream_exactly_one_part_long_round_trips(self, store: ObjectStore) -> None:
        data = random_bytes(5 * MiB)
        store.put("exact.dcm", UnknownLengthStream(data))
        assert store.get("exact.dcm") == data

    def test_a_seekable_file_is_read_from_its_current_position(self, store: ObjectStore) -> None:
        file = io.BytesIO(b"HEADER" + b"payload")
        file.seek(6)
        info = store.put("k.dcm", file)
        assert store.get("k.dcm") == b"payload"
        assert info.sha256 == sha256(b"payload")

    def test_with_a_length_exactly_that_many_bytes_are_read(self, store: ObjectStore) -> None:
        stream = UnknownLengthStream(b"0123456789")
        info = store.put("k.dcm", stream, length=4)
        assert (store.get("k.dcm"), info.size) == (b"0123", 4)
        assert stream.read(100) == b"456789"

    def test_a_stream_shorter_than_its_length_is_refused_and_nothing_stored(
        self, store: ObjectStore
    ) -> None:
        with pytest.raises(ValueError):
            store.put("k.dcm", UnknownLengthStream(b"0123"), length=10)
        assert store.stat("k.dcm") is None

    def test_bytes_with_a_different_length_are_refused(self, store: ObjectStore) -> None:
        with pytest.raises(ValueError):
            store.put("k.dcm", b"0123", length=3)
        assert store.stat("k.dcm") is None

    def test_a_declared_sha256_that_matches_is_stored(self, store: ObjectStore) -> None:
        data = random_bytes(MULTIPART_BYTES, seed=1)
        info = store.put("k.dcm", UnknownLengthStream(data), sha256=sha256(data).upper())
        stat = store.stat("k.dcm")
        assert info.sha256 == sha256(data)
        assert stat is not None and stat.sha256 == sha256(data)
        assert store.get("k.dcm") == data

    @pytest.mark.parametrize("size", [1000, MULTIPART_BYTES], ids=["single-part", "multipart"])
    def test_a_declared_sha256_that_does_not_match_stores_nothing(
        self, store: ObjectStore, size: int
    ) -> None:
        data = random_bytes(size, seed=2)
        with pytest.raises(ChecksumMismatch) as caught:
            store.put("k.dcm", UnknownLengthStream(data), sha256=sha256(b"other"))
        assert caught.value.actual == sha256(data)
        assert store.stat("k.dcm") is None
        assert list(store.list_keys()) == []

    def test_a_malformed_sha256_is_refused(self, store: ObjectStore) -> None:
        with pytest.raises(ValueError):
            store.put("k.dcm", b"x", sha256="abc")

    # -- put_if_absent ----------------------------------------------------------------------------

    def test_put_if_absent_creates_a_missing_object(self, store: ObjectStore) -> None:
        info, created = store.put_if_absent("k.dcm", b"data", metadata={"origin": "ziekenhuis-a"})
        assert created
        assert (info.size, info.sha256) == (4, sha256(b"data"))
        stat = store.stat("k.dcm")
        assert stat is not None and stat.sha256 == sha256(b"data")
        assert stat.metadata == {"origin": "ziekenhuis-a"}

    def test_put_if_absent_of_identical_bytes_reports_the_existing_object(
        self, store: ObjectStore
    ) -> None:
        first, _ = store.put_if_absent("k.dcm", b"data")
        again, created = store.put_if_absent("k.dcm", io.BytesIO(b"data"))
        assert not created
        assert (again.size, again.sha256) == (first.size, first.sha256)

    def test_put_if_absent_never_overwrites_different_bytes(self, store: ObjectStore) -> None:
        store.put_if_absent("k.dcm", b"original", metadata={"v": "1"})
        info, created = store.put_if_absent("k.dcm", b"impostor", metadata={"v": "2"})
        assert not created
        assert info.sha256 == sha256(b"original")
        assert info.metadata == {"v": "1"}
        assert store.get("k.dcm") == b"original"

    def test_put_if_absent_never_overwrites_with_a_multipart_stream(
        self, store: ObjectStore
    ) -> None:
        store.put_if_absent("k.dcm", b"original")
        data = random_bytes(MULTIPART_BYTES, seed=3)
        info, created = store.put_if_absent("k.dcm", UnknownLengthStream(data), sha256=sha256(data))
        assert not created
        assert info.sha256 == sha256(b"original")
        assert store.get("k.dcm") == b"original"

    def test_put_if_absent_creates_from_a_multipart_stream(self, store: ObjectStore) -> None:
        data = random_bytes(MULTIPART_BYTES, seed=4)
        info, created = store.put_if_absent("k.dcm", UnknownLengthStream(data))
        assert created
        assert info.sha256 == sha256(data)
        assert store.get("k.dcm") == data

    def test_put_if_absent_after_delete_creates_again(self, store: ObjectStore) -> None:
        store.put_if_absent("k.dcm", b"one")
        store.delete("k.dcm")
        _, created = store.put_if_absent("k.dcm", b"two")
        assert created and store.get("k.dcm") == b"two"

    def test_concurrent_put_if_absent_calls_store_one_whole_candidate(
        self, store: ObjectStore
    ) -> None:
        # Only what every server keeps: at least one creates and one whole candidate is stored.
        # "Exactly one creates" holds on atomic servers but not on versitygw posix (see the port).
        candidates = [f"version {i}".encode() * 100 for i in range(8)]
        results = self._race_put_if_absent(store, "raced.dcm", candidates)
        assert any(created for _, (_, created) in results)
        assert store.get("raced.dcm") in candidates
        assert all(info.sha256 in {sha256(c) for c in candidates} for _, (info, _) in results)

    def test_put_if_absent_racing_on_an_existing_key_never_overwrites_it(
        self, store: ObjectStore
    ) -> None:
        store.put("k.dcm", b"original")
        candidates = [f"version {i}".encode() * 100 for i in range(8)]
        results = self._race_put_if_absent(store, "k.dcm", candidates)
        assert not any(created for _, (_, created) in results)
        assert store.get("k.dcm") == b"original"

    @staticmethod
    def _race_put_if_absent(
        store: ObjectStore, key: str, candidates: list[bytes]
    ) -> list[tuple[bytes, tuple]]:
        barrier = threading.Barrier(len(candidates))
        results: list[tuple[bytes, tuple]] = []
        errors: list[BaseException] = []

        def attempt(data: bytes) -> None:
            barrier.wait()
            try:
                results.append((data, store.put_if_absent(key, data)))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=attempt, args=(data,)) for data in candidates]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        assert len(results) == len(candidates)
        return results

    # -- aput_if_absent: the same promises, awaited on the event loop ---------------------------

    @staticmethod
    def _aput(store: ObjectStore, key: str, data: bytes, **options: object) -> tuple:
        async def put() -> tuple:
            try:
                return await store.aput_if_absent(key, data, **options)  # type: ignore[arg-type]
            finally:
                await store.aclose()

        return asyncio.run(put())

    def test_aput_if_absent_creates_a_missing_object_with_its_metadata(
        self, store: ObjectStore
    ) -> None:
        data = random_bytes(36_000, seed=5)
        info, created = self._aput(
            store, "s/1.2/1.2.3.dcm", data, metadata={"origin": "ziekenhuis-a"}, sha256=sha256(data)
        )
        assert created
        assert (info.key, info.size, info.sha256) == ("s/1.2/1.2.3.dcm", len(data), sha256(data))
        assert info.metadata == {"origin": "ziekenhuis-a"}
        stat = store.stat("s/1.2/1.2.3.dcm")
        assert stat is not None
        assert (stat.size, stat.sha256, stat.content_type) == (
            len(data),
            sha256(data),
            "application/dicom",
        )
        assert stat.metadata == {"origin": "ziekenhuis-a"}
        assert store.get("s/1.2/1.2.3.dcm") == data

    def test_aput_if_absent_never_overwrites_and_reports_the_existing_object(
        self, store: ObjectStore
    ) -> None:
        store.put_if_absent("k.dcm", b"original", metadata={"v": "1"})
        info, created = self._aput(store, "k.dcm", b"impostor", metadata={"v": "2"})
        assert not created
        assert (info.sha256, info.metadata) == (sha256(b"original"), {"v": "1"})
        again, created = self._aput(store, "k.dcm", b"original")
        assert not created and again.sha256 == sha256(b"original")
        assert store.get("k.dcm") == b"original"

    def test_aput_if_absent_of_a_body_larger_than_a_part_is_stored_whole(
        self, store: ObjectStore
    ) -> None:
        data = random_bytes(MULTIPART_BYTES, seed=6)
        info, created = self._aput(store, "big.dcm", data)
        assert created and info.sha256 == sha256(data)
        assert store.get("big.dcm") == data

    def test_aput_if_absent_with_a_wrong_sha256_stores_nothing(self, store: ObjectStore) -> None:
        with pytest.raises(ChecksumMismatch):
            self._aput(store, "k.dcm", b"data", sha256=sha256(b"other"))
        assert not store.exists("k.dcm")

    def test_aput_if_absent_refuses_an_invalid_key_or_metadata(self, store: ObjectStore) -> None:
        with pytest.raises(InvalidObjectKey):
            self._aput(store, "studies/Jansen^Piet", b"data")
        with pytest.raises(ValueError):
            self._aput(store, "k.dcm", b"data", metadata={"Bad Name": "x"})
        assert list(store.list_keys()) == []

    def test_aput_if_absent_to_a_bucket_never_created_raises_bucket_not_found(self) -> None:
        with pytest.raises(BucketNotFound):
            self._aput(self.make_store(), "k.dcm", b"data")

    def test_concurrent_aput_if_absent_calls_never_overwrite_an_existing_key(
        self, store: ObjectStore
    ) -> None:
        store.put("k.dcm", b"original")
        candidates = [f"version {i}".encode() * 100 for i in range(8)]

        async def race() -> list:
            try:
                return await asyncio.gather(*(store.aput_if_absent("k.dcm", c) for c in candidates))
            finally:
                await store.aclose()

        results = asyncio.run(race())
        assert not any(created for _, created in results)
        assert store.get("k.dcm") == b"original"

    def test_many_aput_if_absent_calls_on_one_loop_store_every_object(
        self, store: ObjectStore
    ) -> None:
        bodies = {f"s/{i}.dcm": random_bytes(2_000 + i, seed=i) for i in range(40)}

        async def put_all() -> list:
            try:
                return await asyncio.gather(
                    *(store.aput_if_absent(k, b, sha256=sha256(b)) for k, b in bodies.items())
                )
            finally:
                await store.aclose()

        results = asyncio.run(put_all())
        assert all(created for _, created in results)
        assert {k: store.get(k) for k in bodies} == bodies

    # -- reading ----------------------------------------------------------------------------------

    def test_stat_of_a_missing_object_is_none(self, store: ObjectStore) -> None:
        assert store.stat("missing.dcm") is None
        assert not store.exists("missing.dcm")

    def test_exists_after_put(self, store: ObjectStore) -> None:
        store.put("k.dcm", b"x")
        assert store.exists("k.dcm")

    def test_get_of_a_missing_object_raises_object_not_found(self, store: ObjectStore) -> None:
        with pytest.raises(ObjectNotFound) as caught:
            store.get("missing.dcm")
        assert caught.value.key == "missing.dcm"
        assert isinstance(caught.value, KeyError)

    def test_open_of_a_missing_object_raises_on_entering(self, store: ObjectStore) -> None:
        with pytest.raises(ObjectNotFound):
            store.open("missing.dcm").__enter__()

    def test_open_yields_the_object_in_bounded_chunks(self, store: ObjectStore) -> None:
        data = random_bytes(250_000)
        store.put("k.dcm", data)
        with store.open("k.dcm", chunk_size=64 * 1024) as chunks:
            received = list(chunks)
        assert b"".join(received) == data
        assert len(received) >= 4
        assert all(0 < len(chunk) <= 64 * 1024 for chunk in received)

    def test_leaving_open_early_many_times_leaves_the_store_usable(
        self, store: ObjectStore
    ) -> None:
        data = random_bytes(3 * MiB)
        store.put("k.dcm", data)
        for _ in range(40):  # more than a connection pool holds
            with store.open("k.dcm", chunk_size=1024) as chunks:
                assert next(iter(chunks)) == data[:1024]
        assert store.get("k.dcm") == data

    # -- listing and deleting ---------------------------------------------------------------------

    def test_list_keys_returns_the_keys_under_a_prefix_in_order(self, store: ObjectStore) -> None:
        for key in ["s/2/b.dcm", "s/1/a.dcm", "s/1/c.dcm", "s/10/a.dcm", "t/1/a.dcm"]:
            store.put(key, b"x")
        assert list(store.list_keys("s/1/")) == ["s/1/a.dcm", "s/1/c.dcm"]
        assert list(store.list_keys("s/")) == ["s/1/a.dcm", "s/1/c.dcm", "s/10/a.dcm", "s/2/b.dcm"]
        assert len(list(store.list_keys())) == 5

    def test_a_list_prefix_is_a_string_prefix_not_a_folder(self, store: ObjectStore) -> None:
        for key in ["s/1/a.dcm", "s/10/a.dcm", "s/2/a.dcm"]:
            store.put(key, b"x")
        assert list(store.list_keys("s/1")) == ["s/1/a.dcm", "s/10/a.dcm"]

    def test_list_keys_of_an_unused_prefix_is_empty(self, store: ObjectStore) -> None:
        store.put("s/1.dcm", b"x")
        assert list(store.list_keys("nothing/")) == []

    def test_list_keys_pages_through_many_objects(self, store: ObjectStore) -> None:
        keys = [f"many/{i:05d}.dcm" for i in range(1100)]  # S3 pages by 1000
        for key in keys:
            store.put(key, b"")
        assert list(store.list_keys("many/")) == keys

    def test_delete_removes_the_object(self, store: ObjectStore) -> None:
        store.put("k.dcm", b"x")
        store.delete("k.dcm")
        assert store.stat("k.dcm") is None
        with pytest.raises(ObjectNotFound):
            store.get("k.dcm")
        assert list(store.list_keys()) == []

    def test_deleting_a_missing_object_is_not_an_error(self, store: ObjectStore) -> None:
        store.put("kept.dcm", b"x")
        store.delete("missing.dcm")
        assert store.stat("missing.dcm") is None
        assert list(store.list_keys()) == ["kept.dcm"]
        assert store.get("kept.dcm") == b"x"

    # -- keys, metadata and buckets ---------------------------------------------------------------

    @pytest.mark.parametrize("key", INVALID_KEYS)
    def test_invalid_keys_are_refused_by_every_operation(
        self, store: ObjectStore, key: str
    ) -> None:
        operations = [
            lambda: store.put(key, b"x"),
            lambda: store.put_if_absent(key, b"x"),
            lambda: store.get(key),
            lambda: store.open(key).__enter__(),
            lambda: store.stat(key),
            lambda: store.exists(key),
            lambda: store.delete(key),
        ]
        for operation in operations:
            with pytest.raises(InvalidObjectKey):
                operation()
        assert list(store.list_keys()) == []

    @pytest.mark.parametrize("prefix", ["/s", "s//", "../", "s/../", "s p", "\u00e9"])
    def test_invalid_list_prefixes_are_refused(self, store: ObjectStore, prefix: str) -> None:
        with pytest.raises(InvalidObjectKey):
            store.list_keys(prefix)

    def test_the_longest_allowed_key_round_trips(self, store: ObjectStore) -> None:
        # Segments stay under 255: filesystem-backed S3 servers map segments to file names.
        key = "/".join(["d" * 200] * 5) + "/" + "k" * 19
        assert len(key) == 1024
        store.put(key, b"x")
        assert store.get(key) == b"x"
        assert list(store.list_keys("d")) == [key]

    def test_keys_from_sanitised_dicom_uids_are_accepted(self, store: ObjectStore) -> None:
        key = "studies/1.2.826.0.1.3680043.8.498.1/series/1.2.3/1.2.3.4.5_v1-final.dcm"
        store.put(key, b"x")
        assert store.exists(key)

    @pytest.mark.parametrize(
        "metadata",
        [{"sha256": "0" * 64}, {"naam": "J\u00f6rg"}, {"met spatie": "x"}, {"": "x"}],
        ids=["reserved-sha256", "non-ascii-value", "space-in-name", "empty-name"],
    )
    def test_unsendable_metadata_is_refused_and_nothing_stored(
        self, store: ObjectStore, metadata: dict[str, str]
    ) -> None:
        with pytest.raises(ValueError):
            store.put("k.dcm", b"x", metadata=metadata)
        assert store.stat("k.dcm") is None

    def test_writing_to_a_bucket_never_created_raises_bucket_not_found(self) -> None:
        store = self.make_store()
        with pytest.raises(BucketNotFound):
            store.put("k.dcm", b"x")
        with pytest.raises(BucketNotFound):
            store.get("k.dcm")
        assert store.stat("k.dcm") is None

    def test_ensure_bucket_is_idempotent_and_keeps_objects(self, store: ObjectStore) -> None:
        store.put("k.dcm", b"x")
        store.ensure_bucket()
        assert store.get("k.dcm") == b"x"
