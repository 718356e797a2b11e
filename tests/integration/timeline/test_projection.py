"""The timeline projection against the real Kafka and PostgreSQL: events in, TimelineReader out.

Each test has its own tagged copies of the four topics, its own consumer group and a fresh
database with the project's migrations. "Caught up" is exact, not a sleep: the group's
committed offsets reach the topics' end offsets, and the projection commits offsets only after
its database transaction committed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.timeline.adapters.reload import SCHEMA, Reload
from services.timeline.adapters.store import PROJECTION_TABLES, PostgresTimeline
from services.timeline.config import TimelineSettings
from services.timeline.domain.ports import EntryKind, TimelineEntry, TimelineQuery
from services.timeline.entrypoints.projection import TOPICS, build_projection
from services.timeline.entrypoints.rebuild import RebuildRefused, _commit_offsets, rebuild
from shared import migrations, topics
from shared.events import (
    Basis,
    BsnStatus,
    ConsentChecked,
    ConsentRevoked,
    Decision,
    Event,
    PatientRef,
    Purpose,
    ReportKind,
    ReportRef,
    StudySnapshot,
)
from shared.kafka import KafkaEventPublisher
from shared.settings import KafkaSettings, PostgresSettings
from shared.stream import Worker
from shared.topics import TopicSpec
from tests.factories import (
    make_consent_checked,
    make_consent_revoked,
    make_delivered,
    make_instance_ref,
    make_pseudonym,
    make_study,
    make_study_received,
)
from tests.integration.conftest import SERVICE_ROLE, as_role
from tests.workers import running

pytestmark = pytest.mark.integration

TIMEOUT = 60.0
PARTITIONS = 3
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
OTHER_URA = "22222222"


# --- events as consent and ingest make them -----------------------------------------------------


def patient_ref(pseudonym: str) -> PatientRef:
    return PatientRef(pseudonym=pseudonym, bsn_status=BsnStatus.VERIFIED)


def study_of(patient: str, **overrides: Any) -> StudySnapshot:
    return make_study(patient=patient_ref(patient), **overrides)


def next_version(study: StudySnapshot, instances: int = 1) -> StudySnapshot:
    added = tuple(make_instance_ref() for _ in range(instances))
    return study.model_copy(
        update={
            "version": study.version + 1,
            "instances": study.instances + added,
            "last_received_at": study.last_received_at + timedelta(minutes=5),
        }
    )


def with_report(
    study: StudySnapshot, kind: ReportKind = ReportKind.STRUCTURED_REPORT
) -> StudySnapshot:
    series = make_instance_ref().series_instance_uid
    report = make_instance_ref(
        series_instance_uid=series,
        sop_class_uid=BASIC_TEXT_SR,
    )
    ref = ReportRef(sop_instance_uid=report.sop_instance_uid, series_instance_uid=series, kind=kind)
    return study.model_copy(
        update={"instances": (*study.instances, report), "reports": (*study.reports, ref)}
    )


def decided(
    study: StudySnapshot, decision: Decision = Decision.PERMIT, consent: str = "consent-1"
) -> list[Event]:
    """The study-received and both consent-checked of one version, as consent announces them."""
    received = make_study_received(study=study)
    timeline_basis = (
        Basis.EXPLICIT_CONSENT if decision is Decision.PERMIT else Basis.NO_EXPLICIT_CONSENT
    )
    common = {"study": study, "occurred_at": received.occurred_at}
    return [
        received,
        make_consent_checked(purpose=Purpose.DELIVERY, **common),
        make_consent_checked(
            purpose=Purpose.TIMELINE,
            decision=decision,
            basis=timeline_basis,
            decided_by=consent if decision is Decision.PERMIT else "rule:no-explicit-consent",
            **common,
        ),
    ]


def timeline_decision(
    study: StudySnapshot, decision: Decision = Decision.PERMIT, consent: str = "consent-1"
) -> ConsentChecked:
    event = decided(study, decision, consent)[2]
    assert isinstance(event, ConsentChecked)
    return event


# --- the harness ----------------------------------------------------------------------------------


@dataclass
class Timeline:
    settings: TimelineSettings
    names: dict[str, str]
    group: str
    dsn: str
    reader: PostgresTimeline
    publisher: KafkaEventPublisher
    admin: AIOKafkaAdminClient

    @property
    def group_id(self) -> str:
        return f"{self.settings.kafka.client_id_prefix}-{self.group}"

    def worker(self) -> Worker:
        # The worker as production runs it: a role that owns nothing (the rebuild, the tests'
        # reads and seeding, as the owner).
        service = PostgresSettings(dsn=as_role(self.dsn, SERVICE_ROLE))
        settings = self.settings.model_copy(update={"postgres": service})
        return build_projection(settings, group=self.group, rename=self.names, max_records=500)

    async def publish(self, *events: Event) -> None:
        for event in events:
            await self.publisher.publish(event, self.names[type(event).topic])

    async def caught_up(self, timeout: float = TIMEOUT) -> None:
        """Until the projection's committed offsets reach the end of every topic."""
        tps = [TopicPartition(t, p) for t in self.names.values() for p in range(PARTITIONS)]
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka.bootstrap_list)
        await consumer.start()
        try:
            end = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
        async with asyncio.timeout(timeout):
            while True:
                committed = await self.admin.list_consumer_group_offsets(self.group_id)
                if all(
                    end[tp] == 0 or (tp in committed and committed[tp].offset >= end[tp])
                    for tp in tps
                ):
                    return
                await asyncio.sleep(0.05)

    async def entries(self, patient: str, **query: Any) -> list[TimelineEntry]:
        return (await self.reader.search(TimelineQuery(patient=patient, **query))).entries

    def dump(self) -> dict[str, list[str]]:
        """Every projection table's rows as text, sorted."""
        with psycopg.connect(self.dsn) as conn:
            return {
                table: [r[0] for r in conn.execute(f"SELECT t::text FROM {table} t ORDER BY 1")]
                for table in PROJECTION_TABLES
            }


