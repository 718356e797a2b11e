"""How a service serves its FastAPI app: uvicorn, our JSON logs, a graceful stop, and the
operational routes every service has."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import uvicorn
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.identifiers import contains_written_bsn
from shared.logging import correlation_context
from shared.metrics import ServiceMetrics
from shared.runtime import tune_gc

# uvicorn handles SIGTERM/SIGINT: it stops accepting, drains requests in flight for up to this
# long, then runs the app's lifespan shutdown.
GRACEFUL_SHUTDOWN_SECONDS = 30


def http_server(app: Any, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for ``app``; ``await server.serve()`` runs it until SIGTERM/SIGINT."""
    tune_gc()
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,  # our JSON logging (shared.logging)
            access_log=False,  # an access log adds nothing the metrics do not have
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
    )


class BodyLimitMiddleware:
    """Refuses a request body over ``max_bytes`` with 413, declared (Content-Length) or
    streamed (chunked), as its bytes arrive.

    FastAPI reads and parses a JSON or form body before the route's dependencies run, its
    authentication among them: without a limit here anyone, token or not, could make a service
    read and parse as many bytes as they send. Plain ASGI like :class:`CorrelationMiddleware`
    (add it before that one, so that a refusal gets its correlation id too). A body over the
    limit raises the 413 from ``receive``, so a route reading the stream itself is stopped
    alike.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, what: str = "a request body") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.detail = f"{what} is at most {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise StarletteHTTPException(413, self.detail)
            return message

        await self.app(scope, limited, send)


CORRELATION_HEADER = "X-Correlation-Id"
# An offered correlation id is taken over only if it is short and plain: it goes into every log
# line and event of the request and is echoed in the response.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def offered_correlation_id(value: str | None) -> str | None:
    """``value`` if it may serve as the correlation id, else None (a new one is made)."""
    if value and _SAFE_ID.match(value) and not contains_written_bsn(value):
        return value
    return None


class CorrelationMiddleware:
    """Every request gets a correlation id: the caller's ``X-Correlation-Id`` if it is safe to
    keep (:func:`offered_correlation_id`), a new one otherwise. It is bound for the request's
    log lines (``shared.logging``), is ``request.state.correlation_id`` for the events the
    request publishes, and is echoed in the response. ``on_response(route, status)`` is called
    for every answered request with the route's template, never the path: a path holds UIDs.

    Plain ASGI, not ``@app.middleware("http")``. Starlette's BaseHTTPMiddleware runs the app in
    a task of its own and passes the request body through a memory stream, which costs every
    STOW-RS body chunk a task switch. It also ends a streamed response normally when the stream
    fails, so a WADO-RS response or a pickup zip broken off half-way would reach the client as
    complete. Here the failure reaches the server, which closes the connection without the
    final chunk: the client sees that the download failed.
    """

    def __init__(self, app: ASGIApp, on_response: Callable[[str, int], None] | None = None) -> None:
        self.app = app
        self.on_response = on_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = offered_correlation_id(Headers(scope=scope).get(CORRELATION_HEADER))
        with correlation_context(offered) as cid:
            scope.setdefault("state", {})["correlation_id"] = cid
            status, started = 500, False

            async def send_with_id(message: Message) -> None:
                nonlocal status, started
                if message["type"] == "http.response.start":
                    status, started = message["status"], True
                    MutableHeaders(scope=message)[CORRELATION_HEADER] = cid
                await send(message)

            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                # Unhandled: answer the 500 here, with the id the logs carry, rather than leave
                # it to Starlette's ServerErrorMiddleware outside, which sends it without. The
                # error still goes on to be logged.
                if not started:
                    await send_with_id(
                        {
                            "type": "http.response.start",
                            "status": 500,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                        }
                    )
                    await send_with_id(
                        {"type": "http.response.body", "body": b"Internal Server Error"}
                    )
                raise
            finally:
                if self.on_response is not None:
                    route = scope.get("route")
                    self.on_response(getattr(route, "path", "<unmatched>"), status)


def add_operational_routes(
    app: Any,
    readiness: Callable[[], Mapping[str, bool]],
    metrics: ServiceMetrics,
    *,
    not_ready: str,
) -> None:
    """``/healthz`` (the process answers), ``/readyz`` (every check in ``readiness()`` holds,
    503 otherwise; ``not_ready`` documents when) and ``/metrics`` (Prometheus)."""

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"description": not_ready}})
    async def readyz() -> Response:
        checks = dict(readiness())
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"])
    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)
