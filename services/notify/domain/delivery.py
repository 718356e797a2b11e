"""One delivery attempt, decided without I/O: what to send, in which batches, and what follows.

A delivery is one study version to one endpoint (``DeliveryQueued.key``). An attempt sends the
instances earlier attempts did not settle, in batches within the receiver's limits, and ends in
exactly one of:

- **delivered**: nothing is left to retry and at least one instance is at the receiver: stored
  by it, or answered as held already (``already_present``: C-STORE 0111 or STOW-RS B00E, as
  a rule our own copy from an attempt whose answer was lost; never sent again). Instances the
  receiver refused for good (or that could not be sent at all, e.g. no verified BSN to coerce
  to) are named in ``refused`` and counted as failed. One ``Delivered`` per delivery (event
  id from the key), whatever the number of attempts;
- **retry**: something failed for now (the receiver was down, answered A7xx, 5xx, ...) and the
  policy has another delay: a ``DeliveryFailed`` (not final) and the delivery, with what it
  settled so far, onto the retry tier of that delay, due at ``not_before``;
- **dead**: the failure is permanent for the whole delivery (the receiver refuses our
  credentials, the endpoint left the directory) or the retries are used up: a final
  ``DeliveryFailed`` and the delivery on the dead-letter topic, for an operator to re-drive.
  So is an attempt where every instance was refused: the receiver holds none of them;
- **yielded**: the attempt used up its time slice (``Deliverer.attempt_seconds``) with batches
  left and nothing failed: the delivery, with what it settled so far, goes to the back of its
  priority queue, the same attempt. A large study to a slow receiver thus takes turns with the
  deliveries queued behind it instead of holding them up for its whole length (a worker
  handles a fetched batch of records together).

Event ids derive from the delivery key and the attempt, so a replayed attempt repeats its
events under the same ids.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.notify.domain.outcomes import BatchResult, InstanceStatus
from services.notify.domain.retry import DEAD_LETTER_TOPIC, RetryPolicy, tier_topic_name
from shared.events import (
    Delivered,
    DeliveryFailed,
    DeliveryQueued,
    InstanceOutcomes,
    InstanceRef,
    RefusedInstance,
    RouteResolved,
    Urgency,
    delivery_key,
)
from shared.events.routing import BatchLimits
from shared.stream import Outgoing

PRODUCER = "notify"
URGENT_QUEUE = "delivery-urgent"
ROUTINE_QUEUE = "delivery-routine"
_NAMESPACE = uuid.UUID("6f0c8a36-3b0e-4c55-9d43-0c5e4f6a1d21")
# When a receiver states no limits (an older route): what Orthanc's own STOW client sends.
DEFAULT_LIMITS = BatchLimits(max_instances=10, max_bytes=10 * 1024 * 1024)


def queue_for(urgency: Urgency) -> str:
    """Urgent and emergency deliveries have a queue (and consumers) of their own."""
    return ROUTINE_QUEUE if urgency is Urgency.ROUTINE else URGENT_QUEUE


def queued(route: RouteResolved, *, now: datetime, producer: str = PRODUCER) -> DeliveryQueued:
    """The first attempt of the delivery a route asks for."""
    study, destination = route.study, route.destination
    key = delivery_key(
        study.study_instance_uid,
        study.version,
        study.sender_ura,
        destination.organisation_ura,
        destination.endpoint_id,
    )
    return DeliveryQueued(
        event_id=_id(key, "queued", 1),
        occurred_at=now,
        correlation_id=route.correlation_id,
        producer=producer,
        route=route,
        attempt=1,
        first_queued_at=now,
    )


def selected(route: RouteResolved) -> list[InstanceRef]:
    """The instances this route delivers, in the snapshot's order."""
    study = route.study
    wanted = route.sop_instance_uids
    if wanted is None:  # an older route: the new instances of this version
        wanted = study.new_sop_instance_uids or tuple(i.sop_instance_uid for i in study.instances)
    chosen = set(wanted)
    return [i for i in study.instances if i.sop_instance_uid in chosen]


