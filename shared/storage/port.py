"""The ObjectStore port: where DICOM bytes live, what a write promises, what it raises."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, runtime_checkable

DEFAULT_CONTENT_TYPE = "application/dicom"
MAX_KEY_LENGTH = 1024

# Sanitised DICOM UIDs are digits and dots; the rest is room for prefixes like "studies/".
# Anything else (spaces, unicode, '%', ...) would mean something unsanitised, possibly a name or
# BSN, is about to become a key, so it is refused rather than escaped.
_KEY_CHARACTERS = re.compile(r"[A-Za-z0-9._/-]+")
# Every rule of validate_key in one pattern: segments of the allowed characters, none of them
# "." or "..", joined by single slashes. Events carry one key per instance and are decoded by
# the thousand per second, so the common case costs one match; a refusal is then explained by
# the checks below. No look-around: the same pattern is an event field's constraint
# (``shared.events.common.ObjectKey``), which pydantic-core checks with Rust's regex engine,
# without calling back into Python. A segment starts with a character other than a dot, or is
# one dot and a non-dot, or two dots and at least one more character.
_SEGMENT = r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+)"
OBJECT_KEY_PATTERN = rf"{_SEGMENT}(?:/{_SEGMENT})*"
_VALID_KEY = re.compile(OBJECT_KEY_PATTERN)
# User metadata travels as HTTP headers (x-amz-meta-<name>): keep names to lowercase tokens, since
# S3 lowercases them anyway, and values to printable ASCII, the only thing every S3 returns intact.
_METADATA_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_METADATA_VALUE = re.compile(r"[\x20-\x7e]{0,1024}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Reserved: the store itself writes the content hash under this name.
SHA256_METADATA = "sha256"


class ObjectStoreError(Exception):
    """Base of every error an ObjectStore raises; raised as such it is fatal (misconfiguration,
    access denied, a response the adapter does not understand): crash and let the supervisor act."""


class ObjectNotFound(ObjectStoreError, KeyError):
    """Poison for whatever asked for the object: it does not exist (never written, or deleted)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the key; keep messages plain.
        return f"no object with key {self.key!r}"


class BucketNotFound(ObjectStoreError):
    """Fatal: the configured bucket does not exist; ``ensure_bucket()`` was never run there."""

    def __init__(self, bucket: str) -> None:
        super().__init__(f"bucket {bucket!r} does not exist")
        self.bucket = bucket


