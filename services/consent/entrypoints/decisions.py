"""The consent decision worker: a decision for every study version, for delivery and timeline.

How it fits together:

- The registry (``consent-registered``, ``consent-revoked``, ``treatment-relationships``) is
  folded per patient pseudonym by a :class:`RegistryView`, the same read model the consent API
  answers from. The registry topics are event-sourced and kept forever: they *are* the
  changelog, so every replica reads them whole at start (about a second per 100,000 consents)
  and follows them; no second copy of the state is kept.
- ``study-received`` is consumed by a :class:`~shared.stream.StreamWorker` (consumer group
  ``consent-decisions``, so replicas share its partitions). Before each batch the registry view
  is brought up to the topics' ends (:meth:`TopicView.sync`): a batch is decided on every
  registry event published before it was handled, so an objection registered before a study
  was decided always counts.
- Each study version is decided on the registry as it is (``decide_study``) and announced as two
  ``consent-checked`` events with ids derived from (study, version, purpose); the batch's
  offsets are committed once every announcement is acknowledged.

A crash replays at most the batch in hand: a replayed study is decided again on the registry as
it then is, under the same event ids, so consumers that recognise event ids keep the first
decision. Only a registry change in the seconds between the two could make the replay decide
differently, and it would then follow the newer registry, which for an objection is the side
the law asks for.

The recipient's Mitz provider category comes from its provider type in the routing service's
directory (:class:`ProviderTypes`); the worker waits up to a minute for that view at start, then
decides anyway (an unknown recipient counts as "any category": a category-specific objection
still refuses, the conservative side).

Why not faust here (it was, until measured): see ``shared.stream``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.consent.adapters.checked_records import CheckedRecords
from services.consent.adapters.provider_types import DIRECTORY_TOPIC, ProviderTypes
from services.consent.adapters.registry_view import RegistryTopics, RegistryView
from services.consent.config import ConsentSettings
from services.consent.domain.checks import StudyDecisions, decide_study, provider_category
from services.consent.metrics import DecisionMetrics
from shared import runtime
from shared.codec import Codec
from shared.errors import TransientError
from shared.events import ConsentChecked, StudyReceived
from shared.events.base import utcnow
from shared.events.consent import Decision, Purpose
from shared.logging import configure_logging, correlation_context, debug_enabled, get_logger
from shared.stream import Encoded, StreamWorker, Worker, decode_as, run_worker

log = get_logger(__name__)

SERVICE = "consent-decisions"
PRODUCER = "consent"
# How long the worker waits for the provider directory before it decides anyway.
DIRECTORY_WAIT_SECONDS = 60.0
# How long a batch waits for the registry view to reach the topics' ends before it is retried.
REGISTRY_SYNC_SECONDS = 30.0
# How long the worker waits for the registry view's first full read.
REGISTRY_LOAD_SECONDS = 600.0
DELIVERY, TIMELINE = Purpose.DELIVERY.value, Purpose.TIMELINE.value


@dataclass
class ConsentDecider:
    """Decode a study-received record, decide both purposes, return the two announcements."""

    registry: RegistryView
    providers: ProviderTypes
    metrics: DecisionMetrics
    data_category: str
    provider_categories: Mapping[str, str]
    codec: Codec = field(default_factory=Codec)
    _ready: bool = False

    def __post_init__(self) -> None:
        self.records = CheckedRecords(self.codec, PRODUCER)

    async def prepare(self) -> None:
        """Before a batch: the views started and read, the registry up to the topics' ends."""
        if not self._ready:
            await self._first_read()
        try:
            await self.registry.sync(REGISTRY_SYNC_SECONDS)
        except TimeoutError as exc:
            raise TransientError(str(exc)) from exc
        self.metrics.registry_patients.set(self.registry.patients)

    async def handle(self, record: Any) -> Sequence[Encoded]:
        received = decode_as(self.codec, record, StudyReceived)
        with correlation_context(received.correlation_id):
            decisions = self.decide(received)
            latency = (utcnow() - received.occurred_at).total_seconds()
            self.metrics.decision_latency.observe(max(latency, 0.0))
            self.metrics.consumed(record.topic, received.schema_name, "decided")
            for purpose, result in ((DELIVERY, decisions.delivery), (TIMELINE, decisions.timeline)):
                self.metrics.decided(
                    purpose, result.decision.value, result.basis.value, result.flagged
                )
            # Every decision is an event already; the log names the ones an operator looks at.
            notable = decisions.delivery.flagged or decisions.delivery.decision is Decision.DENY
            if notable or debug_enabled(__name__):
                (log.info if notable else log.debug)(
                    "consent checked",
                    study_instance_uid=received.study.study_instance_uid,
                    version=received.study.version,
                    delivery=decisions.delivery.decision.value,
                    delivery_basis=decisions.delivery.basis.value,
                    timeline=decisions.timeline.decision.value,
                )
        # The two consent-checked records, the snapshot in them as received.
        return self.records.write(record, received, decisions)

    def decide(self, received: StudyReceived) -> StudyDecisions:
        pseudonym = received.study.patient.pseudonym
        registry = self.registry.get(pseudonym) if pseudonym is not None else None
        category = provider_category(
            self.providers.type_code(received.study.recipient_ura), self.provider_categories
        )
        return decide_study(
            received, registry, recipient_category=category, data_category=self.data_category
        )

    async def _first_read(self) -> None:
        await self.registry.wait_caught_up(REGISTRY_LOAD_SECONDS)
        log.info("consent registry read", patients=self.registry.patients)
        try:
            await self.providers.view.wait_caught_up(DIRECTORY_WAIT_SECONDS)
            log.info("provider directory read", providers=len(self.providers))
        except TimeoutError as exc:
            log.error(
                "provider directory not read; recipients count as any provider category",
                error=str(exc),
            )
        self._ready = True


def build_decision_worker(
    settings: ConsentSettings,
    *,
    group: str = SERVICE,
    study_topic: str = StudyReceived.topic,
    registry_topics: RegistryTopics | None = None,
    sink_topic: str = ConsentChecked.topic,
    directory_topic: str = DIRECTORY_TOPIC,
    metrics: DecisionMetrics | None = None,
    max_records: int = 500,
) -> Worker:
    """The decision worker on the declared topics; tests and benchmarks name their own copies."""
    metrics = metrics or DecisionMetrics()
    decider = ConsentDecider(
        registry=RegistryView(settings.kafka, registry_topics, name=f"{group}-registry"),
        providers=ProviderTypes(settings.kafka, topic=directory_topic),
        metrics=metrics,
        data_category=settings.data_category,
        provider_categories=settings.provider_categories,
    )
    stream = StreamWorker(
        settings.kafka,
        name=group,
        group=group,
        topics=[study_topic],
        handle=decider.handle,
        prepare=decider.prepare,
        metrics=metrics,
        rename={ConsentChecked.topic: sink_topic},
        max_records=max_records,
    )
    return Worker(stream, views=(decider.registry, decider.providers.view))


def main(settings: ConsentSettings) -> None:
    """Run the decision worker until SIGTERM (``beeldportaal consent decide``)."""
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    metrics = DecisionMetrics()
    worker = build_decision_worker(settings, metrics=metrics)
    runtime.run(
        run_worker(
            worker,
            metrics=metrics,
            metrics_port=settings.decisions_metrics_port,
            metrics_host=settings.decisions_metrics_host,
        )
    )
