"""A scripted HTTP/1.1 server on 127.0.0.1 for tests of our own HTTP clients: each request is
answered by a script, which may also close the connection, so that what real servers do rarely
(answer early, hang up, send a 408 on an idle connection) happens on demand."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int


# (request, its number on this connection) -> raw answer bytes, or None to close without one,
# or (answer, True) to close after it
Script = Callable[[Seen, int], bytes | tuple[bytes, bool] | None]


@dataclass
class Server:
    script: Script
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        reader = conn.makefile("rb")
        with conn, reader, contextlib.suppress(OSError):  # the client may hang up any time
            for index in range(1_000):
                line = reader.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                headers = {}
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = reader.read(int(headers.get("content-length", "0")))
                seen = Seen(method, target, headers, body, number)
                self.requests.append(seen)
                answer = self.script(seen, index)
                if answer is None:
                    return
                close = isinstance(answer, tuple)
                conn.sendall(answer[0] if isinstance(answer, tuple) else answer)
                if close:
                    return

    def close(self) -> None:
        self.sock.close()


def ok(etag: str = "abc") -> bytes:
    return f'HTTP/1.1 200 OK\r\nETag: "{etag}"\r\nContent-Length: 0\r\n\r\n'.encode()


def answer(status: str, body: bytes = b"", *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
