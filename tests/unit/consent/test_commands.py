"""API writes become registry events with content-derived ids and ownership rules."""

from __future__ import annotations

from datetime import date

import pytest

from services.consent.domain.commands import (
    InvalidPeriod,
    LooksLikeBsn,
    NotOwner,
    RevokedForGood,
    UnknownRelationship,
    derived_relationship_id,
    notification_event_id,
    plan_notification,
    plan_relationship_end,
    plan_relationship_registration,
)
from services.consent.domain.mitz import parse_notification
from services.consent.domain.registry import apply, replay
from shared.events.consent import ConsentRegistered, ConsentRevoked
from tests.factories import TEST_BSN, make_pseudonym
from tests.unit.consent.test_mitz import make_bundle

PATIENT = make_pseudonym()
HOSPITAL = "11111111"
OTHER = "22222222"
START = date(2025, 1, 1)
ENVELOPE = {"correlation_id": "c", "producer": "tests"}


def register(registry=None, **kw):  # type: ignore[no-untyped-def]
    fields = {
        "principal_ura": HOSPITAL,
        "patient": PATIENT,
        "organisation_ura": HOSPITAL,
        "start": START,
        "end": None,
        "source": "referral",
        "relationship_id": None,
        **ENVELOPE,
        **kw,
    }
    return plan_relationship_registration(registry, **fields)


def end(registry, **kw):  # type: ignore[no-untyped-def]
    fields = {
        "principal_ura": HOSPITAL,
        "patient": PATIENT,
        "relationship_id": "r1",
        "end": date(2025, 6, 1),
        **ENVELOPE,
        **kw,
    }
    return plan_relationship_end(registry, **fields)


def test_the_same_notification_always_becomes_the_same_event_id() -> None:
    one = plan_notification(parse_notification(make_bundle()), None, patient=PATIENT, **ENVELOPE)
    two = plan_notification(parse_notification(make_bundle()), None, patient=PATIENT, **ENVELOPE)
    assert isinstance(one.event, ConsentRegistered)
    assert one.event.event_id == two.event.event_id
    assert not one.already_applied
    registry = apply(replay(PATIENT, []), one.event)
    assert plan_notification(
        parse_notification(make_bundle()), registry, patient=PATIENT, **ENVELOPE
    ).already_applied


def test_a_revocation_and_changed_terms_are_other_events() -> None:
    active = parse_notification(make_bundle())
    inactive = parse_notification(make_bundle(status="inactive"))
    denied = parse_notification(make_bundle(provision="deny"))
    ids = {notification_event_id(n, PATIENT) for n in (active, inactive, denied)}
    assert len(ids) == 3
    revoked = plan_notification(inactive, None, patient=PATIENT, **ENVELOPE).event
    assert isinstance(revoked, ConsentRevoked)


def test_event_ids_depend_on_the_pseudonym_not_on_the_bsn() -> None:
    notification = parse_notification(make_bundle())
    assert notification_event_id(notification, PATIENT) != notification_event_id(
        notification, make_pseudonym()
    )
    assert (
        TEST_BSN
        not in plan_notification(
            notification, None, patient=PATIENT, **ENVELOPE
        ).event.model_dump_json()
    )


@pytest.mark.parametrize("written", [TEST_BSN, f"{TEST_BSN[:4]}.{TEST_BSN[4:6]}.{TEST_BSN[6:]}"])
def test_a_consent_id_that_looks_like_a_bsn_is_refused(written: str) -> None:
    bundle = make_bundle()
    bundle["entry"][0]["resource"]["id"] = f"x-{written}"
    with pytest.raises(LooksLikeBsn, match="consent_id"):
        plan_notification(parse_notification(bundle), None, patient=PATIENT, **ENVELOPE)


def test_an_organisation_registers_only_its_own_relationship() -> None:
    with pytest.raises(NotOwner):
        register(organisation_ura=OTHER)


def test_a_relationship_without_an_id_gets_a_stable_derived_one() -> None:
    one, two = register().event, register().event
    assert one.relationship_id == two.relationship_id
    assert one.relationship_id == derived_relationship_id(PATIENT, HOSPITAL, START, "referral")
    assert one.event_id == two.event_id
    assert register(start=date(2025, 2, 1)).event.relationship_id != one.relationship_id


def test_registering_again_is_already_applied_and_a_changed_end_is_a_new_event() -> None:
    registry = replay(PATIENT, [register(relationship_id="r1").event])
    assert register(registry, relationship_id="r1").already_applied
    changed = register(registry, relationship_id="r1", end=date(2025, 12, 31))
    assert not changed.already_applied


def test_another_organisation_cannot_reuse_a_relationship_id() -> None:
    registry = replay(PATIENT, [register(relationship_id="r1").event])
    with pytest.raises(NotOwner):
        register(registry, principal_ura=OTHER, organisation_ura=OTHER, relationship_id="r1")


