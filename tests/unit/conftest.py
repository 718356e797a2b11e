"""Unit tier: pure logic, no network. Settings from the developer's shell must not leak in."""

from collections.abc import Callable, Iterator

import pytest

from tests.scripted_http import Script, Server


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("BEELDPORTAAL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def serve() -> Iterator[Callable[[Script], Server]]:
    """Start scripted HTTP servers (tests/scripted_http.py); closed after the test."""
    servers: list[Server] = []

    def start(script: Script) -> Server:
        servers.append(Server(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
