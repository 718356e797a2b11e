"""One request through an app's ASGI interface, without a server (httpx, and so Starlette's
TestClient, is not installed)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Answer:
    """What the app sent back, message by message."""

    sent: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> int:
        return int(self._start["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode().lower(): v.decode() for k, v in self._start["headers"]}

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.bodies)

    @property
    def _start(self) -> dict[str, Any]:
        return next(m for m in self.sent if m["type"] == "http.response.start")


def _scope(method: str, path: str, headers: dict[str, str] | None) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }


async def asgi_get(
    app: Any, path: str, headers: dict[str, str] | None = None, answer: Answer | None = None
) -> Answer:
    """GET ``path`` from ``app``. Pass ``answer`` to see what was sent when the app raises. The
    client stays connected until the app is done (as a streaming response listens for it)."""
    answer = answer if answer is not None else Answer()
    scope = _scope("GET", path, headers)
    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # connected until cancelled
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        answer.sent.append(message)

    await app(scope, receive, send)
    return answer


async def asgi_post(
    app: Any, path: str, chunks: list[bytes], headers: dict[str, str] | None = None
) -> tuple[Answer, int]:
    """POST ``chunks`` as the body (chunked unless ``headers`` give a Content-Length); the
    answer and how many of the chunks the app took."""
    answer = Answer()
    scope = _scope("POST", path, headers)
    left = list(chunks)
    taken = 0

    async def receive() -> dict[str, Any]:
        nonlocal taken
        if left:
            taken += 1
            return {"type": "http.request", "body": left.pop(0), "more_body": bool(left)}
        await asyncio.Event().wait()  # connected until cancelled
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        answer.sent.append(message)

    await app(scope, receive, send)
    return answer, taken
