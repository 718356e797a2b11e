"""Deliveries notify gave up on: listed for an operator, and re-driven onto a queue on request.

``delivery-dead-letter`` is a compacted table: the key is the delivery
(:func:`~shared.events.delivery_key`, ``study|version|sender|destination|endpoint``), the
value the :class:`~shared.events.DeliveryQueued` that failed for the last time
(``last_failure`` says why), and a tombstone (value ``None``) clears it once it has been
re-driven. Every API replica folds the whole topic in memory (:class:`DeadLetters`, a
:class:`~shared.topic_view.TopicView`): dead letters are few, and each is kept as its encoded
bytes plus a small summary.

A re-drive publishes a fresh ``DeliveryQueued`` (the same route, attempt 1, due now, its first
queueing time kept) to ``delivery-urgent`` or ``delivery-routine`` by the route's priority, and
a tombstone for the dead letter, **in one Kafka transaction**:

- both or neither: a crash half-way neither loses the delivery (tombstone without re-queue)
  nor leaves a dead letter behind for a delivery that is queued again;
- the tombstone is written first and the worker (``read_committed``) only sees the re-queued
  delivery once both are committed, so a delivery that fails again at once is dead-lettered
  *after* the tombstone, never wiped out by it.

The new event id is derived from the key and the dead letter's own offset, so two replicas
re-driving the same dead letter at once publish the same event, which the worker recognises.
Instances the receiver already holds (``stored``, ``already_present``) stay settled; instances
it refused for good (``refused``) are tried again: an operator re-drives after fixing
something, most often that.

The call returns once Kafka acknowledged the transaction and, read-your-writes, once this
process's view has applied the tombstone (``Redriven.visible`` says whether it did in time).
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka.errors import KafkaError

from services.notify.domain.retry import DEAD_LETTER_TOPIC
from shared.codec import Codec
from shared.errors import PoisonEvent, TransientError
from shared.events import DeliveryChannel, DeliveryQueued, Urgency
from shared.kafka import KafkaEventPublisher
from shared.logging import get_logger
from shared.settings import KafkaSettings
from shared.topic_view import TopicView, ViewFailed

log = get_logger(__name__)

URGENT_QUEUE = "delivery-urgent"
ROUTINE_QUEUE = "delivery-routine"
PRODUCER = "notify-api"
# Re-drives of one "redrive all" per transaction: bounded, so a large backlog is not one
# enormous transaction that a broker hiccup aborts as a whole.
REDRIVE_BATCH = 200
_NAMESPACE = uuid.UUID("5b7e8f0e-49a1-4c3e-8f2c-6d1f0e3a9b47")
# A delivery key as the API accepts it: Study Instance UID | version | sender URA | destination
# URA | endpoint id (a slug, as the provider directory demands). Dead letters written before
# 2026-11-27 have keys without the two URAs: still accepted, to re-drive them.
KEY_PATTERN = (
    r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+"  # Study Instance UID
    r"\|[1-9][0-9]{0,9}"  # | version
    r"(\|[0-9]{8}\|[0-9]{8})?"  # | sender URA | destination URA
    r"\|[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # | endpoint id
)
_KEY = re.compile(KEY_PATTERN)


@dataclass(frozen=True, slots=True)
class DeadLetterTopics:
    """Where dead letters live and where re-driven deliveries go; tests name tagged copies."""

    dead_letter: str = DEAD_LETTER_TOPIC
    urgent: str = URGENT_QUEUE
    routine: str = ROUTINE_QUEUE

    def queue_for(self, priority: Urgency) -> str:
        """Urgent and emergency deliveries have a queue (and consumers) of their own."""
        return self.routine if Urgency(priority) is Urgency.ROUTINE else self.urgent


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What an operator sees of one dead letter: identifiers and why, no patient data."""

    key: str
    study_instance_uid: str
    study_version: int
    destination_ura: str
    endpoint_id: str
    channel: DeliveryChannel
    priority: Urgency
    attempts: int
    last_failure: str | None
    first_queued_at: datetime
    # The dead-letter record's timestamp: when notify gave up.
    dead_since: datetime
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Redriven:
    """A dead letter put back on a queue."""

    key: str
    study_instance_uid: str
    study_version: int
    destination_ura: str
    endpoint_id: str
    priority: Urgency
    queue: str
    event_id: uuid.UUID
    # This process's list no longer shows it (the tombstone was applied in time).
    visible: bool = False


def is_delivery_key(key: str) -> bool:
    return len(key) <= 256 and _KEY.fullmatch(key) is not None


