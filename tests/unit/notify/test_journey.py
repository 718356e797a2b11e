"""The journey fold (and the dead-letter fold): records built with the codec, folded in memory."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from services.notify.adapters.dead_letters import DeadLetterFold
from services.notify.adapters.journey_view import JourneyFold, PickupInstance
from shared.codec import Codec
from shared.errors import PoisonEvent
from shared.events import (
    Basis,
    BsnStatus,
    Decision,
    DeliveryChannel,
    DeliveryQueued,
    Event,
    InstanceOutcomes,
    Purpose,
    Urgency,
)
from shared.events.delivery import RefusedInstance
from shared.events.routing import RouteFailureReason
from tests.factories import (
    RECIPIENT_URA,
    SENDER_URA,
    T0,
    make_access_logged,
    make_consent_checked,
    make_delivered,
    make_delivery_failed,
    make_delivery_queued,
    make_destination,
    make_route_failed,
    make_route_resolved,
    make_study,
    make_study_received,
)

CODEC = Codec()
OTHER_URA = "11112222"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"
_offsets = itertools.count()


@dataclass(frozen=True)
class Rec:
    """What the view hands the fold: an aiokafka ConsumerRecord's fields."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp: int = int(T0.timestamp() * 1000)


def rec(event: Event, **overrides: Any) -> Rec:
    encoded = CODEC.encode(event)
    fields: dict[str, Any] = {
        "topic": encoded.topic,
        "partition": 0,
        "offset": next(_offsets),
        "key": encoded.key,
        "value": encoded.value,
        "headers": encoded.headers,
    }
    fields.update(overrides)
    return Rec(**fields)


def fold(*events: Event) -> JourneyFold:
    journeys = JourneyFold(CODEC)
    for event in events:
        journeys.apply_record(rec(event))
    return journeys


def manifest(
    journeys: JourneyFold, uid: str, version: int, recipient: str, sender: str | None = SENDER_URA
) -> tuple[PickupInstance, ...] | None:
    found = journeys.pickup(uid, version, recipient, sender)
    return found.instances if found is not None else None


def endpoint_events(study: Any, endpoint_id: str = "pacs-dicomweb", **route: Any) -> list[Event]:
    destination = make_destination(endpoint_id=endpoint_id, **route.pop("destination", {}))
    return [make_route_resolved(study=study, destination=destination, **route)]


# --- the journey ----------------------------------------------------------------------------------


def test_a_study_that_went_all_the_way_is_delivered_with_what_each_stage_said() -> None:
    study = make_study(instances=3, urgency=Urgency.URGENT)
    uid = study.study_instance_uid
    received = make_study_received(study=study, occurred_at=T0 + timedelta(minutes=1))
    journeys = fold(
        received,
        make_consent_checked(study=study, flagged=True, basis=Basis.EMERGENCY),
        make_route_resolved(study=study, destination=make_destination(), priority=Urgency.URGENT),
        make_delivered(
            study_instance_uid=uid,
            attempts=2,
            outcomes=InstanceOutcomes(sent=3, already_present=0),
            delivered_at=T0 + timedelta(minutes=5),
        ),
    )

    [version] = journeys.get(uid).visible_to(SENDER_URA)  # type: ignore[union-attr]
    assert version.state == "delivered"
    assert (version.version, version.sender_ura, version.recipient_ura) == (
        1,
        SENDER_URA,
        RECIPIENT_URA,
    )
    assert version.instances == 3
    assert version.first_received_at == study.first_received_at
    assert version.last_received_at == study.last_received_at
    assert version.announced_at == received.occurred_at
    assert version.consent is not None
    assert (version.consent.decision, version.consent.basis, version.consent.flagged) == (
        Decision.PERMIT,
        Basis.EMERGENCY,
        True,
    )
    [endpoint] = version.endpoints.values()
    assert (endpoint.destination_ura, endpoint.endpoint_id) == (RECIPIENT_URA, "pacs-dicomweb")
    assert (endpoint.channel, endpoint.priority, endpoint.routed) == (
        DeliveryChannel.DICOMWEB,
        Urgency.URGENT,
        True,
    )
    assert endpoint.delivered is not None
    assert endpoint.delivered.attempts == 2
    assert endpoint.delivered.outcomes.sent == 3
    assert endpoint.delivered.delivered_at == T0 + timedelta(minutes=5)
    # Nothing of the patient is kept, not even the pseudonym; no manifest for a PACS route.
    assert study.patient.pseudonym is not None
    assert study.patient.pseudonym not in repr(journeys.get(uid))
    assert version.pickup is None