@pytest.fixture
async def timeline(
    kafka_settings: KafkaSettings,
    scratch_database: str,
    declare_topics: Callable[..., Awaitable[None]],
    tag: str,
) -> AsyncIterator[Timeline]:
    names = {name: f"test-timeline-{name}-{tag}" for name in TOPICS}
    await declare_topics(*(TopicSpec(n, PARTITIONS, topics.DAY_MS) for n in names.values()))
    migrations.migrate(scratch_database, grant_to=SERVICE_ROLE)
    settings = TimelineSettings(
        kafka=kafka_settings, postgres=PostgresSettings(dsn=scratch_database)
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_list)
    await admin.start()
    try:
        async with (
            PostgresTimeline(scratch_database, pool_size=2) as reader,
            KafkaEventPublisher(kafka_settings, "test-timeline") as publisher,
        ):
            yield Timeline(
                settings, names, f"test-timeline-{tag}", scratch_database, reader, publisher, admin
            )
    finally:
        await admin.close()


async def project(timeline: Timeline, *events: Event) -> None:
    """Publish ``events`` and run the projection until it has applied them."""
    await timeline.publish(*events)
    async with running(timeline.worker()):
        await timeline.caught_up()


# --- visibility -----------------------------------------------------------------------------------


async def test_a_permitted_study_appears_with_its_source_and_a_denied_one_does_not(
    timeline: Timeline,
) -> None:
    patient = make_pseudonym()
    permitted = study_of(patient, instances=4, series=2, study_date=date(2025, 3, 1))
    denied = study_of(patient, study_date=date(2025, 4, 1))
    await project(timeline, *decided(permitted), *decided(denied, Decision.DENY))

    [entry] = await timeline.entries(patient)
    assert entry.kind is EntryKind.IMAGES
    assert entry.study_instance_uid == permitted.study_instance_uid
    assert (entry.accession_number, entry.description) == ("ACC0001", "CT thorax")
    assert (entry.study_date, entry.modalities) == (date(2025, 3, 1), ("CT",))
    [source] = entry.sources
    assert (source.sender_ura, source.institution_name, source.version) == (
        permitted.sender_ura,
        "Testziekenhuis",
        1,
    )
    assert (source.number_of_series, source.number_of_instances) == (2, 4)
    assert source.received_at == permitted.last_received_at

    reader = timeline.reader
    assert await reader.patient_of_study(permitted.study_instance_uid) == patient
    assert await reader.patient_of_study(denied.study_instance_uid) is None
    assert await reader.entry(denied.study_instance_uid) is None
    assert await reader.series(denied.study_instance_uid) == []
    assert await reader.instances(denied.study_instance_uid) == []
    assert len(await reader.series(permitted.study_instance_uid)) == 2
    stored = {i.sop_instance_uid: i for i in permitted.instances}
    rows = await reader.instances(permitted.study_instance_uid)
    assert {r.sop_instance_uid for r in rows} == set(stored)
    assert all(r.object_key == stored[r.sop_instance_uid].object_key for r in rows)
    assert all(r.sha256 == stored[r.sop_instance_uid].sha256 for r in rows)


