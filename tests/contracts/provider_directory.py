"""The provider directory contract: one suite, subclassed per backend, so the in-memory directory
the API's unit tests use cannot drift from the Kafka view and writer the services run on.

A backend hands out :class:`DirectoryPorts`: a :class:`DirectoryReader` and a
:class:`DirectoryWriter` over one directory (the fake is both at once; on Kafka a
:class:`DirectoryView` and a :class:`KafkaDirectoryWriter` over one compacted topic). The suite
only speaks the ports, the way the API and the seed do: write, then ``wait_for`` the
:class:`Written` (read-your-writes) or ``sync``, then read.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import pytest

from services.routing.adapters.directory_view import DirectoryReader, DirectoryWriter, Written
from services.routing.domain.directory import Provider
from tests.factories import make_provider

# Generous for a busy broker on a shared machine; the fake answers at once.
WAIT = 30.0
# How long to wait for a record that is never written: the wait must give up, not hang.
NEVER = 0.5

PASSWORD = "s3cret-pacs-password"
WEBHOOK_SECRET = "webhook-secret-of-at-least-32-characters"


def provider(ura: str, name: str = "Testziekenhuis", city: str = "Utrecht") -> Provider:
    """A provider with secrets (endpoint password, webhook secret): they must survive a write."""
    return make_provider(
        ura,
        name=name,
        city=city,
        endpoints=[
            {
                "channel": "dicomweb",
                "id": "pacs-web",
                "base_url": "https://pacs.example.nl/dicom-web",
                "auth": {"type": "basic", "username": "bp", "password": PASSWORD},
            }
        ],
        webhook={"url": "https://hooks.example.nl/bp", "secret": WEBHOOK_SECRET},
    )


def uras(providers: list[Provider]) -> list[str]:
    return [p.ura for p in providers]


@dataclass
class DirectoryPorts:
    """The reader and the writer of one directory, started and stopped as the API's lifespan
    does (the writer first), with the write-then-wait the API does to read its own write."""

    reader: DirectoryReader
    writer: DirectoryWriter
    topic: str

    async def start(self) -> None:
        await self.writer.start()
        await self.reader.start()

    async def stop(self) -> None:
        await self.reader.stop()
        await self.writer.stop()

    async def put_and_wait(self, provider: Provider) -> Written:
        written = await self.writer.put(provider)
        await self.reader.wait_for(written, WAIT)
        return written

    async def remove_and_wait(self, ura: str) -> Written:
        written = await self.writer.remove(ura)
        await self.reader.wait_for(written, WAIT)
        return written


class DirectoryBackend(Protocol):
    async def create(self, *existing: Provider) -> DirectoryPorts:
        """Ports, not started, over a directory that already holds ``existing`` (written to it
        before, in this order). Whoever starts them stops them."""


OpenDirectory = Callable[..., Awaitable[DirectoryPorts]]


class ProviderDirectoryContract:
    """Subclass as ``Test...`` and override the ``backend`` fixture with one whose directories
    start empty in every test."""

    @pytest.fixture
    def backend(self) -> DirectoryBackend:
        raise NotImplementedError("a backend overrides the backend fixture")

    @pytest.fixture
    async def open_directory(self, backend: DirectoryBackend) -> AsyncIterator[OpenDirectory]:
        """``await open_directory(*existing)``: started ports that have read what was there."""
        opened: list[DirectoryPorts] = []

        async def open_(*existing: Provider) -> DirectoryPorts:
            ports = await backend.create(*existing)
            opened.append(ports)
            await ports.start()
            await ports.reader.sync(WAIT)
            return ports

        yield open_
        for ports in reversed(opened):
            await ports.stop()

    @pytest.fixture
    async def directory(self, open_directory: OpenDirectory) -> DirectoryPorts:
        return await open_directory()

    @staticmethod
    async def put_shuffled(directory: DirectoryPorts, *providers: Provider) -> None:
        """Write in an order unrelated to the expected one: the search ranks, not the writes."""
        shuffled = list(providers)
        random.Random(7).shuffle(shuffled)
        for each in shuffled:
            await directory.put_and_wait(each)

    # -- lifecycle and freshness ----------------------------------------------------------------

    async def test_a_directory_is_caught_up_only_between_start_and_stop(
        self, backend: DirectoryBackend
    ) -> None:
        """Readiness hangs on ``is_caught_up``: a reader nobody started holds nothing it read."""
        held = provider("10000001")
        ports = await backend.create(held)
        reader = ports.reader
        assert not reader.is_caught_up
        assert not reader.failed
        # Waiting needs a started reader: a test that forgot to start one must not pass.
        with pytest.raises(RuntimeError, match="not started"):
            await reader.sync(WAIT)
        with pytest.raises(RuntimeError, match="not started"):
            await reader.wait_for(Written(ports.topic, 0, 0), WAIT)

        try:
            await ports.start()
            await reader.sync(WAIT)
            assert reader.is_caught_up
            assert not reader.failed
            assert reader.get(held.ura) == held
        finally:
            await ports.stop()
        assert not reader.is_caught_up

    async def test_a_writer_nobody_started_refuses_to_write(
        self, backend: DirectoryBackend
    ) -> None:
        """A seed or API that forgot to start its writer must fail, not lose the write."""
        ports = await backend.create()
        with pytest.raises(RuntimeError, match="not started"):
            await ports.writer.put(provider("10000001"))
        with pytest.raises(RuntimeError, match="not started"):
            await ports.writer.remove("10000001")

    async def test_an_empty_directory_is_caught_up_and_knows_nobody(
        self, directory: DirectoryPorts
    ) -> None:
        reader = directory.reader
        assert reader.is_caught_up
        assert not reader.failed
        assert reader.get("10000001") is None
        assert reader.search("ziekenhuis") == []
        assert reader.search("10000001") == []

    async def test_a_directory_opened_over_existing_records_holds_them_and_later_writes_win(
        self, open_directory: OpenDirectory
    ) -> None:
        """Another process (a second replica, the seed) reads what was written before it."""
        first, second = provider("10000001", city="Utrecht"), provider("10000002")
        directory = await open_directory(first, second)
        reader = directory.reader
        assert reader.is_caught_up
        assert (reader.get(first.ura), reader.get(second.ura)) == (first, second)

        moved = provider(first.ura, city="Zwolle")
        await directory.put_and_wait(moved)
        assert reader.get(first.ura) == moved
        assert uras(reader.search("zwolle")) == [first.ura]

    async def test_sync_applies_every_write_made_before_it_without_waiting_for_each(
        self, directory: DirectoryPorts
    ) -> None:
        """The API syncs before a DELETE: writes it did not wait for (another replica's)."""
        written = [provider(f"1000000{n}", name=f"Ziekenhuis {n}") for n in range(1, 4)]
        for each in written:
            await directory.writer.put(each)
        await directory.writer.remove(written[0].ura)
        await directory.reader.sync(WAIT)

        assert directory.reader.get(written[0].ura) is None
        assert [directory.reader.get(p.ura) for p in written[1:]] == written[1:]
        assert directory.reader.is_caught_up

    async def test_waiting_for_a_record_never_written_times_out(
        self, directory: DirectoryPorts
    ) -> None:
        """A wait that returned for a record not applied would answer a read from stale state."""
        last = await directory.put_and_wait(provider("10000001"))
        beyond = Written(last.topic, last.partition, last.offset + 1)
        with pytest.raises(TimeoutError):
            await directory.reader.wait_for(beyond, NEVER)
        elsewhere = Written(f"{last.topic}-elsewhere", last.partition, last.offset)
        with pytest.raises(TimeoutError):
            await directory.reader.wait_for(elsewhere, NEVER)
        assert not directory.reader.failed

    # -- writes -----------------------------------------------------------------------------------

    async def test_a_put_provider_is_read_back_with_its_secrets(
        self, directory: DirectoryPorts
    ) -> None:
        """Delivery needs the credentials: the directory keeps them, not their masks."""
        added = provider("10000001", name="Ziekenhuis Rivierenland")
        written = await directory.put_and_wait(added)

        assert (written.topic, written.partition) == (directory.topic, 0)
        stored = directory.reader.get(added.ura)
        assert stored == added
        assert stored is not None and stored.webhook is not None
        assert stored.webhook.secret.get_secret_value() == WEBHOOK_SECRET
        assert stored.endpoints[0].auth.password.get_secret_value() == PASSWORD  # type: ignore[union-attr]
        assert directory.reader.search("rivierenland") == [added]

    async def test_a_later_put_replaces_the_provider_in_get_and_search(
        self, directory: DirectoryPorts
    ) -> None:
        before = provider("10000001", name="Ziekenhuis Oost", city="Utrecht")
        after = provider(before.ura, name="Ziekenhuis West", city="Zwolle")
        await directory.put_and_wait(before)
        await directory.put_and_wait(after)

        reader = directory.reader
        assert reader.get(before.ura) == after
        assert reader.search("oost") == []
        assert reader.search("utrecht") == []
        assert reader.search("west zwolle") == [after]

    async def test_a_removed_provider_is_gone_and_the_others_stay(
        self, directory: DirectoryPorts
    ) -> None:
        gone, kept = provider("10000001"), provider("10000002")
        await directory.put_and_wait(gone)
        await directory.put_and_wait(kept)
        await directory.remove_and_wait(gone.ura)

        reader = directory.reader
        assert reader.get(gone.ura) is None
        assert reader.get(kept.ura) == kept
        assert reader.search("testziekenhuis") == [kept]
        assert reader.search(gone.ura) == []

    async def test_removing_an_unknown_ura_writes_a_harmless_tombstone(
        self, directory: DirectoryPorts
    ) -> None:
        kept = provider("10000002")
        put = await directory.put_and_wait(kept)
        removed = await directory.remove_and_wait("10000001")

        assert removed.offset > put.offset
        assert directory.reader.get("10000001") is None
        assert directory.reader.get(kept.ura) == kept
        assert directory.reader.is_caught_up and not directory.reader.failed

    async def test_a_record_the_directory_cannot_read_is_skipped_not_fatal(
        self, directory: DirectoryPorts
    ) -> None:
        """A record keyed by no URA (written by a buggy client) is skipped, as the view skips a
        poison record: the write lands, the reader stays up, and later writes still apply."""
        kept = provider("10000001")
        await directory.put_and_wait(kept)
        skipped = await directory.remove_and_wait("not-a-ura")

        reader = directory.reader
        assert not reader.failed and reader.is_caught_up
        assert reader.get("not-a-ura") is None
        assert reader.get(kept.ura) == kept
        after = await directory.put_and_wait(provider("10000002"))
        assert after.offset > skipped.offset
        assert reader.get("10000002") is not None

    async def test_every_write_lands_after_the_previous_one(
        self, directory: DirectoryPorts
    ) -> None:
        """Offsets increase in write order, on the directory's topic, repeated writes included
        (the writer does not deduplicate; the API skips an unchanged entry itself)."""
        first, second = provider("10000001"), provider("10000002")
        written = [
            await directory.put_and_wait(first),
            await directory.put_and_wait(first),
            await directory.put_and_wait(second),
            await directory.remove_and_wait(first.ura),
        ]

        offsets = [w.offset for w in written]
        assert offsets == sorted(set(offsets)), offsets
        assert {(w.topic, w.partition) for w in written} == {(directory.topic, 0)}
        assert directory.reader.get(first.ura) is None
        assert directory.reader.get(second.ura) == second

    # -- search -----------------------------------------------------------------------------------

    async def test_search_ranks_a_name_prefix_before_a_word_elsewhere_ties_by_name(
        self, directory: DirectoryPorts
    ) -> None:
        prefix = provider("10000001", name="Oost Ziekenhuis")
        longer_prefix = provider("10000002", name="Oosterschelde Ziekenhuis")
        in_name = provider("10000003", name="Ziekenhuis Oost", city="Almelo")
        in_city = provider("10000004", name="Amsterdam UMC", city="Oostzaan")
        elsewhere = provider("10000005", name="Ziekenhuis West", city="Zwolle")
        await self.put_shuffled(directory, prefix, longer_prefix, in_name, in_city, elsewhere)

        reader = directory.reader
        assert reader.search("oost") == [prefix, longer_prefix, in_city, in_name]
        assert reader.search("ziekenhuis almelo") == [in_name]
        assert reader.search("zwolle west") == [elsewhere]

    async def test_search_puts_an_exact_ura_first_and_finds_a_partial_one(
        self, directory: DirectoryPorts
    ) -> None:
        named_after = provider("10000001", name="Kliniek 20000002")
        exact = provider("20000002", name="Ziekenhuis Zuid")
        await self.put_shuffled(directory, named_after, exact)

        assert directory.reader.search("20000002") == [exact, named_after]
        assert directory.reader.search("000000") == [named_after, exact]

    async def test_search_ignores_case_and_accents(self, directory: DirectoryPorts) -> None:
        accented = provider("10000001", name="Sint-Józef Ziekenhuis", city="Ĳsselmonde")
        await directory.put_and_wait(accented)

        for query in ("SINT-JOZEF", "sint-józef", "ijsselmonde", "  Sint-Jozef   ZIEKENHUIS "):
            assert directory.reader.search(query) == [accented], query

    @pytest.mark.parametrize(
        ("query", "limit"),
        [("", 20), ("   ", 20), ("ziekenhuis", 0), ("ziekenhuis", -1), ("nergens", 20)],
        ids=["empty", "blank", "limit-0", "limit-negative", "no-match"],
    )
    async def test_search_finds_nothing_for_a_blank_query_a_limit_below_one_or_no_match(
        self, directory: DirectoryPorts, query: str, limit: int
    ) -> None:
        await directory.put_and_wait(provider("10000001", name="Ziekenhuis Noord"))
        assert directory.reader.search("noord") != []  # the entry is there to be found
        assert directory.reader.search(query, limit=limit) == []

    async def test_search_returns_at_most_limit_the_best_ranked_first(
        self, directory: DirectoryPorts
    ) -> None:
        names = ["Ziekenhuis E", "Ziekenhuis B", "Ziekenhuis D", "Ziekenhuis A", "Ziekenhuis C"]
        everyone = [provider(f"1000000{n}", name=name) for n, name in enumerate(names, 1)]
        await self.put_shuffled(directory, *everyone)

        by_name = sorted(everyone, key=lambda p: p.name)
        assert directory.reader.search("ziekenhuis") == by_name
        assert directory.reader.search("ziekenhuis", limit=2) == by_name[:2]
        assert directory.reader.search("ziekenhuis", limit=1) == by_name[:1]