def remaining(delivery: DeliveryQueued) -> list[InstanceRef]:
    """What this attempt must still send: the selection minus what earlier attempts settled."""
    settled = (
        set(delivery.stored)
        | set(delivery.already_present)
        | {r.sop_instance_uid for r in delivery.refused}
    )
    return [i for i in selected(delivery.route) if i.sop_instance_uid not in settled]


def batches(
    instances: Sequence[InstanceRef], limits: BatchLimits | None
) -> list[list[InstanceRef]]:
    """Consecutive batches within the limits; an instance larger than max_bytes goes alone."""
    limits = limits or DEFAULT_LIMITS
    out: list[list[InstanceRef]] = []
    current: list[InstanceRef] = []
    size = 0
    for instance in instances:
        full = len(current) >= limits.max_instances or size + instance.size > limits.max_bytes
        if current and full:
            out.append(current)
            current, size = [], 0
        current.append(instance)
        size += instance.size
    if current:
        out.append(current)
    return out


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one attempt achieved: per-instance outcomes, instances not sendable, and a
    whole-delivery failure (``failure``) that stopped it, if any."""

    results: BatchResult
    unsendable: tuple[RefusedInstance, ...] = ()
    failure: str | None = None
    failure_is_permanent: bool = False
    retry_after: float | None = None
    # Stopped with batches left because its time slice was used up (nothing failed).
    yielded: bool = False


def conclude(
    delivery: DeliveryQueued,
    attempt: Attempt,
    *,
    policy: RetryPolicy,
    now: datetime,
    producer: str = PRODUCER,
) -> list[Outgoing]:
    """The events that follow an attempt (see the module docstring)."""
    stored = list(delivery.stored)
    present = list(delivery.already_present)
    refused = list(delivery.refused) + list(attempt.unsendable)
    transient: list[str] = []
    warnings = 0
    for outcome in attempt.results.outcomes:
        if outcome.status is InstanceStatus.FAILED:
            if outcome.transient:
                transient.append(f"{outcome.code or '?'}")
            else:
                refused.append(
                    RefusedInstance(
                        sop_instance_uid=outcome.sop_instance_uid,
                        code=outcome.code,
                        reason=(outcome.reason or "refused by the receiver")[:256],
                    )
                )
        elif outcome.status is InstanceStatus.ALREADY_PRESENT:
            present.append(outcome.sop_instance_uid)
        else:
            stored.append(outcome.sop_instance_uid)
            warnings += outcome.status is InstanceStatus.WARNING
    progressed = delivery.model_copy(
        update={
            "stored": tuple(dict.fromkeys(stored)),
            "already_present": tuple(dict.fromkeys(present)),
            "refused": _unique(refused),
        }
    )
    left = remaining(progressed)
    if attempt.yielded and attempt.failure is None and not transient and left:
        settled = len(progressed.stored) + len(progressed.already_present)
        settled += len(progressed.refused)
        turn = progressed.model_copy(
            update={
                "event_id": _id(delivery, f"yielded-{settled}", delivery.attempt),
                "occurred_at": now,
                "producer": producer,
            }
        )
        return [(queue_for(delivery.route.priority), turn)]
    if attempt.failure is None and not transient and not left:
        if progressed.refused and not (progressed.stored or progressed.already_present):
            # The receiver holds none of it: that is no delivery, whatever the reasons.
            return _dead(
                progressed, _refused_reason(progressed.refused), now=now, producer=producer
            )
        return [_delivered(progressed, warnings, now=now, producer=producer)]

    reason = attempt.failure or _transient_reason(transient, len(left))
    if attempt.failure_is_permanent:
        return _dead(progressed, reason, now=now, producer=producer)
    not_before = policy.not_before(delivery.attempt, now)
    if not_before is None:
        return _dead(
            progressed,
            f"gave up after {delivery.attempt} attempts: {reason}",
            now=now,
            producer=producer,
        )
    tier = policy.tier(delivery.attempt)
    assert tier is not None  # not_before is not None: there is a next tier
    if attempt.retry_after is not None:
        # The receiver's Retry-After: waited out on a tier whose delay covers it (not on this
        # attempt's tier, whose records would all wait behind it; see RetryPolicy).
        delay = policy.delay_covering(delivery.attempt, attempt.retry_after)
        assert delay is not None
        tier = tier_topic_name(delay)
        not_before = now + timedelta(seconds=delay)
    retry = progressed.model_copy(
        update={
            "event_id": _id(delivery, "queued", delivery.attempt + 1),
            "occurred_at": now,
            "producer": producer,
            "attempt": delivery.attempt + 1,
            "not_before": not_before,
            "last_failure": reason[:1024],
        }
    )
    return [
        _failed(delivery, reason, final=False, next_at=not_before, now=now, producer=producer),
        (tier, retry),
    ]


def _delivered(
    delivery: DeliveryQueued, warnings: int, *, now: datetime, producer: str
) -> Delivered:
    route = delivery.route
    study = route.study
    return Delivered(
        event_id=_id(delivery, "delivered", 0),
        occurred_at=now,
        correlation_id=delivery.correlation_id,
        producer=producer,
        study_instance_uid=study.study_instance_uid,
        study_version=study.version,
        destination_ura=route.destination.organisation_ura,
        endpoint_id=route.destination.endpoint_id,
        channel=route.destination.channel,
        outcomes=InstanceOutcomes(
            sent=len(delivery.stored),
            already_present=len(delivery.already_present),
            warnings=warnings,
            failed=len(delivery.refused),
        ),
        attempts=delivery.attempt,
        refused=delivery.refused,
        seconds_since_first_received=max(0.0, (now - study.first_received_at).total_seconds()),
        delivered_at=now,
        sender_ura=study.sender_ura,
    )


def _dead(delivery: DeliveryQueued, reason: str, *, now: datetime, producer: str) -> list[Outgoing]:
    dead = delivery.model_copy(
        update={
            "event_id": _id(delivery, "dead", delivery.attempt),
            "occurred_at": now,
            "producer": producer,
            "not_before": None,
            "last_failure": reason[:1024],
        }
    )
    return [
        _failed(delivery, reason, final=True, next_at=None, now=now, producer=producer),
        (DEAD_LETTER_TOPIC, dead),
    ]


def _failed(
    delivery: DeliveryQueued,
    reason: str,
    *,
    final: bool,
    next_at: datetime | None,
    now: datetime,
    producer: str,
) -> DeliveryFailed:
    route = delivery.route
    return DeliveryFailed(
        event_id=_id(delivery, "failed", delivery.attempt),
        occurred_at=now,
        correlation_id=delivery.correlation_id,
        producer=producer,
        study_instance_uid=route.study.study_instance_uid,
        study_version=route.study.version,
        destination_ura=route.destination.organisation_ura,
        endpoint_id=route.destination.endpoint_id,
        channel=route.destination.channel,
        reason=reason[:1024],
        attempt=delivery.attempt,
        final=final,
        next_attempt_at=next_at,
        sender_ura=route.study.sender_ura,
    )


def _refused_reason(refused: Sequence[RefusedInstance]) -> str:
    reasons = sorted({r.reason for r in refused})
    shown = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
    return f"no instance could be delivered ({len(refused)} refused): {shown}"


def _transient_reason(codes: list[str], left: int) -> str:
    if codes:
        shown = ", ".join(sorted(set(codes))[:5])
        return f"{len(codes)} instance(s) failed for now ({shown}); {left} left to send"
    return f"{left} instance(s) left to send"


def _unique(refused: Iterable[RefusedInstance]) -> tuple[RefusedInstance, ...]:
    return tuple({r.sop_instance_uid: r for r in refused}.values())


def _id(delivery: DeliveryQueued | str, kind: str, attempt: int) -> uuid.UUID:
    """The id of one event of a delivery run: the same for a replay of it. A run re-driven from
    the dead letters was queued again (first_queued_at) after its route: its events are not the
    first run's (a consumer deduplicating on event ids would drop the second final failure)."""
    if isinstance(delivery, str):
        return uuid.uuid5(_NAMESPACE, f"{delivery}|{kind}|{attempt}")
    run = ""
    if delivery.first_queued_at != delivery.route.occurred_at:
        run = f"|{delivery.first_queued_at.isoformat()}"
    return uuid.uuid5(_NAMESPACE, f"{delivery.key}|{kind}|{attempt}{run}")