async def test_a_study_without_a_verified_bsn_or_a_decision_stays_off_the_timeline(
    timeline: Timeline,
) -> None:
    patient = make_pseudonym()
    undecided = study_of(patient)
    unverified = make_study(patient=PatientRef(bsn_status=BsnStatus.ABSENT))
    await project(
        timeline,
        make_study_received(study=undecided),
        *decided(unverified, Decision.DENY),
    )
    assert await timeline.entries(patient) == []
    assert await timeline.reader.patient_of_study(undecided.study_instance_uid) is None
    assert await timeline.reader.patient_of_study(unverified.study_instance_uid) is None


async def test_a_study_from_a_second_institution_shows_once_with_both_sources(
    timeline: Timeline,
) -> None:
    patient = make_pseudonym()
    first = study_of(patient, instances=2)
    second = first.model_copy(
        update={
            "sender_ura": OTHER_URA,
            "institution_name": "Tweede Ziekenhuis",
            "first_received_at": first.first_received_at + timedelta(days=1),
            "last_received_at": first.last_received_at + timedelta(days=1),
        }
    )
    await project(
        timeline,
        *decided(first),
        *decided(second),
        make_delivered(study_instance_uid=first.study_instance_uid, destination_ura="33333333"),
    )

    [entry] = await timeline.entries(patient)
    assert [s.sender_ura for s in entry.sources] == [first.sender_ura, OTHER_URA]
    assert entry.delivered_to == ("33333333",)
    # The same SOP instances from two sources: one row each (any source's copy).
    rows = await timeline.reader.instances(first.study_instance_uid)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(
        i.sop_instance_uid for i in first.instances
    )
    [series] = await timeline.reader.series(first.study_instance_uid)
    assert series.number_of_instances == 2
    by_institution = await timeline.entries(patient, institution="tweede ziekenhuis")
    assert [e.study_instance_uid for e in by_institution] == [first.study_instance_uid]


async def test_a_nul_in_an_older_events_text_is_stored_as_a_space(timeline: Timeline) -> None:
    # Ingest replaces control characters since 2026-11-28; events from before may hold a NUL,
    # which no PostgreSQL text column takes: the batch would fail, and the worker with it.
    patient = make_pseudonym()
    study = study_of(patient).model_copy(
        update={"study_description": "CT\x00thorax", "institution_name": "Oost\x00"}
    )
    await project(timeline, *decided(study))

    [entry] = await timeline.entries(patient)
    assert entry.description == "CT thorax"
    assert [s.institution_name for s in entry.sources] == ["Oost "]


async def test_a_report_is_its_own_entry_linked_to_its_images_by_accession_number(
    timeline: Timeline,
) -> None:
    patient = make_pseudonym()
    study = with_report(study_of(patient, accession_number="ACC-77"), ReportKind.STRUCTURED_REPORT)
    await project(timeline, *decided(study))

    images, report = await timeline.entries(patient)
    assert (images.kind, report.kind) == (EntryKind.IMAGES, EntryKind.REPORT)
    assert images.accession_number == report.accession_number == "ACC-77"
    assert report.study_instance_uid == images.study_instance_uid
    assert report.report_sop_instance_uid == study.reports[0].sop_instance_uid
    assert report.report_kind == "sr"
    assert [s.sender_ura for s in report.sources] == [study.sender_ura]
    only_reports = await timeline.entries(patient, kind=EntryKind.REPORT)
    assert only_reports == [report]
    # The report instance is retrievable (WADO) like the images.
    [row] = await timeline.reader.instances(
        study.study_instance_uid, sop_instance_uid=study.reports[0].sop_instance_uid
    )
    assert row.sop_class_uid == BASIC_TEXT_SR


