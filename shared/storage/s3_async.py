"""An S3 PutObject of a body held in memory, awaited on the event loop: no worker thread.

**Why.** Ingest stores every received instance with one PUT. Through a worker thread each PUT
hands the GIL back and forth between that thread and the event loop, and the minio client builds
and signs the request in Python on top. Doing the PUT on the event loop, signed here, halved the
ingest's CPU per instance in the STOW-RS benchmark (2.63 to 1.41 ms, median of four alternating
runs each, 2026-11-26) and nearly doubled its throughput. Everything else the object store does
(HEAD, GET, listings, multipart uploads, streamed bodies) still goes through minio in a thread.

**What it keeps of the threaded path** (``shared.storage.s3_pool``): the same retry budget and
backoff from the store's ``urllib3.Retry`` (connection errors, read errors and the 5xx of its
status list; the last 5xx is returned), a kept connection that turns out closed before any
answer replaced without counting a retry, a kept connection with something already waiting on it
(a proxy's 408, a close) not used, a connection closed after any refusal (an S3 server may
answer before it has read the body, leaving the rest on the wire), an answer read even when
sending the rest of the body failed, interim 1xx answers skipped, chunked answers read.

**Where it differs, knowingly:** the read timeout bounds each phase (sending the request, then
reading the whole answer) rather than each socket read; a connection belongs to the event loop
that opened it, and one found from another loop is dropped; an answer sent before the server
read the body, by a server that then hangs up, is lost when the body did not fit in the socket's
buffers (asyncio closes the transport on the failed write): the PUT fails as a connection error,
retried. Bodies larger than ``MAX_BODY`` therefore take the threaded path, which reads it.

**A refusal a reset took away.** A server that refuses a conditional PUT (412, the key is
taken) before reading the body, and closes with the body unread, resets the connection: the
reset may arrive before the refusal is read, and discards it (versitygw did so for 2-15 in 100
refusals of a 39 KB body). Retrying meets the same refusal the same way, so the caller passes
``taken``, asked after a connection error: if the key exists now, :class:`KeyTaken` ends the
PUT instead of a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import select
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from urllib3 import Retry
from urllib3.exceptions import ProtocolError

from shared.storage.port import ObjectStoreUnavailable
from shared.storage.s3_pool import (
    _MAX_HEADERS,
    _backoff,
    _budget,
    _chunk_size,
    _ConnectFailed,
    _Framing,
    _request_head,
    _status,
)

_SPACES = re.compile(" +")
# Larger bodies are stored through the threaded path (module docstring).
MAX_BODY = 4 * 1024 * 1024
_ALGORITHM = "AWS4-HMAC-SHA256"


class KeyTaken(Exception):
    """A conditional PUT's refusal lost to a reset: the key exists (``put``'s ``taken``)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    reason: str
    # Names lowercased; a repeated header keeps its last value.
    headers: dict[str, str]
    body: bytes


class _Stale(Exception):
    """A kept-alive connection turned out closed before any answer: try a new one."""


# -- Signature Version 4 ------------------------------------------------------------------------


