"""The TimelineReader contract: one suite, subclassed per backend, so the fake cannot drift from
the PostgreSQL projection.

A backend seeds *scenarios* (:class:`Study`: a patient's study as its senders hold it, whether
consent permitted it for the timeline and whether that consent was revoked since) its own way:
the fake puts the entries a visible study shows, PostgreSQL applies the events consent and
ingest would have sent, so its own visibility rules decide. The expected answers are built from
the scenario in the port's types (``images_entry``, ``report_entries``, ``Study.series``,
``Study.instances``).
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

import pytest

from services.timeline.domain.ports import (
    EntryKind,
    InstanceRow,
    SeriesRow,
    Source,
    TimelineEntry,
    TimelinePage,
    TimelineQuery,
    TimelineReader,
)
from tests.factories import make_pseudonym

T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
HOSPITAL = "12345678"
SECOND_HOSPITAL = "22222222"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def new_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def new_patient() -> str:
    """A fresh pseudonym (the reader never sees a BSN)."""
    return make_pseudonym()


# --- the scenario vocabulary --------------------------------------------------------------------


@dataclass(frozen=True)
class Sender:
    """A source of a study: the institution that sent it, at its latest version."""

    ura: str = HOSPITAL
    institution: str | None = "Testziekenhuis"
    version: int = 1
    received_at: datetime = T0


@dataclass(frozen=True)
class Report:
    sop_instance_uid: str
    series_instance_uid: str
    kind: str = "sr"  # shared.events.common.ReportKind


@dataclass(frozen=True)
class Study:
    """A patient's study as each of its senders holds it (the same series and instances), and
    whether consent permitted it for the timeline, and revoked that consent since."""

    patient: str
    uid: str
    study_date: date | None
    study_time: str | None
    description: str | None
    accession: str | None
    senders: tuple[Sender, ...]
    series: tuple[SeriesRow, ...]
    instances: tuple[InstanceRow, ...]  # report instances included
    reports: tuple[Report, ...]
    permitted: bool
    revoked: bool

    @property
    def visible(self) -> bool:
        return self.permitted and not self.revoked

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(sorted({s.modality for s in self.series if s.modality}))

    @property
    def has_images(self) -> bool:
        reports = {r.sop_instance_uid for r in self.reports}
        return any(i.sop_instance_uid not in reports for i in self.instances)


def _instance_row(study: str, series: str, sop_class_uid: str) -> InstanceRow:
    sop = new_uid()
    data = f"DICM {sop}".encode()
    return InstanceRow(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=sop_class_uid,
        transfer_syntax_uid=EXPLICIT_VR_LITTLE_ENDIAN,
        object_key=f"studies/{study}/{series}/{sop}.dcm",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def study_of(
    patient: str,
    *,
    study_date: date | None = date(2025, 3, 14),
    study_time: str | None = "092653",
    modality: str = "CT",
    description: str | None = "CT thorax",
    accession: str | None = "ACC0001",
    senders: Sequence[Sender] | None = None,
    received_at: datetime = T0,
    series: int = 1,
    instances: int = 2,
    reports: int = 0,
    permitted: bool = True,
    revoked: bool = False,
) -> Study:
    """``series`` image series of ``instances`` each, then one SR series of ``reports``; one
    sender (``received_at``) unless ``senders`` are given."""
    uid = new_uid()
    series_rows: list[SeriesRow] = []
    instance_rows: list[InstanceRow] = []
    report_refs: list[Report] = []
    for number in range(1, series + 1):
        series_uid = new_uid()
        series_rows.append(
            SeriesRow(uid, series_uid, modality, number, f"series {number}", instances)
        )
        instance_rows += [
            _instance_row(uid, series_uid, CT_IMAGE_STORAGE) for _ in range(instances)
        ]
    if reports:
        series_uid = new_uid()
        series_rows.append(SeriesRow(uid, series_uid, "SR", series + 1, "report", reports))
        rows = [_instance_row(uid, series_uid, BASIC_TEXT_SR) for _ in range(reports)]
        instance_rows += rows
        report_refs += [Report(r.sop_instance_uid, series_uid) for r in rows]
    return Study(
        patient=patient,
        uid=uid,
        study_date=study_date,
        study_time=study_time,
        description=description,
        accession=accession,
        senders=tuple(senders) if senders is not None else (Sender(received_at=received_at),),
        series=tuple(series_rows),
        instances=tuple(instance_rows),
        reports=tuple(report_refs),
        permitted=permitted,
        revoked=revoked,
    )


# --- what the reader answers about a visible study -----------------------------------------------


def sources_of(study: Study) -> tuple[Source, ...]:
    """Its sources, first received first."""
    return tuple(
        Source(
            sender_ura=s.ura,
            institution_name=s.institution,
            version=s.version,
            received_at=s.received_at,
            number_of_series=len(study.series),
            number_of_instances=len(study.instances),
        )
        for s in sorted(study.senders, key=lambda s: (s.received_at, s.ura))
    )


def images_entry(study: Study) -> TimelineEntry:
    return TimelineEntry(
        kind=EntryKind.IMAGES,
        study_instance_uid=study.uid,
        accession_number=study.accession,
        study_date=study.study_date,
        study_time=study.study_time,
        description=study.description,
        modalities=study.modalities,
        sources=sources_of(study),
    )


def report_entries(study: Study) -> list[TimelineEntry]:
    """One entry per report, with the study's attributes (its accession number among them)."""
    return [
        replace(
            images_entry(study),
            kind=EntryKind.REPORT,
            report_sop_instance_uid=r.sop_instance_uid,
            report_kind=r.kind,
        )
        for r in sorted(study.reports, key=lambda r: r.sop_instance_uid)
    ]


