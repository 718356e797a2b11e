"""S3ObjectStore: the ObjectStore on any S3 server (versitygw, AWS, Ceph) via the minio SDK."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tempfile
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, BinaryIO, NoReturn

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import check_bucket_name, md5sum_hash

from shared.storage.port import (
    DEFAULT_CONTENT_TYPE,
    SHA256_METADATA,
    BucketNotFound,
    ChecksumMismatch,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    ObjectStoreUnavailable,
    read_chunks,
    validate_key,
    validate_length,
    validate_metadata,
    validate_prefix,
    validate_sha256,
)
from shared.storage.s3_async import (
    MAX_BODY,
    Answer,
    AsyncPutClient,
    KeyTaken,
    SigV4,
    object_path,
)
from shared.storage.s3_pool import S3PoolManager

if TYPE_CHECKING:
    from urllib3.response import BaseHTTPResponse

    from shared.settings import S3Settings

MiB = 1024 * 1024
# 16 MiB parts bound memory per upload to about two parts; S3 allows 10 000 parts, so an upload of
# unknown length can reach 156 GiB, far above any DICOM instance. Known lengths get larger parts.
DEFAULT_PART_SIZE = 16 * MiB
_MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
_MAX_PARTS = 10_000
_READ_CHUNK = 1 * MiB
_META = "x-amz-meta-"
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"

# S3 error codes that say "try again later" even though some come with a 4xx status.
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed"}
)
# Answers to an If-None-Match write meaning "the key is taken": 412 from the conditional check,
# 409 from AWS when a concurrent write to the same key was in flight (its docs say: re-check).
_KEY_TAKEN_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
# Answers meaning "this server does not do conditional writes at all".
_UNSUPPORTED_CODES = frozenset(
    {"NotImplemented", "MethodNotAllowed", "InvalidArgument", "InvalidRequest", "BadRequest"}
)


class _KeyTaken(Exception):
    """Internal: a conditional write found the key already in use."""


class S3ObjectStore:
    """ObjectStore on one S3 bucket.

    No network at construction: the minio client (and its connection pool) is built on first use.
    The pool fails fast: ``connect_timeout`` per connection attempt, ``read_timeout`` per socket
    read, and ``retries`` quick retries (0.2 s, 0.4 s, ... backoff) of idempotent requests on
    connection errors and 5xx, after which ObjectStoreUnavailable is raised for the caller's own
    retry policy. A down server costs about ``(retries + 1) * connect_timeout`` at most.

    ``put_if_absent`` uses S3 conditional writes (``If-None-Match: *`` on PutObject and on
    CompleteMultipartUpload); how atomic that is is up to the server (see the port: versitygw
    posix checks at the start of the upload, not at the end). Whether the server honours the header
    is probed once, on the first ``put_if_absent`` (unless ``conditional_writes`` says so), because
    an S3 that ignores it would silently overwrite; the probe writes and deletes one object under
    ``.beeldportaal-probe/``. Without support it falls back to stat-then-put, which is racy: two
    concurrent writers of one new key may both get ``created=True``, and the last one wins.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        region: str = "us-east-1",
        secure: bool = True,
        part_size: int = DEFAULT_PART_SIZE,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        retries: int = 2,
        conditional_writes: bool | None = None,
    ) -> None:
        check_bucket_name(bucket)
        if part_size < _MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {_MIN_PART_SIZE} bytes")
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        self.secure = secure
        self.part_size = part_size
        self._access_key = access_key
        self._secret_key = secret_key
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._retries = retries
        self._conditional_writes = conditional_writes
        self._client: Minio | None = None
        self._async_client: AsyncPutClient | None = None
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()  # separate: the probe itself needs _lock via _minio()

    @classmethod
    def from_settings(cls, settings: S3Settings, **options: object) -> S3ObjectStore:
        return cls(
            settings.endpoint,
            settings.access_key,
            settings.secret_key.get_secret_value(),
            settings.bucket,
            region=settings.region,
            secure=settings.secure,
            **options,  # type: ignore[arg-type]
        )

    def __repr__(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"S3ObjectStore({scheme}://{self.endpoint}/{self.bucket})"

    # -- the port ---------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        client = self._minio()
        with self._translated():
            if client.bucket_exists(self.bucket):
                return
            try:
                client.make_bucket(self.bucket)
            except S3Error as exc:
                # Another service created it between our check and our create: that is success.
                if exc.code != "BucketAlreadyOwnedByYou":
                    raise

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        length: int | None = None,
        content_type: str = DEFAULT_CONTENT_TYPE,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        info, _ = self._write(key, data, length, content_type, metadata, sha256, if_absent=False)
        return info

    def put_if_absent(
        self,
        key: str,
        data: bytes | BinaryIO,
        length: int | None = None,
        content_type: str = DEFAULT_CONTENT_TYPE,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> tuple[ObjectInfo, bool]:
        return self._write(key, data, length, content_type, metadata, sha256, if_absent=True)

    async def aput_if_absent(
        self,
        key: str,
        data: bytes,
        content_type: str = DEFAULT_CONTENT_TYPE,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> tuple[ObjectInfo, bool]:
        """:meth:`put_if_absent` of a body in memory, on the event loop (``s3_async``): one
        PutObject signed here. A body larger than one part or ``s3_async.MAX_BODY``, a server
        without conditional writes and the HEAD after a refusal take the threaded path."""
        validate_key(key)
        user_metadata = validate_metadata(metadata)
        declared = validate_sha256(sha256)
        body = bytes(data)
        content_type = content_type or DEFAULT_CONTENT_TYPE
        if len(body) > min(self.part_size, MAX_BODY):
            return await asyncio.to_thread(
                self.put_if_absent, key, body, len(body), content_type, metadata, sha256
            )
        conditional = self._conditional_writes
        if conditional is None:
            conditional = await asyncio.to_thread(self._supports_conditional_writes)
        if not conditional:
            existing = await asyncio.to_thread(self.stat, key)
            if existing is not None:
                return existing, False
        digest = hashlib.sha256(body).hexdigest()
        if declared is not None and declared != digest:
            raise ChecksumMismatch(key, declared, digest)
        headers = {"content-type": content_type, _META + SHA256_METADATA: digest}
        headers.update({_META + name: value for name, value in user_metadata.items()})
        if conditional:
            headers["if-none-match"] = "*"

        found: ObjectInfo | None = None

        async def taken() -> bool:
            nonlocal found
            try:
                found = await asyncio.to_thread(self.stat, key)
            except ObjectStoreError:
                return False  # the error goes on as the PUT's own
            return found is not None

        try:
            answer = await self._put_client().put(
                object_path(self.bucket, key),
                body,
                digest,
                headers,
                taken=taken if conditional else None,
            )
        except KeyTaken:
            # Refused as taken, the refusal lost to a reset (s3_async); ``taken`` read it.
            assert found is not None
            return found, False
        if answer.status < 300:
            etag = answer.headers.get("etag", "").replace('"', "")
            return ObjectInfo(key, len(body), etag, digest, content_type, user_metadata), True
        code, message = _error_of(answer)
        if conditional and (answer.status == 412 or code in _KEY_TAKEN_CODES):
            existing = await asyncio.to_thread(self.stat, key)
            if existing is None:
                # Taken a moment ago, gone now (deleted, or a 409 whose writer failed).
                raise ObjectStoreUnavailable(f"{key!r} changed during put_if_absent")
            return existing, False
        if code == "NoSuchBucket":
            raise BucketNotFound(self.bucket)
        if code is None or code in _TRANSIENT_CODES or answer.status >= 500:
            # No S3 error document: a proxy or load balancer answered for a sick server (the
            # threaded path: minio's InvalidResponseError). Transient, as there.
            raise ObjectStoreUnavailable(
                f"S3 {code or answer.reason} ({answer.status})",
                retry_after=_seconds(answer.headers.get("retry-after")),
            )
        raise ObjectStoreError(f"S3 {code} ({answer.status}): {message}")

    async def aclose(self) -> None:
        """Close the connections :meth:`aput_if_absent` keeps (on the loop that opened them)."""
        if self._async_client is not None:
            await self._async_client.aclose()

    def get(self, key: str) -> bytes:
        with self.open(key) as chunks:
            return b"".join(chunks)

    @contextmanager
    def open(self, key: str, chunk_size: int = _READ_CHUNK) -> Iterator[Iterator[bytes]]:
        validate_key(key)
        client = self._minio()
        with self._translated(key):
            response = client.get_object(self.bucket, key)
        try:
            yield self._chunks_of(response, chunk_size, key)
        finally:
            # Close (drops a half-read connection instead of draining it), then hand it back.
            response.close()
            response.release_conn()

    def stat(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        client = self._minio()
        try:
            with self._translated(key):
                result = client.stat_object(self.bucket, key)
        except ObjectNotFound:
            # HEAD has no body, so a missing bucket also reads as NoSuchKey here.
            return None
        metadata = {
            name.lower()[len(_META) :]: value
            for name, value in (result.metadata or {}).items()
            if name.lower().startswith(_META)
        }
        sha256 = metadata.pop(SHA256_METADATA, None)
        return ObjectInfo(
            key=key,
            size=result.size or 0,
            etag=result.etag or "",
            sha256=sha256,
            content_type=result.content_type or DEFAULT_CONTENT_TYPE,
            metadata=metadata,
        )

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def delete(self, key: str) -> None:
        validate_key(key)
        client = self._minio()
        with self._translated(key):
            client.remove_object(self.bucket, key)

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)  # eagerly, not on the first next()
        return self._list(prefix)

    # -- writing ----------------------------------------------------------------------------------

    def _write(
        self,
        key: str,
        data: bytes | BinaryIO,
        length: int | None,
        content_type: str,
        metadata: Mapping[str, str] | None,
        sha256: str | None,
        *,
        if_absent: bool,
    ) -> tuple[ObjectInfo, bool]:
        validate_key(key)
        validate_length(length)
        user_metadata = validate_metadata(metadata)
        declared = validate_sha256(sha256)
        content_type = content_type or DEFAULT_CONTENT_TYPE

        conditional = if_absent and self._supports_conditional_writes()
        if if_absent and not conditional:
            existing = self.stat(key)
            if existing is not None:
                return existing, False

        with _hashed_source(key, data, length, declared, self.part_size) as (source, size, digest):
            headers = {"Content-Type": content_type, _META + SHA256_METADATA: digest}
            headers.update({_META + name: value for name, value in user_metadata.items()})
            try:
                etag, size = self._upload(key, source, size, digest, headers, conditional)
            except _KeyTaken:
                existing = self.stat(key)
                if existing is None:
                    # Taken a moment ago, gone now (deleted, or a 409 whose writer failed).
                    raise ObjectStoreUnavailable(f"{key!r} changed during put_if_absent") from None
                return existing, False
        info = ObjectInfo(key, size, etag, digest, content_type, user_metadata)
        return info, True

    def _upload(
        self,
        key: str,
        source: BinaryIO,
        length: int | None,
        digest: str,
        headers: dict[str, str],
        conditional: bool,
    ) -> tuple[str, int]:
        """Stream ``source`` as one PutObject or a multipart upload; verify it hashes to ``digest``
        before anything becomes visible. Returns (etag, size). Raises _KeyTaken."""
        client = self._minio()
        part_size = self._part_size_for(length)
        hasher = hashlib.sha256()
        condition = {"If-None-Match": "*"} if conditional else {}

        part = _read_part(source, part_size)
        hasher.update(part)
        size = len(part)
        # One byte of look-ahead tells a full last part from a full middle part without holding
        # two parts in memory.
        more = source.read(1) if len(part) == part_size else b""
        if not more:
            _verify(key, digest, hasher)
            with self._translated(key, conditional=conditional):
                result = client._put_object(self.bucket, key, part, {**headers, **condition})
            return result.etag or "", size

        if conditional and self.stat(key) is not None:
            # Worth a HEAD before sending a large body only to have it refused at the end.
            raise _KeyTaken
        with self._translated(key):
            upload_id = client._create_multipart_upload(self.bucket, key, dict(headers))
        try:
            etags: list[str] = []
            while True:
                if len(etags) == _MAX_PARTS:
                    raise ValueError(f"{key!r}: more than {_MAX_PARTS} parts of {part_size} bytes")
                with self._translated(key):
                    etags.append(
                        client._upload_part(self.bucket, key, part, None, upload_id, len(etags) + 1)
                    )
                del part  # free this part before reading the next
                if not more:
                    break
                part = _read_part(source, part_size, first=more)
                hasher.update(part)
                size += len(part)
                more = source.read(1) if len(part) == part_size else b""
            _verify(key, digest, hasher)
            etag = self._complete(key, upload_id, etags, condition)
        except BaseException:
            # Parts of an unfinished upload are invisible but billed and kept until aborted.
            self._abort(key, upload_id)
            raise
        return etag, size

    def _complete(self, key: str, upload_id: str, etags: list[str], condition: dict) -> str:
        # minio's own _complete_multipart_upload cannot send If-None-Match, so build the request.
        root = ET.Element("CompleteMultipartUpload")
        for number, etag in enumerate(etags, start=1):
            part = ET.SubElement(root, "Part")
            ET.SubElement(part, "PartNumber").text = str(number)
            ET.SubElement(part, "ETag").text = f'"{etag}"'
        body = ET.tostring(root)
        headers = {"Content-Type": "application/xml", "Content-MD5": md5sum_hash(body), **condition}
        client = self._minio()
        with self._translated(key, conditional=bool(condition)):
            response = client._execute(
                "POST",
                self.bucket,
                key,
                body=body,
                headers=headers,
                query_params={"uploadId": upload_id},
            )
        # AWS keeps a long completion alive by sending whitespace before the XML declaration.
        answer = ET.fromstring(response.data.strip())
        if answer.tag.removeprefix(_S3_NS) == "Error":
            # S3 may report a failed completion as 200 OK with an <Error> body.
            code = answer.findtext(f"{_S3_NS}Code") or answer.findtext("Code") or "InternalError"
            if condition and code in _KEY_TAKEN_CODES:
                raise _KeyTaken
            raise ObjectStoreUnavailable(f"{key!r}: multipart completion failed: {code}")
        etag = answer.findtext(f"{_S3_NS}ETag") or answer.findtext("ETag") or ""
        return etag.replace('"', "")

    def _abort(self, key: str, upload_id: str) -> None:
        # Best effort: the error that made us abort is the one worth raising.
        with suppress(Exception):
            self._minio()._abort_multipart_upload(self.bucket, key, upload_id)

    def _part_size_for(self, length: int | None) -> int:
        if length is None:
            return self.part_size
        needed = -(-length // _MAX_PARTS)
        return max(self.part_size, -(-needed // MiB) * MiB)

    def _supports_conditional_writes(self) -> bool:
        if self._conditional_writes is None:
            with self._probe_lock:
                if self._conditional_writes is None:
                    self._conditional_writes = self._probe_conditional_writes()
        return self._conditional_writes

    def _probe_conditional_writes(self) -> bool:
        client = self._minio()
        key = f".beeldportaal-probe/{uuid.uuid4().hex}"
        with self._translated(key):
            client._put_object(self.bucket, key, b"", {})
        try:
            try:
                client._put_object(self.bucket, key, b"", {"If-None-Match": "*"})
            except S3Error as exc:
                if exc.code in _KEY_TAKEN_CODES:
                    return True
                if exc.code in _UNSUPPORTED_CODES:
                    return False
                self._raise_translated(exc, key)
            return False  # it overwrote: the header was ignored
        finally:
            with self._translated(key):
                client.remove_object(self.bucket, key)

    # -- reading ----------------------------------------------------------------------------------

    def _chunks_of(self, response: BaseHTTPResponse, chunk_size: int, key: str) -> Iterator[bytes]:
        with self._translated(key):
            yield from response.stream(chunk_size)

    def _list(self, prefix: str) -> Iterator[str]:
        client = self._minio()
        with self._translated():
            for item in client.list_objects(self.bucket, prefix=prefix or None, recursive=True):
                if item.object_name and not item.is_dir:
                    yield item.object_name

    # -- the client and its errors ----------------------------------------------------------------

    def _minio(self) -> Minio:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._build_client()
        return self._client

    def _build_client(self) -> Minio:
        http = S3PoolManager(
            timeout=urllib3.Timeout(connect=self._connect_timeout, read=self._read_timeout),
            retries=self._retry(),
            # One per worker thread of asyncio.to_thread's default executor (at most 32).
            maxsize=32,
            # The system trust store, so a hospital's private CA installed in the image works.
            cert_reqs="CERT_REQUIRED" if self.secure else "CERT_NONE",
        )
        return Minio(
            self.endpoint,
            access_key=self._access_key,
            secret_key=self._secret_key,
            secure=self.secure,
            # An explicit region skips minio's GetBucketLocation round trip.
            region=self.region,
            http_client=http,
        )

    def _put_client(self) -> AsyncPutClient:
        if self._async_client is None:
            self._async_client = AsyncPutClient(
                self.endpoint,
                secure=self.secure,
                signer=SigV4(self._access_key, self._secret_key, self.region),
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
                retries=self._retry(),
            )
        return self._async_client

    def _retry(self) -> urllib3.Retry:
        return urllib3.Retry(
            total=self._retries,
            connect=self._retries,
            read=self._retries,
            status=self._retries,
            backoff_factor=0.2,
            backoff_max=2.0,
            status_forcelist=(500, 502, 503, 504),
            # Retry-After can ask for minutes; surface it in ObjectStoreUnavailable instead.
            respect_retry_after_header=False,
            # Return the last 5xx so minio parses it into an S3Error we can classify.
            raise_on_status=False,
        )

    @contextmanager
    def _translated(self, key: str | None = None, *, conditional: bool = False) -> Iterator[None]:
        """Map minio and urllib3 failures of the calls inside onto the port's error taxonomy.

        Only wraps client calls: errors reading the caller's data must not pass for an outage."""
        try:
            yield
        except S3Error as exc:
            if conditional and exc.code in _KEY_TAKEN_CODES:
                raise _KeyTaken from exc
            self._raise_translated(exc, key)
        except ServerError as exc:
            raise ObjectStoreUnavailable(f"S3 server error {exc.status_code}") from exc
        except InvalidResponseError as exc:
            # A non-S3 answer: typically a proxy or load balancer in front of a sick server.
            raise ObjectStoreUnavailable(f"unexpected answer from S3 endpoint: {exc}") from exc
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
            raise ObjectStoreUnavailable(f"S3 endpoint {self.endpoint} unreachable: {exc}") from exc

    def _raise_translated(self, exc: S3Error, key: str | None) -> NoReturn:
        status = exc.response.status if exc.response is not None else 0
        if exc.code == "NoSuchKey" and key is not None:
            raise ObjectNotFound(key) from exc
        if exc.code == "NoSuchBucket":
            raise BucketNotFound(self.bucket) from exc
        if exc.code in _TRANSIENT_CODES or status >= 500:
            retry_after = _retry_after(exc.response)
            raise ObjectStoreUnavailable(
                f"S3 {exc.code} ({status})", retry_after=retry_after
            ) from exc
        # AccessDenied, SignatureDoesNotMatch, InvalidAccessKeyId, ...: configuration, fatal.
        raise ObjectStoreError(f"S3 {exc.code} ({status}): {exc.message}") from exc


def _retry_after(response: BaseHTTPResponse | None) -> float:
    return _seconds(response.headers.get("Retry-After") if response is not None else None)


def _seconds(value: str | None) -> float:
    try:
        return max(float(value), 0.0) if value else 1.0
    except ValueError:
        return 1.0


def _error_of(answer: Answer) -> tuple[str | None, str]:
    """(Code, Message) of an S3 error answer; (None, reason) when its body is not S3's XML."""
    with suppress(ET.ParseError):
        root = ET.fromstring(answer.body.strip()) if answer.body.strip() else None
        if root is not None and root.tag.removeprefix(_S3_NS) == "Error":
            code = root.findtext(f"{_S3_NS}Code") or root.findtext("Code")
            message = root.findtext(f"{_S3_NS}Message") or root.findtext("Message") or ""
            if code:
                return code, message
    return None, answer.reason


def _read_part(source: BinaryIO, size: int, first: bytes = b"") -> bytes:
    """Up to ``size`` bytes (``first`` included); fewer only at the end of ``source``."""
    pieces = [first] if first else []
    got = len(first)
    while got < size:
        chunk = source.read(min(size - got, _READ_CHUNK))
        if not chunk:
            break
        pieces.append(chunk)
        got += len(chunk)
    return b"".join(pieces)


def _verify(key: str, digest: str, hasher: hashlib._Hash) -> None:
    actual = hasher.hexdigest()
    if actual != digest:
        raise ChecksumMismatch(key, digest, actual)


class _Exactly(io.RawIOBase):
    """Reads exactly ``length`` bytes of ``source``: stops there, and raises if it ends sooner."""

    def __init__(self, source: BinaryIO, length: int) -> None:
        self._source = source
        self._remaining = length
        self._length = length

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        want = self._remaining if size is None or size < 0 else min(size, self._remaining)
        chunk = self._source.read(want)
        if not chunk and want:
            raise ValueError(f"data ended {self._remaining} bytes short of length={self._length}")
        self._remaining -= len(chunk)
        return chunk


@contextmanager
def _hashed_source(
    key: str, data: bytes | BinaryIO, length: int | None, declared: str | None, spool_size: int
) -> Iterator[tuple[BinaryIO, int | None, str]]:
    """Yield (source, length or None, sha256 hex) such that the sha256 is known before upload.

    The sha256 goes into the object's metadata, which S3 only accepts when the upload starts.
    bytes are hashed in place; with a declared sha256 the data streams in one pass (_upload
    verifies it); a seekable file is hashed, then rewound; anything else is spooled while hashing
    (in memory up to one part, then a temporary file), so memory stays bounded either way.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        body = bytes(data)
        if length is not None and length != len(body):
            raise ValueError(f"length={length} but data has {len(body)} bytes")
        actual = hashlib.sha256(body).hexdigest()
        if declared is not None and declared != actual:
            raise ChecksumMismatch(key, declared, actual)
        yield io.BytesIO(body), len(body), actual
        return

    source: BinaryIO = _Exactly(data, length) if length is not None else data  # type: ignore[assignment]
    if declared is not None:
        yield source, length, declared
        return

    if _seekable(data):
        start = data.tell()
        hasher = hashlib.sha256()
        size = 0
        for chunk in read_chunks(data, length, _READ_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
        data.seek(start)
        yield _Exactly(data, size), size, hasher.hexdigest()  # type: ignore[misc]
        return

    with tempfile.SpooledTemporaryFile(max_size=spool_size) as spool:
        hasher = hashlib.sha256()
        size = 0
        for chunk in read_chunks(data, length, _READ_CHUNK):
            hasher.update(chunk)
            spool.write(chunk)
            size += len(chunk)
        spool.seek(0)
        yield spool, size, hasher.hexdigest()  # type: ignore[misc]


def _seekable(data: BinaryIO) -> bool:
    try:
        return bool(data.seekable())
    except (AttributeError, ValueError, OSError):
        return False