class SigV4:
    """Signs S3 requests (AWS Signature Version 4, header-based, payload hash given).

    The signing key depends only on the day, so it is derived once a day, not per request.
    """

    def __init__(self, access_key: str, secret_key: str, region: str) -> None:
        self._access_key = access_key
        self._secret_key = secret_key
        self._region = region
        self._day = ""
        self._key = b""

    def sign(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        payload_sha256: str,
        now: datetime | None = None,
    ) -> dict[str, str]:
        """``headers`` (which must include ``host``) plus ``x-amz-date``,
        ``x-amz-content-sha256`` and ``authorization``, every name lowercased. ``path`` is the
        URI-encoded absolute path; no query string."""
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        signed = {name.lower(): str(value).strip(" ") for name, value in headers.items()}
        signed["x-amz-date"] = stamp
        signed["x-amz-content-sha256"] = payload_sha256
        names = sorted(signed)
        # Values are signed with runs of spaces collapsed (not tabs: as minio and the server),
        # and sent as given: the server canonicalises what it receives the same way.
        canonical = "\n".join(
            [
                method,
                path,
                "",  # query string
                "".join(f"{name}:{_SPACES.sub(' ', signed[name])}\n" for name in names),
                ";".join(names),
                payload_sha256,
            ]
        )
        scope = f"{day}/{self._region}/s3/aws4_request"
        to_sign = "\n".join(
            [_ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        signature = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        signed["authorization"] = (
            f"{_ALGORITHM} Credential={self._access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        return signed

    def _signing_key(self, day: str) -> bytes:
        if day != self._day:
            key = hmac.new(
                f"AWS4{self._secret_key}".encode(), day.encode(), hashlib.sha256
            ).digest()
            for part in (self._region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._day, self._key = day, key
        return self._key


def object_path(bucket: str, key: str) -> str:
    """The URI-encoded path of an object (path-style addressing)."""
    return "/" + quote(f"{bucket}/{key}", safe="/-_.~")


# -- the connection and the client --------------------------------------------------------------


class _Connection:
    __slots__ = ("reader", "reused", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def close(self) -> None:
        with contextlib.suppress(Exception):  # its loop may be closed already
            self.writer.close()

    def idle_and_open(self) -> bool:
        """Nothing waits to be read on it (a 408, an end) and it is not closing."""
        if self.writer.transport.is_closing() or self.reader.at_eof():
            return False
        # What the server sent since the last answer is in the reader's buffer if the loop
        # has read it already (StreamReader has no public peek), or still on the socket if
        # the loop was busy since.
        if getattr(self.reader, "_buffer", b""):
            return False
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    async def exchange(self, request: bytes, timeout: float | None) -> tuple[Answer, bool]:
        """Send ``request``; (the answer, whether the connection can be kept)."""
        send_failed: OSError | None = None
        self.writer.write(request)
        try:
            await asyncio.wait_for(self.writer.drain(), timeout)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # It may have answered (412 for a taken key) and hung up before reading it all.
            send_failed = exc
        return await asyncio.wait_for(self._answer(send_failed), timeout)

    async def _answer(self, send_failed: OSError | None) -> tuple[Answer, bool]:
        try:
            status_line = await self._line()
        except ConnectionResetError as exc:
            send_failed, status_line = send_failed or exc, b""
        if not status_line:
            if self.reused:
                raise _Stale from send_failed
            if send_failed is not None:
                raise send_failed
            raise ProtocolError("the S3 server closed the connection without an answer")
        version, status, reason = _status(status_line)
        headers, length, chunked, keep = await self._headers(version)
        while 100 <= status < 200 and status != 101:  # interim answers (RFC 9110 15.2)
            status_line = await self._line()
            if not status_line:
                raise ProtocolError("the S3 server closed the connection after an interim answer")
            version, status, reason = _status(status_line)
            headers, length, chunked, keep = await self._headers(version)
        keep = keep and send_failed is None and status != 101
        try:
            if chunked:
                body = await self._chunked()
            elif length is not None:
                body = await self.reader.readexactly(length)
            elif status in (204, 304):
                body = b""
            else:  # no length: the body runs to the end of the connection
                body, keep = await self.reader.read(), False
        except asyncio.IncompleteReadError:
            raise ProtocolError("the S3 server's answer ended early") from None
        return Answer(status, reason, headers, body), keep

    async def _line(self) -> bytes:
        try:
            return await self.reader.readline()
        except ValueError:  # longer than the reader's limit
            raise ProtocolError("the S3 server's answer has a line that is too long") from None

    async def _headers(self, version: bytes) -> tuple[dict[str, str], int | None, bool, bool]:
        headers: dict[str, str] = {}
        framing = _Framing(version)
        for _ in range(_MAX_HEADERS + 1):
            line = await self._line()
            if line in (b"\r\n", b"\n"):
                return headers, framing.length, framing.chunked, framing.keep
            if not line:
                raise ProtocolError("the S3 server's answer has malformed headers")
            name, value = framing.read(line)
            headers[name.lower()] = value
        raise ProtocolError("the S3 server's answer has too many headers")

    async def _chunked(self) -> bytes:
        pieces = []
        while True:
            size = _chunk_size(await self._line())
            if size == 0:
                while await self._line() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(pieces)
            chunk = await self.reader.readexactly(size + 2)
            pieces.append(chunk[:size])


class AsyncPutClient:
    """PUTs of in-memory bodies to one S3 endpoint, on the running event loop (module docstring).

    ``put`` raises ObjectStoreUnavailable when the retries ran out on connection or read
    errors; any answer, including the last 5xx, is returned for the caller to judge.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        secure: bool,
        signer: SigV4,
        connect_timeout: float | None,
        read_timeout: float | None,
        retries: Retry,
        max_idle: int = 32,
    ) -> None:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            host, port = endpoint, "443" if secure else "80"
        self._endpoint = endpoint
        self._host = host.strip("[]")
        self._port = int(port)
        # The system trust store, as the threaded path: a hospital's private CA installed works.
        self._ssl = ssl.create_default_context() if secure else None
        self._signer = signer
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._retries = retries
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def put(
        self,
        path: str,
        body: bytes,
        payload_sha256: str,
        headers: Mapping[str, str],
        *,
        taken: Callable[[], Awaitable[bool]] | None = None,
    ) -> Answer:
        """PUT ``body``; the answer (an error status too). Raises ObjectStoreUnavailable when
        the retries run out, :class:`KeyTaken` when ``taken`` (a conditional PUT's) says after
        a connection error that the key exists (see the module docstring)."""
        signed = self._signer.sign("PUT", path, {"host": self._endpoint, **headers}, payload_sha256)
        request = _request_head("PUT", path, signed, len(body)) + body
        errors = 0
        while True:
            try:
                answer = await self._exchange(request)
            except (OSError, ProtocolError, asyncio.IncompleteReadError) as exc:
                if taken is not None and await taken():
                    raise KeyTaken(path) from exc
                errors += 1  # a timeout is an OSError too (TimeoutError)
                if errors > _budget(self._retries, exc):
                    raise ObjectStoreUnavailable(
                        f"S3 endpoint {self._endpoint} unreachable: {exc!r}"
                    ) from exc
                await asyncio.sleep(_backoff(self._retries, errors))
                continue
            if answer.status in (self._retries.status_forcelist or ()) and errors < _budget(
                self._retries, None
            ):
                errors += 1
                await asyncio.sleep(_backoff(self._retries, errors))
                continue
            return answer

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()

    async def _exchange(self, request: bytes) -> Answer:
        while True:
            conn = self._take()
            if conn is None:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(
                            self._host,
                            self._port,
                            ssl=self._ssl,
                            server_hostname=self._host if self._ssl else None,
                        ),
                        self._connect_timeout,
                    )
                except (OSError, ssl.SSLError) as exc:  # TimeoutError is an OSError
                    raise _ConnectFailed(str(exc) or repr(exc)) from exc
                conn = _Connection(reader, writer)
            try:
                answer, keep = await conn.exchange(request, self._read_timeout)
            except _Stale:
                conn.close()
                continue  # a fresh connection, not counted as a retry (nothing was answered)
            except BaseException:
                conn.close()
                raise
            if answer.status == 408 and conn.reused:
                # A kept connection timed out by the server or a proxy just as it was taken:
                # the 408 was not an answer to this request.
                conn.close()
                continue
            # A refused PUT may have left part of its body unread on this connection.
            if keep and answer.status < 400 and len(self._idle) < self._max_idle:
                conn.reused = True
                self._idle.append(conn)
            else:
                conn.close()
            return answer

    def _take(self) -> _Connection | None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            stale, self._idle, self._loop = self._idle, [], loop
            for conn in stale:
                conn.close()
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_and_open():
                return conn
            conn.close()
        return None
