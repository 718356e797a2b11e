"""Seeding the directory from a YAML file: publish what differs, so a second seed writes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.routing.adapters.directory_view import DirectoryReader, DirectoryWriter, Written
from services.routing.domain.directory import Directory


@dataclass
class SeedOutcome:
    published: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    last_written: Written | None = None


async def seed_directory(
    seed: Directory, current: DirectoryReader, writer: DirectoryWriter
) -> SeedOutcome:
    """Publish every provider of ``seed`` whose entry differs from ``current`` (a caught-up view).

    Only adds and replaces: a provider missing from the file is left alone (removing is an
    operator's DELETE, never a side effect of an old seed file).
    """
    outcome = SeedOutcome()
    for provider in seed:
        if current.get(provider.ura) == provider:
            outcome.unchanged.append(provider.ura)
            continue
        outcome.last_written = await writer.put(provider)
        outcome.published.append(provider.ura)
    return outcome
