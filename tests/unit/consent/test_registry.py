"""The patient registry: a fold of consent and treatment-relationship events."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.consent.domain.registry import (
    ConsentStatus,
    PatientRegistry,
    Specificity,
    apply,
    from_row,
    replay,
    to_row,
)
from shared.events.consent import Provision
from tests.factories import (
    RECIPIENT_URA,
    make_consent_registered,
    make_consent_revoked,
    make_pseudonym,
    make_treatment_relationship_ended,
    make_treatment_relationship_registered,
)

PATIENT = make_pseudonym()


def registered(**overrides):
    return make_consent_registered(patient=PATIENT, **overrides)


def revoked(consent_id: str, **overrides):
    return make_consent_revoked(patient=PATIENT, consent_id=consent_id, **overrides)


def test_an_empty_registry_has_version_zero_and_no_facts() -> None:
    registry = PatientRegistry.empty(PATIENT)
    assert registry.version == 0
    assert registry.consents == ()
    assert registry.relationships == ()


def test_registering_a_consent_adds_it_as_active_and_counts_the_event() -> None:
    event = registered(consent_id="c1", provision=Provision.DENY, organisation_ura=RECIPIENT_URA)
    registry = apply(PatientRegistry.empty(PATIENT), event)
    consent = registry.consent("c1")
    assert consent is not None
    assert consent.status is ConsentStatus.ACTIVE
    assert consent.provision is Provision.DENY
    assert consent.organisation_ura == RECIPIENT_URA
    assert registry.version == 1


def test_applying_the_same_event_twice_changes_nothing_not_even_the_version() -> None:
    event = registered(consent_id="c1")
    once = apply(PatientRegistry.empty(PATIENT), event)
    assert apply(once, event) is once


def test_registering_a_known_consent_id_again_replaces_its_terms() -> None:
    registry = replay(
        PATIENT,
        [
            registered(consent_id="c1", data_category="GGC002"),
            registered(consent_id="c1", data_category="GGC003"),
        ],
    )
    assert [c.data_category for c in registry.consents] == ["GGC003"]
    assert registry.version == 2


def test_revoking_a_consent_marks_it_revoked_and_no_longer_in_force() -> None:
    registry = replay(PATIENT, [registered(consent_id="c1"), revoked("c1")])
    consent = registry.consent("c1")
    assert consent is not None
    assert consent.status is ConsentStatus.REVOKED
    assert not consent.in_force_on(date(2025, 6, 1))
    assert registry.consents_in_force("GGC002", date(2025, 6, 1)) == ()


def test_revoking_an_unknown_consent_is_a_no_op_that_still_counts() -> None:
    registry = apply(PatientRegistry.empty(PATIENT), revoked("nope"))
    assert registry.consents == ()
    assert registry.version == 1


def test_a_registration_consumed_after_its_revocation_stays_revoked() -> None:
    registry = replay(PATIENT, [revoked("c1"), registered(consent_id="c1")])
    consent = registry.consent("c1")
    assert consent is not None
    assert consent.status is ConsentStatus.REVOKED


def test_an_event_for_another_patient_is_refused() -> None:
    with pytest.raises(ValueError, match="another patient"):
        apply(PatientRegistry.empty(PATIENT), make_consent_registered())


def test_the_period_includes_both_its_first_and_last_day() -> None:
    consent = replay(
        PATIENT,
        [registered(consent_id="c1", period_start=date(2025, 1, 1), period_end=date(2025, 1, 31))],
    ).consents[0]
    assert not consent.in_force_on(date(2024, 12, 31))
    assert consent.in_force_on(date(2025, 1, 1))
    assert consent.in_force_on(date(2025, 1, 31))
    assert not consent.in_force_on(date(2025, 2, 1))


def test_specificity_ranks_organisation_over_category_over_general() -> None:
    registry = replay(
        PATIENT,
        [
            registered(consent_id="org", organisation_ura=RECIPIENT_URA),
            registered(consent_id="cat", provider_category="RPZAC104"),
            registered(consent_id="gen", provider_category=None),
        ],
    )
    specificity = {c.consent_id: c.specificity for c in registry.consents}
    assert specificity == {
        "org": Specificity.ORGANISATION,
        "cat": Specificity.PROVIDER_CATEGORY,
        "gen": Specificity.GENERAL,
    }
    assert Specificity.ORGANISATION > Specificity.PROVIDER_CATEGORY > Specificity.GENERAL


def test_a_treatment_relationship_holds_from_its_start_until_it_is_ended() -> None:
    start = make_treatment_relationship_registered(
        patient=PATIENT, relationship_id="r1", start=date(2025, 1, 1)
    )
    end = make_treatment_relationship_ended(
        patient=PATIENT, relationship_id="r1", end=date(2025, 6, 30)
    )
    registry = replay(PATIENT, [start, end])
    assert registry.has_treatment_relationship(RECIPIENT_URA, date(2025, 6, 30))
    assert not registry.has_treatment_relationship(RECIPIENT_URA, date(2025, 7, 1))
    assert not registry.has_treatment_relationship(RECIPIENT_URA, date(2024, 12, 31))
    assert not registry.has_treatment_relationship("11111111", date(2025, 3, 1))
    assert registry.version == 2


def test_ending_an_unknown_treatment_relationship_is_a_no_op_that_still_counts() -> None:
    end = make_treatment_relationship_ended(patient=PATIENT, relationship_id="nope")
    registry = apply(PatientRegistry.empty(PATIENT), end)
    assert registry.relationships == ()
    assert registry.version == 1


# --- properties -----------------------------------------------------------------------------------

CONSENT_IDS = ["c1", "c2", "c3", "c4"]


@st.composite
def registry_events(draw: st.DrawFn) -> list:
    """Consent registrations with distinct ids, some revocations, a relationship or two."""
    ids = draw(st.lists(st.sampled_from(CONSENT_IDS), unique=True, max_size=4))
    events: list = [
        registered(
            consent_id=consent_id,
            provision=draw(st.sampled_from(Provision)),
            provider_category=draw(st.sampled_from([None, "RPZAC104"])),
        )
        for consent_id in ids
    ]
    revoke = draw(st.lists(st.sampled_from(CONSENT_IDS), unique=True, max_size=3))
    events += [revoked(consent_id) for consent_id in revoke]
    events += [
        make_treatment_relationship_registered(patient=PATIENT, relationship_id=f"r{i}")
        for i in range(draw(st.integers(0, 2)))
    ]
    return events


@settings(max_examples=60, deadline=None)
@given(events=registry_events())
def test_replaying_the_same_events_rebuilds_the_same_registry(events: list) -> None:
    assert replay(PATIENT, events) == replay(PATIENT, events)


@settings(max_examples=60, deadline=None)
@given(events=registry_events(), data=st.data())
def test_redelivered_events_change_nothing(events: list, data: st.DataObject) -> None:
    redelivered = events + data.draw(st.lists(st.sampled_from(events))) if events else events
    assert replay(PATIENT, redelivered) == replay(PATIENT, events)


@settings(max_examples=60, deadline=None)
@given(events=registry_events(), data=st.data())
def test_distinct_registrations_and_revocations_commute(events: list, data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(events))
    assert replay(PATIENT, shuffled) == replay(PATIENT, events)
    assert replay(PATIENT, events).version == len(events)


@given(events=registry_events())
def test_a_registry_row_reads_back_as_the_same_registry(events: list) -> None:
    registry = replay(PATIENT, events)
    assert from_row(to_row(registry)) == registry


def test_a_row_read_back_keeps_refusing_events_already_applied() -> None:
    event = registered(consent_id="c-1")
    registry = from_row(to_row(apply(PatientRegistry.empty(PATIENT), event)))
    assert apply(registry, event) is registry


def test_a_row_of_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown registry row format"):
        from_row(b'{"format": 99}')
