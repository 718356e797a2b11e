"""Study assembly rules: when a study is stable, what study-received says, which versions follow."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, timedelta

import pytest

from services.ingest.domain.assembly import (
    COMPLETION_QUIET,
    Added,
    AssemblyKey,
    StudyAssemblies,
    add_instance,
    announce,
    complete_request,
    confirmed_completion,
    due,
    key_of,
    next_due_at,
    read_records,
    record_announced,
    record_row_key,
    seen_row_key,
    study_of_row_key,
    study_received_id,
    study_row_key,
    take_in,
)
from shared.events import (
    BsnStatus,
    InstanceStored,
    PatientRef,
    ReportKind,
    StudyReceived,
    Urgency,
)
from tests.factories import (
    RECIPIENT_URA,
    SENDER_URA,
    T0,
    make_completing_request_stored,
    make_instance_ref,
    make_patient,
)
from tests.ingest_factories import (
    BASIC_TEXT_SR,
    ENCAPSULATED_PDF,
    AssemblyTable,
    copy_of,
    make_study_instances,
)

STABLE = timedelta(seconds=15)
OTHER_RECIPIENT = "11112222"


def seconds(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def fold(
    events: Iterable[InstanceStored], at: float = 0.0, table: AssemblyTable | None = None
) -> AssemblyTable:
    """The table after the assembly agent took in ``events`` at ``at`` seconds."""
    table = AssemblyTable() if table is None else table
    for event in events:
        take_in(table, event, seconds(at))
    return table


def announce_at(table: AssemblyTable, key: AssemblyKey, at: float) -> StudyReceived:
    """What the timer publishes for ``key`` at ``at`` (the table is not written)."""
    state = table.state(key.study_instance_uid)
    assembly = state.assembly(key)
    assert assembly is not None
    return announce(state, key, read_records(table, assembly), seconds(at), "tests")[0]


def acknowledge(table: AssemblyTable, event: StudyReceived) -> None:
    """What the agent on study-received does with an announcement consumed back."""
    state = table.state(event.study.study_instance_uid)
    recorded = record_announced(state, event.study, event.occurred_at)
    if recorded is not state:
        table[study_row_key(event.study.study_instance_uid)] = recorded.to_bytes()


def announce_only(table: AssemblyTable, at: float) -> StudyReceived:
    """The one due assembly announced at ``at`` and the announcement recorded."""
    [key] = due(table.state(), seconds(at), STABLE)
    event = announce_at(table, key, at)
    acknowledge(table, event)
    return event


# --- stability ------------------------------------------------------------------------------------


def test_a_study_is_due_once_no_new_instance_came_for_the_stable_age() -> None:
    events = make_study_instances(3)
    state = fold(events, at=0).state()

    assert due(state, seconds(14.999), STABLE) == []
    assert due(state, seconds(15), STABLE) == [key_of(events[0])]
    assert next_due_at(state, STABLE) == seconds(15)


def test_every_new_instance_restarts_the_stable_age() -> None:
    first, second = make_study_instances(2)
    table = fold([first], at=0)
    state = fold([second], at=10, table=table).state()

    assert due(state, seconds(20), STABLE) == []
    assert due(state, seconds(25), STABLE) == [key_of(first)]


def test_stability_runs_on_the_assemblers_clock_not_on_when_ingest_stored_the_instance() -> None:
    # Consumed 60 s after ingest stored it (consumer lag): not stable at once.
    [event] = make_study_instances(1, occurred_at=seconds(-60))
    table = fold([event], at=0)

    assert due(table.state(), seconds(1), STABLE) == []
    event_out = announce_only(table, at=15)
    assert event_out.study.first_received_at == seconds(-60)


def test_a_study_marked_complete_is_announced_after_a_short_quiet_period_not_the_stable_age() -> (
    None
):
    *rest, last = make_study_instances(3)
    table = fold(rest, at=0)
    state = fold([copy_of(last, completes_study=True)], at=1, table=table).state()

    assert due(state, seconds(1), STABLE) == []  # the rest of the request may still be arriving
    assert due(state, seconds(1) + COMPLETION_QUIET, STABLE) == [key_of(last)]


def test_every_instance_of_the_completing_request_keeps_the_quiet_period_going() -> None:
    flagged = make_study_instances(3, completes_study=True)
    table = fold(flagged[:1], at=0)
    state = fold(flagged[1:], at=1.5, table=table).state()

    assert due(state, seconds(2.5), STABLE) == []
    assert due(state, seconds(1.5) + COMPLETION_QUIET, STABLE) != []


def test_an_instance_after_the_completion_mark_cancels_the_shortcut() -> None:
    flagged, later = make_study_instances(2)
    table = fold([copy_of(flagged, completes_study=True)], at=0)
    state = fold([later], at=1, table=table).state()

    assert due(state, seconds(10), STABLE) == []
    assert due(state, seconds(16), STABLE) == [key_of(later)]


def test_the_completion_quiet_period_never_exceeds_the_stable_age() -> None:
    [event] = make_study_instances(1, completes_study=True)
    state = fold([event], at=0).state()

    assert due(state, seconds(0.5), timedelta(seconds=0.5)) == [key_of(event)]


def test_the_completion_quiet_period_is_whatever_the_worker_is_configured_with() -> None:
    [event] = make_study_instances(1, completes_study=True)
    state = fold([event], at=0).state()
    quiet = timedelta(seconds=5)

    assert due(state, seconds(4.9), STABLE, quiet) == []
    assert due(state, seconds(5), STABLE, quiet) == [key_of(event)]
    assert next_due_at(state, STABLE, quiet) == seconds(5)


# --- duplicates and conflicts ---------------------------------------------------------------------


def request_end(table: AssemblyTable, event: InstanceStored, at: float) -> StudyAssemblies:
    """The study row after the end of ``event``'s completing request was taken in at ``at``."""
    mark = make_completing_request_stored(
        study_instance_uid=event.study_instance_uid,
        sender_ura=event.sender_ura,
        recipient_ura=event.recipient_ura,
    )
    state = complete_request(table.state(event.study_instance_uid), mark, seconds(at))
    assert state is not None
    table[study_row_key(event.study_instance_uid)] = state.to_bytes()
    return state


