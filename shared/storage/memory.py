"""InMemoryObjectStore: the dict-backed ObjectStore for unit tests, held to the S3 contract."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from shared.storage.port import (
    DEFAULT_CONTENT_TYPE,
    BucketNotFound,
    ChecksumMismatch,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreUnavailable,
    read_chunks,
    validate_key,
    validate_length,
    validate_metadata,
    validate_prefix,
    validate_sha256,
)

_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Stored:
    data: bytes
    info: ObjectInfo


class InMemoryObjectStore:
    """Thread-safe ObjectStore in a dict.

    ``bucket_exists=False`` models a fresh server: everything but ``ensure_bucket``, ``stat`` and
    ``exists`` raises BucketNotFound until ``ensure_bucket()`` runs (S3's HEAD cannot tell a missing
    bucket from a missing key, so ``stat`` returns None there too). ``fail_next_calls(n)`` makes the
    next n calls raise ObjectStoreUnavailable, for testing a caller's retry policy.
    """

    def __init__(self, bucket: str = "dicom", *, bucket_exists: bool = True) -> None:
        self.bucket = bucket
        self._bucket_exists = bucket_exists
        self._objects: dict[str, _Stored] = {}
        self._lock = threading.Lock()
        self._failures_left = 0

    def fail_next_calls(self, n: int = 1) -> None:
        with self._lock:
            self._failures_left = n

    def ensure_bucket(self) -> None:
        with self._lock:
            self._maybe_fail()
            self._bucket_exists = True

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        length: int | None = None,
        content_type: str = DEFAULT_CONTENT_TYPE,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        stored = self._prepare(key, data, length, content_type, metadata, sha256)
        with self._lock:
            self._maybe_fail()
            self._require_bucket()
            self._objects[key] = stored
        return stored.info

    def put_if_absent(
        self,
        key: str,
        data: bytes | BinaryIO,
        length: int | None = None,
        content_type: str = DEFAULT_CONTENT_TYPE,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> tuple[ObjectInfo, bool]:
        # Like S3 with If-None-Match, the body is read (and checked) before the existence test.
        stored = self._prepare(key, data, length, content_type, metadata, sha256)
        with self._lock:
            self._maybe_fail()
            self._require_bucket()
            existing = self._objects.get(key)
            if existing is not None:
                return existing.info, False
            self._objects[key] = stored
        return stored.info, True

    async def aput_if_absent(
        self,
        key: str,
        data: bytes,
        content_type: str = DEFAULT_CONTENT_TYPE,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> tuple[ObjectInfo, bool]:
        return self.put_if_absent(key, data, len(data), content_type, metadata, sha256)

    async def aclose(self) -> None:
        return None

    def get(self, key: str) -> bytes:
        return self._load(key).data

    @contextmanager
    def open(self, key: str, chunk_size: int = _READ_CHUNK) -> Iterator[Iterator[bytes]]:
        data = self._load(key).data
        yield (data[i : i + chunk_size] for i in range(0, len(data), chunk_size))

    def stat(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        with self._lock:
            self._maybe_fail()
            stored = self._objects.get(key) if self._bucket_exists else None
        return stored.info if stored else None

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._lock:
            self._maybe_fail()
            self._require_bucket()
            self._objects.pop(key, None)

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        with self._lock:
            self._maybe_fail()
            self._require_bucket()
            # A snapshot: like S3 pagination, writes during iteration need not show up.
            keys = sorted(k for k in self._objects if k.startswith(prefix))
        return iter(keys)

    def _prepare(
        self,
        key: str,
        data: bytes | BinaryIO,
        length: int | None,
        content_type: str,
        metadata: Mapping[str, str] | None,
        sha256: str | None,
    ) -> _Stored:
        validate_key(key)
        validate_length(length)
        user_metadata = validate_metadata(metadata)
        declared = validate_sha256(sha256)
        if isinstance(data, bytes | bytearray | memoryview):
            body = bytes(data)
            if length is not None and length != len(body):
                raise ValueError(f"length={length} but data has {len(body)} bytes")
        else:
            body = b"".join(read_chunks(data, length, _READ_CHUNK))
        actual = hashlib.sha256(body).hexdigest()
        if declared is not None and declared != actual:
            raise ChecksumMismatch(key, declared, actual)
        info = ObjectInfo(
            key=key,
            size=len(body),
            etag=hashlib.md5(body, usedforsecurity=False).hexdigest(),
            sha256=actual,
            content_type=content_type or DEFAULT_CONTENT_TYPE,
            metadata=user_metadata,
        )
        return _Stored(body, info)

    def _load(self, key: str) -> _Stored:
        validate_key(key)
        with self._lock:
            self._maybe_fail()
            self._require_bucket()
            stored = self._objects.get(key)
        if stored is None:
            raise ObjectNotFound(key)
        return stored

    def _require_bucket(self) -> None:
        if not self._bucket_exists:
            raise BucketNotFound(self.bucket)

    def _maybe_fail(self) -> None:
        if self._failures_left > 0:
            self._failures_left -= 1
            raise ObjectStoreUnavailable("simulated outage of the in-memory object store")
