"""The TimelineReader contract, run on PostgresTimeline: scenarios go in as the events ingest
and consent send, folded into a ProjectionBatch and applied (``tests.timeline_seed``), so the
projection's own visibility rules decide what the reader answers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.timeline.adapters.store import PostgresTimeline
from shared import migrations
from tests.contracts.timeline_reader import SeededTimeline, TimelineReaderContract
from tests.timeline_seed import ProjectedTimeline

pytestmark = pytest.mark.integration


class TestPostgresTimeline(TimelineReaderContract):
    @pytest.fixture
    async def timeline(self, scratch_database: str) -> AsyncIterator[SeededTimeline]:
        migrations.migrate(scratch_database)
        async with PostgresTimeline(scratch_database, pool_size=2) as store:
            yield ProjectedTimeline(store)
