"""An in-memory directory that is both reader and writer: for unit tests of the API.

It folds every write through the same :class:`DirectoryFold` as the Kafka view, so what a
unit test sees is what the view would hold; writes are applied at once, so every wait returns.
"""

from __future__ import annotations

from services.routing.adapters.directory_view import DirectoryFold, Written
from services.routing.domain.directory import Provider


class InMemoryDirectory:
    def __init__(self, providers: tuple[Provider, ...] | list[Provider] = ()) -> None:
        self.topic = "provider-directory"
        self._fold = DirectoryFold()
        self._offset = -1
        self.caught_up = True
        self.broken = False
        for provider in providers:
            self._write(provider.ura, provider.to_record().encode())

    # --- DirectoryReader

    @property
    def is_caught_up(self) -> bool:
        return self.caught_up and not self.broken

    @property
    def failed(self) -> bool:
        return self.broken

    def get(self, ura: str) -> Provider | None:
        return self._fold.get(ura)

    def search(self, query: str, *, limit: int = 20) -> list[Provider]:
        return self._fold.search(query, limit=limit)

    async def sync(self, timeout: float) -> None:
        return None

    async def wait_for(self, written: Written, timeout: float) -> None:
        return None

    # --- DirectoryWriter

    async def put(self, provider: Provider) -> Written:
        return self._write(provider.ura, provider.to_record().encode())

    async def remove(self, ura: str) -> Written:
        return self._write(ura, None)

    def _write(self, ura: str, value: bytes | None) -> Written:
        self._fold.apply(ura.encode(), value)
        self._offset += 1
        return Written(self.topic, 0, self._offset)

    # --- lifecycle (nothing to start)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
