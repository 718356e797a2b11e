"""An in-memory directory that is both reader and writer: for unit tests of the API.

It folds every write through the same :class:`DirectoryFold` as the Kafka view, so what a
unit test sees is what the view would hold. Writes are applied at once, so a wait for a record
that was written returns at once; everything else behaves as the view does, and
tests/contracts/provider_directory.py holds both to that:

- it is caught up only between ``start`` and ``stop``, and ``sync``/``wait_for`` refuse to run
  on a reader nobody started (``RuntimeError``), so a test that forgot to start it fails;
- a wait for a record that is not there (yet, or on another topic) times out;
- a record the fold cannot read (a key that is no URA) is skipped, as the view skips a poison
  record, instead of failing the write;
- once ``broken`` (the test hook for a view stopped on a bad record), waits raise ``ViewFailed``;
- ``put`` and ``remove`` refuse to write before ``start`` (``RuntimeError``), as the writer does.
"""

from __future__ import annotations

import asyncio
import contextlib

from services.routing.adapters.directory_view import DirectoryFold, Written
from services.routing.domain.directory import Provider
from shared.errors import PoisonEvent
from shared.topic_view import ViewFailed

# How often a wait looks again whether its record was applied (or the fake stopped or broke).
POLL_SECONDS = 0.005


class InMemoryDirectory:
    def __init__(self, providers: tuple[Provider, ...] | list[Provider] = ()) -> None:
        self.topic = "provider-directory"
        self._fold = DirectoryFold()
        self._offset = -1
        self._started = False
        # Test hooks: a view still loading (caught_up False), or one stopped on a bad record.
        self.caught_up = True
        self.broken = False
        for provider in providers:
            self._write(provider.ura, provider.to_record().encode())

    # --- DirectoryReader

    @property
    def is_caught_up(self) -> bool:
        return self._started and self.caught_up and not self.broken

    @property
    def failed(self) -> bool:
        return self.broken

    def get(self, ura: str) -> Provider | None:
        return self._fold.get(ura)

    def search(self, query: str, *, limit: int = 20) -> list[Provider]:
        return self._fold.search(query, limit=limit)

    async def sync(self, timeout: float) -> None:
        self._check_readable()

    async def wait_for(self, written: Written, timeout: float) -> None:
        """Return once ``written`` is applied; raise ``ViewFailed`` as the view does once it
        broke meanwhile (and ``RuntimeError`` once stopped, where the real view's wait would
        run out its timeout). It looks every few milliseconds: writes are applied as they are
        made, and the test hook ``broken`` is a plain attribute, so nothing could wake a
        waiter."""
        here = (written.topic, written.partition) == (self.topic, 0)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            self._check_readable()
            if here and written.offset <= self._offset:
                return
            if asyncio.get_running_loop().time() >= deadline:
                raise TimeoutError(
                    f"in-memory directory did not apply {written} within {timeout:g}s"
                )
            await asyncio.sleep(POLL_SECONDS)

    def _check_readable(self) -> None:
        if not self._started:
            raise RuntimeError("in-memory directory is not started")
        if self.broken:
            raise ViewFailed("in-memory directory failed (broken by the test)")

    # --- DirectoryWriter

    async def put(self, provider: Provider) -> Written:
        return await self._publish(provider.ura, provider.to_record().encode())

    async def remove(self, ura: str) -> Written:
        return await self._publish(ura, None)

    async def _publish(self, ura: str, value: bytes | None) -> Written:
        if not self._started:
            raise RuntimeError("in-memory directory writer not started")
        return self._write(ura, value)

    def _write(self, ura: str, value: bytes | None) -> Written:
        """Append the record (it takes an offset whatever it holds) and fold it in."""
        self._offset += 1
        # A record the fold refuses is skipped, keeping what the URA had, as the view does.
        with contextlib.suppress(PoisonEvent):
            self._fold.apply(ura.encode(), value)
        return Written(self.topic, 0, self._offset)

    # --- lifecycle

    async def start(self) -> None:
        self._started = True

    async def stop(self) -> None:
        self._started = False
