"""PerEntry: a value built once per directory entry, by identity, forgotten past its limit."""

from __future__ import annotations

from services.routing.domain.route import PerEntry


class Entry:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_value_is_built_once_per_entry_and_again_for_a_replaced_entry() -> None:
    built: list[str] = []

    def build(entry: Entry) -> str:
        built.append(entry.name)
        return entry.name.upper()

    per_entry = PerEntry(build)
    first = Entry("a")
    assert per_entry(first) == "A"
    assert per_entry(first) == "A"
    replaced = Entry("a")  # the view replaces an entry when it changes: a new object
    assert per_entry(replaced) == "A"
    assert built == ["a", "a"]


def test_past_its_limit_it_forgets_and_builds_again() -> None:
    built: list[str] = []

    def build(entry: Entry) -> str:
        built.append(entry.name)
        return entry.name

    per_entry = PerEntry(build, limit=2)
    entries = [Entry(n) for n in "abc"]
    for entry in entries:
        per_entry(entry)
    per_entry(entries[0])  # forgotten when the third came
    per_entry(entries[2])  # remembered since
    assert built == ["a", "b", "c", "a"]
