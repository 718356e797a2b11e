"""The closed question: decide() for a requester, plus the treatment relationship for timeline."""

from __future__ import annotations

from datetime import date

import pytest

from services.consent.domain.decide import RULE_NO_EXPLICIT_CONSENT, RULE_PRESUMED_REFERRAL
from services.consent.domain.query import (
    BASIS_NO_TREATMENT_RELATIONSHIP,
    RULE_NO_TREATMENT_RELATIONSHIP,
    QueryAnswer,
    answer_query,
)
from services.consent.domain.registry import replay
from shared.events.consent import Decision, Provision, Purpose
from tests.factories import (
    make_consent_registered,
    make_pseudonym,
    make_treatment_relationship_ended,
    make_treatment_relationship_registered,
)

TODAY = date(2025, 6, 1)
PATIENT = make_pseudonym()
HOSPITAL = "11111111"
HOSPITALS = "RPZAC104"


def ask(registry, purpose: Purpose = Purpose.TIMELINE, **kw) -> QueryAnswer:  # type: ignore[no-untyped-def]
    fields = {"requester_ura": HOSPITAL, "provider_category": HOSPITALS, "today": TODAY, **kw}
    return answer_query(registry, patient=PATIENT, purpose=purpose, **fields)


def permit(consent_id: str = "c1", provision: Provision = Provision.PERMIT):  # type: ignore[no-untyped-def]
    return make_consent_registered(
        patient=PATIENT, consent_id=consent_id, provision=provision, provider_category=HOSPITALS
    )


def relationship(**kw):  # type: ignore[no-untyped-def]
    fields = {"relationship_id": "r1", "organisation_ura": HOSPITAL, "start": date(2025, 1, 1)}
    return make_treatment_relationship_registered(patient=PATIENT, **{**fields, **kw})


def test_explicit_consent_and_a_treatment_relationship_permit_the_timeline() -> None:
    answer = ask(replay(PATIENT, [permit(), relationship()]))
    assert answer == QueryAnswer(Decision.PERMIT, "explicit-consent", "c1", 2, True)


def test_explicit_consent_without_a_treatment_relationship_is_a_deny_on_that_basis() -> None:
    answer = ask(replay(PATIENT, [permit()]))
    assert answer == QueryAnswer(
        Decision.DENY, BASIS_NO_TREATMENT_RELATIONSHIP, RULE_NO_TREATMENT_RELATIONSHIP, 1, False
    )


def test_another_organisations_relationship_does_not_count() -> None:
    answer = ask(replay(PATIENT, [permit(), relationship(organisation_ura="22222222")]))
    assert (answer.decision, answer.treatment_relationship) == (Decision.DENY, False)


def test_an_ended_relationship_no_longer_counts() -> None:
    ended = make_treatment_relationship_ended(
        patient=PATIENT, relationship_id="r1", organisation_ura=HOSPITAL, end=date(2025, 5, 31)
    )
    answer = ask(replay(PATIENT, [permit(), relationship(), ended]))
    assert answer.basis == BASIS_NO_TREATMENT_RELATIONSHIP


def test_a_relationship_without_consent_is_still_a_deny_on_no_explicit_consent() -> None:
    answer = ask(replay(PATIENT, [relationship()]))
    assert answer == QueryAnswer(
        Decision.DENY, "no-explicit-consent", RULE_NO_EXPLICIT_CONSENT, 1, True
    )


def test_an_objection_is_reported_as_such_not_as_a_missing_relationship() -> None:
    answer = ask(replay(PATIENT, [permit("c1", Provision.DENY)]))
    assert (answer.decision, answer.basis, answer.decided_by) == (
        Decision.DENY,
        "explicit-objection",
        "c1",
    )


def test_nothing_registered_is_version_zero_for_both_purposes() -> None:
    assert ask(None).registry_version == 0
    delivery = ask(None, Purpose.DELIVERY, provider_category=None)
    assert delivery == QueryAnswer(
        Decision.PERMIT, "presumed-referral", RULE_PRESUMED_REFERRAL, 0, False
    )


def test_a_delivery_is_decided_without_looking_at_the_relationship() -> None:
    answer = ask(replay(PATIENT, [permit("c1", Provision.DENY)]), Purpose.DELIVERY)
    assert (answer.decision, answer.basis) == (Decision.DENY, "explicit-objection")
    assert ask(None, Purpose.DELIVERY).decision is Decision.PERMIT


def test_a_timeline_question_needs_the_requesters_category() -> None:
    with pytest.raises(ValueError, match="provider category"):
        ask(None, provider_category=None)
