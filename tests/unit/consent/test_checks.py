"""The consent check of a study version: both purposes, remembered rows, stable event ids."""

from __future__ import annotations

from datetime import UTC, date, datetime

from services.consent.domain.checks import (
    DEFAULT_PROVIDER_CATEGORIES,
    StudyDecisions,
    checked_events,
    decide_study,
    decision_day,
    provider_category,
    study_key,
)
from services.consent.domain.registry import replay
from shared.events.consent import Basis, Decision, Provision, Purpose
from tests.factories import make_consent_registered, make_study, make_study_received

RECEIVED = make_study_received(occurred_at=datetime(2025, 6, 1, 12, 0, tzinfo=UTC))
PATIENT = RECEIVED.study.patient.pseudonym


def test_a_study_without_registry_is_delivered_on_presumed_referral_and_kept_off_the_timeline():
    decisions = decide_study(RECEIVED, None, recipient_category="RPZAC104", data_category="GGC002")
    assert (decisions.delivery.decision, decisions.delivery.basis) == (
        Decision.PERMIT,
        Basis.PRESUMED_REFERRAL,
    )
    assert (decisions.timeline.decision, decisions.timeline.basis) == (
        Decision.DENY,
        Basis.NO_EXPLICIT_CONSENT,
    )


def test_an_explicit_consent_lets_the_study_onto_the_timeline_and_names_itself():
    registry = replay(
        PATIENT,
        [make_consent_registered(patient=PATIENT, consent_id="c-1", provider_category=None)],
    )
    decisions = decide_study(RECEIVED, registry, recipient_category=None, data_category="GGC002")
    assert decisions.timeline.decision is Decision.PERMIT
    assert decisions.timeline.decided_by == "c-1"
    assert decisions.timeline.registry_version == 1


def test_an_objection_for_the_recipient_refuses_the_delivery():
    registry = replay(
        PATIENT,
        [
            make_consent_registered(
                patient=PATIENT,
                consent_id="o-1",
                provision=Provision.DENY,
                provider_category=None,
                organisation_ura=RECEIVED.study.recipient_ura,
            )
        ],
    )
    decisions = decide_study(RECEIVED, registry, recipient_category=None, data_category="GGC002")
    assert (decisions.delivery.decision, decisions.delivery.decided_by) == (Decision.DENY, "o-1")


def test_the_two_events_have_stable_ids_and_the_time_of_the_first_decision():
    decisions = decide_study(RECEIVED, None, recipient_category=None, data_category="GGC002")
    first = checked_events(RECEIVED, decisions)
    again = checked_events(RECEIVED, StudyDecisions.from_row(decisions.to_row()))
    assert [e.purpose for e in first] == [Purpose.DELIVERY, Purpose.TIMELINE]
    assert first == again
    assert len({e.event_id for e in first}) == 2
    assert all(e.occurred_at == RECEIVED.occurred_at for e in first)
    assert all(e.study == RECEIVED.study for e in first)


def test_another_version_of_the_study_gets_other_event_ids():
    v2 = make_study_received(study=RECEIVED.study.model_copy(update={"version": 2}))
    decisions = decide_study(v2, None, recipient_category=None, data_category="GGC002")
    ids_v1 = {e.event_id for e in checked_events(RECEIVED, decisions)}
    ids_v2 = {e.event_id for e in checked_events(v2, decisions)}
    assert ids_v1.isdisjoint(ids_v2)
    assert study_key(RECEIVED.study) != study_key(v2.study)


def test_a_decision_row_reads_back_equal():
    decisions = decide_study(RECEIVED, None, recipient_category=None, data_category="GGC002")
    assert StudyDecisions.from_row(decisions.to_row()) == decisions


def test_the_decision_day_is_the_dutch_calendar_day():
    # 23:30 UTC on 31 May is already 1 June in Amsterdam (summer time, UTC+2).
    assert decision_day(datetime(2025, 5, 31, 23, 30, tzinfo=UTC)) == date(2025, 6, 1)


def test_a_provider_type_maps_to_its_mitz_category_and_unknown_types_to_none():
    assert provider_category("V4", DEFAULT_PROVIDER_CATEGORIES) == "RPZAC104"
    assert provider_category("Z9", DEFAULT_PROVIDER_CATEGORIES) is None
    assert provider_category(None, DEFAULT_PROVIDER_CATEGORIES) is None


def test_study_keys_tell_sender_and_recipient_apart():
    study = make_study()
    other_sender = study.model_copy(update={"sender_ura": "00000101"})
    assert study_key(study) != study_key(other_sender)
