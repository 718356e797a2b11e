"""Consent decisions for delivery (presumed consent) and timeline (explicit consent only)."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.consent.domain.decide import (
    RULE_EMERGENCY,
    RULE_NO_EXPLICIT_CONSENT,
    RULE_PRESUMED_REFERRAL,
    RULE_UNVERIFIED_IDENTITY,
    DecisionResult,
    decide,
)
from services.consent.domain.registry import ConsentStatus, PatientRegistry, replay
from shared.events.common import BsnStatus, Urgency
from shared.events.consent import Basis, Decision, Provision, Purpose
from tests.factories import (
    RECIPIENT_URA,
    make_consent_registered,
    make_consent_revoked,
    make_study,
)

TODAY = date(2025, 6, 1)
HOSPITALS = "RPZAC104"
PHARMACIES = "RPZAC200"
OTHER_URA = "11111111"

STUDY = make_study()
PATIENT = STUDY.patient.pseudonym
assert PATIENT is not None
URGENT = STUDY.model_copy(update={"urgency": Urgency.URGENT})
EMERGENCY = STUDY.model_copy(update={"urgency": Urgency.EMERGENCY})


def consent(consent_id: str, provision: Provision = Provision.PERMIT, **overrides):
    fields = {"provider_category": None, **overrides}
    return make_consent_registered(
        patient=PATIENT, consent_id=consent_id, provision=provision, **fields
    )


def objection(consent_id: str, **overrides):
    return consent(consent_id, Provision.DENY, **overrides)


def registry(*events) -> PatientRegistry:
    return replay(PATIENT, events)


def delivery(reg, *, study=STUDY, category: str | None = HOSPITALS) -> DecisionResult:
    return decide(study, Purpose.DELIVERY, reg, recipient_category=category, today=TODAY)


def timeline(reg, *, study=STUDY, category: str | None = HOSPITALS, **kw) -> DecisionResult:
    return decide(study, Purpose.TIMELINE, reg, recipient_category=category, today=TODAY, **kw)


# --- delivery -------------------------------------------------------------------------------------


def test_a_delivery_without_any_registered_consent_is_permitted_on_presumed_referral() -> None:
    assert delivery(None) == DecisionResult(
        Decision.PERMIT, Basis.PRESUMED_REFERRAL, RULE_PRESUMED_REFERRAL, 0
    )


def test_a_general_objection_refuses_a_delivery_and_names_itself() -> None:
    result = delivery(registry(objection("no")))
    assert (result.decision, result.basis, result.decided_by) == (
        Decision.DENY,
        Basis.EXPLICIT_OBJECTION,
        "no",
    )
    assert result.registry_version == 1
    assert not result.flagged


def test_an_objection_for_another_organisation_does_not_refuse_the_delivery() -> None:
    result = delivery(registry(objection("no", organisation_ura=OTHER_URA)))
    assert result.decision is Decision.PERMIT
    assert result.decided_by == RULE_PRESUMED_REFERRAL


def test_an_objection_for_another_provider_category_does_not_refuse_the_delivery() -> None:
    assert delivery(registry(objection("no", provider_category=PHARMACIES))).decision is (
        Decision.PERMIT
    )


def test_an_objection_for_another_data_category_does_not_refuse_the_delivery() -> None:
    assert delivery(registry(objection("no", data_category="GGC003"))).decision is Decision.PERMIT


def test_an_objection_outside_its_period_does_not_refuse_the_delivery() -> None:
    expired = objection("no", period_start=date(2024, 1, 1), period_end=date(2025, 5, 31))
    future = objection("later", period_start=date(2025, 6, 2))
    assert delivery(registry(expired, future)).decision is Decision.PERMIT


def test_a_revoked_objection_no_longer_refuses_the_delivery() -> None:
    reg = registry(objection("no"), make_consent_revoked(patient=PATIENT, consent_id="no"))
    assert delivery(reg) == DecisionResult(
        Decision.PERMIT, Basis.PRESUMED_REFERRAL, RULE_PRESUMED_REFERRAL, 2
    )


def test_a_permit_for_the_recipient_organisation_beats_a_general_objection() -> None:
    reg = registry(objection("no"), consent("yes", organisation_ura=RECIPIENT_URA))
    result = delivery(reg)
    assert (result.decision, result.basis, result.decided_by) == (
        Decision.PERMIT,
        Basis.EXPLICIT_CONSENT,
        "yes",
    )


def test_a_category_objection_beats_a_general_permit() -> None:
    reg = registry(consent("yes"), objection("no", provider_category=HOSPITALS))
    assert delivery(reg).decided_by == "no"


def test_at_equal_specificity_the_objection_beats_the_permit() -> None:
    reg = registry(
        consent("a-yes", provider_category=HOSPITALS),
        objection("z-no", provider_category=HOSPITALS),
    )
    assert delivery(reg).decided_by == "z-no"


def test_with_an_unknown_recipient_category_a_category_objection_refuses() -> None:
    reg = registry(objection("no", provider_category=HOSPITALS))
    assert delivery(reg, category=None).decided_by == "no"


def test_with_an_unknown_recipient_category_a_category_permit_does_not_lift_an_objection() -> None:
    reg = registry(objection("no"), consent("yes", provider_category=HOSPITALS))
    assert delivery(reg, category=HOSPITALS).decision is Decision.PERMIT
    assert delivery(reg, category=None).decided_by == "no"


def test_an_emergency_send_is_permitted_and_flagged_even_over_an_objection() -> None:
    reg = registry(objection("no", organisation_ura=RECIPIENT_URA))
    assert delivery(reg, study=EMERGENCY) == DecisionResult(
        Decision.PERMIT, Basis.EMERGENCY, RULE_EMERGENCY, 1, flagged=True
    )


def test_an_urgent_send_is_permitted_on_the_emergency_basis_and_flagged() -> None:
    assert delivery(None, study=URGENT) == DecisionResult(
        Decision.PERMIT, Basis.EMERGENCY, RULE_EMERGENCY, 0, flagged=True
    )


def test_an_urgent_send_does_not_override_an_explicit_objection() -> None:
    assert delivery(registry(objection("no")), study=URGENT).decided_by == "no"


@pytest.mark.parametrize("status", [BsnStatus.ABSENT, BsnStatus.INVALID, BsnStatus.CONFLICTING])
def test_a_delivery_on_an_unverified_bsn_is_permitted_and_flagged(status: BsnStatus) -> None:
    study = make_study(bsn_status=status)
    assert delivery(None, study=study) == DecisionResult(
        Decision.PERMIT,
        Basis.PRESUMED_UNVERIFIED_IDENTITY,
        RULE_UNVERIFIED_IDENTITY,
        0,
        flagged=True,
    )


def test_a_registry_of_another_patient_is_refused() -> None:
    with pytest.raises(ValueError, match="patient"):
        delivery(PatientRegistry.empty(make_study().patient.pseudonym))


def test_a_requester_ura_is_refused_for_a_delivery() -> None:
    with pytest.raises(ValueError, match="recipient"):
        decide(
            STUDY,
            Purpose.DELIVERY,
            None,
            recipient_category=HOSPITALS,
            today=TODAY,
            requester_ura=OTHER_URA,
        )


# --- timeline -------------------------------------------------------------------------------------


def test_the_timeline_is_denied_without_an_explicit_consent() -> None:
    assert timeline(None) == DecisionResult(
        Decision.DENY, Basis.NO_EXPLICIT_CONSENT, RULE_NO_EXPLICIT_CONSENT, 0
    )


def test_the_timeline_is_permitted_by_an_explicit_consent_for_the_category() -> None:
    reg = registry(consent("yes", provider_category=HOSPITALS))
    assert timeline(reg) == DecisionResult(Decision.PERMIT, Basis.EXPLICIT_CONSENT, "yes", 1)


def test_a_consent_for_another_provider_category_does_not_permit_the_timeline() -> None:
    reg = registry(consent("yes", provider_category=PHARMACIES))
    assert timeline(reg).basis is Basis.NO_EXPLICIT_CONSENT


def test_without_a_requester_category_any_category_consent_admits_the_study() -> None:
    reg = registry(objection("no"), consent("yes", provider_category=PHARMACIES))
    assert timeline(reg, category=None).decided_by == "yes"


def test_an_objection_denies_the_timeline_and_names_itself() -> None:
    reg = registry(consent("yes"), objection("no", provider_category=HOSPITALS))
    result = timeline(reg)
    assert (result.decision, result.basis, result.decided_by) == (
        Decision.DENY,
        Basis.EXPLICIT_OBJECTION,
        "no",
    )


def test_a_requester_organisation_consent_beats_a_category_objection() -> None:
    reg = registry(
        objection("no", provider_category=HOSPITALS),
        consent("yes", organisation_ura=OTHER_URA),
    )
    assert timeline(reg, requester_ura=OTHER_URA).decided_by == "yes"
    assert timeline(reg, requester_ura=RECIPIENT_URA).decided_by == "no"


@pytest.mark.parametrize("status", [BsnStatus.ABSENT, BsnStatus.INVALID, BsnStatus.CONFLICTING])
def test_the_timeline_is_never_permitted_on_an_unverified_bsn(status: BsnStatus) -> None:
    study = make_study(bsn_status=status)
    assert timeline(None, study=study) == DecisionResult(
        Decision.DENY, Basis.UNVERIFIED_IDENTITY, RULE_UNVERIFIED_IDENTITY, 0
    )


def test_an_emergency_does_not_open_the_timeline() -> None:
    assert timeline(None, study=EMERGENCY).decision is Decision.DENY


# --- properties -----------------------------------------------------------------------------------

DAYS = [None, date(2025, 1, 1), TODAY, date(2025, 12, 31)]


@st.composite
def consent_events(draw: st.DrawFn, max_size: int = 6) -> list:
    """Registrations with distinct ids over a small space, so conflicts are common."""
    n = draw(st.integers(0, max_size))
    events = []
    for i in range(n):
        start, end = draw(st.sampled_from(DAYS)), draw(st.sampled_from(DAYS))
        events.append(
            consent(
                f"c{i}",
                draw(st.sampled_from(Provision)),
                data_category=draw(st.sampled_from(["GGC002", "GGC003"])),
                provider_category=draw(st.sampled_from([None, HOSPITALS, PHARMACIES])),
                organisation_ura=draw(st.sampled_from([None, RECIPIENT_URA, OTHER_URA])),
                period_start=start,
                period_end=end,
            )
        )
    return events


@st.composite
def registries(draw: st.DrawFn) -> tuple[list, PatientRegistry]:
    events = draw(consent_events())
    ids = [e.consent_id for e in events]
    revoked = draw(st.lists(st.sampled_from(ids), unique=True)) if ids else []
    events += [make_consent_revoked(patient=PATIENT, consent_id=c) for c in revoked]
    return events, registry(*events)


categories = st.sampled_from([None, HOSPITALS, PHARMACIES])
purposes = st.sampled_from(Purpose)
urgencies = st.sampled_from(Urgency)
STUDIES = {u: STUDY.model_copy(update={"urgency": u}) for u in Urgency}
UNVERIFIED = make_study(bsn_status=BsnStatus.ABSENT)


@settings(max_examples=200, deadline=None)
@given(events=consent_events(), category=st.sampled_from([None, HOSPITALS]), data=st.data())
def test_an_objection_for_the_recipient_organisation_always_wins_over_a_general_permit(
    events: list, category: str | None, data: st.DataObject
) -> None:
    events = [
        *events,
        consent("general-permit"),
        objection("org-objection", organisation_ura=RECIPIENT_URA, provider_category=category),
    ]
    shuffled = data.draw(st.permutations(events))
    result = delivery(registry(*shuffled), category=data.draw(st.sampled_from([HOSPITALS, None])))
    assert result.decision is Decision.DENY
    assert result.basis is Basis.EXPLICIT_OBJECTION
    decided = registry(*events).consent(result.decided_by)
    assert decided is not None
    assert decided.provision is Provision.DENY
    assert decided.organisation_ura == RECIPIENT_URA


@settings(max_examples=300, deadline=None)
@given(generated=registries(), category=categories, requester=st.sampled_from([None, OTHER_URA]))
def test_no_timeline_permit_without_an_explicit_in_force_consent_and_a_verified_bsn(
    generated: tuple[list, PatientRegistry], category: str | None, requester: str | None
) -> None:
    _, reg = generated
    result = timeline(reg, category=category, requester_ura=requester)
    if result.decision is Decision.PERMIT:
        decided = reg.consent(result.decided_by)
        assert decided is not None
        assert decided.provision is Provision.PERMIT
        assert decided.status is ConsentStatus.ACTIVE
        assert decided.in_force_on(TODAY)
        assert decided.data_category == "GGC002"
        assert decided.provider_category in (None, category) or category is None
        assert decided.organisation_ura in (None, requester) or requester is None
        assert result.basis is Basis.EXPLICIT_CONSENT
    # An unverified BSN has no pseudonym, so no registry can even be consulted.
    assert timeline(None, study=UNVERIFIED, category=category).decision is Decision.DENY


@settings(max_examples=200, deadline=None)
@given(generated=registries(), category=categories)
def test_a_delivery_is_refused_only_by_an_in_force_objection(
    generated: tuple[list, PatientRegistry], category: str | None
) -> None:
    _, reg = generated
    result = delivery(reg, category=category)
    if result.decision is Decision.DENY:
        decided = reg.consent(result.decided_by)
        assert decided is not None
        assert decided.provision is Provision.DENY
        assert decided.in_force_on(TODAY)


@settings(max_examples=200, deadline=None)
@given(
    generated=registries(),
    purpose=purposes,
    urgency=urgencies,
    category=categories,
    data=st.data(),
)
def test_decisions_are_deterministic_and_independent_of_the_event_order(
    generated: tuple[list, PatientRegistry],
    purpose: Purpose,
    urgency: Urgency,
    category: str | None,
    data: st.DataObject,
) -> None:
    events, reg = generated
    study = STUDIES[urgency]
    shuffled = registry(*data.draw(st.permutations(events)))
    first = decide(study, purpose, reg, recipient_category=category, today=TODAY)
    again = decide(study, purpose, reg, recipient_category=category, today=TODAY)
    reordered = decide(study, purpose, shuffled, recipient_category=category, today=TODAY)
    assert first == again == reordered
    assert first.registry_version == len(events)


@settings(max_examples=200, deadline=None)
@given(
    generated=registries(),
    purpose=purposes,
    urgency=urgencies,
    category=categories,
)
def test_revoked_consents_never_decide(
    generated: tuple[list, PatientRegistry],
    purpose: Purpose,
    urgency: Urgency,
    category: str | None,
) -> None:
    events, reg = generated
    study = STUDIES[urgency]
    revoked = {c.consent_id for c in reg.consents if c.status is ConsentStatus.REVOKED}
    result = decide(study, purpose, reg, recipient_category=category, today=TODAY)
    assert result.decided_by not in revoked
    # The same decision as if the revoked consents had never been registered.
    kept = [e for e in events if e.consent_id not in revoked]
    without = decide(study, purpose, registry(*kept), recipient_category=category, today=TODAY)
    assert (result.decision, result.basis, result.decided_by, result.flagged) == (
        without.decision,
        without.basis,
        without.decided_by,
        without.flagged,
    )
