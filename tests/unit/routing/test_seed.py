"""Seeding publishes only what differs from the directory, so a second seed writes nothing."""

from __future__ import annotations

from services.routing.adapters.memory import InMemoryDirectory
from services.routing.domain.directory import Directory, Provider
from services.routing.handlers.seed import seed_directory


def provider(ura: str, city: str = "Ede") -> Provider:
    return Provider(ura=ura, name=f"Ziekenhuis {ura}", type_code="V4", city=city)


async def test_a_seed_publishes_new_and_changed_entries_and_leaves_others_alone() -> None:
    memory = InMemoryDirectory([provider("10000001"), provider("10000002"), provider("10000009")])
    await memory.start()
    seed = Directory(
        [provider("10000001"), provider("10000002", city="Wageningen"), provider("10000003")]
    )
    outcome = await seed_directory(seed, memory, memory)
    assert outcome.published == ["10000002", "10000003"]
    assert outcome.unchanged == ["10000001"]
    assert memory.get("10000002").city == "Wageningen"  # type: ignore[union-attr]
    assert memory.get("10000009") is not None  # not in the file: kept
    again = await seed_directory(seed, memory, memory)
    assert (again.published, again.last_written) == ([], None)
