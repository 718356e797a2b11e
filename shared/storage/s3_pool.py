"""The HTTP transport under the minio client: urllib3, plus a lean path for plain-HTTP PUTs.

**Refusals leave a connection dirty.** An S3 server may refuse a PUT or POST (412 for
If-None-Match on a taken key, 403, 400 ...) as soon as it has read the headers, before it has
read the body. HTTP lets it, and lets it keep the connection open; the rest of the body is then
still on the wire, and the server reads it as the start of the next request on that connection.
versitygw v1.7.0 does this: about 1 in 100 refused conditional writes of a 36 KiB instance left a
connection whose next request, whatever it was, came back ``400 BadRequest`` (the ingest answered
A700 for a plain duplicate). Refusals are rare, so closing the connection after each costs nothing
measurable. Both paths below do so.

**Storing an instance is one PUT**, and through urllib3 and http.client its request and answer
cost more of the ingest's one core than anything else in it: a fifth of the GIL-holding time in a
STOW-RS benchmark (py-spy, 2026-11-26), for building, sending and parsing a dozen headers. A PUT
of a body already in memory over plain HTTP (``S3PoolManager._put_fast``) therefore skips them:
the request is written with one ``sendall`` and the answer read with a buffered reader. It keeps
urllib3's behaviour for what the object store relies on: the same timeouts, the same retries
(connection errors, read errors and 5xx, with the same backoff; the last 5xx is returned), a
stale keep-alive connection retried once on a new one, ``MaxRetryError`` when retries run out.
Everything else (GET, HEAD, POST, DELETE, streamed bodies, HTTPS) goes through urllib3.

Where it differs from urllib3, knowingly: the retry counts are read from the ``Retry`` the store
builds (``S3ObjectStore._build_client``: connect, read, status and total all equal), with one
counter for every kind of failure; a kept connection found closed before it answered is
replaced without counting a retry (nothing was answered); ``raise_on_status``, jitter,
redirects and per-call ``retries`` or ``timeout`` arguments are not looked at.
"""

from __future__ import annotations

import io
import select
import socket
import threading
import time
import weakref
from typing import Any
from urllib.parse import urlsplit

from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager, Retry, Timeout
from urllib3._collections import HTTPHeaderDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import MaxRetryError, ProtocolError
from urllib3.response import BaseHTTPResponse, HTTPResponse

_WITH_BODY = frozenset({"PUT", "POST"})
# Longest status or header line accepted in an answer, and most header lines (as http.client).
_MAX_LINE = 65536
_MAX_HEADERS = 100


class _Discarding:
    """Mixin for a connection: remembers that its last answer refused a request with a body."""

    dirty = False

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        options = self._response_options  # type: ignore[attr-defined]
        method = options.request_method if options is not None else None
        response = super().getresponse()  # type: ignore[misc]
        self.dirty = method in _WITH_BODY and response.status >= 400
        return response


class _Connection(_Discarding, HTTPConnection):
    pass


class _TLSConnection(_Discarding, HTTPSConnection):
    pass


class _Returning:
    """Mixin for a pool: closes a dirty connection on its way back (it reconnects when reused)."""

    def _put_conn(self, conn: HTTPConnection | None) -> None:
        if isinstance(conn, _Discarding) and conn.dirty:
            conn.dirty = False
            conn.close()
        super()._put_conn(conn)  # type: ignore[misc]