# --- the fold (pure) ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Stored:
    letter: DeadLetter
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


class DeadLetterFold:
    """The dead-letter table as its records say, applied in order; no Kafka here."""

    def __init__(self, codec: Codec | None = None) -> None:
        self._codec = codec or Codec()
        self._letters: dict[str, _Stored] = {}

    def __len__(self) -> int:
        return len(self._letters)

    def apply_record(self, record: Any) -> None:
        key = _key_of(record.key)
        if record.value is None:  # tombstone: re-driven (or cleared)
            self._letters.pop(key, None)
            return
        # What compaction keeps for this key is this record, readable or not: a restarted view
        # would not hold the previous value either.
        self._letters.pop(key, None)
        headers = tuple(record.headers or ())
        event = self._codec.decode(record.value, headers)
        if not isinstance(event, DeliveryQueued):
            raise PoisonEvent(f"{type(event).schema_name} is not a dead-lettered delivery")
        if event.key != key:
            raise PoisonEvent("dead-letter record keyed for another delivery than it holds")
        route = event.route
        letter = DeadLetter(
            key=key,
            study_instance_uid=route.study.study_instance_uid,
            study_version=route.study.version,
            destination_ura=route.destination.organisation_ura,
            endpoint_id=route.destination.endpoint_id,
            channel=route.destination.channel,
            priority=route.priority,
            attempts=event.attempt,
            last_failure=event.last_failure,
            first_queued_at=event.first_queued_at,
            dead_since=datetime.fromtimestamp(record.timestamp / 1000, tz=UTC),
            partition=record.partition,
            offset=record.offset,
        )
        self._letters[key] = _Stored(letter, record.value, headers)

    def list(self) -> builtins.list[DeadLetter]:
        """Newest first."""
        letters = [stored.letter for stored in self._letters.values()]
        return sorted(letters, key=lambda d: (d.dead_since, d.partition, d.offset), reverse=True)

    def get(self, key: str) -> DeadLetter | None:
        stored = self._letters.get(key)
        return stored.letter if stored is not None else None

    def requeued(self, key: str, *, now: datetime, producer: str = PRODUCER) -> DeliveryQueued:
        """The fresh first attempt that re-drives the dead letter ``key`` (KeyError if none)."""
        stored = self._letters[key]
        entry = self._codec.decode(stored.value, stored.headers)
        assert isinstance(entry, DeliveryQueued)  # checked when applied
        letter = stored.letter
        update: dict[str, Any] = {
            "event_id": uuid.uuid5(_NAMESPACE, f"redrive|{key}|{letter.partition}|{letter.offset}"),
            "occurred_at": now,
            "producer": producer,
            "attempt": 1,
            "not_before": None,
            "last_failure": None,
            # A run of its own, queued when the last one died (the same on every replica): its
            # events get ids of their own, not the dead run's (delivery._id).
            "first_queued_at": letter.dead_since,
        }
        if "refused" in DeliveryQueued.model_fields:
            update["refused"] = ()
        return DeliveryQueued.model_validate({**entry.model_dump(), **update})


def _key_of(raw: bytes | None) -> str:
    if raw is None:
        raise PoisonEvent("dead-letter record has no key")
    try:
        key = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PoisonEvent("dead-letter record key is not text") from None
    # Its shape is checked against the value it holds (DeliveryQueued.key), not a pattern: a
    # dead letter is listed even if its endpoint id is not a directory slug.
    if not key:
        raise PoisonEvent("dead-letter record has an empty key")
    return key


# --- the view and the re-drive --------------------------------------------------------------------