def test_the_end_of_a_completing_request_makes_the_study_due_at_once_without_a_quiet_period() -> (
    None
):
    flagged = make_study_instances(3, completes_study=True)
    table = fold(flagged, at=0)
    assert due(table.state(), seconds(0.1), STABLE) == []  # quiet period still running

    state = request_end(table, flagged[0], at=0.1)

    assert due(state, seconds(0.1), STABLE) == [key_of(flagged[0])]
    assert next_due_at(state, STABLE) == seconds(0.1)
    assembly = state.assembly(key_of(flagged[0]))
    assert assembly is not None and confirmed_completion(assembly) == seconds(0.1)


def test_an_instance_after_the_end_of_the_completing_request_brings_back_the_usual_rules() -> None:
    first, later = make_study_instances(2)
    table = fold([copy_of(first, completes_study=True)], at=0)
    request_end(table, first, at=0.2)
    state = fold([later], at=1, table=table).state()

    assert due(state, seconds(1), STABLE) == []
    assert due(state, seconds(16), STABLE) == [key_of(later)]
    assembly = state.assembly(key_of(later))
    assert assembly is not None and confirmed_completion(assembly) is None


def test_the_end_of_a_request_with_nothing_new_announces_nothing() -> None:
    [event] = make_study_instances(1, completes_study=True)
    table = fold([event], at=0)
    announce_only(table, at=15)  # everything announced already

    state = request_end(table, event, at=20)

    assert due(state, seconds(20), STABLE) == []
    assert next_due_at(state, STABLE) is None


def test_the_end_of_a_request_for_an_assembly_never_taken_in_changes_nothing() -> None:
    [event] = make_study_instances(1)
    table = fold([event], at=0)
    state = table.state()
    other = make_completing_request_stored(
        study_instance_uid=event.study_instance_uid, recipient_ura=OTHER_RECIPIENT
    )

    assert complete_request(state, other, seconds(1)) is state
    assert complete_request(None, other, seconds(1)) is None