def test_the_state_follows_the_journey_from_received_to_routed() -> None:
    study = make_study()
    uid = study.study_instance_uid
    journeys = fold(make_study_received(study=study))
    states = [journeys.get(uid).versions[(SENDER_URA, RECIPIENT_URA, 1)].state]  # type: ignore[union-attr]
    journeys.apply_record(rec(make_consent_checked(study=study)))
    states.append(journeys.get(uid).versions[(SENDER_URA, RECIPIENT_URA, 1)].state)  # type: ignore[union-attr]
    journeys.apply_record(rec(make_route_resolved(study=study)))
    states.append(journeys.get(uid).versions[(SENDER_URA, RECIPIENT_URA, 1)].state)  # type: ignore[union-attr]

    assert states == ["received", "consent-checked", "routed"]


def test_a_retrying_delivery_keeps_the_version_routed_and_a_final_failure_fails_it() -> None:
    study = make_study()
    uid = study.study_instance_uid
    retry_at = T0 + timedelta(minutes=1)
    journeys = fold(
        make_study_received(study=study),
        make_route_resolved(study=study),
        make_delivery_failed(
            study_instance_uid=uid, attempt=1, final=False, next_attempt_at=retry_at
        ),
    )
    version = journeys.get(uid).versions[(SENDER_URA, RECIPIENT_URA, 1)]  # type: ignore[union-attr]
    [endpoint] = version.endpoints.values()
    assert (version.state, endpoint.state) == ("routed", "retrying")
    assert endpoint.failure is not None
    assert (endpoint.failure.attempt, endpoint.failure.next_attempt_at) == (1, retry_at)

    journeys.apply_record(
        rec(
            make_delivery_failed(
                study_instance_uid=uid,
                attempt=6,
                final=True,
                next_attempt_at=None,
                reason="HTTP 401 from the receiver",
            )
        )
    )

    assert (version.state, endpoint.state) == ("failed", "failed")
    assert (endpoint.failure.attempt, endpoint.failure.final) == (6, True)
    assert endpoint.failure.reason == "HTTP 401 from the receiver"
    assert endpoint.failure.next_attempt_at is None


def test_one_failed_endpoint_fails_the_version_even_when_another_was_delivered() -> None:
    study = make_study()
    uid = study.study_instance_uid
    journeys = fold(
        make_study_received(study=study),
        *endpoint_events(study, "pacs-web"),
        *endpoint_events(study, "pacs-dimse", destination={"channel": DeliveryChannel.DIMSE}),
        make_delivered(study_instance_uid=uid, endpoint_id="pacs-web"),
        make_delivery_failed(study_instance_uid=uid, endpoint_id="pacs-dimse", final=True),
    )

    version = journeys.get(uid).versions[(SENDER_URA, RECIPIENT_URA, 1)]  # type: ignore[union-attr]
    assert version.state == "failed"
    assert {e.endpoint_id: e.state for e in version.endpoints.values()} == {
        "pacs-web": "delivered",
        "pacs-dimse": "failed",
    }