async def test_a_new_version_waits_for_its_own_decision(timeline: Timeline) -> None:
    patient = make_pseudonym()
    v1 = study_of(patient)
    v2 = next_version(v1, instances=2)
    await timeline.publish(*decided(v1))
    async with running(timeline.worker()):
        await timeline.caught_up()
        assert [e.sources[0].version for e in await timeline.entries(patient)] == [1]
        # Announced but not yet decided: consent has not seen its new instances.
        await timeline.publish(make_study_received(study=v2))
        await timeline.caught_up()
        assert await timeline.entries(patient) == []
        await timeline.publish(*decided(v2)[1:])
        await timeline.caught_up()
        [entry] = await timeline.entries(patient)
        assert (entry.sources[0].version, entry.sources[0].number_of_instances) == (2, 5)


async def test_a_revocation_withdraws_within_seconds_and_a_later_permit_brings_it_back(
    timeline: Timeline,
) -> None:
    patient = make_pseudonym()
    v1 = study_of(patient)
    other = study_of(patient, study_date=date(2024, 1, 1))
    await timeline.publish(*decided(v1, consent="consent-1"), *decided(other, consent="consent-9"))
    async with running(timeline.worker()):
        await timeline.caught_up()
        assert len(await timeline.entries(patient)) == 2

        await timeline.publish(make_consent_revoked(patient=patient, consent_id="consent-1"))
        revoked = time.monotonic()
        async with asyncio.timeout(5):
            while len(await timeline.entries(patient)) != 1:
                await asyncio.sleep(0.05)
        withdrawn_after = time.monotonic() - revoked
        [left] = await timeline.entries(patient)
        assert left.study_instance_uid == other.study_instance_uid
        assert await timeline.reader.patient_of_study(v1.study_instance_uid) is None
        assert await timeline.reader.instances(v1.study_instance_uid) == []
        assert withdrawn_after < 5

        # A new version decided on a new consent: back on the timeline.
        v2 = next_version(v1)
        await timeline.publish(*decided(v2, consent="consent-2"))
        await timeline.caught_up()
        entries = await timeline.entries(patient)
        assert [e.study_instance_uid for e in entries] == [
            v1.study_instance_uid,
            other.study_instance_uid,
        ]
        assert entries[0].sources[0].version == 2


async def test_a_permit_naming_a_consent_revoked_earlier_is_never_shown(
    timeline: Timeline,
) -> None:
    patient = make_pseudonym()
    study = study_of(patient)
    # The revocation is consumed before the decision that names it (two topics, any order).
    await project(
        timeline,
        make_consent_revoked(patient=patient, consent_id="consent-1"),
        *decided(study, consent="consent-1"),
    )
    assert await timeline.entries(patient) == []


# --- the search -----------------------------------------------------------------------------------


