"""Routing a consent decision: one route per endpoint, or a route-failed naming the reason."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from services.routing.domain.directory import Directory, Provider, ReceiverPreferences
from services.routing.domain.route import (
    priority_rank,
    route,
    route_failed_id,
    route_resolved_id,
    select_instances,
)
from shared.events.common import DeliveryChannel, Urgency
from shared.events.consent import Basis, ConsentChecked, Decision, Purpose
from shared.events.routing import RouteFailed, RouteResolved
from tests.factories import (
    RECIPIENT_URA,
    T0,
    make_consent_checked,
    make_instance_ref,
    make_study,
)

PS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State

DICOMWEB = {"channel": "dicomweb", "id": "pacs-web", "base_url": "https://pacs.example.nl/dw"}
DIMSE = {"channel": "dimse", "id": "pacs-dimse", "host": "10.0.0.7", "port": 104, "ae_title": "P"}
PICKUP = {"channel": "pickup", "id": "portal"}


def make_recipient(*endpoints: dict[str, Any], **overrides: Any) -> Provider:
    fields: dict[str, Any] = {
        "ura": RECIPIENT_URA,
        "name": "Ontvangend Ziekenhuis",
        "type_code": "V4",
        "city": "Utrecht",
        "endpoints": list(endpoints),
    }
    fields.update(overrides)
    return Provider.model_validate(fields)


def directory_with(*endpoints: dict[str, Any]) -> Directory:
    return Directory([make_recipient(*endpoints)])


def routed(checked: ConsentChecked, directory: Directory) -> list[RouteResolved]:
    result = route(checked, directory)
    assert isinstance(result, list), result
    return result


def failed(checked: ConsentChecked, directory: Directory) -> RouteFailed:
    result = route(checked, directory)
    assert isinstance(result, RouteFailed), result
    return result


def test_a_permitted_delivery_gets_one_route_per_endpoint() -> None:
    checked = make_consent_checked()
    routes = routed(checked, directory_with(DICOMWEB, DIMSE, PICKUP))
    assert [(r.destination.endpoint_id, r.destination.channel) for r in routes] == [
        ("pacs-web", DeliveryChannel.DICOMWEB),
        ("pacs-dimse", DeliveryChannel.DIMSE),
        ("portal", DeliveryChannel.PICKUP),
    ]
    for r in routes:
        assert r.study == checked.study
        assert r.destination.organisation_ura == RECIPIENT_URA
        assert r.consent_basis is Basis.PRESUMED_REFERRAL
        assert r.priority is Urgency.ROUTINE
        assert (r.correlation_id, r.producer) == (checked.correlation_id, "routing")
        assert r.occurred_at == checked.occurred_at


def test_a_flagged_decision_gives_flagged_routes() -> None:
    checked = make_consent_checked(basis=Basis.PRESUMED_UNVERIFIED_IDENTITY, flagged=True)
    [r] = routed(checked, directory_with(DICOMWEB))
    assert r.flagged and r.consent_basis is Basis.PRESUMED_UNVERIFIED_IDENTITY


def test_a_denied_delivery_fails_naming_the_basis_and_who_decided() -> None:
    checked = make_consent_checked(
        decision=Decision.DENY, basis=Basis.EXPLICIT_OBJECTION, decided_by="consent-42"
    )
    result = failed(checked, directory_with(DICOMWEB))
    assert (
        result.reason == "consent denies delivery: basis explicit-objection, decided by consent-42"
    )
    assert (result.study_instance_uid, result.study_version, result.recipient_ura) == (
        checked.study.study_instance_uid,
        checked.study.version,
        RECIPIENT_URA,
    )
    assert result.correlation_id == checked.correlation_id


@pytest.mark.parametrize("decision", list(Decision))
def test_a_timeline_decision_routes_nothing(decision: Decision) -> None:
    checked = make_consent_checked(
        purpose=Purpose.TIMELINE, decision=decision, basis=Basis.EXPLICIT_CONSENT
    )
    assert route(checked, directory_with(DICOMWEB)) == []


def test_an_unknown_recipient_fails_naming_the_ura() -> None:
    result = failed(make_consent_checked(), Directory())
    assert result.reason == f"recipient {RECIPIENT_URA} is not in the provider directory"


def test_a_recipient_without_endpoints_fails() -> None:
    result = failed(make_consent_checked(), directory_with())
    assert result.reason == (
        f"recipient {RECIPIENT_URA} (Ontvangend Ziekenhuis) has no delivery endpoint"
    )


def test_a_recipient_whose_endpoints_are_all_disabled_fails() -> None:
    result = failed(make_consent_checked(), directory_with({**DICOMWEB, "enabled": False}))
    assert "has no usable delivery endpoint" in result.reason


def test_disabled_endpoints_are_skipped() -> None:
    routes = routed(make_consent_checked(), directory_with({**DICOMWEB, "enabled": False}, PICKUP))
    assert [r.destination.endpoint_id for r in routes] == ["portal"]


@pytest.mark.parametrize(
    ("urgency", "basis", "priority"),
    [
        (Urgency.ROUTINE, Basis.PRESUMED_REFERRAL, Urgency.ROUTINE),
        (Urgency.URGENT, Basis.PRESUMED_REFERRAL, Urgency.URGENT),
        (Urgency.EMERGENCY, Basis.PRESUMED_REFERRAL, Urgency.EMERGENCY),
        (Urgency.ROUTINE, Basis.EMERGENCY, Urgency.EMERGENCY),
        # Consent permits an urgent send on the emergency basis: still urgent, not an emergency.
        (Urgency.URGENT, Basis.EMERGENCY, Urgency.URGENT),
        (Urgency.EMERGENCY, Basis.EMERGENCY, Urgency.EMERGENCY),
    ],
)
def test_priority_follows_the_study_urgency_and_an_emergency_send(
    urgency: Urgency, basis: Basis, priority: Urgency
) -> None:
    checked = make_consent_checked(study=make_study(urgency=urgency), basis=basis)
    [r] = routed(checked, directory_with(DICOMWEB))
    assert r.priority is priority


def test_urgent_work_ranks_ahead_of_routine() -> None:
    assert priority_rank(Urgency.EMERGENCY) > priority_rank(Urgency.URGENT)
    assert priority_rank(Urgency.URGENT) > priority_rank(Urgency.ROUTINE)


# --- replay ---------------------------------------------------------------------------------------


def test_routing_the_same_decision_again_yields_the_same_events() -> None:
    checked = make_consent_checked()
    directory = directory_with(DICOMWEB, PICKUP)
    replayed = checked.model_copy(update={"event_id": checked.event_id})
    assert route(checked, directory) == route(replayed, directory)
    denied = make_consent_checked(decision=Decision.DENY, basis=Basis.EXPLICIT_OBJECTION)
    assert route(denied, directory) == route(denied, directory)


def test_event_ids_differ_per_endpoint_version_and_recipient() -> None:
    study = make_study()
    ids = {
        route_resolved_id(study, "a"),
        route_resolved_id(study, "b"),
        route_resolved_id(study.model_copy(update={"version": 2}), "a"),
        route_resolved_id(study.model_copy(update={"recipient_ura": "11111111"}), "a"),
        route_resolved_id(study.model_copy(update={"sender_ura": "22222222"}), "a"),
        route_failed_id(study),
    }
    assert len(ids) == 6


def test_the_route_ids_are_the_deterministic_ones() -> None:
    checked = make_consent_checked()
    routes = routed(checked, directory_with(DICOMWEB, PICKUP))
    assert [r.event_id for r in routes] == [
        route_resolved_id(checked.study, "pacs-web"),
        route_resolved_id(checked.study, "portal"),
    ]
    assert failed(checked, Directory()).event_id == route_failed_id(checked.study)


def test_now_overrides_the_time_of_the_events() -> None:
    later = T0 + timedelta(hours=1)
    [r] = route(make_consent_checked(), directory_with(DICOMWEB), now=later)  # type: ignore[misc]
    assert r.occurred_at == later


# --- which instances ------------------------------------------------------------------------------


def test_select_instances_keeps_the_new_ones_the_receiver_accepts() -> None:
    base = make_study(instances=2)
    ps = make_instance_ref(sop_class_uid=PS_SOP_CLASS)
    old, new = base.instances
    study = base.model_copy(
        update={
            "version": 2,
            "instances": (old, new, ps),
            "new_sop_instance_uids": (new.sop_instance_uid, ps.sop_instance_uid),
        }
    )
    prefs = ReceiverPreferences(object_filters=("presentation-states",))
    assert select_instances(study, prefs) == (new,)
    assert select_instances(study, ReceiverPreferences()) == (new, ps)


def test_select_instances_takes_every_instance_of_version_1() -> None:
    study = make_study(instances=3)
    assert select_instances(study, ReceiverPreferences()) == study.instances


def test_a_changed_directory_entry_is_routed_on_what_it_now_says() -> None:
    # What a route takes from the entry is kept per entry object; the view replaces an entry
    # when it changes, and the next route must follow the new one.
    base = make_study(instances=1)
    ps = make_instance_ref(sop_class_uid=PS_SOP_CLASS)
    checked = make_consent_checked(
        study=base.model_copy(update={"instances": (*base.instances, ps)})
    )
    before = make_recipient(DICOMWEB)
    after = make_recipient(
        {**DICOMWEB, "id": "pacs-web-2"},
        preferences={
            "object_filters": ["presentation-states"],
            "batch_limits": {"max_instances": 7},
        },
    )
    for _ in range(2):  # the second time from what was kept
        (first,) = routed(checked, Directory([before]))
        assert first.destination.endpoint_id == "pacs-web"
        assert first.sop_instance_uids == tuple(i.sop_instance_uid for i in checked.study.instances)
        assert first.excluded_sop_classes == ()
        (second,) = routed(checked, Directory([after]))
        assert second.destination.endpoint_id == "pacs-web-2"
        assert second.sop_instance_uids == (base.instances[0].sop_instance_uid,)
        assert PS_SOP_CLASS in second.excluded_sop_classes
        assert second.batch_limits is not None and second.batch_limits.max_instances == 7