def test_a_denied_send_is_not_routed_and_says_why() -> None:
    study = make_study()
    uid = study.study_instance_uid
    journeys = fold(
        make_study_received(study=study),
        make_consent_checked(study=study, decision=Decision.DENY, basis=Basis.EXPLICIT_OBJECTION),
    )
    version = journeys.get(uid).versions[(SENDER_URA, RECIPIENT_URA, 1)]  # type: ignore[union-attr]
    assert version.state == "not-routed"  # before routing has said so, too

    journeys.apply_record(
        rec(
            make_route_failed(
                study_instance_uid=uid,
                study_version=1,
                reason="the patient objected",
                reason_code=RouteFailureReason.CONSENT_DENIED,
            )
        )
    )

    assert version.state == "not-routed"
    assert version.route_failure is not None
    assert version.route_failure.reason_code == "consent-denied"
    assert version.route_failure.reason == "the patient objected"


def test_a_route_failure_without_a_consent_record_is_not_routed() -> None:
    study = make_study()
    uid = study.study_instance_uid
    journeys = fold(
        make_study_received(study=study),
        make_route_failed(study_instance_uid=uid, study_version=1, reason_code=None),
    )

    version = journeys.get(uid).versions[(SENDER_URA, RECIPIENT_URA, 1)]  # type: ignore[union-attr]
    assert version.state == "not-routed"
    assert version.route_failure is not None and version.route_failure.reason_code is None


def test_a_delivery_read_before_its_study_shows_to_its_sender_at_once() -> None:
    study = make_study()
    uid = study.study_instance_uid
    journeys = fold(make_delivered(study_instance_uid=uid))
    study_journey = journeys.get(uid)
    assert study_journey is not None
    [version] = study_journey.visible_to(SENDER_URA)
    assert version.state == "delivered" and version.instances is None
    assert study_journey.visible_to(OTHER_URA) == []

    journeys.apply_record(rec(make_study_received(study=study)))

    [version] = study_journey.visible_to(SENDER_URA)
    # Delivered, though the route itself was never seen (route-resolved is kept 90 days only).
    assert version.state == "delivered"
    assert (version.recipient_ura, version.instances) == (RECIPIENT_URA, study.number_of_instances)
    [endpoint] = version.endpoints.values()
    assert endpoint.routed is False and endpoint.priority is None


def test_facts_of_records_without_their_sender_show_with_the_one_sender_of_that_version() -> None:
    # Written before route-failed, delivered and delivery-failed named the sender.
    study = make_study()
    uid = study.study_instance_uid
    journeys = fold(
        make_delivered(study_instance_uid=uid, sender_ura=None),
        make_delivery_failed(study_instance_uid=uid, endpoint_id="other", sender_ura=None),
    )
    study_journey = journeys.get(uid)
    assert study_journey is not None
    assert study_journey.visible_to(SENDER_URA) == []
    [unknown] = study_journey.all_versions()  # operators see it, sender unknown
    assert unknown.sender_ura is None and unknown.state == "routed"

    journeys.apply_record(rec(make_study_received(study=study)))
    journeys.apply_record(rec(make_route_resolved(study=study)))

    [version] = study_journey.visible_to(SENDER_URA)
    assert version.sender_ura == SENDER_URA
    delivered = version.endpoints[(RECIPIENT_URA, "pacs-dicomweb")]
    assert delivered.routed and delivered.state == "delivered"
    assert version.endpoints[(RECIPIENT_URA, "other")].state == "retrying"
    assert study_journey.all_versions() == [version]
    # Shown merged, not merged into the kept state: the fold is unchanged by being asked.
    kept = study_journey.versions[(SENDER_URA, RECIPIENT_URA, 1)].endpoints
    assert kept[(RECIPIENT_URA, "pacs-dicomweb")].delivered is None
    assert (RECIPIENT_URA, "other") not in kept


def test_facts_without_their_sender_are_shown_to_no_sender_while_two_have_that_version() -> None:
    from_a = make_study()
    uid = from_a.study_instance_uid
    from_b = make_study(study_instance_uid=uid, sender_ura=OTHER_URA)
    journeys = fold(
        make_study_received(study=from_a),
        make_study_received(study=from_b),
        make_route_failed(study_instance_uid=uid, sender_ura=None, reason="nowhere to go"),
    )
    study = journeys.get(uid)
    assert study is not None

    for sender in (SENDER_URA, OTHER_URA):
        [version] = study.visible_to(sender)
        assert version.route_failure is None and version.state == "received"
    shown = study.all_versions()
    assert [v.sender_ura for v in shown] == [*sorted([SENDER_URA, OTHER_URA]), None]
    assert shown[2].state == "not-routed"