async def test_filters_on_date_modality_institution_and_kind_and_pages_newest_first(
    timeline: Timeline,
) -> None:
    patient = make_pseudonym()
    ct = study_of(patient, study_date=date(2025, 1, 10), modality="CT")
    mr = study_of(patient, study_date=date(2025, 2, 10), modality="MR", study_time="080000")
    mr_later = study_of(patient, study_date=date(2025, 2, 10), modality="MR", study_time="170000")
    us = study_of(
        patient,
        study_date=date(2024, 6, 1),
        modality="US",
        sender_ura=OTHER_URA,
        institution_name="Tweede Ziekenhuis",
    )
    reported = with_report(study_of(patient, study_date=date(2024, 12, 24), modality="CR"))
    undated = study_of(patient, study_date=None, modality="XA")
    someone_else = study_of(make_pseudonym(), study_date=date(2025, 1, 10))
    events = [
        e for s in (ct, mr, mr_later, us, reported, undated, someone_else) for e in decided(s)
    ]
    await project(timeline, *events)

    def uids(entries: Sequence[TimelineEntry]) -> list[tuple[str, str]]:
        return [(e.study_instance_uid, e.kind.value) for e in entries]

    newest_first = [
        (mr_later.study_instance_uid, "images"),
        (mr.study_instance_uid, "images"),
        (ct.study_instance_uid, "images"),
        (reported.study_instance_uid, "images"),
        (reported.study_instance_uid, "report"),
        (us.study_instance_uid, "images"),
        (undated.study_instance_uid, "images"),
    ]
    assert uids(await timeline.entries(patient)) == newest_first

    pages = []
    for offset in (0, 3, 6):
        page = await timeline.reader.search(TimelineQuery(patient, count=3, offset=offset))
        assert page.total == 7
        pages += uids(page.entries)
    assert pages == newest_first
    beyond = await timeline.reader.search(TimelineQuery(patient, count=3, offset=50))
    assert (beyond.entries, beyond.total) == ([], 7)
    count_only = await timeline.reader.search(TimelineQuery(patient, count=0))
    assert (count_only.entries, count_only.total) == ([], 7)

    in_2025 = await timeline.reader.search(
        TimelineQuery(patient, date_from=date(2025, 1, 1), date_to=date(2025, 1, 31))
    )
    assert (uids(in_2025.entries), in_2025.total) == ([(ct.study_instance_uid, "images")], 1)
    from_december = await timeline.entries(patient, date_from=date(2024, 12, 1))
    assert uids(from_december) == newest_first[:5]
    until_june = await timeline.entries(patient, date_to=date(2024, 6, 30))
    assert uids(until_june) == [(us.study_instance_uid, "images")]

    mr_or_us = await timeline.entries(patient, modalities=frozenset({"MR", "US"}))
    assert uids(mr_or_us) == [newest_first[0], newest_first[1], newest_first[5]]

    by_ura = await timeline.entries(patient, institution=OTHER_URA)
    assert uids(by_ura) == [(us.study_instance_uid, "images")]
    by_name = await timeline.entries(patient, institution="testziekenhuis")
    assert len(by_name) == 6 and (us.study_instance_uid, "images") not in uids(by_name)

    reports = await timeline.reader.search(TimelineQuery(patient, kind=EntryKind.REPORT))
    assert (uids(reports.entries), reports.total) == ([(reported.study_instance_uid, "report")], 1)
    images = await timeline.reader.search(TimelineQuery(patient, kind=EntryKind.IMAGES))
    assert images.total == 6

    assert await timeline.entries(make_pseudonym()) == []


# --- idempotency and rebuild --------------------------------------------------------------------


def history(patient: str) -> list[Event]:
    """A patient's history with every hard case: versions, a second source and recipient,
    a revoked consent and a re-permit, a denial, reports, deliveries."""
    a1 = with_report(study_of(patient, study_date=date(2025, 1, 2)))
    a2 = next_version(a1)
    a_other = a1.model_copy(update={"sender_ura": OTHER_URA, "institution_name": "Tweede"})
    a_recipient = a1.model_copy(update={"recipient_ura": "44444444"})
    b1 = study_of(patient, study_date=date(2024, 5, 5), modality="MR")
    b2 = next_version(b1, instances=3)
    c1 = study_of(patient, study_date=date(2023, 3, 3))
    return [
        *decided(a1, consent="consent-1"),
        *decided(a_recipient, consent="consent-1"),
        *decided(a_other, consent="consent-1"),
        # The later version's decision before its announcement: order must not matter.
        timeline_decision(a2, consent="consent-1"),
        make_study_received(study=a2),
        *decided(b1, consent="consent-1"),
        make_consent_revoked(patient=patient, consent_id="consent-1"),
        *decided(b2, consent="consent-2"),
        *decided(c1, Decision.DENY),
        make_delivered(study_instance_uid=a1.study_instance_uid, study_version=1),
        make_delivered(study_instance_uid=a1.study_instance_uid, study_version=2),
        make_delivered(study_instance_uid=b1.study_instance_uid, destination_ura="55555555"),
    ]


async def test_replaying_the_same_events_twice_changes_nothing(timeline: Timeline) -> None:
    patients = [make_pseudonym() for _ in range(3)]
    events = [e for p in patients for e in history(p)]
    await project(timeline, *events)
    first = timeline.dump()
    assert len(first["timeline_studies"]) == 9 and len(first["timeline_revocations"]) == 3
    visible = [await timeline.entries(p) for p in patients]
    # Only b at version 2 (consent-2) is left for each patient: a's consent-1 was revoked.
    assert [len(v) for v in visible] == [1, 1, 1]

    # At-least-once: every event delivered again, in another order.
    await project(timeline, *reversed(events))
    assert timeline.dump() == first
    assert [await timeline.entries(p) for p in patients] == visible