def test_a_duplicate_instance_changes_nothing_and_does_not_postpone_stability() -> None:
    first, second = make_study_instances(2)
    table = fold([first, second], at=0)
    written = len(table.changelog)

    outcome = take_in(table, copy_of(first), seconds(10)).outcome

    assert outcome is Added.DUPLICATE
    assert len(table.changelog) == written  # not a single row written
    assert due(table.state(), seconds(15), STABLE) == [key_of(first)]


def test_a_duplicate_carrying_a_completion_mark_is_still_a_duplicate() -> None:
    [event] = make_study_instances(1)
    table = fold([event], at=0)
    state = table.state()
    seen = table.seen(event)

    again = add_instance(
        state, copy_of(event, completes_study=True, sender_note="ignore me"), seconds(1), seen
    )

    assert again.state is state
    assert (again.outcome, again.record) == (Added.DUPLICATE, None)
    assert due(again.state, seconds(5), STABLE) == []


def test_the_same_sop_instance_with_other_bytes_keeps_the_first_copy_and_counts_a_conflict() -> (
    None
):
    [event] = make_study_instances(1)
    table = fold([event], at=0)
    other_bytes = event.instance.model_copy(update={"sha256": "0" * 64, "size": 1})

    outcome = take_in(table, copy_of(event, instance=other_bytes), seconds(10)).outcome

    assembly = table.state().assembly(key_of(event))
    assert outcome is Added.CONFLICT
    assert assembly is not None and assembly.conflicts == 1
    assert due(table.state(), seconds(15), STABLE) == [key_of(event)]  # not postponed
    study = announce_at(table, key_of(event), 15).study
    assert study.instances == (event.instance,)


# --- versions -------------------------------------------------------------------------------------


def test_version_1_lists_every_instance_as_new() -> None:
    events = make_study_instances(3)
    table = fold(events, at=0)
    event = announce_only(table, at=15)

    study = event.study
    assert study.version == 1
    assert {r.sop_instance_uid for r in study.instances} == {
        e.instance.sop_instance_uid for e in events
    }
    assert set(study.new_sop_instance_uids) == {e.instance.sop_instance_uid for e in events}
    assert study.number_of_instances == 3
    assert due(table.state(), seconds(100), STABLE) == []
    assert next_due_at(table.state(), STABLE) is None


def test_a_late_instance_makes_version_2_with_the_full_manifest_and_only_itself_as_new() -> None:
    *early, late = make_study_instances(4)
    table = fold(early, at=0)
    announce_only(table, at=15)

    fold([late], at=100, table=table)
    assert due(table.state(), seconds(114), STABLE) == []
    event = announce_only(table, at=115)

    study = event.study
    assert study.version == 2
    assert study.new_sop_instance_uids == (late.instance.sop_instance_uid,)
    assert len(study.instances) == 4
    assert study.last_received_at == late.occurred_at
    assert table.state().assembly(key_of(late)).announced_version == 2  # type: ignore[union-attr]


def test_recording_a_version_again_or_an_older_one_changes_nothing() -> None:
    events = make_study_instances(2)
    table = fold(events, at=0)
    event = announce_only(table, at=15)
    announced = table.state()

    assert record_announced(announced, event.study, seconds(16)) is announced


def test_only_the_first_announcement_of_a_version_counts() -> None:
    # v1 was announced, then (after a crash, before it was recorded) announced again with one
    # more instance under the same event id. Consumers keep the first; the extra one must
    # therefore still come as new in version 2.
    first, extra = make_study_instances(2)
    table = fold([first], at=0)
    v1 = announce_at(table, key_of(first), 15)
    fold([extra], at=16, table=table)
    v1_again = announce_at(table, key_of(first), 40)
    assert v1_again.event_id == v1.event_id and v1_again.study.version == 1

    acknowledge(table, v1)
    acknowledge(table, v1_again)

    v2 = announce_only(table, at=40)
    assert v2.study.version == 2
    assert v2.study.new_sop_instance_uids == (extra.instance.sop_instance_uid,)


def test_announcing_without_anything_new_is_refused() -> None:
    events = make_study_instances(1)
    table = fold(events, at=0)
    announce_only(table, at=15)

    with pytest.raises(ValueError, match="nothing new"):
        announce_at(table, key_of(events[0]), 20)