def test_a_relationship_cannot_end_before_it_starts() -> None:
    with pytest.raises(InvalidPeriod):
        register(end=date(2024, 12, 31))
    registry = replay(PATIENT, [register(relationship_id="r1").event])
    with pytest.raises(InvalidPeriod):
        end(registry, end=date(2024, 12, 31))


def test_a_source_that_holds_a_bsn_is_refused() -> None:
    with pytest.raises(LooksLikeBsn, match="source"):
        register(source=TEST_BSN)


def test_only_the_owner_ends_a_known_relationship() -> None:
    registry = replay(PATIENT, [register(relationship_id="r1").event])
    with pytest.raises(UnknownRelationship):
        end(None)
    with pytest.raises(UnknownRelationship):
        end(registry, relationship_id="r2")
    with pytest.raises(NotOwner):
        end(registry, principal_ura=OTHER)
    planned = end(registry)
    assert planned.event.organisation_ura == HOSPITAL
    after = apply(registry, planned.event)
    assert end(after).already_applied
    relationship = after.relationship("r1")
    assert relationship is not None and relationship.end == date(2025, 6, 1)


def _after(registry, planned):  # type: ignore[no-untyped-def]
    """The registry once a planned event was published and read back (nothing if held)."""
    return registry if planned.already_applied else apply(registry, planned.event)


def test_an_objection_given_again_after_a_permit_is_a_new_event_and_applies() -> None:
    deny, permit = make_bundle(provision="deny"), make_bundle(provision="permit")
    registry = replay(PATIENT, [])
    ids = []
    for bundle in (deny, permit, deny):
        planned = plan_notification(
            parse_notification(bundle), registry, patient=PATIENT, **ENVELOPE
        )
        assert not planned.already_applied
        ids.append(planned.event.event_id)
        registry = _after(registry, planned)
    assert len(set(ids)) == 3
    [consent] = registry.consents
    assert consent.provision.value == "deny"
    # The same objection once more, now the registry holds it: answered as held.
    again = plan_notification(parse_notification(deny), registry, patient=PATIENT, **ENVELOPE)
    assert again.already_applied


def test_a_resend_before_the_registry_shows_the_first_is_the_same_event() -> None:
    registry = replay(PATIENT, [])
    one = plan_notification(
        parse_notification(make_bundle()), registry, patient=PATIENT, **ENVELOPE
    )
    two = plan_notification(
        parse_notification(make_bundle()), registry, patient=PATIENT, **ENVELOPE
    )
    assert one.event.event_id == two.event.event_id
    # The fold applies it once.
    assert apply(apply(registry, one.event), two.event).version == 1


def test_a_relationship_ended_again_after_a_change_is_a_new_event_and_applies() -> None:
    registry = _after(replay(PATIENT, []), register(None, relationship_id="r1"))
    first_end = end(registry)
    registry = _after(registry, first_end)
    longer = register(registry, relationship_id="r1", end=date(2025, 12, 31))
    assert not longer.already_applied
    registry = _after(registry, longer)
    again = end(registry)
    assert not again.already_applied and again.event.event_id != first_end.event.event_id
    registry = _after(registry, again)
    assert not registry.has_treatment_relationship(HOSPITAL, date(2025, 6, 2))


def test_a_revoked_consent_cannot_be_registered_again_but_a_late_resend_is_held() -> None:
    registry = replay(PATIENT, [])
    for bundle in (make_bundle(provision="deny"), make_bundle(status="inactive")):
        planned = plan_notification(
            parse_notification(bundle), registry, patient=PATIENT, **ENVELOPE
        )
        registry = _after(registry, planned)
    # The original registration arriving late changes nothing: answered as held.
    late = plan_notification(
        parse_notification(make_bundle(provision="deny")), registry, patient=PATIENT, **ENVELOPE
    )
    assert late.already_applied
    renewed = make_bundle(provision="deny")
    renewed["entry"][0]["resource"]["provision"]["period"] = {"start": "2026-01-01"}  # new terms
    with pytest.raises(RevokedForGood, match="revoked for good"):
        plan_notification(parse_notification(renewed), registry, patient=PATIENT, **ENVELOPE)


def test_a_registration_arriving_after_its_revocation_is_taken_and_stays_revoked() -> None:
    registry = replay(PATIENT, [])
    revoked = plan_notification(
        parse_notification(make_bundle(status="inactive")), registry, patient=PATIENT, **ENVELOPE
    )
    registry = _after(registry, revoked)
    late = plan_notification(
        parse_notification(make_bundle()), registry, patient=PATIENT, **ENVELOPE
    )
    assert not late.already_applied
    registry = _after(registry, late)
    [consent] = registry.consents
    assert consent.status.value == "revoked"