def test_one_senders_study_to_two_recipients_is_two_versions_each_with_its_own_fate() -> None:
    # Ingest numbers versions per sender and recipient: both sends are version 1.
    to_first = make_study()
    uid = to_first.study_instance_uid
    to_second = make_study(study_instance_uid=uid, recipient_ura=OTHER_URA)
    second_pacs = make_destination(organisation_ura=OTHER_URA, endpoint_id="pacs")
    journeys = fold(
        make_study_received(study=to_first),
        make_study_received(study=to_second),
        make_consent_checked(
            study=to_first, decision=Decision.DENY, basis=Basis.EXPLICIT_OBJECTION
        ),
        make_route_failed(study_instance_uid=uid, reason="consent denied delivery"),
        make_consent_checked(study=to_second),
        make_route_resolved(study=to_second, destination=second_pacs),
        make_delivered(study_instance_uid=uid, destination_ura=OTHER_URA, endpoint_id="pacs"),
    )
    study = journeys.get(uid)
    assert study is not None

    versions = study.visible_to(SENDER_URA)
    assert len(versions) == 2
    first, second = (
        next(v for v in versions if v.recipient_ura == r) for r in (RECIPIENT_URA, OTHER_URA)
    )
    assert (first.version, first.state) == (1, "not-routed")
    assert first.consent is not None and first.consent.decision is Decision.DENY
    assert first.endpoints == {}
    assert (second.version, second.state) == (1, "delivered")
    assert second.route_failure is None


def test_a_fact_without_its_sender_goes_to_the_version_of_its_recipient() -> None:
    # One sender, one UID to two recipients (both version 1); an old delivered record without
    # the sender names the second recipient: it is that send's, not the first's.
    to_first = make_study()
    uid = to_first.study_instance_uid
    to_second = make_study(study_instance_uid=uid, recipient_ura=OTHER_URA)
    journeys = fold(
        make_study_received(study=to_first),
        make_study_received(study=to_second),
        make_delivered(
            study_instance_uid=uid, destination_ura=OTHER_URA, endpoint_id="pacs", sender_ura=None
        ),
    )
    study = journeys.get(uid)
    assert study is not None

    by_recipient = {v.recipient_ura: v for v in study.visible_to(SENDER_URA)}
    assert by_recipient[OTHER_URA].state == "delivered"
    assert by_recipient[RECIPIENT_URA].state == "received"
    assert by_recipient[RECIPIENT_URA].endpoints == {}
    assert len(study.all_versions()) == 2  # nothing left unattributed


def test_two_senders_of_one_uid_each_see_only_their_own_routes_and_deliveries() -> None:
    # Both send "their" study as version 1, to different recipients.
    from_a = make_study()
    uid = from_a.study_instance_uid
    from_b = make_study(study_instance_uid=uid, sender_ura=OTHER_URA, recipient_ura="55556666")
    to_b = make_destination(organisation_ura="55556666", endpoint_id="pacs-b")
    journeys = fold(
        make_study_received(study=from_a),
        make_study_received(study=from_b),
        make_route_resolved(study=from_a),
        make_route_resolved(study=from_b, destination=to_b),
        make_delivered(study_instance_uid=uid),
        make_delivery_failed(
            study_instance_uid=uid,
            destination_ura="55556666",
            endpoint_id="pacs-b",
            sender_ura=OTHER_URA,
            final=True,
        ),
    )
    study = journeys.get(uid)
    assert study is not None

    [mine] = study.visible_to(SENDER_URA)
    [theirs] = study.visible_to(OTHER_URA)
    assert list(mine.endpoints) == [(RECIPIENT_URA, "pacs-dicomweb")]
    assert mine.state == "delivered"
    assert list(theirs.endpoints) == [("55556666", "pacs-b")]
    assert theirs.state == "failed"


