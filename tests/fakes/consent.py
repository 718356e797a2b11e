"""In-memory stand-ins for the consent API's Kafka adapters: the registry view and the publisher.

:class:`FakePublisher` stores each event as the record Kafka would (one partition per topic,
offsets counted per topic from 0) and hands it to its :class:`FakeView`, which, like
``RegistryView``, reads only its registry topics and folds them with the same
``RegistryFold``, skipping and counting a record that is no registry event. A record is
applied when someone waits for the view (``sync`` or ``wait_for_offset``); the real view
applies it in the background. Both pass ``tests/contracts/consent_registry.py``, as
``RegistryView`` and ``KafkaEventPublisher`` on Kafka do.

Test controls, not part of that contract: ``FakePublisher.down`` (Kafka refuses the send),
``FakePublisher.hang`` (Kafka never acknowledges), ``FakeView.caught_up`` (the view is still
reading the history) and ``FakeView.visible`` (the view applies nothing more, so waiting for a
write times out as a lagging view's does).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import KafkaConnectionError

from services.consent.adapters.registry_view import RegistryFold, RegistryTopics
from services.consent.domain.registry import PatientRegistry
from shared.codec import Codec
from shared.errors import PoisonEvent
from shared.events import Event

# The fake's topics have one partition each.
_PARTITION = 0


@dataclass(frozen=True)
class _Record:
    """A record as Kafka stores it; also the send's acknowledgement, since it names the topic,
    partition and offset as aiokafka's RecordMetadata does."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass
class FakeView:
    """The registry view (``services/consent/bootstrap.py``'s RegistryReader), fed by
    :class:`FakePublisher` instead of Kafka."""

    topics: RegistryTopics = field(default_factory=RegistryTopics)
    caught_up: bool = True
    visible: bool = True
    applied: int = 0
    skipped: int = 0
    fold: RegistryFold = field(default_factory=RegistryFold)
    pending: list[_Record] = field(default_factory=list)
    # Next offset to apply per (topic, partition), as TopicView keeps it.
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    started: bool = False

    @property
    def failed(self) -> bool:
        return False

    @property
    def is_caught_up(self) -> bool:
        return self.started and self.caught_up

    @property
    def patients(self) -> int:
        return len(self.fold)

    def lag(self) -> int:
        return len(self.pending)

    def get(self, pseudonym: str) -> PatientRegistry | None:
        return self.fold.get(pseudonym)

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    def deliver(self, record: _Record) -> None:
        """Take a record just stored; like the real view, one on another topic is not read."""
        if record.topic in self.topics.names:
            self.pending.append(record)

    async def sync(self, timeout: float) -> None:
        # Like TopicView.sync, a view that cannot apply everything stored times out.
        self._require_started()
        self._drain()
        if self.pending:
            raise TimeoutError(f"registry view not in sync (lag {self.lag()})")

    async def wait_for_offset(
        self, topic: str, partition: int, offset: int, timeout: float
    ) -> None:
        # Nothing is stored while the fake waits, so a record not applied now never will be.
        self._require_started()
        self._drain()
        if self.positions.get((topic, partition), 0) <= offset:
            raise TimeoutError(f"offset {offset} of {topic}/{partition} not applied")

    def _require_started(self) -> None:
        if not self.started:
            raise RuntimeError("fake registry view is not started")

    def _drain(self) -> None:
        """Apply the pending records, as TopicView does: a poison one is skipped and counted,
        and either way the view moves past it."""
        if not self.visible:
            return
        for record in self.pending:
            try:
                self.fold.apply_record(record)
            except PoisonEvent:
                self.skipped += 1
            else:
                self.applied += 1
            self.positions[(record.topic, record.partition)] = record.offset + 1
        self.pending.clear()


@dataclass
class FakePublisher:
    """KafkaEventPublisher's ``send``: the record is stored at once and acknowledged."""

    view: FakeView
    down: bool = False
    hang: bool = False
    sent: list[_Record] = field(default_factory=list)
    codec: Codec = field(default_factory=Codec)
    _others: list[FakeView] = field(default_factory=list, init=False, repr=False)

    def another_view(self) -> FakeView:
        """A view, not started, of what this publisher stored and will store (a second API
        replica, or one restarted): it reads the topics from their start, as RegistryView."""
        view = FakeView(topics=self.view.topics)
        for record in self.sent:
            view.deliver(record)
        self._others.append(view)
        return view

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, event: Event, topic: str | None = None) -> asyncio.Future[Any]:
        if self.down:
            raise KafkaConnectionError("broker down")
        if self.hang:
            return asyncio.get_running_loop().create_future()
        encoded = self.codec.encode(event)
        topic = topic or encoded.topic
        offset = sum(1 for r in self.sent if r.topic == topic)  # Kafka counts per partition
        record = _Record(
            topic, _PARTITION, offset, encoded.key, encoded.value, list(encoded.headers)
        )
        self.sent.append(record)
        for view in (self.view, *self._others):
            view.deliver(record)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(record)
        return future