@pytest.mark.parametrize(
    ("chunk_events", "processes"),
    [(3, 1), (5000, 2)],
    ids=["one-process-chunks-of-3", "two-processes"],
)
async def test_rebuild_from_the_topics_yields_identical_tables_and_keeps_the_access_log(
    timeline: Timeline, chunk_events: int, processes: int
) -> None:
    patients = [make_pseudonym() for _ in range(4)]
    events = [e for p in patients for e in history(p)]
    worker = timeline.worker()
    await timeline.publish(*events)
    async with running(worker):
        await timeline.caught_up()
        with pytest.raises(RebuildRefused, match="stop the projection worker"):
            await rebuild(
                timeline.settings, group=timeline.group, rename=timeline.names, progress=print
            )
    before = timeline.dump()
    assert sum(len(rows) for rows in before.values()) > 50
    with psycopg.connect(timeline.dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO access_log (event_id, occurred_at, event_type, action, outcome, "
            "organisation_ura, access_point) VALUES (gen_random_uuid(), now(), "
            "'timeline-search', 'query', 'allowed', '12345678', 'POST /x')"
        )

    lines: list[str] = []
    report = await rebuild(
        timeline.settings,
        group=timeline.group,
        rename=timeline.names,
        progress=lines.append,
        chunk_events=chunk_events,
        processes=processes,
    )

    assert timeline.dump() == before
    assert report.events == len(events)
    assert report.revocations == len(patients)
    assert report.poison == 0
    assert (report.sources, report.studies) == (
        len(before["timeline_sources"]),
        len(before["timeline_studies"]),
    )
    assert f"loading with {processes} process(es)" in lines
    assert lines[-1].startswith(f"done: {len(events)} events")
    assert "new tables vacuumed and analysed and the replaced ones dropped" in lines[-1]
    with psycopg.connect(timeline.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM access_log").fetchone() == (1,)
        assert load_tables(conn) == []
        # The swapped-in tables were vacuumed and analysed: the planner has their statistics,
        # and autovacuum has nothing left to do on them (a later swap would wait for it to
        # give way). How many pages the vacuum could mark all-visible depends on the other
        # sessions' snapshots at that moment, so it is not asserted.
        settled = conn.execute(
            "SELECT relname FROM pg_stat_user_tables WHERE relname = ANY(%s) "
            "AND schemaname = current_schema() AND last_analyze IS NOT NULL "
            "AND last_vacuum IS NOT NULL ORDER BY 1",
            (list(PROJECTION_TABLES),),
        ).fetchall()
        assert [name for (name,) in settled] == sorted(PROJECTION_TABLES)

    # The worker continues after the rebuild: only what is new is applied.
    extra = study_of(patients[0], study_date=date(2026, 1, 1))
    await project(timeline, *decided(extra, consent="consent-2"))
    assert (await timeline.entries(patients[0]))[0].study_instance_uid == extra.study_instance_uid


async def test_a_rebuild_that_fails_before_it_replaces_the_tables_changes_nothing(
    timeline: Timeline,
) -> None:
    patient = make_pseudonym()
    await project(timeline, *history(patient))
    before = timeline.dump()
    # Published while the worker is stopped: the rebuild reads it, the worker has not.
    late = study_of(patient, study_date=date(2026, 2, 2))
    await timeline.publish(*decided(late, consent="consent-2"))

    def progress(line: str) -> None:
        if "events loaded" in line:  # after the load, before the build and the swap
            raise RuntimeError("stopped by the operator")

    with pytest.raises(RuntimeError, match="stopped by the operator"):
        await rebuild(
            timeline.settings, group=timeline.group, rename=timeline.names, progress=progress
        )

    assert_unchanged(timeline, before)
    # Nor did the group move: the worker still has the late study to apply.
    await project(timeline)
    assert (await timeline.entries(patient))[0].study_instance_uid == late.study_instance_uid


async def test_a_second_rebuild_is_refused_while_one_runs(timeline: Timeline) -> None:
    await project(timeline, *history(make_pseudonym()))
    before = timeline.dump()
    async with Reload(timeline.dsn):  # what a running rebuild holds
        with pytest.raises(RebuildRefused, match="another timeline rebuild is running"):
            await rebuild(
                timeline.settings, group=timeline.group, rename=timeline.names, progress=print
            )
        with psycopg.connect(timeline.dsn) as conn:  # the running one's are left alone
            assert len(load_tables(conn)) == 12
    assert timeline.dump() == before


async def test_a_rebuild_missing_a_topic_is_refused_before_it_loads(timeline: Timeline) -> None:
    # Left out, the revocations' topic would bring every withdrawn study back.
    await project(timeline, *history(make_pseudonym()))
    before = timeline.dump()
    revoked = ConsentRevoked.topic
    names = {**timeline.names, revoked: f"{timeline.names[revoked]}-gone"}
    with pytest.raises(RebuildRefused, match=r"-gone could not be described \(UnknownTopic"):
        await rebuild(timeline.settings, group=timeline.group, rename=names, progress=print)
    assert_unchanged(timeline, before)


async def test_a_rebuild_says_so_when_the_replaced_tables_were_not_dropped(
    timeline: Timeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After the swap nothing waits for the drop, so its failure fails nothing; but the
    # rebuild must not claim it happened.
    await project(timeline, *history(make_pseudonym()))
    before = timeline.dump()

    drop = Reload._drop_schema
    calls: list[int] = []

    async def refused_after_the_swap(self: Reload) -> None:
        calls.append(1)
        if len(calls) > 1:  # the first is the start's, of what a dead rebuild left
            raise psycopg.errors.LockNotAvailable("the replaced tables are in use")
        await drop(self)

    lines: list[str] = []
    with monkeypatch.context() as patched:
        patched.setattr(Reload, "_drop_schema", refused_after_the_swap)
        await rebuild(
            timeline.settings, group=timeline.group, rename=timeline.names, progress=lines.append
        )
    assert len(calls) == 2
    assert "the replaced tables NOT dropped" in lines[-1]
    assert "new tables vacuumed and analysed" in lines[-1]
    assert timeline.dump() == before
    # The next rebuild drops what this one left.
    await rebuild(timeline.settings, group=timeline.group, rename=timeline.names, progress=print)
    with psycopg.connect(timeline.dsn) as conn:
        assert load_tables(conn) == []


async def test_a_rebuild_is_refused_if_the_worker_committed_while_it_ran(
    timeline: Timeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker started and stopped again during the load applied what it read to the live
    # tables, which the swap would replace: the rebuild refuses and changes nothing.
    await project(timeline, *history(make_pseudonym()))
    before = timeline.dump()
    build = Reload.build

    async def worker_ran_meanwhile(self: Reload) -> None:
        tp = TopicPartition(timeline.names[TOPICS[0]], 0)
        await _commit_offsets(
            timeline.settings.kafka.bootstrap_list, timeline.group_id, {tp: 10**6}
        )
        await build(self)

    monkeypatch.setattr(Reload, "build", worker_ran_meanwhile)
    with pytest.raises(RebuildRefused, match="committed offsets while the rebuild ran"):
        await rebuild(
            timeline.settings, group=timeline.group, rename=timeline.names, progress=print
        )
    assert_unchanged(timeline, before)


def assert_unchanged(timeline: Timeline, before: dict[str, list[str]]) -> None:
    """A refused or failed rebuild changed nothing: the live tables as they were, and no
    rebuild schema left behind."""
    assert timeline.dump() == before
    with psycopg.connect(timeline.dsn) as conn:
        assert load_tables(conn) == []


def load_tables(conn: psycopg.Connection[Any]) -> list[str]:
    """The tables of a rebuild's schema: its four load tables and the eight it builds."""
    return [
        r[0]
        for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (SCHEMA,)
        )
    ]


async def test_a_rebuild_skips_a_poison_record_as_the_projection_does(
    timeline: Timeline, kafka_settings: KafkaSettings
) -> None:
    patient = make_pseudonym()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_list)
    await producer.start()
    try:
        await producer.send_and_wait(
            timeline.names[ConsentChecked.topic],
            b"{not json",
            key=b"x",
            headers=[("schema", ConsentChecked.schema_name.encode())],
        )
    finally:
        await producer.stop()
    await project(timeline, *history(patient))
    projected = timeline.dump()
    assert len(projected["timeline_studies"]) == 3

    report = await rebuild(
        timeline.settings, group=timeline.group, rename=timeline.names, progress=print
    )

    assert report.poison == 1
    assert timeline.dump() == projected
