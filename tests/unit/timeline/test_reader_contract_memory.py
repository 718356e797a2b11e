"""The TimelineReader contract, run on InMemoryTimeline (the fake the FHIR unit tests use)."""

from __future__ import annotations

import pytest

from services.timeline.domain.ports import TimelineReader
from tests.contracts.timeline_reader import (
    SeededTimeline,
    Study,
    TimelineReaderContract,
    images_entry,
    report_entries,
)
from tests.fakes.timeline import InMemoryTimeline


class SeededInMemoryTimeline:
    """Seeds the fake the way tests use it: ``put`` each entry a study shows, ``hide`` a study
    that consent did not permit or revoked."""

    def __init__(self) -> None:
        self.fake = InMemoryTimeline()

    @property
    def reader(self) -> TimelineReader:
        return self.fake

    async def seed(self, *studies: Study) -> None:
        for study in studies:
            entries = [images_entry(study)] if study.has_images else []
            entries += report_entries(study)
            first, *rest = entries
            self.fake.put(study.patient, first, series=study.series, instances=study.instances)
            for entry in rest:
                self.fake.put(study.patient, entry)
            if not study.visible:
                self.fake.hide(study.uid)


class TestInMemoryTimeline(TimelineReaderContract):
    @pytest.fixture
    def timeline(self) -> SeededTimeline:
        return SeededInMemoryTimeline()
