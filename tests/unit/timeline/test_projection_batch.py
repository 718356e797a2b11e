"""The projection's batch fold: per natural key the maximum of a total order, whatever the order."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from services.timeline.adapters.store import (
    ProjectionBatch,
    decision_key,
    number_of_images,
    snapshot_key,
    snapshot_row,
)
from shared.events import (
    Basis,
    ConsentChecked,
    Decision,
    Event,
    Purpose,
    ReportKind,
    ReportRef,
    StudySnapshot,
)
from tests.factories import (
    T0,
    make_consent_checked,
    make_consent_revoked,
    make_delivered,
    make_study,
    make_study_received,
)


def timeline(
    study: StudySnapshot, decision: Decision = Decision.PERMIT, **kw: object
) -> ConsentChecked:
    basis = Basis.EXPLICIT_CONSENT if decision is Decision.PERMIT else Basis.NO_EXPLICIT_CONSENT
    fields: dict[str, object] = {"decided_by": "consent-1", **kw}
    return make_consent_checked(
        study=study, purpose=Purpose.TIMELINE, decision=decision, basis=basis, **fields
    )


def version(study: StudySnapshot, n: int, **kw: object) -> StudySnapshot:
    later = study.last_received_at + timedelta(minutes=n)
    return study.model_copy(update={"version": n, "last_received_at": later, **kw})


def folded(events: list[Event]) -> ProjectionBatch:
    batch = ProjectionBatch()
    for event in events:
        batch.add(event)
    return batch


def test_a_source_keeps_its_newest_snapshot_and_decision_in_any_order() -> None:
    v1 = make_study()
    v2, v3 = version(v1, 2), version(v1, 3)
    events: list[Event] = [
        make_study_received(study=v1),
        timeline(v1),
        make_study_received(study=v3),
        timeline(v2, Decision.DENY),
        make_study_received(study=v2),
        timeline(v3),
    ]
    key = (v1.study_instance_uid, v1.sender_ura)
    rng = random.Random(3)
    for _ in range(20):
        rng.shuffle(events)
        batch = folded(events)
        assert batch.snapshots[key].version == 3
        assert batch.decisions[key].study.version == 3
        assert batch.decisions[key].decision is Decision.PERMIT


def test_folding_an_event_twice_changes_nothing() -> None:
    study = make_study()
    events: list[Event] = [
        make_study_received(study=study),
        timeline(study),
        make_consent_revoked(patient=study.patient.pseudonym, consent_id="consent-1"),
        make_delivered(study_instance_uid=study.study_instance_uid),
    ]
    assert folded(events) == folded(events + events)


def test_delivery_decisions_are_ignored_and_timeline_decisions_projected() -> None:
    study = make_study()
    batch = ProjectionBatch()
    delivery = make_consent_checked(study=study, purpose=Purpose.DELIVERY)
    assert batch.add(delivery) == "ignored"
    assert not batch
    assert batch.add(timeline(study)) == "projected"
    assert list(batch.decisions) == [(study.study_instance_uid, study.sender_ura)]


def test_at_the_same_snapshot_a_deny_outranks_a_permit() -> None:
    study = make_study()
    permit, deny = timeline(study), timeline(study, Decision.DENY)
    assert decision_key(deny) > decision_key(permit)
    key = (study.study_instance_uid, study.sender_ura)
    assert folded([permit, deny]).decisions[key].decision is Decision.DENY
    assert folded([deny, permit]).decisions[key].decision is Decision.DENY


def test_two_assemblies_of_one_version_are_ordered_by_their_last_instance_then_recipient() -> None:
    first = make_study(recipient_ura="11111111")
    later = first.model_copy(
        update={
            "recipient_ura": "00000001",
            "last_received_at": first.last_received_at + timedelta(seconds=1),
        }
    )
    same_time = first.model_copy(update={"recipient_ura": "99999999"})
    assert snapshot_key(later) > snapshot_key(first)
    assert snapshot_key(same_time) > snapshot_key(first)


def test_a_revocation_keeps_its_earliest_time_and_a_delivery_its_latest_version() -> None:
    patient = make_study().patient.pseudonym
    assert patient is not None
    early = make_consent_revoked(patient=patient, consent_id="c", occurred_at=T0)
    late = make_consent_revoked(patient=patient, consent_id="c", occurred_at=T0 + timedelta(days=1))
    assert folded([late, early]).revocations == {(patient, "c"): T0}

    uid = make_study().study_instance_uid
    d1 = make_delivered(study_instance_uid=uid, study_version=1, delivered_at=T0)
    d2 = make_delivered(
        study_instance_uid=uid, study_version=2, delivered_at=T0 + timedelta(hours=1)
    )
    assert folded([d2, d1]).deliveries == {
        (uid, d1.destination_ura, d1.endpoint_id): (2, d2.delivered_at)
    }


def test_reports_are_not_counted_as_images() -> None:
    study = make_study(3)
    report = study.instances[0]
    with_report = study.model_copy(
        update={
            "reports": (
                ReportRef(
                    sop_instance_uid=report.sop_instance_uid,
                    series_instance_uid=report.series_instance_uid,
                    kind=ReportKind.PDF,
                ),
            )
        }
    )
    assert number_of_images(study) == 3
    assert number_of_images(with_report) == 2


def test_an_event_the_timeline_does_not_project_is_refused() -> None:
    from tests.factories import make_route_failed

    with pytest.raises(TypeError, match="does not project"):
        ProjectionBatch().add(make_route_failed())


@pytest.mark.parametrize(
    ("stored", "row"),
    [("10:15:00", "101500"), ("10:15:00.5", "101500.5"), ("1015", "1015"), (None, None)],
)
def test_a_study_time_goes_into_the_read_model_in_its_standard_form(
    stored: str | None, row: str | None
) -> None:
    # Events from before ingest normalised it may carry an ACR-NEMA time, which would sort
    # after every standard one as text.
    study = make_study().model_copy(update={"study_time": stored})

    assert snapshot_row(study)[9] == row