def test_delivered_wins_over_a_failure_read_later_from_the_other_topic() -> None:
    study = make_study()
    uid = study.study_instance_uid
    journeys = fold(
        make_study_received(study=study),
        make_route_resolved(study=study),
        make_delivered(study_instance_uid=uid, attempts=1),
        # Dead-lettered earlier, re-driven, then delivered: the topics are read side by side.
        make_delivery_failed(study_instance_uid=uid, attempt=6, final=True),
    )

    version = journeys.get(uid).versions[(SENDER_URA, RECIPIENT_URA, 1)]  # type: ignore[union-attr]
    assert version.state == "delivered"


def test_each_sender_sees_only_the_versions_it_sent() -> None:
    first = make_study(version=1)
    uid = first.study_instance_uid
    # Another organisation reuses the UID (a misconfigured PACS): its version stays its own.
    second = make_study(version=2, study_instance_uid=uid, sender_ura=OTHER_URA)
    journeys = fold(make_study_received(study=first), make_study_received(study=second))
    study = journeys.get(uid)
    assert study is not None

    assert [v.version for v in study.visible_to(SENDER_URA)] == [1]
    assert [v.version for v in study.visible_to(OTHER_URA)] == [2]
    assert study.visible_to(RECIPIENT_URA) == []


def test_versions_are_told_apart_and_listed_oldest_first() -> None:
    v1 = make_study(version=1)
    uid = v1.study_instance_uid
    v2 = make_study(version=2, study_instance_uid=uid, instances=5)
    journeys = fold(
        make_study_received(study=v2),
        make_study_received(study=v1),
        make_route_resolved(study=v1),
        make_delivered(study_instance_uid=uid, study_version=1),
    )

    versions = journeys.get(uid).visible_to(SENDER_URA)  # type: ignore[union-attr]
    assert [(v.version, v.state, v.instances) for v in versions] == [
        (1, "delivered", 3),
        (2, "received", 5),
    ]


def test_the_timeline_decision_is_not_part_of_the_send() -> None:
    study = make_study()
    journeys = fold(
        make_study_received(study=study),
        make_consent_checked(study=study, purpose=Purpose.TIMELINE, decision=Decision.DENY),
    )

    version = journeys.get(study.study_instance_uid).versions[(SENDER_URA, RECIPIENT_URA, 1)]  # type: ignore[union-attr]
    assert version.consent is None
    assert version.state == "received"


def test_a_pickup_route_keeps_the_manifest_minus_the_classes_the_receiver_excludes() -> None:
    study = make_study(instances=2)
    report = study.instances[0].model_copy(
        update={"sop_class_uid": SR_STORAGE, "sop_instance_uid": "1.2.3.4"}
    )
    study = study.model_copy(update={"instances": (*study.instances, report)})
    uid = study.study_instance_uid
    pickup = make_destination(endpoint_id="portal", channel=DeliveryChannel.PICKUP)
    journeys = fold(
        make_study_received(study=study),
        make_route_resolved(study=study, destination=pickup, excluded_sop_classes=(SR_STORAGE,)),
    )

    assert manifest(journeys, uid, 1, RECIPIENT_URA) == tuple(
        PickupInstance(i.sop_instance_uid, i.series_instance_uid, i.object_key, i.size, i.sha256)
        for i in study.instances[:2]
    )
    # Only for the organisation the pickup route is for, and only for that version.
    assert manifest(journeys, uid, 1, OTHER_URA) is None
    assert manifest(journeys, uid, 2, RECIPIENT_URA) is None
    assert manifest(journeys, "1.2.999", 1, RECIPIENT_URA) is None
    assert manifest(journeys, uid, 1, RECIPIENT_URA, sender=OTHER_URA) is None