class _Pool(_Returning, HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(_Returning, HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class _Stale(Exception):
    """A kept-alive connection turned out closed before any answer: try a new one."""


class _ConnectFailed(OSError):
    """No connection to the S3 server (refused, unresolvable, timed out): urllib3's connect
    retries apply, not its read retries."""


class _Lean:
    """One plain-HTTP keep-alive connection: a socket and a buffered reader on it."""

    __slots__ = ("reader", "reused", "sock")

    def __init__(self, host: str, port: int, connect_timeout: float | None) -> None:
        self.sock = socket.create_connection((host, port), timeout=connect_timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")
        self.reused = False

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def exchange(
        self, request: bytes, read_timeout: float | None
    ) -> tuple[int, str, list[tuple[str, str]], bytes, bool]:
        """Send ``request``; (status, reason, headers, body, keep the connection)."""
        self.sock.settimeout(read_timeout)
        # A server may answer (a 412 for a taken key) and hang up before it has read the whole
        # body; sending the rest then fails. Its answer is read all the same, as urllib3 does.
        send_failed: OSError | None = None
        try:
            self.sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError) as exc:
            send_failed = exc
        try:
            status_line = self.reader.readline(_MAX_LINE + 1)
        except ConnectionResetError as exc:
            send_failed, status_line = send_failed or exc, b""
        if not status_line:
            if self.reused:
                raise _Stale from send_failed
            if send_failed is not None:
                raise send_failed
            raise ProtocolError("the S3 server closed the connection without an answer")
        version, status, reason = _status(status_line)
        headers, length, chunked, keep = self._headers(version)
        # An interim answer (100 Continue, 103 Early Hints ...) is followed by the real one
        # (RFC 9110 15.2; minio sends no Expect, so only an odd server or proxy sends one).
        while 100 <= status < 200 and status != 101:
            status_line = self.reader.readline(_MAX_LINE + 1)
            if not status_line:
                raise ProtocolError("the S3 server closed the connection after an interim answer")
            version, status, reason = _status(status_line)
            headers, length, chunked, keep = self._headers(version)
        keep = keep and send_failed is None and status != 101
        if chunked:
            body = self._chunked()
        elif length is not None:
            body = self.reader.read(length)
            if len(body) != length:
                raise ProtocolError("the S3 server's answer ended before its Content-Length")
        elif status in (204, 304):
            body = b""
        else:  # no length: the body runs to the end of the connection
            body, keep = self.reader.read(), False
        return status, reason, headers, body, keep

    def _headers(self, version: bytes) -> tuple[list[tuple[str, str]], int | None, bool, bool]:
        """(headers, Content-Length, chunked, keep the connection) of the answer being read."""
        headers: list[tuple[str, str]] = []
        framing = _Framing(version)
        while True:
            line = self.reader.readline(_MAX_LINE + 1)
            if line in (b"\r\n", b"\n"):
                return headers, framing.length, framing.chunked, framing.keep
            if not line or len(line) > _MAX_LINE or len(headers) >= _MAX_HEADERS:
                raise ProtocolError("the S3 server's answer has malformed headers")
            headers.append(framing.read(line))

    def idle_and_open(self) -> bool:
        """Whether a kept connection can take a request: nothing waits to be read on it. A
        server that closed it (or sent a 408 on its idle timeout) left something, or an end."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        if poller.poll(0):  # data or the end waits on the socket
            return False
        # Or it came with the last answer and waits in the reader's buffer. Without blocking:
        # the next exchange sets the timeout again.
        self.sock.setblocking(False)
        return not self.reader.peek(1)

    def _chunked(self) -> bytes:
        pieces = []
        while True:
            size = _chunk_size(self.reader.readline(_MAX_LINE + 1))
            if size == 0:
                while self.reader.readline(_MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(pieces)
            chunk = self.reader.read(size + 2)
            if len(chunk) != size + 2:
                raise ProtocolError("the S3 server's answer ended inside a chunk")
            pieces.append(chunk[:size])


class S3PoolManager(PoolManager):
    """urllib3's PoolManager with refusal-safe pools and the lean PUT path (module docstring)."""

    def __init__(self, *, timeout: Timeout, retries: Retry, maxsize: int = 10, **options: Any):
        super().__init__(timeout=timeout, retries=retries, maxsize=maxsize, **options)
        self.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
        self._lean_timeout = timeout
        self._lean_retries = retries
        self._lean_max_idle = maxsize
        self._idle: dict[tuple[str, int], list[_Lean]] = {}
        self._idle_lock = threading.Lock()
        # As urllib3's pools do: the kept connections close when the manager is collected.
        weakref.finalize(self, _close_idle, self._idle, self._idle_lock)

    def urlopen(  # type: ignore[override]
        self, method: str, url: str, redirect: bool = True, **kw: Any
    ) -> BaseHTTPResponse:
        body = kw.get("body")
        if (
            method == "PUT"
            and isinstance(body, bytes)
            and kw.get("preload_content", True)
            and url.startswith("http://")
        ):
            return self._put_fast(url, body, kw.get("headers") or {})
        return super().urlopen(method, url, redirect=redirect, **kw)

    def _put_fast(self, url: str, body: bytes, headers: Any) -> HTTPResponse:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = _request_head("PUT", target, headers, len(body)) + body
        retries = self._lean_retries
        timeout = self._lean_timeout
        errors = 0
        while True:
            try:
                status, reason, answer, data = self._exchange(host, port, request, timeout)
            except (OSError, ProtocolError) as exc:  # socket.timeout is an OSError
                errors += 1
                if errors > _budget(retries, exc):
                    raise MaxRetryError(None, url, exc) from exc  # type: ignore[arg-type]
                time.sleep(_backoff(retries, errors))
                continue
            if status in (retries.status_forcelist or ()) and errors < _budget(retries, None):
                errors += 1
                time.sleep(_backoff(retries, errors))
                continue
            # From a stream, read at once: ``.data`` is b"" for an empty body, as urllib3's.
            return HTTPResponse(
                body=io.BytesIO(data),
                headers=HTTPHeaderDict(answer),
                status=status,
                reason=reason,
                preload_content=True,
                decode_content=False,
                request_method="PUT",
                request_url=url,
            )

    def _exchange(
        self, host: str, port: int, request: bytes, timeout: Timeout
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        key = (host, port)
        while True:
            with self._idle_lock:
                idle = self._idle.get(key)
                conn = idle.pop() if idle else None
            if conn is not None and not conn.idle_and_open():
                conn.close()
                continue
            if conn is None:
                try:
                    conn = _Lean(host, port, timeout.connect_timeout)  # type: ignore[arg-type]
                except OSError as exc:
                    raise _ConnectFailed(str(exc)) from exc
            try:
                status, reason, headers, body, keep = conn.exchange(
                    request,
                    timeout.read_timeout,  # type: ignore[arg-type]
                )
            except _Stale:
                conn.close()
                continue  # a fresh connection, not counted as a retry (nothing was answered)
            except BaseException:
                conn.close()
                raise
            # A refused PUT may have left part of its body unread on this connection.
            if keep and status < 400:
                conn.reused = True
                with self._idle_lock:
                    idle = self._idle.setdefault(key, [])
                    if len(idle) < self._lean_max_idle:
                        idle.append(conn)
                        conn = None
            if conn is not None:
                conn.close()
            return status, reason, headers, body

    def clear(self) -> None:
        _close_idle(self._idle, self._idle_lock)
        super().clear()


def _close_idle(idle: dict[tuple[str, int], list[_Lean]], lock: threading.Lock) -> None:
    with lock:
        conns = [conn for kept in idle.values() for conn in kept]
        idle.clear()
    for conn in conns:
        conn.close()


def _status(line: bytes) -> tuple[bytes, int, str]:
    """(HTTP version, status, reason) of a status line."""
    if len(line) > _MAX_LINE:
        raise ProtocolError("the S3 server's status line is too long")
    version, _, rest = line.rstrip(b"\r\n").partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {line[:80]!r}")
    return version, int(code), reason.decode("latin-1")


class _Framing:
    """What the header lines of an HTTP/1.x answer say about its body and its connection."""

    __slots__ = ("chunked", "keep", "length")

    def __init__(self, version: bytes) -> None:
        self.length: int | None = None
        self.chunked = False
        self.keep = version == b"HTTP/1.1"

    def read(self, line: bytes) -> tuple[str, str]:
        """The (name, value) of one header line, noting what it says about the framing."""
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon:
            raise ProtocolError("the S3 server's answer has malformed headers")
        name, value = name.strip(), value.strip()
        lowered = name.lower()
        if lowered == "content-length":
            if not (value.isascii() and value.isdigit()):
                raise ProtocolError("the S3 server's answer has a bad Content-Length")
            self.length = int(value)
        elif lowered == "transfer-encoding":
            self.chunked = "chunked" in value.lower()
        elif lowered == "connection":
            options = {option.strip() for option in value.lower().split(",")}
            self.keep = "close" not in options and (self.keep or "keep-alive" in options)
        return name, value


def _chunk_size(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise ProtocolError("the S3 server's answer has a bad chunk size") from None


def _request_head(method: str, target: str, headers: Any, length: int) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    has_length = False
    for name, value in headers.items():
        value = str(value)
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"invalid HTTP header {name!r}")
        if name.lower() == "content-length":
            has_length = True
        lines.append(f"{name}: {value}")
    if not has_length:
        lines.append(f"Content-Length: {length}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def _budget(retries: Retry, exc: BaseException | None) -> int:
    """How many retries a failure of this kind gets (urllib3's per-kind counts, capped by total)."""
    if exc is None:
        kind = retries.status
    elif isinstance(exc, _ConnectFailed):
        kind = retries.connect
    else:
        kind = retries.read
    counts = [c for c in (kind, retries.total) if isinstance(c, int)]
    return min(counts) if counts else 0


def _backoff(retries: Retry, errors: int) -> float:
    """urllib3's backoff: none before the first retry, then factor * 2^(n-1), at most the max."""
    if errors <= 1:
        return 0.0
    return float(min(retries.backoff_max, retries.backoff_factor * 2 ** (errors - 1)))
