"""An in-memory TimelineReader that behaves as ``services/timeline/domain/ports.py`` says.

Tests put studies in with :meth:`InMemoryTimeline.put` (an images entry, its series and
instances, any report entries) and hide them with :meth:`hide` (consent revoked for the
timeline): the reader answers only about visible studies, exactly like the PostgreSQL
projection. Searches filter on date, modality, institution (a source's URA or its name,
lower-cased as PostgreSQL's lower() does) and kind, newest first (study date/time, then
received), ``count`` from ``offset``. ``make_*`` build the rows with defaults that fit together.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any

from services.timeline.domain.ports import (
    EntryKey,
    EntryKind,
    InstanceRow,
    SeriesRow,
    Source,
    TimelineEntry,
    TimelinePage,
    TimelineQuery,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
_URA = re.compile(r"[0-9]{8}")


def new_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def make_source(
    sender_ura: str = "12345678",
    institution_name: str | None = "Testziekenhuis",
    *,
    version: int = 1,
    received_at: datetime = T0,
    number_of_series: int = 1,
    number_of_instances: int = 1,
) -> Source:
    return Source(
        sender_ura=sender_ura,
        institution_name=institution_name,
        version=version,
        received_at=received_at,
        number_of_series=number_of_series,
        number_of_instances=number_of_instances,
    )


def make_entry(
    *,
    kind: EntryKind = EntryKind.IMAGES,
    study_instance_uid: str | None = None,
    accession_number: str | None = "ACC0001",
    study_date: date | None = date(2025, 3, 14),
    study_time: str | None = "092653",
    description: str | None = "CT thorax",
    modalities: tuple[str, ...] = ("CT",),
    sources: Sequence[Source] | None = None,
    report_sop_instance_uid: str | None = None,
    report_kind: str | None = None,
    delivered_to: tuple[str, ...] = (),
) -> TimelineEntry:
    if kind is EntryKind.REPORT and report_sop_instance_uid is None:
        report_sop_instance_uid = new_uid()
        report_kind = report_kind or "sr"
    return TimelineEntry(
        kind=kind,
        study_instance_uid=study_instance_uid or new_uid(),
        accession_number=accession_number,
        study_date=study_date,
        study_time=study_time,
        description=description,
        modalities=modalities,
        sources=tuple(sources) if sources is not None else (make_source(),),
        report_sop_instance_uid=report_sop_instance_uid,
        report_kind=report_kind,
        delivered_to=delivered_to,
    )


def make_series_row(
    study_instance_uid: str,
    *,
    series_instance_uid: str | None = None,
    modality: str | None = "CT",
    series_number: int | None = 1,
    series_description: str | None = "series 1",
    number_of_instances: int = 1,
) -> SeriesRow:
    return SeriesRow(
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid or new_uid(),
        modality=modality,
        series_number=series_number,
        series_description=series_description,
        number_of_instances=number_of_instances,
    )


def make_instance_row(
    study_instance_uid: str,
    series_instance_uid: str,
    *,
    sop_instance_uid: str | None = None,
    data: bytes = b"DICM",
    sop_class_uid: str = CT_IMAGE_STORAGE,
    transfer_syntax_uid: str = EXPLICIT_VR_LITTLE_ENDIAN,
    object_key: str | None = None,
    sha256: str | None = None,
    sender_ura: str = "12345678",
) -> InstanceRow:
    """A row for ``data`` as stored (at ingest's key, ``{sender}/{sop}.dcm``): its size and
    (unless overridden) its sha256."""
    sop = sop_instance_uid or new_uid()
    return InstanceRow(
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop,
        sop_class_uid=sop_class_uid,
        transfer_syntax_uid=transfer_syntax_uid,
        object_key=object_key or f"{sender_ura}/{sop}.dcm",
        size=len(data),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
    )


@dataclass
class _Study:
    patient: str
    images: TimelineEntry | None = None
    reports: list[TimelineEntry] = field(default_factory=list)
    series: dict[str, SeriesRow] = field(default_factory=dict)
    instances: dict[str, InstanceRow] = field(default_factory=dict)
    visible: bool = True


@functools.total_ordering
class _Descending:
    """Sorts its value the other way round."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and self.value == other.value

    def __lt__(self, other: _Descending) -> bool:
        return bool(self.value > other.value)

    __hash__ = None  # type: ignore[assignment]


def _key_of(entry: TimelineEntry) -> EntryKey:
    received = max((s.received_at for s in entry.sources), default=datetime.min.replace(tzinfo=UTC))
    return EntryKey(
        entry.study_date,
        entry.study_time,
        received,
        entry.study_instance_uid,
        entry.kind,
        entry.report_sop_instance_uid or "",
    )


def _order(key: EntryKey) -> tuple[Any, ...]:
    """``key`` as a tuple that ascends in the reader's order (``store._NEWEST_FIRST``): study
    date, study time (as stored, compared as text like the "C" collation) and latest received,
    newest first and undated last; ties by Study UID, a study's images before its reports,
    then report UID, ascending, so pages never overlap."""
    return (
        key.study_date is None,
        _Descending(key.study_date or date.min),
        key.study_time is None,
        _Descending(key.study_time or ""),
        _Descending(key.received_at),
        key.study_instance_uid,
        key.kind is EntryKind.REPORT,
        key.report_sop_instance_uid,
    )


def _newest_first(entries: list[TimelineEntry]) -> list[TimelineEntry]:
    return sorted(entries, key=lambda entry: _order(_key_of(entry)))


class InMemoryTimeline:
    """The :class:`~services.timeline.domain.ports.TimelineReader` in a dict."""

    def __init__(self) -> None:
        self._studies: dict[str, _Study] = {}
        self.searches: list[TimelineQuery] = []

    def put(
        self,
        patient: str,
        entry: TimelineEntry,
        *,
        series: Sequence[SeriesRow] = (),
        instances: Sequence[InstanceRow] = (),
    ) -> None:
        """Add (or replace) an images entry or a report entry with its rows, visible."""
        study = self._studies.setdefault(entry.study_instance_uid, _Study(patient))
        if study.patient != patient:
            raise ValueError("a study belongs to one patient")
        if entry.kind is EntryKind.IMAGES:
            study.images = entry
        else:
            study.reports = [
                r
                for r in study.reports
                if r.report_sop_instance_uid != entry.report_sop_instance_uid
            ] + [entry]
        for row in series:
            study.series[row.series_instance_uid] = row
        for row in instances:
            study.instances[row.sop_instance_uid] = row

    def hide(self, study_instance_uid: str) -> None:
        """Take the study off every timeline (its timeline consent was revoked)."""
        self._studies[study_instance_uid].visible = False

    def show(self, study_instance_uid: str) -> None:
        self._studies[study_instance_uid].visible = True

    def _visible(self, study_instance_uid: str) -> _Study | None:
        study = self._studies.get(study_instance_uid)
        return study if study is not None and study.visible else None

    async def search(self, query: TimelineQuery) -> TimelinePage:
        self.searches.append(query)
        matches = [
            entry
            for study in self._studies.values()
            if study.visible and study.patient == query.patient
            for entry in ([study.images] if study.images else []) + study.reports
            if _matches(entry, query)
        ]
        matches = _newest_first(matches)
        offset = query.offset
        if query.after is not None:
            # Where the key's entry is, or would be: after every entry that sorts before it.
            after = _order(query.after)
            offset = sum(1 for entry in matches if _order(_key_of(entry)) <= after)
        page = matches[offset : offset + query.count]
        return TimelinePage(
            entries=page,
            total=len(matches),
            offset=offset,
            last=_key_of(page[-1]) if page else None,
        )

    async def patient_of_study(self, study_instance_uid: str) -> str | None:
        study = self._visible(study_instance_uid)
        return study.patient if study is not None else None

    async def entry(self, study_instance_uid: str) -> TimelineEntry | None:
        study = self._visible(study_instance_uid)
        if study is None:
            return None
        if study.images is not None or not study.reports:
            return study.images
        # A study that holds reports only still has a study-level entry (QIDO-RS).
        return replace(
            study.reports[0], kind=EntryKind.IMAGES, report_sop_instance_uid=None, report_kind=None
        )

    async def series(self, study_instance_uid: str) -> list[SeriesRow]:
        study = self._visible(study_instance_uid)
        if study is None:
            return []
        return sorted(
            study.series.values(), key=lambda s: (s.series_number is None, s.series_number or 0)
        )

    async def instances(
        self,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[InstanceRow]:
        study = self._visible(study_instance_uid)
        if study is None:
            return []
        return [
            row
            for row in study.instances.values()
            if (series_instance_uid is None or row.series_instance_uid == series_instance_uid)
            and (sop_instance_uid is None or row.sop_instance_uid == sop_instance_uid)
        ]


def _matches(entry: TimelineEntry, query: TimelineQuery) -> bool:
    if query.kind is not None and entry.kind is not query.kind:
        return False
    if query.date_from is not None or query.date_to is not None:
        if entry.study_date is None:
            return False
        if query.date_from is not None and entry.study_date < query.date_from:
            return False
        if query.date_to is not None and entry.study_date > query.date_to:
            return False
    if query.modalities and not query.modalities & set(entry.modalities):
        return False
    if query.institution is not None:
        wanted = query.institution
        if _URA.fullmatch(wanted):
            return any(s.sender_ura == wanted for s in entry.sources)
        # Lower-cased as PostgreSQL's lower() does, not case-folded ("ß" is not "ss").
        return any((s.institution_name or "").lower() == wanted.lower() for s in entry.sources)
    return True