class ObjectStoreUnavailable(ObjectStoreError):
    """Transient: connection refused or reset, timeout, 5xx, throttling. Retry with backoff."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidObjectKey(ObjectStoreError, ValueError):
    """Poison: the key (or list prefix) breaks the key rules; it can never succeed."""


class ChecksumMismatch(ObjectStoreError, ValueError):
    """Poison: the bytes read do not hash to the sha256 the caller declared; nothing was stored."""

    def __init__(self, key: str, declared: str, actual: str) -> None:
        super().__init__(f"{key!r}: declared sha256 {declared}, data hashes to {actual}")
        self.key = key
        self.declared = declared
        self.actual = actual


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the store knows about one object."""

    key: str
    size: int
    # Opaque: differs per backend and per upload method (multipart ETags are not an MD5).
    etag: str
    # Hex sha256 of the bytes. Always set for objects written through an ObjectStore; None only for
    # an object written by something else, which never recorded it.
    sha256: str | None
    content_type: str = DEFAULT_CONTENT_TYPE
    # User metadata as given to put(), names lowercased; never includes the reserved "sha256".
    metadata: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class ObjectStore(Protocol):
    """A bucket of immutable-by-convention objects (DICOM instances), addressed by validated keys.

    Synchronous and thread-safe: async services call it through ``asyncio.to_thread``, except
    :meth:`aput_if_absent`, which is awaited on the event loop itself.

    Writes are all-or-nothing: a reader sees the old object, no object, or the complete new one,
    never a prefix. Every write records the sha256 of the bytes, so ``stat(key).sha256`` can later
    prove that a resent instance is identical to the stored one.

    ``data`` is ``bytes`` or a binary file-like. A file-like is read in bounded chunks, never whole:
    ``length=None`` reads to EOF, otherwise exactly ``length`` bytes (fewer is a ValueError). The
    sha256 must be known before the first byte is stored (it is written with the object), so:

    - pass ``sha256=`` when the caller already knows it (e.g. hashed while receiving): the data is
      streamed in one pass and verified as it goes; a mismatch raises ChecksumMismatch and nothing
      is stored;
    - otherwise a seekable file-like is hashed in a first pass and rewound; a non-seekable one is
      spooled (memory up to one part, then a temporary file) while hashing.

    Errors: InvalidObjectKey, ObjectNotFound, ChecksumMismatch (poison); ObjectStoreUnavailable
    (transient); BucketNotFound and plain ObjectStoreError (fatal). Errors reading ``data`` itself
    propagate unchanged.
    """

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist. Idempotent; safe to race with other services."""
        ...

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        length: int | None = None,
        content_type: str = DEFAULT_CONTENT_TYPE,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Store the object, replacing any existing one. The result's sha256 is never None."""
        ...

    def put_if_absent(
        self,
        key: str,
        data: bytes | BinaryIO,
        length: int | None = None,
        content_type: str = DEFAULT_CONTENT_TYPE,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> tuple[ObjectInfo, bool]:
        """Store the object only if ``key`` is free; never overwrite.

        Returns ``(info, True)`` when this call created it, else ``(info_of_existing, False)``
        without touching the existing object; compare ``info.sha256`` to tell an identical resend
        from a conflict.

        Concurrency depends on the server. Where conditional writes are atomic (AWS S3, MinIO) of
        concurrent callers on one new key exactly one gets ``True``. versitygw's posix backend
        (v1.7) checks ``If-None-Match`` when the upload starts and moves the file into place when
        it ends, so racing callers may each get ``True`` and the last to finish wins. The promise
        everywhere: a key that existed before the call is never overwritten. Keep one writer per
        key (e.g. partition by instance UID) rather than rely on the race being decided.
        """
        ...

    async def aput_if_absent(
        self,
        key: str,
        data: bytes,
        content_type: str = DEFAULT_CONTENT_TYPE,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> tuple[ObjectInfo, bool]:
        """:meth:`put_if_absent` of a body held in memory, awaited on the event loop: the same
        promises and errors. For the many small writes of a busy async service, which would
        otherwise each cost a trip to a worker thread."""
        ...

    async def aclose(self) -> None:
        """Release what :meth:`aput_if_absent` keeps open, on the loop it ran on."""
        ...

    def get(self, key: str) -> bytes:
        """The whole object. For large objects prefer ``open``."""
        ...

    def open(self, key: str, chunk_size: int = ...) -> AbstractContextManager[Iterator[bytes]]:
        """``with store.open(key) as chunks:`` iterates the object's bytes in chunks.

        Raises ObjectNotFound on entering; the connection is released on leaving, read or not.
        """
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """Info about the object, or None if it does not exist."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the object. Deleting a missing object is not an error (S3 semantics)."""
        ...

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix`` (a plain string prefix, not a folder), in sorted order."""
        ...


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise InvalidObjectKey."""
    if type(key) is str and len(key) <= MAX_KEY_LENGTH and _VALID_KEY.fullmatch(key):
        return key
    if not isinstance(key, str) or not key:
        raise InvalidObjectKey(f"object key must be a non-empty string, got {key!r}")
    _check_characters(key)
    if key.startswith("/"):
        raise InvalidObjectKey(f"object key must not start with '/': {key!r}")
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        # Empty, '.' and '..' segments are normalised away by filesystem-backed S3 servers
        # (versitygw posix) and by proxies, so two different keys could name one object.
        raise InvalidObjectKey(f"object key has an empty, '.' or '..' segment: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """Like validate_key, but empty is allowed and so is a trailing '/'."""
    if prefix == "":
        return prefix
    if not isinstance(prefix, str):
        raise InvalidObjectKey(f"prefix must be a string, got {prefix!r}")
    _check_characters(prefix)
    if prefix.startswith("/"):
        raise InvalidObjectKey(f"prefix must not start with '/': {prefix!r}")
    segments = prefix.split("/")
    if segments[-1] == "":
        segments.pop()
    if any(segment in ("", ".", "..") for segment in segments):
        raise InvalidObjectKey(f"prefix has an empty, '.' or '..' segment: {prefix!r}")
    return prefix


def _check_characters(key: str) -> None:
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidObjectKey(f"object key longer than {MAX_KEY_LENGTH}: {key[:40]!r}...")
    if not _KEY_CHARACTERS.fullmatch(key):
        # Do not echo the key: if it fails here it may be exactly the unsanitised value we must
        # keep out of logs.
        raise InvalidObjectKey("object key has characters outside [A-Za-z0-9._/-]")


def validate_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Return the user metadata with lowercased names, or raise ValueError."""
    result: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        lowered = name.lower()
        if not _METADATA_NAME.fullmatch(lowered):
            raise ValueError(f"metadata name must match [a-z0-9-]{{1,64}}: {name!r}")
        if lowered == SHA256_METADATA:
            raise ValueError("metadata name 'sha256' is reserved; pass sha256= instead")
        if not isinstance(value, str) or not _METADATA_VALUE.fullmatch(value):
            raise ValueError(f"metadata value for {name!r} must be printable ASCII, <= 1024 chars")
        result[lowered] = value
    return result


def validate_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    lowered = sha256.lower()
    if not _SHA256_HEX.fullmatch(lowered):
        raise ValueError("sha256 must be 64 hex characters")
    return lowered


def validate_length(length: int | None) -> int | None:
    if length is not None and (isinstance(length, bool) or length < 0):
        raise ValueError(f"length must be None or >= 0, got {length!r}")
    return length


def read_chunks(data: BinaryIO, length: int | None, chunk_size: int) -> Iterator[bytes]:
    """Read ``data`` in chunks of at most ``chunk_size``: to EOF, or exactly ``length`` bytes."""
    remaining = length
    while remaining is None or remaining > 0:
        want = chunk_size if remaining is None else min(chunk_size, remaining)
        chunk = data.read(want)
        if not chunk:
            break
        if remaining is not None:
            remaining -= len(chunk)
        yield chunk
    if remaining:
        raise ValueError(f"data ended {remaining} bytes short of length={length}")


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(
    objects: ObjectStore, key: str, sha256: str, chunk_size: int = 1024 * 1024
) -> Iterator[bytes]:
    """An object's bytes as stored, hashed on the way (S3 is read once).

    The last chunk is held back until the whole object hashes to ``sha256``; a mismatch raises
    :class:`ChecksumMismatch` instead, so a response streamed from this breaks off before it is
    complete and a client never receives altered bytes as a whole object.
    """
    digest = hashlib.sha256()
    held: bytes | None = None
    with objects.open(key, chunk_size) as chunks:
        for chunk in chunks:
            digest.update(chunk)
            if held is not None:
                yield held
            held = chunk
    actual = digest.hexdigest()
    if actual != sha256:
        raise ChecksumMismatch(key, sha256, actual)
    if held is not None:
        yield held