def test_event_ids_are_derived_from_study_sender_recipient_and_version() -> None:
    events = make_study_instances(2)
    table = fold(events, at=0)
    key = key_of(events[0])

    once = announce_at(table, key, 15)
    twice = announce_at(table, key, 99)

    assert once.event_id == twice.event_id == study_received_id(key, 1)
    assert study_received_id(key, 2) != study_received_id(key, 1)
    assert study_received_id(key._replace(recipient_ura=OTHER_RECIPIENT), 1) != once.event_id
    assert once.correlation_id == events[0].correlation_id


# --- assemblies -----------------------------------------------------------------------------------


def test_one_study_sent_to_two_recipients_is_two_assemblies_announced_separately() -> None:
    study_uid = make_instance_ref().series_instance_uid  # any fresh UID
    to_first = make_study_instances(2, study_instance_uid=study_uid)
    to_second = make_study_instances(1, study_instance_uid=study_uid, recipient_ura=OTHER_RECIPIENT)
    table = fold([*to_first, *to_second], at=0)

    keys = due(table.state(), seconds(15), STABLE)
    assert keys == sorted(
        [
            AssemblyKey(study_uid, SENDER_URA, RECIPIENT_URA),
            AssemblyKey(study_uid, SENDER_URA, OTHER_RECIPIENT),
        ]
    )
    first = announce_at(table, keys[0], 15)
    acknowledge(table, first)
    assert due(table.state(), seconds(15), STABLE) == [keys[1]]
    second = announce_at(table, keys[1], 15)
    acknowledge(table, second)

    counts = {e.study.recipient_ura: len(e.study.instances) for e in (first, second)}
    assert counts == {RECIPIENT_URA: 2, OTHER_RECIPIENT: 1}
    assert first.event_id != second.event_id
    assert due(table.state(), seconds(100), STABLE) == []


def test_a_state_belongs_to_one_study() -> None:
    state = fold(make_study_instances(1), at=0).state()

    with pytest.raises(ValueError, match="another study"):
        add_instance(state, make_study_instances(1)[0], seconds(1), None)


def test_the_state_survives_its_json_round_trip_as_a_table_value() -> None:
    events = make_study_instances(3, urgency=Urgency.URGENT, completes_study=True)
    table = fold(events, at=0)

    restored = AssemblyTable.restored(table.changelog)

    assert StudyAssemblies.from_bytes(table.state().to_bytes()) == table.state()
    assert announce_only(restored, at=15) == announce_only(table, at=15)


# --- what is stored: linear in the study, bounded per instance ------------------------------------


def test_every_row_of_a_study_is_keyed_by_its_study_instance_uid_first() -> None:
    # What keeps all of a study's rows in its partition (see the entrypoint's notes).
    events = make_study_instances(3)
    table = fold(events, at=0)
    acknowledge(table, announce_at(table, key_of(events[0]), 15))

    uid = events[0].study_instance_uid
    assert {study_of_row_key(key) for key, _ in table.changelog} == {uid}
    assert study_row_key(uid) == uid.encode()  # exactly the message key of its events


def test_taking_in_an_instance_writes_the_same_few_rows_however_large_the_study_already_is() -> (
    None
):
    events = make_study_instances(1001)
    table = fold(events[:1], at=0)
    mark = len(table.changelog)
    fold(events[1:2], at=0, table=table)
    second = table.written_since(mark)
    fold(events[2:1000], at=0, table=table)

    mark = len(table.changelog)
    fold(events[1000:], at=0, table=table)

    assert len(table.changelog) - mark == 3  # the record, the seen mark, the study row
    # The same size give or take digits (the instance number, UIDs): no row carries the study's
    # other instances, which would be some 500 kB here.
    assert table.written_since(mark) <= second + 32
    assert table.written_since(mark) < 2_500


def test_recording_an_announcement_writes_only_the_study_row_however_many_instances_it_lists() -> (
    None
):
    events = make_study_instances(500)
    table = fold(events, at=0)
    event = announce_at(table, key_of(events[0]), 15)
    mark = len(table.changelog)

    acknowledge(table, event)

    assert [key for key, _ in table.changelog[mark:]] == [
        study_row_key(events[0].study_instance_uid)
    ]
    assert table.written_since(mark) < 2_500


