"""``/healthz``, ``/readyz`` and ``/metrics`` for a process without a web API (the stream workers).

A small standard-library HTTP server on its own thread, so a probe is answered even while the
event loop is busy with a batch; what it reports comes from the loop, though:

- ``/healthz`` is 200 while the event loop has beaten in the last ``stall_after`` seconds, 503
  once it has not (a loop stuck in blocking code is a process to restart);
- ``/readyz`` is 200 while ``ready()`` says so (for a worker: every stream has joined its group
  and is not stopping), else 503;
- ``/metrics`` is the Prometheus exposition of the service's own registry.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

BEAT_SECONDS = 1.0
STALL_AFTER_SECONDS = 30.0


class ProbeServer:
    def __init__(
        self,
        port: int,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        *,
        host: str = "127.0.0.1",
        stall_after: float = STALL_AFTER_SECONDS,
        beat_every: float = BEAT_SECONDS,
    ) -> None:
        self._registry = registry
        self._ready = ready
        self._stall_after = stall_after
        self._beat_every = beat_every
        self._last_beat = time.monotonic()
        self._beat_task: asyncio.Task[None] | None = None
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="probes", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def alive(self) -> bool:
        return time.monotonic() - self._last_beat < self._stall_after

    async def __aenter__(self) -> ProbeServer:
        self._beat_task = asyncio.create_task(self._beat(), name="probe-heartbeat")
        self._thread.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._beat_task is not None:
            self._beat_task.cancel()
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()

    async def _beat(self) -> None:
        while True:
            self._last_beat = time.monotonic()
            await asyncio.sleep(self._beat_every)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        probes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._answer(200, generate_latest(probes._registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = probes.alive()
                    self._answer(200 if ok else 503, b"ok\n" if ok else b"event loop stalled\n")
                elif path == "/readyz":
                    ok = probes.alive() and probes._ready()
                    self._answer(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._answer(404, b"not found\n")

            def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds would drown the service's own log

        return Handler
