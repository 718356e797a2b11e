"""The access-log archive: ``access-logged`` in, PostgreSQL ``access_log`` out.

Services other than the timeline also disclose patient data (notify's portal pickup streams a
whole study as a zip) and record each attempt on ``access-logged`` (``shared/audit.py``). The
patient's access-log search reads ``access_log``, so the timeline loads the topic into it:

- one :class:`~shared.stream.StreamWorker` (consumer group ``timeline-access-archive``), run
  next to the projection in ``beeldportaal timeline project``;
- a fetched batch is inserted in one transaction, ``ON CONFLICT (event_id) DO NOTHING``, and
  its offsets committed only after that: a crash replays the batch, which changes nothing, and
  the records the timeline's API wrote itself (to both) are kept once;
- it has its own group, so ``beeldportaal timeline rebuild`` neither waits for nor moves it,
  and it never truncates: ``access_log`` is append-only evidence. Loading the topic from the
  start into an empty database gives back every record the topic still holds (six years).

Errors. An audit record is evidence, so the archive waits rather than skip one it could read
later: a record of an ``access.logged`` schema this version does not know yet (a producer
upgraded first) is a transient error, the batch is read again with backoff until the timeline
is upgraded (its lag grows, and BeeldportaalConsumerLagHigh says so). A record that is no
access record at all is poison, logged and skipped. PostgreSQL away is transient; a record
PostgreSQL refuses as data (a NUL character in a text, say) is logged with its event id and
skipped, the rest of its batch kept (``AccessLogArchive.add``): it stays on the topic. Anything
else is fatal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.timeline.adapters.audit import AccessLogArchive
from services.timeline.config import TimelineSettings
from shared.codec import SCHEMA_HEADER, Codec, header
from shared.errors import PoisonEvent, TransientError
from shared.events import AccessLogged
from shared.events.base import registry
from shared.metrics import ServiceMetrics, safe_label
from shared.stream import Outgoing, StreamWorker, decode_as

GROUP = "timeline-access-archive"
ACCESS_SCHEMA_PREFIX = AccessLogged.schema_name.rsplit(".", 1)[0] + "."  # "access.logged."


@dataclass
class Archiver:
    """Collect a batch's records (``prepare``, ``handle``) and insert them at once (``tick``)."""

    archive: AccessLogArchive
    metrics: ServiceMetrics
    topic: str
    codec: Codec = field(default_factory=Codec)
    _events: list[AccessLogged] = field(default_factory=list)

    async def prepare(self) -> None:
        self._events = []

    async def handle(self, record: Any) -> Sequence[Outgoing]:
        try:
            event = decode_as(self.codec, record, AccessLogged)
        except PoisonEvent:
            schema = (header(record, SCHEMA_HEADER) or b"").decode("utf-8", "replace")
            if schema.startswith(ACCESS_SCHEMA_PREFIX) and schema not in registry:
                raise TransientError(
                    f"an access record of schema {schema[:64]!r}, which this version does not "
                    "know: upgrade the timeline; the archive waits for it"
                ) from None
            raise  # not an access record: the worker logs and skips it
        self._events.append(event)
        return ()

    async def tick(self) -> Sequence[Outgoing]:
        if not self._events:
            return ()
        new = await self.archive.add(self._events)
        # Counted once the transaction committed: a retried batch is not counted twice.
        topic = safe_label(self.topic)
        schema = safe_label(AccessLogged.schema_name)
        consumed = self.metrics.events_consumed
        consumed.labels(topic, schema, "archived").inc(new)
        consumed.labels(topic, schema, "already-kept").inc(len(self._events) - new)
        await self.prepare()
        return ()


def build_access_archive(
    settings: TimelineSettings,
    archive: AccessLogArchive,
    metrics: ServiceMetrics,
    *,
    group: str = GROUP,
    topic: str = AccessLogged.topic,
) -> StreamWorker:
    """The archive's stream (consumer group ``beeldportaal-<group>``) reading ``topic``; the
    caller opens and closes ``archive`` (a view of the :class:`~shared.stream.Worker`)."""
    archiver = Archiver(archive=archive, metrics=metrics, topic=topic)
    return StreamWorker(
        settings.kafka,
        name=group,
        group=group,
        topics=[topic],
        prepare=archiver.prepare,
        handle=archiver.handle,
        tick=archiver.tick,
        tick_interval_ms=60_000,
        metrics=metrics,
        max_records=settings.projection_batch,
    )
