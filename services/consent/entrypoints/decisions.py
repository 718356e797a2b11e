"""The consent decision worker: the registry in a faust table, a decision for every study version.

How it fits together:

- ``fold`` (agent on ``consent-registered``, ``consent-revoked``, ``treatment-relationships``,
  all keyed by patient pseudonym) folds each event into the patient's registry row in the
  ``consent-registry`` table (``services.consent.domain.registry``).
- ``rekey`` (agent on ``study-received``, keyed by Study Instance UID) forwards each record
  unchanged to ``consent-study-by-patient``, keyed by the patient's pseudonym. A study and its
  patient's registry then sit in the same partition number of 6-partition topics, which faust
  assigns to one worker together (a lookup across differently keyed streams needs
  co-partitioning: design.md, Decisions).
- ``check`` (agent on ``consent-study-by-patient``) decides both purposes on the registry as it
  is, remembers the decisions per study version in ``consent-decided`` and publishes the two
  ``consent-checked`` events. A redelivered study version is answered from that row: decided
  once, never twice differently (``services.consent.domain.checks``).

Every table write happens while handling a record of the partition it belongs to, without the
partitioner, so faust writes the changelog partition of that record (see the ingest assembly
worker's notes on co-partitioning): the three registry topics and the by-patient topic must
therefore share one partition count and one key mapping (murmur2: ``KafkaEventPublisher`` and
this app's producer both use it). study-received has that count too, though nothing requires it
logically: with a second partition count in the app (6 for the registry, 12 for studies, as
first declared) a restarted worker lost a tenth to a third of its backlog in every run of a
restart test; with one count, and ``shared.faust_app.GapSafeConsumer``, most runs lost nothing
but about one in four still did (faust 0.15.3; open, see the issue notes).

A study of a patient without a verified BSN has no pseudonym and no registry: it is keyed by its
Study Instance UID on the by-patient topic (spreading the load) and decided on no registry.

The recipient's Mitz provider category comes from its provider type in the directory
(:class:`ProviderTypes`); the worker decides nothing until that view has read the directory.

Sends go out at once (not held until commit); faust flushes its producer before it commits
offsets, so no offset is committed before what its record caused is on the broker:
at-least-once. Poison (undecodable, wrong key or partition) is logged with its position
and skipped; the metrics count it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import faust
import mode
from faust.types import EventT, StreamT, TableT, TopicT
from prometheus_client import start_http_server

from services.consent.adapters.provider_types import DIRECTORY_TOPIC, ProviderTypes
from services.consent.config import ConsentSettings
from services.consent.domain.checks import (
    StudyDecisions,
    checked_events,
    decide_study,
    provider_category,
    study_key,
)
from services.consent.domain.registry import (
    PatientRegistry,
    RegistryEvent,
    apply,
    from_row,
    to_row,
)
from shared.codec import Codec
from shared.errors import PoisonEvent
from shared.events import (
    ConsentChecked,
    ConsentRegistered,
    ConsentRevoked,
    Event,
    StudyReceived,
    TreatmentRelationshipEnded,
    TreatmentRelationshipRegistered,
)
from shared.events.base import utcnow
from shared.events.consent import Decision
from shared.faust_app import (
    App,
    bytes_table,
    complete,
    declare_changelogs,
    decode_event,
    header_pairs,
    make_app,
)
from shared.kafka import CachedMurmur2Partitioner
from shared.logging import configure_logging, correlation_context, get_logger, kafka_position
from shared.metrics import DURATION_BUCKETS, ServiceMetrics
from shared.topics import topic as declared_topic

log = get_logger(__name__)

SERVICE = "consent-decisions"
PRODUCER = "consent"
REGISTRY_TABLE = "consent-registry"
DECIDED_TABLE = "consent-decided"
BY_PATIENT_TOPIC = "consent-study-by-patient"
REGISTRY_TOPICS = (
    ConsentRegistered.topic,
    ConsentRevoked.topic,
    TreatmentRelationshipRegistered.topic,
)
_REGISTRY_EVENTS = (
    ConsentRegistered,
    ConsentRevoked,
    TreatmentRelationshipRegistered,
    TreatmentRelationshipEnded,
)
# How long the worker waits for the provider directory before it decides anyway (recipients
# then count as "any category": the conservative side for a delivery).
DIRECTORY_WAIT_SECONDS = 60.0


class DecisionMetrics(ServiceMetrics):
    def __init__(self, *, registry: Any = None, version: str = "0.1.0") -> None:
        super().__init__("consent", version, registry=registry)
        self.decisions = self.counter(
            "consent_decisions",
            "consent-checked events, by purpose, decision and basis (repeated: redelivered).",
            ["purpose", "decision", "basis", "repeated"],
        )
        self.flagged = self.counter(
            "consent_decisions_flagged", "Decisions flagged for an operator, by basis.", ["basis"]
        )
        self.decision_latency = self.histogram(
            "consent_decision_latency_seconds",
            "From a study's announcement (study-received) to its first decision.",
            buckets=DURATION_BUCKETS,
        )
        self.registry_events = self.counter(
            "consent_registry_events", "Registry events folded in, by outcome.", ["outcome"]
        )


class _DirectoryService(mode.Service):
    """Runs the provider-type view for the lifetime of the faust app."""

    def __init__(self, providers: ProviderTypes, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.providers = providers
        self.view_started = asyncio.Event()

    async def on_start(self) -> None:
        await self.providers.view.start()
        self.view_started.set()

    async def on_stop(self) -> None:
        await self.providers.view.stop()


@dataclass
class ConsentDecider:
    """The glue between faust and the pure rules: decode, fold, re-key, decide, announce."""

    registry: TableT
    decided: TableT
    by_patient: TopicT
    sink: TopicT
    partitions: int
    directory: _DirectoryService
    metrics: DecisionMetrics
    data_category: str
    provider_categories: Mapping[str, str]
    codec: Codec = field(default_factory=Codec)
    _partitioner: CachedMurmur2Partitioner = field(default_factory=CachedMurmur2Partitioner)
    _directory_ready: bool = False

    # --- registry -------------------------------------------------------------------------

    def on_registry_event(self, faust_event: EventT) -> None:
        event = self._decode(faust_event, _REGISTRY_EVENTS)
        if event is None:
            return
        assert isinstance(event, _REGISTRY_EVENTS)
        key = event.patient.encode()
        self._check_placement(faust_event, key)
        row = self.registry.get(key)
        current = from_row(row) if row is not None else PatientRegistry.empty(event.patient)
        new = apply(current, _registry_event(event))
        topic = faust_event.message.topic
        if new is current:
            self.metrics.registry_events.labels("duplicate").inc()
            self.metrics.consumed(topic, event.schema_name, "duplicate")
            return
        self.registry[key] = to_row(new)
        self.metrics.registry_events.labels("applied").inc()
        self.metrics.consumed(topic, event.schema_name, "applied")

    # --- studies --------------------------------------------------------------------------

    async def on_study(self, faust_event: EventT) -> None:
        """Forward a study-received record, as it is, keyed by its patient.

        Only the key is read here (a plain JSON parse, no validation): the record is validated
        once, where it is decided, and poison is skipped there with its position.
        """
        message = faust_event.message
        key = patient_key_of_record(message.value)
        if key is None:
            log.error(
                "poison record skipped",
                position=_position(faust_event),
                reason="not a study-received record",
            )
            self.metrics.failed(message.topic, "poison")
            self.metrics.consumed(message.topic, "unknown", "poison")
            return
        await self.by_patient.send(
            key=key, value=message.value, headers=header_pairs(message.headers)
        )
        self.metrics.consumed(message.topic, StudyReceived.schema_name, "forwarded")

    async def on_patient_study(self, faust_event: EventT) -> None:
        event = self._decode(faust_event, (StudyReceived,))
        if event is None:
            return
        assert isinstance(event, StudyReceived)
        self._check_placement(faust_event, patient_key(event))
        with correlation_context(event.correlation_id):
            key = study_key(event.study)
            row = self.decided.get(key)
            repeated = row is not None
            if row is not None:
                decisions = StudyDecisions.from_row(row)
            else:
                await self._await_directory()
                decisions = self._decide(event)
                self.decided[key] = decisions.to_row()
                latency = (utcnow() - event.occurred_at).total_seconds()
                self.metrics.decision_latency.observe(max(latency, 0.0))
            for checked in checked_events(event, decisions, producer=PRODUCER):
                await self._publish(checked, repeated)
            self.metrics.consumed(faust_event.message.topic, event.schema_name, "decided")
            # Every decision is an event already; the log names the ones an operator looks at.
            notable = decisions.delivery.flagged or decisions.delivery.decision is Decision.DENY
            (log.info if notable and not repeated else log.debug)(
                "consent checked",
                study_instance_uid=event.study.study_instance_uid,
                version=event.study.version,
                delivery=decisions.delivery.decision.value,
                delivery_basis=decisions.delivery.basis.value,
                timeline=decisions.timeline.decision.value,
                repeated=repeated,
            )

    def _decide(self, event: StudyReceived) -> StudyDecisions:
        pseudonym = event.study.patient.pseudonym
        registry = None
        if pseudonym is not None:
            row = self.registry.get(pseudonym.encode())
            registry = from_row(row) if row is not None else None
        category = provider_category(
            self.directory.providers.type_code(event.study.recipient_ura),
            self.provider_categories,
        )
        return decide_study(
            event, registry, recipient_category=category, data_category=self.data_category
        )

    async def _publish(self, checked: ConsentChecked, repeated: bool) -> None:
        record = self.codec.encode(checked)
        await self.sink.send(key=record.key, value=record.value, headers=list(record.headers))
        self.metrics.produced(self.sink.get_topic_name(), checked.schema_name)
        labels = (checked.purpose.value, checked.decision.value, checked.basis.value)
        self.metrics.decisions.labels(*labels, str(repeated).lower()).inc()
        if checked.flagged and not repeated:
            self.metrics.flagged.labels(checked.basis.value).inc()

    async def _await_directory(self) -> None:
        if self._directory_ready:
            return
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.directory.view_started.wait(), DIRECTORY_WAIT_SECONDS)
            left = DIRECTORY_WAIT_SECONDS - (time.monotonic() - started)
            await self.directory.providers.view.wait_caught_up(max(left, 0.1))
            log.info("provider directory read", providers=len(self.directory.providers))
        except (TimeoutError, RuntimeError) as exc:
            log.error(
                "provider directory not read; recipients count as any provider category",
                error=str(exc),
            )
        self._directory_ready = True

    # --- decoding and placement -----------------------------------------------------------

    def _decode(self, faust_event: EventT, expected: tuple[type[Event], ...]) -> Event | None:
        message = faust_event.message
        try:
            event = decode_event(self.codec, faust_event)
            if not isinstance(event, expected):
                raise PoisonEvent(f"{event.schema_name} does not belong on {message.topic}")
        except PoisonEvent as exc:
            log.error("poison record skipped", position=_position(faust_event), reason=str(exc))
            self.metrics.failed(message.topic, "poison")
            self.metrics.consumed(message.topic, "unknown", "poison")
            return None
        return event

    def _check_placement(self, faust_event: EventT, key: bytes) -> None:
        """A table row may only be written from its own partition: see the module docstring."""
        message = faust_event.message
        every = list(range(self.partitions))
        if message.key != key or message.partition != self._partitioner(key, every, every):
            raise PoisonEvent("record is not keyed and partitioned by its patient")


def patient_key(event: StudyReceived) -> bytes:
    """The by-patient key: the pseudonym, or the Study UID for a patient without one."""
    study = event.study
    return (study.patient.pseudonym or study.study_instance_uid).encode()


def patient_key_of_record(value: bytes | None) -> bytes | None:
    """:func:`patient_key` read from a record's JSON without decoding the event (None: not one)."""
    try:
        study = json.loads(value or b"")["study"]
        key = study["patient"].get("pseudonym") or study["study_instance_uid"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return key.encode() if isinstance(key, str) and key else None


def _registry_event(event: Event) -> RegistryEvent:
    assert isinstance(event, _REGISTRY_EVENTS)
    return event


def _position(faust_event: EventT) -> str:
    message = faust_event.message
    return kafka_position(message.topic, message.partition, message.offset)


def build_decisions_app(
    settings: ConsentSettings,
    *,
    app_id: str = SERVICE,
    study_topic: str = StudyReceived.topic,
    registry_topics: tuple[str, ...] = REGISTRY_TOPICS,
    by_patient_topic: str = BY_PATIENT_TOPIC,
    sink_topic: str = ConsentChecked.topic,
    directory_topic: str = DIRECTORY_TOPIC,
    partitions: int | None = None,
    metrics: DecisionMetrics | None = None,
    **faust_overrides: Any,
) -> App:
    """The decision worker's faust app (``beeldportaal-<app_id>``) on the declared topics.

    Topic names are parameters so tests can run it on their own (tagged) copies; ``partitions``
    is then the count those copies of the registry and by-patient topics share.
    """
    partitions = partitions or declared_topic(BY_PATIENT_TOPIC).partitions
    counts = {
        name: declared_topic(name).partitions for name in (*REGISTRY_TOPICS, BY_PATIENT_TOPIC)
    }
    counts[StudyReceived.topic] = declared_topic(StudyReceived.topic).partitions
    if len(set(counts.values())) != 1:
        raise ValueError(f"the consent worker's topics must share one partition count: {counts}")
    store = "rocksdb://" if settings.state_dir is not None else "memory://"
    app = make_app(
        app_id,
        settings.kafka,
        store=store,
        data_dir=settings.state_dir,
        producer_partitioner=CachedMurmur2Partitioner(),
        **faust_overrides,
    )
    registry = bytes_table(
        app,
        REGISTRY_TABLE,
        partitions=partitions,
        kafka=settings.kafka,
        help="The consent registry of each patient (by pseudonym).",
    )
    decided = bytes_table(
        app,
        DECIDED_TABLE,
        partitions=partitions,
        kafka=settings.kafka,
        help="What was decided per study version, so a redelivery is answered the same.",
    )
    directory = _DirectoryService(ProviderTypes(settings.kafka, topic=directory_topic))
    app.service(directory)
    decider = ConsentDecider(
        registry=registry,
        decided=decided,
        by_patient=app.topic(by_patient_topic),
        sink=app.topic(sink_topic),
        partitions=partitions,
        directory=directory,
        metrics=metrics or DecisionMetrics(),
        data_category=settings.data_category,
        provider_categories=settings.provider_categories,
    )

    @app.agent(app.topic(*registry_topics), name=f"{app_id}-fold")
    async def fold(stream: StreamT[Any]) -> None:
        async for faust_event in stream.events():
            await _guarded(decider.on_registry_event, faust_event)

    @app.agent(app.topic(study_topic), name=f"{app_id}-rekey")
    async def rekey(stream: StreamT[Any]) -> None:
        async for faust_event in stream.events():
            await _guarded(decider.on_study, faust_event)

    @app.agent(decider.by_patient, name=f"{app_id}-check")
    async def check(stream: StreamT[Any]) -> None:
        async for faust_event in stream.events():
            await _guarded(decider.on_patient_study, faust_event)

    app.decider = decider  # type: ignore[attr-defined]  # for tests and the benchmark
    return app


async def _guarded(handle: Any, faust_event: EventT) -> None:
    # A record that fails is logged with its position and skipped: a crashed agent would stop
    # deciding every study of its partitions. Poison is counted by the handler; anything else
    # here is a bug, logged with the traceback.
    try:
        result = handle(faust_event)
        if asyncio.iscoroutine(result):
            await complete(result)
    except PoisonEvent as exc:
        log.error("poison record skipped", position=_position(faust_event), reason=str(exc))
    except Exception as exc:
        log.exception(
            "record could not be handled; skipped", position=_position(faust_event), error=str(exc)
        )


def main(settings: ConsentSettings) -> None:
    """Run the decision worker until stopped (``beeldportaal consent decide``)."""
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    metrics = DecisionMetrics()
    app = build_decisions_app(settings, metrics=metrics)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(declare_changelogs(app, settings.kafka))
    if settings.decisions_metrics_port is not None:
        start_http_server(
            settings.decisions_metrics_port, addr="127.0.0.1", registry=metrics.registry
        )
    worker = faust.Worker(app, loop=loop, loglevel=settings.log_level, override_logging=False)
    worker.execute_from_commandline()