def test_a_pickup_names_the_patient_and_consent_basis_for_its_audit_record() -> None:
    study = make_study(instances=1)
    unverified = make_study(instances=1, bsn_status=BsnStatus.ABSENT)
    pickup = make_destination(endpoint_id="portal", channel=DeliveryChannel.PICKUP)
    journeys = fold(
        make_consent_checked(study=study, basis=Basis.EMERGENCY),
        make_route_resolved(study=study, destination=pickup),
        make_route_resolved(study=unverified, destination=pickup),
    )

    found = journeys.pickup(study.study_instance_uid, 1, RECIPIENT_URA, SENDER_URA)
    assert found is not None
    assert study.patient.pseudonym is not None
    assert (found.patient, found.consent_basis) == (study.patient.pseudonym, Basis.EMERGENCY)
    # No verified BSN, no pseudonym; no consent decision read yet, no basis.
    other = journeys.pickup(unverified.study_instance_uid, 1, RECIPIENT_URA, SENDER_URA)
    assert other is not None
    assert (other.patient, other.consent_basis) == (None, None)


def test_a_study_uid_two_senders_sent_to_two_pickup_recipients_zips_each_only_its_own() -> None:
    # Versions are numbered per sender and recipient: both sends are version 1 here.
    from_a = make_study(instances=2)
    uid = from_a.study_instance_uid
    from_b = make_study(instances=1).model_copy(
        update={"study_instance_uid": uid, "sender_ura": "33334444", "recipient_ura": OTHER_URA}
    )
    to_a = make_destination(endpoint_id="portal", channel=DeliveryChannel.PICKUP)
    to_b = make_destination(
        organisation_ura=OTHER_URA, endpoint_id="portal", channel=DeliveryChannel.PICKUP
    )
    journeys = fold(
        make_route_resolved(study=from_a, destination=to_a),
        make_route_resolved(study=from_b, destination=to_b),
    )

    def objects(recipient: str, sender: str | None) -> list[str]:
        found = manifest(journeys, uid, 1, recipient, sender)
        assert found is not None
        return sorted(i.object_key for i in found)

    assert objects(RECIPIENT_URA, SENDER_URA) == sorted(i.object_key for i in from_a.instances)
    assert objects(OTHER_URA, "33334444") == sorted(i.object_key for i in from_b.instances)
    # A link signed before links named the sender: the one sender that routed it there.
    assert objects(RECIPIENT_URA, None) == objects(RECIPIENT_URA, SENDER_URA)
    assert manifest(journeys, uid, 1, OTHER_URA, SENDER_URA) is None


def test_no_manifest_is_kept_for_a_version_without_a_pickup_route() -> None:
    study = make_study()
    journeys = fold(make_study_received(study=study), make_route_resolved(study=study))

    version = journeys.get(study.study_instance_uid).versions[(SENDER_URA, RECIPIENT_URA, 1)]  # type: ignore[union-attr]
    assert version.pickup is None
    assert manifest(journeys, study.study_instance_uid, 1, RECIPIENT_URA) is None


def test_replaying_records_changes_nothing() -> None:
    study = make_study()
    uid = study.study_instance_uid
    records = [
        rec(make_study_received(study=study)),
        rec(make_consent_checked(study=study)),
        rec(make_route_resolved(study=study)),
        rec(make_delivery_failed(study_instance_uid=uid, attempt=1)),
    ]
    once, twice = JourneyFold(CODEC), JourneyFold(CODEC)
    for record in records:
        once.apply_record(record)
    for record in records + records:
        twice.apply_record(record)

    assert repr(once.get(uid)) == repr(twice.get(uid))
    assert len(twice) == 1


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (rec(make_access_logged()), "not part of a study's journey"),
        (rec(make_delivery_queued()), "not part of a study's journey"),
        (rec(make_study_received(), value=b"{not json"), "not JSON"),
        (rec(make_study_received(), headers=()), "no 'schema' header"),
        (rec(make_study_received(), value=None), "tombstone"),
    ],
)
def test_records_that_are_not_journey_events_are_poison(record: Rec, reason: str) -> None:
    journeys = JourneyFold(CODEC)

    with pytest.raises(PoisonEvent, match=reason):
        journeys.apply_record(record)
    assert len(journeys) == 0


