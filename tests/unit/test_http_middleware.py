"""shared.http.CorrelationMiddleware: the correlation id every service's API gives a request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from shared.http import CorrelationMiddleware, offered_correlation_id
from shared.logging import current_correlation_id
from tests.factories import TEST_BSN


async def get(app: FastAPI, path: str, correlation_id: str | None = None) -> Any:
    """One GET through the ASGI interface: (status, headers, body messages)."""
    headers = [] if correlation_id is None else [(b"x-correlation-id", correlation_id.encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []

    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        await app(scope, receive, send)
    finally:
        get.sent = sent  # type: ignore[attr-defined]
    start = next(m for m in sent if m["type"] == "http.response.start")
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    response_headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], response_headers, bodies


def body_json(bodies: list[dict[str, Any]]) -> Any:
    return json.loads(b"".join(m.get("body", b"") for m in bodies))


def _app(answered: list[tuple[str, int]]) -> FastAPI:
    app = FastAPI()

    @app.get("/studies/{uid}")
    async def study(uid: str, request: Request) -> dict[str, str | None]:
        return {"state": request.state.correlation_id, "logged": current_correlation_id()}

    @app.get("/broken")
    async def broken() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first half"
            raise RuntimeError("the store failed half-way")

        return StreamingResponse(chunks())

    app.add_middleware(CorrelationMiddleware, on_response=lambda r, s: answered.append((r, s)))
    return app


async def test_a_safe_offered_id_is_kept_bound_and_echoed() -> None:
    answered: list[tuple[str, int]] = []
    status, headers, bodies = await get(_app(answered), "/studies/1.2.3", "req-42:a.b")
    assert status == 200
    assert headers["x-correlation-id"] == "req-42:a.b"
    assert body_json(bodies) == {"state": "req-42:a.b", "logged": "req-42:a.b"}
    # The route's template, never the path with its UID.
    assert answered == [("/studies/{uid}", 200)]


@pytest.mark.parametrize(
    "offered",
    ["", "has space", "x" * 129, "semi;colon", f"patient-{TEST_BSN}", "ünïcode"],
)
async def test_an_unsafe_offered_id_is_replaced(offered: str) -> None:
    assert offered_correlation_id(offered) is None
    _status, headers, bodies = await get(_app([]), "/studies/1.2.3", offered)
    echoed = headers["x-correlation-id"]
    assert echoed and echoed != offered
    assert TEST_BSN not in echoed
    assert body_json(bodies)["state"] == echoed


async def test_without_an_offered_id_each_request_gets_its_own() -> None:
    app = _app([])
    first = (await get(app, "/studies/1"))[1]["x-correlation-id"]
    second = (await get(app, "/studies/1"))[1]["x-correlation-id"]
    assert first and second and first != second


async def test_an_unmatched_path_is_counted_without_its_path() -> None:
    answered: list[tuple[str, int]] = []
    status, headers, _bodies = await get(_app(answered), "/nothing/here")
    assert status == 404
    assert "x-correlation-id" in headers
    assert answered == [("<unmatched>", 404)]


async def test_a_stream_that_fails_half_way_reaches_the_server_as_a_failure() -> None:
    # BaseHTTPMiddleware would end the body normally: the client would take half a file
    # for a whole one. Through this middleware the failure reaches the server, and the body
    # is never ended (no message with more_body False).
    answered: list[tuple[str, int]] = []
    with pytest.raises(RuntimeError, match="half-way"):
        await get(_app(answered), "/broken")
    sent = get.sent  # type: ignore[attr-defined]
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert b"first half" in b"".join(m.get("body", b"") for m in bodies)
    assert all(m.get("more_body", False) for m in bodies)
    assert answered == [("/broken", 200)]