class DeadLetters(TopicView):
    """The dead letters as far as this process has read them, and the re-drive.

    ``publisher``, when given, must be a :class:`KafkaEventPublisher` built with a
    ``transactional_id`` unique to this process; by default one is built and owned here.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: DeadLetterTopics | None = None,
        *,
        publisher: KafkaEventPublisher | None = None,
        codec: Codec | None = None,
        name: str = "notify-dead-letters",
        producer: str = PRODUCER,
        poll_timeout_ms: int = 200,
    ) -> None:
        self.topics = topics or DeadLetterTopics()
        self._codec = codec or Codec()
        self._fold = DeadLetterFold(self._codec)
        self._producer_name = producer
        self._owns_publisher = publisher is None
        self._publisher = publisher or KafkaEventPublisher(
            kafka,
            "notify-redrive",
            self._codec,
            transactional_id=f"{kafka.client_id_prefix}-notify-redrive-{uuid.uuid4().hex}",
            linger_ms=0,
        )
        # One transaction at a time on the producer; it also serialises re-drives of one key.
        self._redrive_lock = asyncio.Lock()
        super().__init__(
            kafka,
            [self.topics.dead_letter],
            self._fold.apply_record,
            name=name,
            poll_timeout_ms=poll_timeout_ms,
        )

    async def start(self) -> None:
        if self._owns_publisher:
            await self._publisher.start()
        try:
            await super().start()
        except BaseException:
            if self._owns_publisher:
                await self._publisher.stop()
            raise

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            if self._owns_publisher:
                await self._publisher.stop()

    def __len__(self) -> int:
        return len(self._fold)

    def list(self) -> builtins.list[DeadLetter]:
        """Every dead letter this process has read, newest first."""
        return self._fold.list()

    def get(self, key: str) -> DeadLetter | None:
        return self._fold.get(key)

    async def redrive(self, key: str, timeout: float = 10.0) -> Redriven | None:
        """Re-drive one dead letter; None when there is none under ``key`` (also after a sync,
        so one dead-lettered a moment ago is found). Raises TransientError when Kafka did not
        take it (then nothing changed)."""
        async with self._redrive_lock:
            if self._fold.get(key) is None:
                await self._synced(timeout)
                if self._fold.get(key) is None:
                    return None
            done = await self._publish([key], timeout)
        return done[0]

    async def redrive_all(self, timeout: float = 10.0) -> builtins.list[Redriven]:
        """Re-drive every dead letter on the topic now (a sync first), newest first."""
        async with self._redrive_lock:
            await self._synced(timeout)
            keys = [letter.key for letter in self._fold.list()]
            done: builtins.list[Redriven] = []
            for start in range(0, len(keys), REDRIVE_BATCH):
                done += await self._publish(keys[start : start + REDRIVE_BATCH], timeout)
        return done

    # --- internals --------------------------------------------------------------------------

    async def _synced(self, timeout: float) -> None:
        try:
            await self.sync(timeout)
        except (TimeoutError, ViewFailed) as exc:
            raise TransientError(f"the dead letters could not be read: {exc}") from None

    async def _publish(self, keys: Sequence[str], timeout: float) -> builtins.list[Redriven]:
        now = datetime.now(UTC)
        plans = []
        for key in keys:
            fresh = self._fold.requeued(key, now=now, producer=self._producer_name)
            plans.append((key, fresh, self.topics.queue_for(fresh.route.priority)))
        producer = self._publisher.producer
        try:
            async with asyncio.timeout(timeout), producer.transaction():
                tombstone_futures, requeue_futures = [], []
                for key, fresh, queue in plans:
                    # The tombstone first, in the same transaction (see the module docstring).
                    tombstone_futures.append(
                        await producer.send(self.topics.dead_letter, key=key.encode(), value=None)
                    )
                    requeue_futures.append(await self._publisher.send(fresh, queue))
                tombstones = await asyncio.gather(*tombstone_futures)
                await asyncio.gather(*requeue_futures)
        except (KafkaError, TimeoutError) as exc:
            log.error("re-drive failed; nothing changed", deliveries=len(plans), error=str(exc))
            raise TransientError(f"re-driving {len(plans)} deliveries failed: {exc}") from None
        redriven = [
            Redriven(
                key=key,
                study_instance_uid=fresh.route.study.study_instance_uid,
                study_version=fresh.route.study.version,
                destination_ura=fresh.route.destination.organisation_ura,
                endpoint_id=fresh.route.destination.endpoint_id,
                priority=fresh.route.priority,
                queue=queue,
                event_id=fresh.event_id,
            )
            for key, fresh, queue in plans
        ]
        for item in redriven:
            log.info(
                "dead letter re-driven",
                study_instance_uid=item.study_instance_uid,
                study_version=item.study_version,
                endpoint_id=item.endpoint_id,
                queue=item.queue,
            )
        # Read-your-writes: wait until this process's view has applied every tombstone.
        last: dict[int, int] = {}
        for metadata in tombstones:
            last[metadata.partition] = max(last.get(metadata.partition, -1), metadata.offset)
        try:
            for partition, offset in last.items():
                await self.wait_for_offset(self.topics.dead_letter, partition, offset, timeout)
        except (TimeoutError, ViewFailed) as exc:
            log.warning("re-driven, but not yet visible here", error=str(exc))
            return redriven
        return [dataclasses.replace(item, visible=True) for item in redriven]