def test_instances_are_numbered_in_arrival_order_and_a_version_announces_up_to_its_count() -> None:
    *early, late = make_study_instances(3)
    table = fold(early, at=0)
    announce_only(table, at=15)
    fold([late], at=20, table=table)

    key = key_of(late)
    assembly = table.state().assembly(key)
    assert assembly is not None
    assert (assembly.instances, assembly.announced_instances) == (3, 2)
    assert [r.instance for r in read_records(table, assembly)] == [e.instance for e in early] + [
        late.instance
    ]
    assert table.seen(late) is not None and table.seen(late).number == 3  # type: ignore[union-attr]


def test_the_study_row_keeps_at_most_two_patients_which_already_make_the_patient_conflicting() -> (
    None
):
    study_uid = make_instance_ref().sop_instance_uid
    events = [
        e
        for _ in range(5)
        for e in make_study_instances(1, study_instance_uid=study_uid, patient=make_patient())
    ]
    table = fold(events, at=0)

    assembly = table.state().assembly(key_of(events[0]))
    assert assembly is not None and assembly.patients == (events[0].patient, events[1].patient)
    assert announce_only(table, at=15).study.patient.bsn_status is BsnStatus.CONFLICTING


@pytest.mark.parametrize("rows_kept", [0, 1, 2], ids=["none", "record", "record-and-seen"])
def test_a_crash_part_way_through_an_instances_rows_is_repaired_when_it_is_replayed(
    rows_kept: int,
) -> None:
    # A crash keeps a prefix of the changelog: of the replayed instance's three rows (record,
    # seen, study row) none, one or two survived, and its source offset was not committed.
    first, second, third = make_study_instances(3)
    table = fold([first], at=0)
    mark = len(table.changelog)
    fold([second], at=1, table=table)

    restored = AssemblyTable.restored(table.changelog[: mark + rows_kept])
    assert take_in(restored, second, seconds(2)).outcome is Added.NEW
    assert take_in(restored, second, seconds(2)).outcome is Added.DUPLICATE
    fold([third], at=3, table=restored)

    study = announce_only(restored, at=30).study
    assert {r.sop_instance_uid for r in study.instances} == {
        e.instance.sop_instance_uid for e in (first, second, third)
    }
    assembly = restored.state().assembly(key_of(first))
    assert assembly is not None and assembly.instances == 3


def test_a_missing_record_row_is_an_error_not_a_shorter_manifest() -> None:
    events = make_study_instances(3)
    table = fold(events, at=0)
    del table[record_row_key(key_of(events[0]), 2)]

    assembly = table.state().assembly(key_of(events[0]))
    assert assembly is not None
    with pytest.raises(LookupError, match="record row 2"):
        read_records(table, assembly)


def test_a_seen_row_is_found_by_the_sop_instance_uid_of_its_assembly() -> None:
    [event] = make_study_instances(1)
    table = fold([event], at=0)
    other = key_of(event)._replace(recipient_ura=OTHER_RECIPIENT)

    assert seen_row_key(key_of(event), event.instance.sop_instance_uid) in table
    assert seen_row_key(other, event.instance.sop_instance_uid) not in table


# --- what study-received says ---------------------------------------------------------------------


def test_instances_that_name_different_patients_make_the_patient_conflicting() -> None:
    one, two = make_study_instances(2)
    table = fold([one, copy_of(two, patient=make_patient())], at=0)

    patient = announce_only(table, at=15).study.patient
    assert patient == PatientRef(pseudonym=None, bsn_status=BsnStatus.CONFLICTING)


def test_a_verified_bsn_next_to_an_instance_without_one_is_conflicting() -> None:
    one, two = make_study_instances(2)
    absent = make_patient(BsnStatus.ABSENT)
    table = fold([one, copy_of(two, patient=absent)], at=0)

    assert announce_only(table, at=15).study.patient.bsn_status is BsnStatus.CONFLICTING


def test_instances_that_agree_give_their_patient() -> None:
    patient = make_patient()
    table = fold(make_study_instances(3, patient=patient), at=0)

    assert announce_only(table, at=15).study.patient == patient


