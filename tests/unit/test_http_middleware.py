"""shared.http's middleware: the correlation id every service's API gives a request, and the
limit on a request body that holds before the body is read."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse

from shared.http import BodyLimitMiddleware, CorrelationMiddleware, offered_correlation_id
from shared.logging import current_correlation_id
from tests.asgi import Answer, asgi_get, asgi_post
from tests.factories import TEST_BSN


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


def offering(correlation_id: str) -> dict[str, str]:
    return {"X-Correlation-Id": correlation_id}


async def test_a_safe_offered_id_is_kept_bound_and_echoed() -> None:
    answered: list[tuple[str, int]] = []
    answer = await asgi_get(_app(answered), "/studies/1.2.3", offering("req-42:a.b"))
    assert answer.status == 200
    assert answer.headers["x-correlation-id"] == "req-42:a.b"
    assert json.loads(answer.body) == {"state": "req-42:a.b", "logged": "req-42:a.b"}
    # The route's template, never the path with its UID.
    assert answered == [("/studies/{uid}", 200)]


@pytest.mark.parametrize(
    "offered",
    ["", "has space", "x" * 129, "semi;colon", f"patient-{TEST_BSN}", "ünïcode"],
)
async def test_an_unsafe_offered_id_is_replaced(offered: str) -> None:
    assert offered_correlation_id(offered) is None
    answer = await asgi_get(_app([]), "/studies/1.2.3", offering(offered))
    echoed = answer.headers["x-correlation-id"]
    assert echoed and echoed != offered
    assert TEST_BSN not in echoed
    assert json.loads(answer.body)["state"] == echoed


async def test_without_an_offered_id_each_request_gets_its_own() -> None:
    app = _app([])
    first = (await asgi_get(app, "/studies/1")).headers["x-correlation-id"]
    second = (await asgi_get(app, "/studies/1")).headers["x-correlation-id"]
    assert first and second and first != second


async def test_an_unmatched_path_is_counted_without_its_path() -> None:
    answered: list[tuple[str, int]] = []
    answer = await asgi_get(_app(answered), "/nothing/here")
    assert answer.status == 404
    assert "x-correlation-id" in answer.headers
    assert answered == [("<unmatched>", 404)]


async def test_a_stream_that_fails_half_way_reaches_the_server_as_a_failure() -> None:
    # BaseHTTPMiddleware would end the body normally: the client would take half a file
    # for a whole one. Through this middleware the failure reaches the server, and the body
    # is never ended (no message with more_body False).
    answered: list[tuple[str, int]] = []
    answer = Answer()
    with pytest.raises(RuntimeError, match="half-way"):
        await asgi_get(_app(answered), "/broken", answer=answer)
    assert b"first half" in answer.body
    assert all(m.get("more_body", False) for m in answer.bodies)
    assert answered == [("/broken", 200)]


async def test_an_unhandled_error_is_answered_500_with_the_id_and_still_raised() -> None:
    answered: list[tuple[str, int]] = []
    app = _app(answered)

    @app.get("/boom/{uid}")
    async def boom(uid: str) -> None:
        raise RuntimeError("a bug")

    answer = Answer()
    with pytest.raises(RuntimeError, match="a bug"):  # on to the server, which logs it
        await asgi_get(app, "/boom/1.2.3", offering("req-500"), answer=answer)
    assert answer.status == 500
    assert answer.headers["x-correlation-id"] == "req-500"
    assert answer.body == b"Internal Server Error"
    assert [m["type"] for m in answer.sent].count("http.response.start") == 1
    assert answered == [("/boom/{uid}", 500)]


def _limited_app() -> FastAPI:
    app = FastAPI()

    def authenticated() -> None:
        raise HTTPException(401, "no token")

    @app.post("/entries", dependencies=[Depends(authenticated)])
    async def entries(entry: dict[str, Any]) -> dict[str, Any]:
        return entry

    app.add_middleware(BodyLimitMiddleware, max_bytes=1000, what="an entry")
    app.add_middleware(CorrelationMiddleware)
    return app


async def test_a_streamed_body_over_the_limit_is_refused_as_it_arrives_before_any_token_check() -> (
    None
):
    chunks = [b'{"a": "' + b"x" * 400] + [b"x" * 400] * 100 + [b'"}']
    answer, taken = await asgi_post(_limited_app(), "/entries", chunks)
    assert answer.status == 413
    assert json.loads(answer.body) == {"detail": "an entry is at most 1000 bytes"}
    assert answer.headers["x-correlation-id"]
    assert taken == 3  # stopped at the chunk that passed the limit, not at the end


async def test_a_declared_length_over_the_limit_is_refused_unread_and_a_small_body_goes_on() -> (
    None
):
    answer, taken = await asgi_post(_limited_app(), "/entries", [b"{}"], {"content-length": "1001"})
    assert (answer.status, taken) == (413, 0)
    # Within the limit the route decides: here the token check refuses it.
    answer, _ = await asgi_post(_limited_app(), "/entries", [b'{"a": 1}'])
    assert answer.status == 401
