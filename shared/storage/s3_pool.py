"""An urllib3 pool for S3 that never reuses a connection a refusal may have left dirty.

An S3 server may refuse a PUT or POST (412 for If-None-Match on a taken key, 403, 400 ...) as soon
as it has read the headers, before it has read the body. HTTP lets it, and lets it keep the
connection open; the rest of the body is then still on the wire, and the server reads it as the
start of the next request on that connection. versitygw v1.7.0 does this: about 1 in 100 refused
conditional writes of a 36 KiB instance left a connection whose next request, whatever it was,
came back ``400 BadRequest`` (the ingest answered A700 for a plain duplicate). Refusals are rare,
so closing the connection after each costs nothing measurable.
"""

from __future__ import annotations

from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.response import HTTPResponse

_WITH_BODY = frozenset({"PUT", "POST"})


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


def pool_manager(**options: object) -> PoolManager:
    """A urllib3 PoolManager (same options) whose pools discard connections after a refusal."""
    manager = PoolManager(**options)  # type: ignore[arg-type]
    manager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
    return manager