def keys(entries: Sequence[TimelineEntry]) -> list[tuple[str, str]]:
    return [(e.study_instance_uid, e.kind.value) for e in entries]


def images(*studies: Study) -> list[tuple[str, str]]:
    return [(s.uid, "images") for s in studies]


class SeededTimeline(Protocol):
    """A TimelineReader and a way to put scenarios behind it."""

    @property
    def reader(self) -> TimelineReader: ...

    async def seed(self, *studies: Study) -> None: ...


class TimelineReaderContract:
    """Subclass as ``Test...`` and override the ``timeline`` fixture with a backend that is
    empty at the start of every test."""

    @pytest.fixture
    def timeline(self) -> SeededTimeline:
        raise NotImplementedError("a backend overrides the timeline fixture")

    @staticmethod
    async def search(timeline: SeededTimeline, patient: str, **query: Any) -> TimelinePage:
        return await timeline.reader.search(TimelineQuery(patient=patient, **query))

    @staticmethod
    async def seed_shuffled(timeline: SeededTimeline, *studies: Study) -> None:
        """Seed in an order unrelated to the expected one: the reader sorts, not the seeding."""
        shuffled = list(studies)
        random.Random(7).shuffle(shuffled)
        await timeline.seed(*shuffled)

    # -- a visible study ------------------------------------------------------------------------

    async def test_a_permitted_study_is_on_its_patients_timeline(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        study = study_of(patient, series=2, instances=3)
        await timeline.seed(study)

        page = await self.search(timeline, patient)
        assert (page.entries, page.total) == ([images_entry(study)], 1)
        assert await timeline.reader.entry(study.uid) == images_entry(study)
        assert await timeline.reader.patient_of_study(study.uid) == patient

    # -- newest first ---------------------------------------------------------------------------

    async def test_entries_come_newest_first_by_date_then_time_then_received(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        evening = study_of(patient, study_date=date(2025, 2, 10), study_time="170000")
        morning_later = study_of(
            patient, study_date=date(2025, 2, 10), study_time="080000", received_at=T0
        )
        morning_earlier = study_of(
            patient,
            study_date=date(2025, 2, 10),
            study_time="080000",
            received_at=T0 - timedelta(hours=1),
        )
        january = study_of(patient, study_date=date(2025, 1, 10), study_time="235959")
        last_year = study_of(patient, study_date=date(2024, 12, 31))
        undated = study_of(patient, study_date=None, study_time=None)
        newest_first = [evening, morning_later, morning_earlier, january, last_year, undated]
        await self.seed_shuffled(timeline, *newest_first)

        page = await self.search(timeline, patient)
        assert keys(page.entries) == images(*newest_first)
        assert page.total == 6

    async def test_entries_that_tie_page_without_overlap_each_report_after_its_images(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        tied = [study_of(patient, reports=1) for _ in range(4)]  # same date, time, received
        await self.seed_shuffled(timeline, *tied)

        whole = await self.search(timeline, patient)
        assert whole.total == len(whole.entries) == 8
        paged: list[TimelineEntry] = []
        for offset in range(0, 8, 3):
            paged += (await self.search(timeline, patient, count=3, offset=offset)).entries
        assert paged == whole.entries
        pairs = list(zip(whole.entries[::2], whole.entries[1::2], strict=True))
        assert {images.study_instance_uid for images, _ in pairs} == {s.uid for s in tied}
        for images, report in pairs:
            assert (images.kind, report.kind) == (EntryKind.IMAGES, EntryKind.REPORT)
            assert images.study_instance_uid == report.study_instance_uid

    # -- filters --------------------------------------------------------------------------------

    async def test_a_date_range_is_inclusive_and_an_undated_study_matches_no_date_filter(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        before = study_of(patient, study_date=date(2024, 12, 31))
        first_day = study_of(patient, study_date=date(2025, 1, 1))
        last_day = study_of(patient, study_date=date(2025, 1, 31))
        after = study_of(patient, study_date=date(2025, 2, 1))
        undated = study_of(patient, study_date=None)
        await self.seed_shuffled(timeline, before, first_day, last_day, after, undated)

        january = await self.search(
            timeline, patient, date_from=date(2025, 1, 1), date_to=date(2025, 1, 31)
        )
        assert (keys(january.entries), january.total) == (images(last_day, first_day), 2)
        one_day = await self.search(
            timeline, patient, date_from=date(2025, 1, 31), date_to=date(2025, 1, 31)
        )
        assert keys(one_day.entries) == images(last_day)
        since = await self.search(timeline, patient, date_from=date(2025, 1, 31))
        assert keys(since.entries) == images(after, last_day)
        until = await self.search(timeline, patient, date_to=date(2025, 1, 1))
        assert keys(until.entries) == images(first_day, before)
        # A range that ends before it starts (the search's answer to "after the last day
        # there is") holds nothing, the calendar's ends included.
        nothing = await self.search(timeline, patient, date_from=date.max, date_to=date.min)
        assert (nothing.entries, nothing.total) == ([], 0)

    async def test_a_modality_filter_keeps_studies_with_any_of_the_modalities(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        ct = study_of(patient, modality="CT", study_date=date(2025, 3, 3))
        mr = study_of(patient, modality="MR", study_date=date(2025, 2, 2))
        us = study_of(patient, modality="US", study_date=date(2025, 1, 1))
        await self.seed_shuffled(timeline, ct, mr, us)

        only_mr = await self.search(timeline, patient, modalities=frozenset({"MR"}))
        assert (keys(only_mr.entries), only_mr.total) == (images(mr), 1)
        ct_or_us = await self.search(timeline, patient, modalities=frozenset({"CT", "US", "XA"}))
        assert keys(ct_or_us.entries) == images(ct, us)
        none = await self.search(timeline, patient, modalities=frozenset({"NM"}))
        assert (none.entries, none.total) == ([], 0)

    async def test_an_institution_filter_matches_a_sources_ura_or_its_name_in_any_case(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        here = study_of(patient, study_date=date(2025, 3, 3))
        there = study_of(
            patient,
            study_date=date(2025, 2, 2),
            senders=[Sender(SECOND_HOSPITAL, "Máxima MC")],
        )
        await self.seed_shuffled(timeline, here, there)

        for institution in (SECOND_HOSPITAL, "Máxima MC", "máxima mc", "MÁXIMA MC"):
            page = await self.search(timeline, patient, institution=institution)
            assert (keys(page.entries), page.total) == (images(there), 1), institution
        by_ura = await self.search(timeline, patient, institution=HOSPITAL)
        assert keys(by_ura.entries) == images(here)
        by_name = await self.search(timeline, patient, institution="TESTZIEKENHUIS")
        assert keys(by_name.entries) == images(here)
        # A whole URA or name, not a part of one; letters compared lower-cased, not folded
        # (PostgreSQL's lower(): "ß" stays "ß", so "STRASSE" is not "Straße").
        for partial in ("Máxima", "1234567", "ziekenhuis", "MAXIMA MC"):
            page = await self.search(timeline, patient, institution=partial)
            assert (page.entries, page.total) == ([], 0), partial
        street = study_of(
            patient, study_date=date(2025, 1, 1), senders=[Sender("33333333", "Straße Klinik")]
        )
        await self.seed_shuffled(timeline, street)
        for folded in ("STRASSE KLINIK", "strasse klinik"):
            page = await self.search(timeline, patient, institution=folded)
            assert (page.entries, page.total) == ([], 0), folded
        page = await self.search(timeline, patient, institution="STRAßE KLINIK")
        assert keys(page.entries) == images(street)

    async def test_a_kind_filter_keeps_only_images_or_only_reports(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        reported = study_of(patient, study_date=date(2025, 3, 3), reports=1)
        plain = study_of(patient, study_date=date(2025, 2, 2))
        await self.seed_shuffled(timeline, reported, plain)

        only_images = await self.search(timeline, patient, kind=EntryKind.IMAGES)
        assert (keys(only_images.entries), only_images.total) == (images(reported, plain), 2)
        only_reports = await self.search(timeline, patient, kind=EntryKind.REPORT)
        assert (only_reports.entries, only_reports.total) == (report_entries(reported), 1)

    # -- paging ---------------------------------------------------------------------------------

    async def test_pages_of_count_from_offset_add_up_to_the_whole_timeline(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        studies = [study_of(patient, study_date=date(2025, 1, day)) for day in range(1, 6)]
        await self.seed_shuffled(timeline, *studies)
        newest_first = images(*reversed(studies))

        pages: list[tuple[str, str]] = []
        for offset in (0, 2, 4):
            page = await self.search(timeline, patient, count=2, offset=offset)
            assert page.total == 5
            assert len(page.entries) == (2 if offset < 4 else 1)
            pages += keys(page.entries)
        assert pages == newest_first
        middle = await self.search(timeline, patient, count=3, offset=1)
        assert keys(middle.entries) == newest_first[1:4]

    async def test_pages_after_the_last_entry_add_up_to_the_whole_timeline_ties_included(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        tied = [study_of(patient, reports=1) for _ in range(3)]  # same date, time, received
        dated = [study_of(patient, study_date=date(2025, 1, day)) for day in (1, 2)]
        undated = study_of(patient, study_date=None, study_time=None)
        await self.seed_shuffled(timeline, *tied, *dated, undated)
        whole = await self.search(timeline, patient)

        paged: list[TimelineEntry] = []
        offsets = []
        page = await self.search(timeline, patient, count=3)
        while True:
            paged += page.entries
            offsets.append(page.offset)
            if page.last is None or page.offset + len(page.entries) >= page.total:
                break
            page = await self.search(timeline, patient, count=3, after=page.last)
        assert paged == whole.entries and len(paged) == whole.total == 9
        assert offsets == [0, 3, 6]
        past = await self.search(timeline, patient, count=3, after=page.last)
        assert (past.entries, past.total, past.offset) == ([], 9, 9)

    async def test_a_page_after_an_entry_is_not_shifted_by_a_study_arriving_or_leaving_before_it(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        studies = [study_of(patient, study_date=date(2025, 1, day)) for day in range(1, 6)]
        await self.seed_shuffled(timeline, *studies)
        newest_first = images(*reversed(studies))
        first = await self.search(timeline, patient, count=2)
        assert keys(first.entries) == newest_first[:2]
        assert first.last is not None

        newer = study_of(patient, study_date=date(2025, 2, 1))  # arrives before the page
        await timeline.seed(newer)
        second = await self.search(timeline, patient, count=2, after=first.last)
        # By offset the next page would show the 2nd study again.
        assert keys(second.entries) == newest_first[2:4]
        assert (second.total, second.offset) == (6, 3)

        # The first page's studies leave (consent revoked): the next page does not skip.
        for study in (studies[4], studies[3]):
            await timeline.seed(replace(study, revoked=True))
        third = await self.search(timeline, patient, count=2, after=second.last)
        assert keys(third.entries) == newest_first[4:]
        assert (third.total, third.offset) == (4, 3)

    async def test_a_page_past_the_end_is_empty_and_still_counts_the_total(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        await timeline.seed(*(study_of(patient) for _ in range(3)))

        for offset in (3, 50):
            page = await self.search(timeline, patient, count=10, offset=offset)
            assert (page.entries, page.total) == ([], 3), offset

    async def test_a_count_of_zero_answers_the_total_only(self, timeline: SeededTimeline) -> None:
        patient = new_patient()
        await timeline.seed(*(study_of(patient) for _ in range(3)), study_of(patient, reports=1))

        for offset in (0, 2, 50):
            page = await self.search(timeline, patient, count=0, offset=offset)
            assert (page.entries, page.total) == ([], 5), offset
        reports = await self.search(timeline, patient, count=0, kind=EntryKind.REPORT)
        assert (reports.entries, reports.total) == ([], 1)

    async def test_the_total_counts_what_the_filters_keep_not_the_page(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        mr = [study_of(patient, modality="MR", study_date=date(2025, 1, d)) for d in (1, 2, 3)]
        await timeline.seed(*mr, study_of(patient, modality="CT"))

        page = await self.search(timeline, patient, modalities=frozenset({"MR"}), count=1)
        assert (keys(page.entries), page.total) == (images(mr[2]), 3)

    async def test_a_patient_without_entries_has_an_empty_timeline(
        self, timeline: SeededTimeline
    ) -> None:
        await timeline.seed(study_of(new_patient()))

        page = await self.search(timeline, new_patient())
        assert (page.entries, page.total) == ([], 0)

    # -- one study, several sources; reports ----------------------------------------------------

    async def test_a_study_from_two_institutions_is_one_entry_listing_both_sources(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        first = Sender(HOSPITAL, "Testziekenhuis", received_at=T0)
        second = Sender(
            SECOND_HOSPITAL, "Tweede Ziekenhuis", version=2, received_at=T0 + timedelta(days=1)
        )
        study = study_of(patient, senders=[second, first], series=2, instances=2)
        await timeline.seed(study)

        page = await self.search(timeline, patient)
        assert (page.entries, page.total) == ([images_entry(study)], 1)
        [entry] = page.entries
        assert [(s.sender_ura, s.version) for s in entry.sources] == [
            (HOSPITAL, 1),
            (SECOND_HOSPITAL, 2),
        ]
        assert await timeline.reader.entry(study.uid) == entry
        for institution in (HOSPITAL, SECOND_HOSPITAL, "tweede ziekenhuis"):
            found = await self.search(timeline, patient, institution=institution)
            assert found.entries == [entry], institution
        # Each source holds a copy of every series and instance: still one row per UID.
        series = await timeline.reader.series(study.uid)
        assert sorted(series, key=lambda s: s.series_instance_uid) == sorted(
            study.series, key=lambda s: s.series_instance_uid
        )
        rows = await timeline.reader.instances(study.uid)
        assert sorted(rows, key=lambda r: r.sop_instance_uid) == sorted(
            study.instances, key=lambda r: r.sop_instance_uid
        )

    async def test_a_report_is_its_own_entry_after_its_images_with_the_studys_accession(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        study = study_of(patient, accession="ACC-77", reports=1)
        older = study_of(patient, study_date=date(2020, 1, 1))
        await self.seed_shuffled(timeline, study, older)

        page = await self.search(timeline, patient)
        [report] = report_entries(study)
        assert page.entries == [images_entry(study), report, images_entry(older)]
        assert page.total == 3
        assert report.accession_number == "ACC-77"
        assert report.report_sop_instance_uid == study.reports[0].sop_instance_uid
        # The study-level entry stays the images entry; the report instance is retrievable.
        assert await timeline.reader.entry(study.uid) == images_entry(study)
        [row] = await timeline.reader.instances(
            study.uid, sop_instance_uid=study.reports[0].sop_instance_uid
        )
        assert row.sop_class_uid == BASIC_TEXT_SR

    async def test_a_study_of_reports_only_has_report_entries_and_a_study_level_entry(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        study = study_of(patient, series=0, reports=1, accession="ACC-R")
        await timeline.seed(study)

        page = await self.search(timeline, patient)
        assert (page.entries, page.total) == (report_entries(study), 1)
        images_only = await self.search(timeline, patient, kind=EntryKind.IMAGES)
        assert (images_only.entries, images_only.total) == ([], 0)
        assert await timeline.reader.entry(study.uid) == images_entry(study)
        assert await timeline.reader.patient_of_study(study.uid) == patient

    # -- visibility -----------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("permitted", "revoked"), [(False, False), (True, True)], ids=["denied", "revoked"]
    )
    async def test_an_invisible_study_is_absent_from_every_answer(
        self, timeline: SeededTimeline, permitted: bool, revoked: bool
    ) -> None:
        patient = new_patient()
        shown = study_of(patient, study_date=date(2024, 1, 1))
        hidden = study_of(
            patient,
            reports=1,
            study_date=date(2025, 1, 1),
            senders=[Sender(SECOND_HOSPITAL, "Tweede Ziekenhuis")],
            permitted=permitted,
            revoked=revoked,
        )
        await timeline.seed(shown, hidden)

        page = await self.search(timeline, patient)
        assert (page.entries, page.total) == ([images_entry(shown)], 1)
        for query in (
            {"kind": EntryKind.REPORT},
            {"institution": SECOND_HOSPITAL},
            {"institution": "tweede ziekenhuis"},
            {"date_from": date(2025, 1, 1)},
            {"count": 0},
        ):
            filtered = await self.search(timeline, patient, **query)
            assert filtered.total == (1 if "count" in query else 0), query
            assert hidden.uid not in {e.study_instance_uid for e in filtered.entries}, query
        reader = timeline.reader
        assert await reader.patient_of_study(hidden.uid) is None
        assert await reader.entry(hidden.uid) is None
        assert await reader.series(hidden.uid) == []
        assert await reader.instances(hidden.uid) == []
        series_uid = hidden.series[0].series_instance_uid
        assert await reader.instances(hidden.uid, series_instance_uid=series_uid) == []
        sop = hidden.instances[0].sop_instance_uid
        assert await reader.instances(hidden.uid, sop_instance_uid=sop) == []
        assert await reader.patient_of_study(shown.uid) == patient

    async def test_another_patients_studies_never_appear(self, timeline: SeededTimeline) -> None:
        patient, other = new_patient(), new_patient()
        mine = study_of(patient, study_date=date(2024, 1, 1))
        theirs = study_of(other, study_date=date(2025, 1, 1), reports=1)
        await timeline.seed(mine, theirs)

        for query in ({}, {"kind": EntryKind.REPORT}, {"institution": HOSPITAL}, {"count": 0}):
            page = await self.search(timeline, patient, **query)
            assert theirs.uid not in {e.study_instance_uid for e in page.entries}, query
            assert page.total == (0 if query.get("kind") else 1), query
        assert await timeline.reader.patient_of_study(theirs.uid) == other
        assert await timeline.reader.patient_of_study(mine.uid) == patient
        page = await self.search(timeline, other)
        assert page.entries == [images_entry(theirs), *report_entries(theirs)]

    # -- series and instances -------------------------------------------------------------------

    async def test_series_and_instances_of_a_study_one_row_per_uid(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        study = study_of(patient, series=3, instances=2, reports=1)
        await timeline.seed(study, study_of(patient))

        series = await timeline.reader.series(study.uid)
        assert len({s.series_instance_uid for s in series}) == len(series) == 4
        assert sorted(series, key=lambda s: s.series_instance_uid) == sorted(
            study.series, key=lambda s: s.series_instance_uid
        )
        rows = await timeline.reader.instances(study.uid)
        assert len({r.sop_instance_uid for r in rows}) == len(rows) == 7
        assert sorted(rows, key=lambda r: r.sop_instance_uid) == sorted(
            study.instances, key=lambda r: r.sop_instance_uid
        )

    async def test_instances_filter_by_series_and_by_sop_instance_uid(
        self, timeline: SeededTimeline
    ) -> None:
        patient = new_patient()
        study = study_of(patient, series=2, instances=3)
        await timeline.seed(study)
        first, second = (s.series_instance_uid for s in study.series)
        in_first = [i for i in study.instances if i.series_instance_uid == first]
        wanted = in_first[1]
        in_second = next(i for i in study.instances if i.series_instance_uid == second)
        reader = timeline.reader

        rows = await reader.instances(study.uid, series_instance_uid=first)
        assert sorted(rows, key=lambda r: r.sop_instance_uid) == sorted(
            in_first, key=lambda r: r.sop_instance_uid
        )
        assert await reader.instances(study.uid, sop_instance_uid=wanted.sop_instance_uid) == [
            wanted
        ]
        both = await reader.instances(
            study.uid, series_instance_uid=first, sop_instance_uid=wanted.sop_instance_uid
        )
        assert both == [wanted]
        crossed = await reader.instances(
            study.uid, series_instance_uid=first, sop_instance_uid=in_second.sop_instance_uid
        )
        assert crossed == []
        assert await reader.instances(study.uid, series_instance_uid=new_uid()) == []
        assert await reader.instances(study.uid, sop_instance_uid=new_uid()) == []

    async def test_an_unknown_study_answers_none_and_nothing(
        self, timeline: SeededTimeline
    ) -> None:
        await timeline.seed(study_of(new_patient()))
        unknown = new_uid()
        reader = timeline.reader

        assert await reader.patient_of_study(unknown) is None
        assert await reader.entry(unknown) is None
        assert await reader.series(unknown) == []
        assert await reader.instances(unknown) == []