def test_structured_reports_and_encapsulated_pdfs_are_listed_as_reports() -> None:
    study_uid = make_instance_ref().sop_instance_uid
    images = make_study_instances(2, study_instance_uid=study_uid)
    [sr] = make_study_instances(1, study_instance_uid=study_uid, sop_class_uid=BASIC_TEXT_SR)
    [pdf] = make_study_instances(1, study_instance_uid=study_uid, sop_class_uid=ENCAPSULATED_PDF)
    table = fold([*images, sr, pdf], at=0)

    reports = announce_only(table, at=15).study.reports
    assert {(r.sop_instance_uid, r.kind) for r in reports} == {
        (sr.instance.sop_instance_uid, ReportKind.STRUCTURED_REPORT),
        (pdf.instance.sop_instance_uid, ReportKind.PDF),
    }


def test_urgency_is_the_highest_any_instance_had() -> None:
    study_uid = make_instance_ref().sop_instance_uid
    events = [
        *make_study_instances(1, study_instance_uid=study_uid, urgency=Urgency.URGENT),
        *make_study_instances(1, study_instance_uid=study_uid, urgency=Urgency.EMERGENCY),
        *make_study_instances(1, study_instance_uid=study_uid, urgency=Urgency.ROUTINE),
    ]
    table = fold(events, at=0)

    assert announce_only(table, at=15).study.urgency is Urgency.EMERGENCY


def test_the_latest_non_empty_sender_note_wins() -> None:
    a, b, c = make_study_instances(3)
    table = fold([copy_of(a, sender_note="first"), copy_of(b, sender_note="second"), c], at=0)

    assert announce_only(table, at=15).study.sender_note == "second"


def test_study_attributes_come_from_the_first_instance_that_has_them() -> None:
    a, b = make_study_instances(2)
    without = copy_of(
        a, accession_number=None, study_date=None, study_description=None, study_time=None
    )
    full = copy_of(
        b,
        accession_number="ACC9",
        study_date=date(2024, 1, 2),
        study_description="MRI knee",
        study_time="101010",
        institution_name="Ziekenhuis B",
    )
    later = copy_of(full, instance=make_instance_ref(), accession_number="OTHER")
    study = announce_only(fold([without, full, later], at=0), at=15).study

    assert (study.accession_number, study.study_date, study.study_description) == (
        "ACC9",
        date(2024, 1, 2),
        "MRI knee",
    )
    assert (study.study_time, study.institution_name) == ("101010", "Ziekenhuis B")


def test_series_summaries_modalities_and_the_manifest_order_do_not_depend_on_arrival() -> None:
    study_uid = make_instance_ref().sop_instance_uid
    ct = make_study_instances(
        3, study_instance_uid=study_uid, modality="CT", series_number=2, series_description="ax"
    )
    sr = make_study_instances(
        1,
        study_instance_uid=study_uid,
        modality="SR",
        series_number=1,
        sop_class_uid=BASIC_TEXT_SR,
    )
    forward = announce_only(fold([*ct, *sr], at=0), at=15).study
    backward = announce_only(fold([*sr, *reversed(ct)], at=0), at=15).study

    assert forward.instances == backward.instances
    assert forward.series == backward.series
    assert [s.series_number for s in forward.series] == [1, 2]
    assert [(s.modality, s.number_of_instances) for s in forward.series] == [("SR", 1), ("CT", 3)]
    assert forward.series[1].series_description == "ax"
    assert forward.modalities == ("CT", "SR")
    assert forward.new_sop_instance_uids == tuple(r.sop_instance_uid for r in forward.instances)


def test_first_and_last_received_are_when_ingest_stored_the_instances() -> None:
    study_uid = make_instance_ref().sop_instance_uid
    late = make_study_instances(1, study_instance_uid=study_uid, occurred_at=seconds(30))
    early = make_study_instances(1, study_instance_uid=study_uid, occurred_at=seconds(-5))
    study = announce_only(fold([*late, *early], at=0), at=15).study

    assert (study.first_received_at, study.last_received_at) == (seconds(-5), seconds(30))
