"""The webhook sender against a real HTTP subscriber on 127.0.0.1 that checks every signature."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from services.notify.adapters.webhooks import (
    ATTEMPT_HEADER,
    DELIVERED_TYPE,
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    WebhookOutcome,
    WebhookSender,
    delivered_payload,
    verify,
)
from tests.factories import make_delivered

pytestmark = pytest.mark.integration

SECRET = "integration-webhook-secret-0123456789abcdef"
FAST_BACKOFF = (0.01, 0.01, 0.01)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    signature_valid: bool


@dataclass
class Subscriber:
    """What the server got; ``/flaky`` answers 503 twice and then 200, ``/bad`` always 400."""

    url: str
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


@pytest.fixture
def subscriber() -> Iterator[Subscriber]:
    state = Subscriber(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            valid = verify(body, SECRET, self.headers.get(SIGNATURE_HEADER))
            with state.lock:
                state.received.append(Received(self.path, dict(self.headers), body, valid))
                seen = sum(1 for r in state.received if r.path == self.path)
            if not valid:
                status = 401
            elif self.path == "/flaky":
                status = 503 if seen <= 2 else 200
            elif self.path == "/bad":
                status = 400
            else:
                status = 204
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep the test output clean

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that is bound (so nobody else takes it) but never listens."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def test_a_flaky_subscriber_gets_the_same_signed_delivery_until_it_accepts(
    subscriber: Subscriber,
) -> None:
    event = make_delivered()
    payload = delivered_payload(event)

    async with httpx.AsyncClient() as client:
        sender = WebhookSender(client, backoff=FAST_BACKOFF, timeout=5)
        result = await sender.deliver(
            f"{subscriber.url}/flaky", SECRET, str(event.event_id), DELIVERED_TYPE, payload
        )

    assert result.outcome is WebhookOutcome.DELIVERED
    assert (result.attempts, result.status_code) == (3, 200)
    calls = subscriber.on("/flaky")
    assert [c.headers[ATTEMPT_HEADER] for c in calls] == ["1", "2", "3"]
    assert {c.headers[DELIVERY_HEADER] for c in calls} == {str(event.event_id)}
    assert {c.headers[EVENT_HEADER] for c in calls} == {"delivered.v1"}
    assert all(c.signature_valid for c in calls)
    assert all(c.headers["Content-Type"] == "application/json" for c in calls)
    assert json.loads(calls[-1].body) == payload


async def test_a_subscriber_that_answers_400_is_not_retried(subscriber: Subscriber) -> None:
    async with httpx.AsyncClient() as client:
        sender = WebhookSender(client, backoff=FAST_BACKOFF, timeout=5)
        result = await sender.deliver(
            f"{subscriber.url}/bad", SECRET, "delivery-400", DELIVERED_TYPE, {"type": "x"}
        )

    assert result.outcome is WebhookOutcome.REJECTED
    assert result.permanent
    assert (result.attempts, result.status_code) == (1, 400)
    calls = subscriber.on("/bad")
    assert len(calls) == 1
    assert calls[0].signature_valid


async def test_a_wrong_secret_is_caught_by_the_subscriber(subscriber: Subscriber) -> None:
    async with httpx.AsyncClient() as client:
        sender = WebhookSender(client, backoff=FAST_BACKOFF, timeout=5)
        result = await sender.deliver(
            f"{subscriber.url}/ok", "not-the-shared-secret-at-all-000000", "d", "t", {}
        )

    assert result.outcome is WebhookOutcome.REJECTED
    assert result.status_code == 401
    assert [c.signature_valid for c in subscriber.on("/ok")] == [False]


async def test_an_unreachable_subscriber_is_retried_and_then_given_up(closed_port: int) -> None:
    async with httpx.AsyncClient() as client:
        sender = WebhookSender(client, backoff=FAST_BACKOFF, timeout=5)
        result = await sender.deliver(
            f"http://127.0.0.1:{closed_port}/hook", SECRET, "delivery-down", DELIVERED_TYPE, {}
        )

    assert result.outcome is WebhookOutcome.EXHAUSTED
    assert not result.delivered and not result.permanent
    assert result.attempts == len(FAST_BACKOFF) + 1
    assert result.status_code is None
    assert result.error is not None and result.error.startswith("ConnectError")
