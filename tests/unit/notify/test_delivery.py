"""What one delivery attempt leads to: delivered, a retry on the next tier, or a dead letter."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from services.notify.domain.delivery import (
    ROUTINE_QUEUE,
    URGENT_QUEUE,
    Attempt,
    batches,
    conclude,
    queue_for,
    queued,
    remaining,
    selected,
)
from services.notify.domain.outcomes import (
    BatchResult,
    InstanceOutcome,
    InstanceStatus,
    outcome_for_status,
)
from services.notify.domain.retry import DEAD_LETTER_TOPIC, RetryPolicy
from shared.events import Delivered, DeliveryFailed, DeliveryQueued, Urgency
from shared.events.routing import BatchLimits
from tests.factories import (
    T0,
    make_destination,
    make_instance_ref,
    make_route_resolved,
    make_study,
)

NOW = T0 + timedelta(hours=1)
POLICY = RetryPolicy(delays=(10.0, 60.0))


def delivery(instances: int = 3, **route_overrides: object) -> DeliveryQueued:
    route = make_route_resolved(study=make_study(instances), **route_overrides)
    return queued(route, now=NOW)


def stored(uid: str) -> InstanceOutcome:
    return InstanceOutcome(uid, InstanceStatus.STORED)


def failed(uid: str, code: str, transient: bool) -> InstanceOutcome:
    return InstanceOutcome(uid, InstanceStatus.FAILED, code, "refused", transient)


def present(uid: str, code: str = "0111") -> InstanceOutcome:
    return InstanceOutcome(uid, InstanceStatus.ALREADY_PRESENT, code, "duplicate SOP instance")


def uids(d: DeliveryQueued) -> list[str]:
    return [i.sop_instance_uid for i in selected(d.route)]


def test_urgent_and_emergency_have_their_own_queue() -> None:
    assert queue_for(Urgency.ROUTINE) == ROUTINE_QUEUE
    assert queue_for(Urgency.URGENT) == queue_for(Urgency.EMERGENCY) == URGENT_QUEUE


def test_queueing_a_route_twice_gives_the_same_record() -> None:
    route = make_route_resolved()
    assert queued(route, now=route.occurred_at) == queued(route, now=route.occurred_at)


def test_deliveries_of_one_study_version_to_endpoints_of_the_same_id_are_not_one() -> None:
    # Versions are numbered per (study, sender, recipient), endpoint ids per provider: a study
    # sent to two hospitals whose PACS are both "pacs", or by two senders, is two deliveries.
    study = make_study(2)
    to_a = make_route_resolved(study=study, destination=make_destination(endpoint_id="pacs"))
    to_b = make_route_resolved(
        study=study.model_copy(update={"recipient_ura": "22223333"}),
        destination=make_destination(organisation_ura="22223333", endpoint_id="pacs"),
    )
    from_other = make_route_resolved(
        study=study.model_copy(update={"sender_ura": "44445555"}),
        destination=make_destination(endpoint_id="pacs"),
    )
    deliveries = [queued(r, now=NOW) for r in (to_a, to_b, from_other)]
    assert len({d.key for d in deliveries}) == 3
    assert len({d.event_id for d in deliveries}) == 3
    assert len({d.partition_key() for d in deliveries}) == 3
    assert deliveries[1].key == f"{study.study_instance_uid}|1|{study.sender_ura}|22223333|pacs"


def test_a_route_without_a_selection_sends_the_new_instances_of_its_version() -> None:
    study = make_study(4)
    study = study.model_copy(
        update={"new_sop_instance_uids": tuple(i.sop_instance_uid for i in study.instances[2:])}
    )
    route = make_route_resolved(study=study, sop_instance_uids=None)
    assert [i.sop_instance_uid for i in selected(route)] == list(study.new_sop_instance_uids)
    chosen = make_route_resolved(
        study=study, sop_instance_uids=(study.instances[0].sop_instance_uid,)
    )
    assert selected(chosen) == [study.instances[0]]


def test_every_instance_stored_is_delivered_once_with_a_stable_id() -> None:
    d = delivery(3)
    attempt = Attempt(BatchResult(tuple(stored(u) for u in uids(d))))
    [event] = conclude(d, attempt, policy=POLICY, now=NOW)
    assert isinstance(event, Delivered)
    assert (event.outcomes.sent, event.outcomes.failed, event.attempts) == (3, 0, 1)
    [again] = conclude(d, attempt, policy=POLICY, now=NOW + timedelta(seconds=5))
    assert again.event_id == event.event_id


def test_a_refused_instance_is_named_and_the_rest_delivered() -> None:
    d = delivery(3)
    first, *rest = uids(d)
    attempt = Attempt(BatchResult((failed(first, "A900", False), *map(stored, rest))))
    [event] = conclude(d, attempt, policy=POLICY, now=NOW)
    assert isinstance(event, Delivered)
    assert (event.outcomes.sent, event.outcomes.failed) == (2, 1)
    assert [(r.sop_instance_uid, r.code) for r in event.refused] == [(first, "A900")]


def test_an_attempt_where_everything_was_refused_is_dead_not_delivered() -> None:
    d = delivery(2)
    attempt = Attempt(BatchResult(tuple(failed(u, "0122", False) for u in uids(d))))
    failure, (topic, dead) = conclude(d, attempt, policy=POLICY, now=NOW)
    assert isinstance(failure, DeliveryFailed) and failure.final
    assert "no instance could be delivered" in failure.reason
    assert topic == DEAD_LETTER_TOPIC and isinstance(dead, DeliveryQueued)


def test_instances_the_receiver_holds_already_are_delivered_as_already_present() -> None:
    # A resend after an abort: the receiver answers 0111 (C-STORE) or B00E (STOW-RS) for the
    # instances our lost attempt did store. Not failures, and not a dead letter.
    d = delivery(3)
    a, b, c = uids(d)
    attempt = Attempt(BatchResult((present(a), present(b, "B00E"), stored(c))))

    [event] = conclude(d, attempt, policy=POLICY, now=NOW)

    assert isinstance(event, Delivered)
    assert event.outcomes.model_dump() == {
        "sent": 1,
        "already_present": 2,
        "warnings": 0,
        "failed": 0,
    }
    assert event.refused == ()


def test_a_delivery_the_receiver_held_entirely_already_is_delivered() -> None:
    d = delivery(2)
    attempt = Attempt(BatchResult(tuple(present(u) for u in uids(d))))

    [event] = conclude(d, attempt, policy=POLICY, now=NOW)

    assert isinstance(event, Delivered)
    assert (event.outcomes.sent, event.outcomes.already_present) == (0, 2)


def test_instances_already_present_beside_refused_ones_make_a_delivery() -> None:
    # The receiver holds some of it: not "nothing could be delivered".
    d = delivery(2)
    a, b = uids(d)
    attempt = Attempt(BatchResult((present(a), failed(b, "A900", False))))

    [event] = conclude(d, attempt, policy=POLICY, now=NOW)

    assert isinstance(event, Delivered)
    assert (event.outcomes.already_present, event.outcomes.failed) == (1, 1)


def test_instances_already_present_are_settled_never_sent_again_and_counted_at_the_end() -> None:
    d = delivery(3)
    a, b, c = uids(d)
    first = Attempt(BatchResult((present(a), failed(b, "A700", True), stored(c))))

    _, (_, retry) = conclude(d, first, policy=POLICY, now=NOW)

    assert isinstance(retry, DeliveryQueued)
    assert (retry.stored, retry.already_present) == ((c,), (a,))
    assert [i.sop_instance_uid for i in remaining(retry)] == [b]
    [event] = conclude(retry, Attempt(BatchResult((stored(b),))), policy=POLICY, now=NOW)
    assert isinstance(event, Delivered)
    assert (event.outcomes.sent, event.outcomes.already_present, event.attempts) == (2, 1, 2)


def test_turns_that_only_found_instances_already_present_are_distinct_events() -> None:
    d = delivery(3)
    a, b, _ = uids(d)

    [(_, turn)] = conclude(
        d, Attempt(BatchResult((present(a),)), yielded=True), policy=POLICY, now=NOW
    )
    [(_, second)] = conclude(
        turn, Attempt(BatchResult((present(b),)), yielded=True), policy=POLICY, now=NOW
    )

    assert turn.event_id != second.event_id
    assert second.already_present == (a, b)


def test_a_transient_failure_goes_to_the_first_tier_with_what_was_stored() -> None:
    d = delivery(3)
    a, b, c = uids(d)
    attempt = Attempt(BatchResult((stored(a), failed(b, "A700", True), stored(c))))
    failure, (topic, retry) = conclude(d, attempt, policy=POLICY, now=NOW)
    assert isinstance(failure, DeliveryFailed) and not failure.final
    assert failure.next_attempt_at == NOW + timedelta(seconds=10)
    assert topic == "delivery-retry-10s"
    assert isinstance(retry, DeliveryQueued)
    assert (retry.attempt, retry.not_before) == (2, NOW + timedelta(seconds=10))
    assert set(retry.stored) == {a, c}
    assert [i.sop_instance_uid for i in remaining(retry)] == [b]


def test_the_receivers_retry_after_is_waited_out_on_a_tier_whose_delay_covers_it() -> None:
    # Every record of a tier waits that tier's delay, so its head is the one due first: a
    # record due later than the tier's delay would hold up every record behind it.
    d = delivery(1)
    policy = RetryPolicy(delays=(10.0, 60.0, 300.0))
    cases = [(1, "delivery-retry-10s", 10), (30, "delivery-retry-1m", 60),
             (120, "delivery-retry-5m", 300), (86_400, "delivery-retry-5m", 300)]  # fmt: skip
    for retry_after, tier, waited in cases:
        attempt = Attempt(BatchResult(()), failure="HTTP 503", retry_after=retry_after)
        failure, (topic, retry) = conclude(d, attempt, policy=policy, now=NOW)
        assert (topic, retry.not_before) == (tier, NOW + timedelta(seconds=waited))
        assert failure.next_attempt_at == retry.not_before
        assert retry.attempt == 2


def test_a_processing_failure_is_retried_on_the_tiers_then_dead_lettered() -> None:
    # 0110 is the receiver's own internal error (dcm4chee, Azure): worth another try, but a
    # delivery still holding one when the tiers are used up gives up like any transient one.
    d = delivery(2)
    a, b = uids(d)
    attempt = Attempt(BatchResult((stored(a), outcome_for_status(b, 0x0110))))

    failure, (topic, retry) = conclude(d, attempt, policy=POLICY, now=NOW)

    assert not failure.final and topic == "delivery-retry-10s"
    assert "0110" in failure.reason and retry.refused == ()
    assert [i.sop_instance_uid for i in remaining(retry)] == [b]
    last = retry.model_copy(update={"attempt": 3})
    again = Attempt(BatchResult((outcome_for_status(b, 0x0110),)))
    failure, (topic, dead) = conclude(last, again, policy=POLICY, now=NOW)
    assert failure.final and "gave up after 3 attempts" in failure.reason
    assert topic == DEAD_LETTER_TOPIC and dead.stored == (a,)


def test_retries_used_up_and_permanent_failures_are_dead_letters() -> None:
    last = delivery(1).model_copy(update={"attempt": 3})
    down = Attempt(BatchResult(()), failure="receiver unreachable")
    failure, (topic, dead) = conclude(last, down, policy=POLICY, now=NOW)
    assert failure.final and "gave up after 3 attempts" in failure.reason
    assert topic == DEAD_LETTER_TOPIC and dead.last_failure == failure.reason
    refused = Attempt(BatchResult(()), failure="HTTP 403", failure_is_permanent=True)
    failure, (topic, _) = conclude(delivery(1), refused, policy=POLICY, now=NOW)
    assert failure.final and failure.attempt == 1 and topic == DEAD_LETTER_TOPIC


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=5000), max_size=40),
    max_instances=st.integers(min_value=1, max_value=7),
    max_bytes=st.integers(min_value=1, max_value=9000),
)
def test_batches_keep_every_instance_once_in_order_within_the_limits(
    sizes: list[int], max_instances: int, max_bytes: int
) -> None:
    refs = [make_instance_ref(data=b"x", size=size) for size in sizes]
    limits = BatchLimits(max_instances=max_instances, max_bytes=max_bytes)
    out = batches(refs, limits)
    assert [r for batch in out for r in batch] == refs
    for batch in out:
        assert len(batch) <= max_instances
        assert len(batch) == 1 or sum(r.size for r in batch) <= max_bytes


def test_a_run_re_driven_from_the_dead_letters_has_event_ids_of_its_own() -> None:
    first = delivery(1)
    # What the dead-letter fold re-drives: attempt 1 again, queued when the first run died.
    again = first.model_copy(update={"first_queued_at": NOW + timedelta(days=1)})
    down = Attempt(BatchResult(()), failure="receiver unreachable")

    [failed_first, (_, retry_first)] = conclude(first, down, policy=POLICY, now=NOW)
    [failed_again, (_, retry_again)] = conclude(again, down, policy=POLICY, now=NOW)

    assert failed_first.event_id != failed_again.event_id
    assert retry_first.event_id != retry_again.event_id
    # A replay of either run is that run's events again.
    assert conclude(again, down, policy=POLICY, now=NOW)[0].event_id == failed_again.event_id
