"""Storage of DICOM bytes: the ObjectStore port and its S3 and in-memory adapters."""

from shared.storage.memory import InMemoryObjectStore
from shared.storage.port import (
    DEFAULT_CONTENT_TYPE,
    BucketNotFound,
    ChecksumMismatch,
    InvalidObjectKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailable,
    validate_key,
)
from shared.storage.s3 import S3ObjectStore

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "BucketNotFound",
    "ChecksumMismatch",
    "InMemoryObjectStore",
    "InvalidObjectKey",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectStoreUnavailable",
    "S3ObjectStore",
    "validate_key",
]
