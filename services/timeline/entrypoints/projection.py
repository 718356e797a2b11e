"""The timeline projection: study-received, consent-checked, consent-revoked and delivered in,
the PostgreSQL read model out (``beeldportaal timeline project``).

How it fits together:

- One :class:`~shared.stream.StreamWorker` (consumer group ``timeline-projection``) reads the
  four topics. Each fetched batch (up to ``projection_batch`` records) is decoded, folded into
  a :class:`~services.timeline.adapters.store.ProjectionBatch` (only timeline decisions count;
  delivery decisions are skipped) and applied in ONE PostgreSQL transaction; the batch's
  offsets are committed only after that transaction committed. A crash replays at most the
  batch in hand, and the store's upserts make a replay change nothing.
- The batch hooks of ``shared.stream`` carry it: ``prepare()`` starts an empty fold before the
  batch's records (also when a failed batch is handled again), ``handle(record)`` decodes and
  folds one record and publishes nothing, and ``tick()``, which the worker runs after the
  batch's records and before it commits their offsets, applies the fold in one transaction.
- Errors (style.md taxonomy): a record that does not decode is poison, logged with its position
  and skipped; PostgreSQL unreachable (or a deadlock lost) is transient: the same batch is
  applied again with backoff, holding its partitions; anything else is fatal, uncommitted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.timeline.adapters.audit import AccessLogArchive
from services.timeline.adapters.store import PostgresTimeline, ProjectionBatch
from services.timeline.config import TimelineSettings
from services.timeline.entrypoints.access_archive import build_access_archive
from shared import migrations, runtime
from shared.codec import Codec, header
from shared.events import (
    PURPOSE_HEADER,
    AccessLogged,
    ConsentChecked,
    ConsentRevoked,
    Delivered,
    Event,
    Purpose,
    StudyReceived,
)
from shared.logging import configure_logging, get_logger
from shared.metrics import DURATION_BUCKETS, ServiceMetrics, safe_label
from shared.stream import Outgoing, StreamWorker, Worker, decode_as, run_worker

log = get_logger(__name__)

SERVICE = "timeline-projection"
# Delivery decisions carry this purpose header: passed over without decoding (half the
# consent-checked records, each carrying a whole study snapshot).
DELIVERY = Purpose.DELIVERY.value.encode()
# The topics the projection reads, as declared (``rename`` maps them to test copies).
TOPICS = (StudyReceived.topic, ConsentChecked.topic, ConsentRevoked.topic, Delivered.topic)
PROJECTED = (StudyReceived, ConsentChecked, ConsentRevoked, Delivered)
# What the `timeline project` process reads: the projection's topics and the access-log
# archive's (access_archive.py).
PROCESS_TOPICS = (*TOPICS, AccessLogged.topic)


class ProjectionMetrics(ServiceMetrics):
    def __init__(self, *, registry: Any = None, version: str = "0.1.0") -> None:
        super().__init__("timeline", version, registry=registry)
        self.batch_seconds = self.histogram(
            "timeline_projection_batch_seconds",
            "Time to apply one batch to PostgreSQL (one transaction).",
            buckets=DURATION_BUCKETS,
        )
        self.batch_events = self.histogram(
            "timeline_projection_batch_events",
            "Events per applied batch.",
            buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10_000, 50_000),
        )


def decode_projected(codec: Codec, record: Any) -> Event | None:
    """The record's event, or None for a delivery decision (passed over undecoded); raises
    PoisonEvent for a record that does not decode into an event the projection reads."""
    if header(record, PURPOSE_HEADER) == DELIVERY:
        return None
    return decode_as(codec, record, *PROJECTED)


def fold(batch: ProjectionBatch, codec: Codec, record: Any) -> tuple[str, str]:
    """Fold one record into ``batch``; returns its schema and outcome ("projected", or
    "ignored" for a delivery decision) and raises PoisonEvent for one that does not decode."""
    event = decode_projected(codec, record)
    if event is None:
        return ConsentChecked.schema_name, "ignored"
    return event.schema_name, batch.add(event)


@dataclass
class Projector:
    """Fold a batch's records (``prepare``, ``handle``) and apply them in one transaction
    (``tick``, run by the worker after the batch's records, before their offsets commit)."""

    store: PostgresTimeline
    metrics: ProjectionMetrics
    codec: Codec = field(default_factory=Codec)
    _batch: ProjectionBatch = field(default_factory=ProjectionBatch)
    _outcomes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    _records: int = 0

    async def prepare(self) -> None:
        self._batch, self._outcomes, self._records = ProjectionBatch(), Counter(), 0

    async def handle(self, record: Any) -> Sequence[Outgoing]:
        # A record that does not decode raises PoisonEvent: the worker logs and skips it.
        self._outcomes[(record.topic, *fold(self._batch, self.codec, record))] += 1
        self._records += 1
        return ()

    async def tick(self) -> Sequence[Outgoing]:
        if not self._records:
            return ()  # a tick without a batch, or a batch of poison only
        if self._batch:  # not a batch of delivery decisions only
            with self.metrics.batch_seconds.time():
                await self.store.apply(self._batch)
        # Counted once the transaction committed: a retried batch is not counted twice.
        self.metrics.batch_events.observe(self._records)
        for (topic, schema, outcome), n in self._outcomes.items():
            self.metrics.events_consumed.labels(
                safe_label(topic), safe_label(schema), safe_label(outcome)
            ).inc(n)
        await self.prepare()
        return ()


def build_projection(
    settings: TimelineSettings,
    *,
    group: str = SERVICE,
    rename: Mapping[str, str] | None = None,
    store: PostgresTimeline | None = None,
    metrics: ProjectionMetrics | None = None,
    max_records: int | None = None,
) -> Worker:
    """The projection worker (consumer group ``beeldportaal-<group>``).

    ``rename`` maps declared topic names to the topics read (tests and benchmarks use their own
    copies). Without ``store`` the worker makes one on ``settings.postgres`` and opens and
    closes it; a given store is the caller's to open and close.
    """
    names = dict(rename or {})
    metrics = metrics or ProjectionMetrics()
    views: tuple[PostgresTimeline, ...] = ()
    if store is None:  # ours: opened and closed with the worker; a given store is the caller's
        store = PostgresTimeline(settings.postgres.conninfo, pool_size=2, name=group)
        views = (store,)
    projector = Projector(store=store, metrics=metrics)
    stream = StreamWorker(
        settings.kafka,
        name=group,
        group=group,
        topics=[names.get(topic, topic) for topic in TOPICS],
        prepare=projector.prepare,
        handle=projector.handle,
        tick=projector.tick,
        # Ticks without a batch find nothing to apply; rarely is enough.
        tick_interval_ms=60_000,
        metrics=metrics,
        max_records=max_records or settings.projection_batch,
    )
    return Worker(stream, views=views)


def main(settings: TimelineSettings) -> None:
    """Apply the migrations, then project (and archive the access log) until SIGTERM
    (``beeldportaal timeline project``)."""
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    applied = migrations.migrate(settings.postgres.conninfo)
    if applied:
        log.info("migrations applied", migrations=applied)
    metrics = ProjectionMetrics()
    projection = build_projection(settings, metrics=metrics)
    # The access-log archive runs beside it: access-logged into access_log (access_archive.py).
    archive = AccessLogArchive(settings.postgres.conninfo)
    worker = Worker(
        (*projection.streams, build_access_archive(settings, archive, metrics)),
        views=(*projection.views, archive),
    )
    runtime.run(
        run_worker(
            worker,
            metrics=metrics,
            metrics_port=settings.projection_metrics_port,
            metrics_host=settings.projection_metrics_host,
        )
    )