# --- the dead letters -----------------------------------------------------------------------------


def dead(queued: DeliveryQueued, **overrides: Any) -> Rec:
    encoded = CODEC.encode(queued)
    fields: dict[str, Any] = {
        "topic": "delivery-dead-letter",
        "key": queued.key.encode(),
        "value": encoded.value,
        "headers": encoded.headers,
    }
    fields.update(overrides)
    return rec(queued, **fields)


def test_a_dead_letter_is_listed_newest_first_and_a_tombstone_clears_it() -> None:
    letters = DeadLetterFold(CODEC)
    old = make_delivery_queued(attempt=6, last_failure="HTTP 401 from the receiver")
    new = make_delivery_queued(attempt=2, last_failure="endpoint disabled")
    letters.apply_record(dead(old, timestamp=int(T0.timestamp() * 1000)))
    letters.apply_record(dead(new, timestamp=int(T0.timestamp() * 1000) + 60_000))

    listed = letters.list()
    assert [d.key for d in listed] == [new.key, old.key]
    assert (listed[1].attempts, listed[1].last_failure) == (6, "HTTP 401 from the receiver")
    assert listed[1].dead_since == T0
    assert listed[1].first_queued_at == old.first_queued_at
    assert listed[1].study_instance_uid == old.route.study.study_instance_uid

    letters.apply_record(dead(old, value=None, headers=()))

    assert [d.key for d in letters.list()] == [new.key]
    assert letters.get(old.key) is None


def test_a_requeued_dead_letter_is_a_fresh_first_attempt_of_the_same_route() -> None:
    letters = DeadLetterFold(CODEC)
    refused = RefusedInstance(sop_instance_uid="1.2.3", code="A900", reason="does not match")
    entry = make_delivery_queued(
        attempt=6,
        not_before=T0 + timedelta(hours=2),
        last_failure="HTTP 503",
        stored=("1.2.4",),
        refused=(refused,),
        already_present=("1.2.5",),
    )
    record = dead(entry)
    letters.apply_record(record)

    fresh = letters.requeued(entry.key, now=T0 + timedelta(days=1))
    again = letters.requeued(entry.key, now=T0 + timedelta(days=2))

    assert fresh.route == entry.route
    assert (fresh.attempt, fresh.not_before, fresh.last_failure) == (1, None, None)
    # A run of its own: queued again when the last one died, so its events are not the dead
    # run's (a consumer deduplicating on event ids would drop its final failure).
    assert fresh.first_queued_at == letters.get(entry.key).dead_since != entry.first_queued_at  # type: ignore[union-attr]
    assert fresh.correlation_id == entry.correlation_id
    # What the receiver holds is not sent again; what it refused is tried anew.
    assert fresh.stored == ("1.2.4",) and fresh.refused == ()
    assert fresh.already_present == ("1.2.5",)
    assert fresh.key == entry.key
    # Deterministic (two replicas re-driving at once publish one event), but not the old id.
    assert fresh.event_id == again.event_id != entry.event_id


def test_a_dead_letter_keyed_for_another_delivery_is_poison_and_hides_the_older_value() -> None:
    letters = DeadLetterFold(CODEC)
    entry = make_delivery_queued()
    letters.apply_record(dead(entry))

    with pytest.raises(PoisonEvent, match="another delivery"):
        letters.apply_record(dead(make_delivery_queued(), key=entry.key.encode()))
    assert letters.get(entry.key) is None
    delivered = CODEC.encode(make_delivered())
    with pytest.raises(PoisonEvent, match="not a dead-lettered delivery"):
        letters.apply_record(dead(entry, value=delivered.value, headers=delivered.headers))
