"""The routing worker: a faust agent on consent-checked that emits route-resolved/route-failed.

For every consent decision it looks the recipient up in the provider directory and publishes
what :func:`services.routing.domain.route.route` decides. How it fits together:

- The directory is a :class:`DirectoryView` (a whole-topic read model, faust's "global table"),
  started and stopped with the app as a mode service. The agent waits, once, until the view
  holds everything that was on the topic when it started: routing against a half-read directory
  would fail studies to recipients it simply had not read yet.
- At-least-once (design.md, Decisions): the results are sent with ``force=True`` (now, not at
  commit) and the agent waits for every acknowledgement (acks=all, idempotent producer) before
  it takes the next record, so faust only commits an offset whose results are on the broker.
  A crash in between replays the decision; ``route`` is deterministic (uuid5 event ids, the
  decision's time), so a replay yields the same events, which consumers recognise by event id.
- Errors (style.md taxonomy): a record that cannot be decoded is poison, logged with its
  ``topic[partition]@offset`` and skipped; a publish that fails is transient and retried with
  backoff, holding the partition (a skipped decision would be a study silently never routed);
  a failed directory view or anything unexpected is fatal: the app crashes and its supervisor
  restarts it, which replays from the last committed offset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.types import EventT, StreamT, TopicT
from mode import Service
from prometheus_client import start_http_server

from services.routing.adapters.directory_view import PROVIDER_DIRECTORY, DirectoryView
from services.routing.config import RoutingSettings
from services.routing.domain.route import PRODUCER, route
from services.routing.metrics import RoutingMetrics
from shared.codec import Codec
from shared.errors import FatalError, PoisonEvent
from shared.events import ConsentChecked, Event
from shared.events.routing import RouteFailed, RouteResolved
from shared.faust_app import App, complete, decode_event, make_app
from shared.kafka import CachedMurmur2Partitioner
from shared.logging import configure_logging, correlation_context, get_logger, kafka_position
from shared.topic_view import ViewFailed

log = get_logger(__name__)

SERVICE = "routing"
MAX_BACKOFF_SECONDS = 30.0


class DirectoryViewService(Service):
    """Starts the directory view with the faust app and stops it with the app."""

    def __init__(self, view: DirectoryView, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.view = view

    async def on_start(self) -> None:
        await self.view.start()

    async def on_stop(self) -> None:
        await self.view.stop()


@dataclass
class Router:
    """The glue between faust and the pure ``route``: decode, wait for the directory, route,
    publish, wait for the acknowledgements."""

    directory: DirectoryView
    source: TopicT
    resolved_sink: TopicT
    failed_sink: TopicT
    metrics: RoutingMetrics
    app: faust.App
    codec: Codec = field(default_factory=Codec)
    view_timeout: float = 60.0
    publish_timeout: float = 35.0
    _directory_ready: bool = False

    async def on_decision(self, faust_event: EventT) -> None:
        checked = self._decode(faust_event)
        if checked is None:
            return
        await self._wait_for_directory()
        source = self.source.get_topic_name()
        with correlation_context(checked.correlation_id):
            with self.metrics.time_handler("route"):
                result = route(checked, self.directory, producer=PRODUCER)
            events: Sequence[RouteResolved | RouteFailed] = (
                [result] if isinstance(result, RouteFailed) else result
            )
            if not events:  # a timeline decision: not ours to route
                self.metrics.consumed(source, checked.schema_name, "not-routed")
                return
            await self._publish(events)
            self._record(checked, events)

    def _decode(self, faust_event: EventT) -> ConsentChecked | None:
        message = faust_event.message
        try:
            event = decode_event(self.codec, faust_event)
            if not isinstance(event, ConsentChecked):
                raise PoisonEvent(f"{event.schema_name} does not belong on {message.topic}")
        except PoisonEvent as exc:
            # It can never succeed: logged with its position (never its value) and skipped.
            log.error("poison record skipped", position=_position(faust_event), reason=str(exc))
            self.metrics.failed(message.topic, "poison")
            self.metrics.consumed(message.topic, "unknown", "poison")
            return None
        return event

    async def _wait_for_directory(self) -> None:
        while not self._directory_ready:
            try:
                await self.directory.wait_caught_up(self.view_timeout)
            except TimeoutError:
                log.warning(
                    "still waiting for the provider directory before routing",
                    waited_seconds=self.view_timeout,
                )
                continue
            except ViewFailed as exc:
                raise FatalError(str(exc)) from exc
            self._directory_ready = True
            log.info("provider directory loaded; routing", providers=len(self.directory))

    def _sink(self, event: Event) -> TopicT:
        return self.failed_sink if isinstance(event, RouteFailed) else self.resolved_sink

    async def _publish(self, events: Sequence[Event]) -> None:
        """Send every event now and wait for all acknowledgements; retry until they are in."""
        attempt = 0
        while True:
            try:
                futures = []
                for event in events:
                    record = self.codec.encode(event)
                    futures.append(
                        await self._sink(event).send(
                            key=record.key,
                            value=record.value,
                            headers=list(record.headers),
                            force=True,
                        )
                    )
                await asyncio.wait_for(asyncio.gather(*futures), self.publish_timeout)
                return
            except (KafkaError, TimeoutError) as exc:
                attempt += 1
                delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2**attempt)
                topic = self._sink(events[0]).get_topic_name()
                self.metrics.failed(topic, "transient")
                # The same events go again under the same ids: the idempotent producer and
                # the consumers' deduplication absorb a copy that did land.
                log.warning(
                    "publishing routes failed; retrying",
                    attempt=attempt,
                    delay=delay,
                    error=repr(exc),
                )
                await asyncio.sleep(delay)

    def _record(
        self, checked: ConsentChecked, events: Sequence[RouteResolved | RouteFailed]
    ) -> None:
        study = checked.study
        self.metrics.consumed(
            self.source.get_topic_name(),
            checked.schema_name,
            "failed" if isinstance(events[0], RouteFailed) else "routed",
        )
        for event in events:
            self.metrics.produced(self._sink(event).get_topic_name(), event.schema_name)
            if isinstance(event, RouteFailed):
                code = event.reason_code.value if event.reason_code else "unknown"
                self.metrics.route_failed(code)
                log.warning(
                    "study not routed",
                    study_instance_uid=study.study_instance_uid,
                    version=study.version,
                    recipient_ura=study.recipient_ura,
                    reason_code=code,
                    reason=event.reason,
                )
            else:
                self.metrics.resolved(event.destination.channel.value, event.priority.value)
                log.info(
                    "study routed",
                    study_instance_uid=study.study_instance_uid,
                    version=study.version,
                    recipient_ura=study.recipient_ura,
                    endpoint_id=event.destination.endpoint_id,
                    priority=event.priority.value,
                    instances=len(event.sop_instance_uids or ()),
                    event_id=str(event.event_id),
                )


def _position(faust_event: EventT) -> str:
    message = faust_event.message
    return kafka_position(message.topic, message.partition, message.offset)


@dataclass
class RoutingWorker:
    """The faust app and what it is built from (tests look at the router and the view)."""

    app: App
    router: Router
    view: DirectoryView


def build_routing_app(settings: RoutingSettings, **kwargs: Any) -> App:
    """The routing worker's faust app; see :func:`build_routing_worker` for the arguments."""
    return build_routing_worker(settings, **kwargs).app


def build_routing_worker(
    settings: RoutingSettings,
    *,
    app_id: str = SERVICE,
    source_topic: str = ConsentChecked.topic,
    resolved_topic: str = RouteResolved.topic,
    failed_topic: str = RouteFailed.topic,
    directory_topic: str = PROVIDER_DIRECTORY,
    metrics: RoutingMetrics | None = None,
    **faust_overrides: Any,
) -> RoutingWorker:
    """The routing worker's faust app (``beeldportaal-<app_id>``); topic names can be replaced
    by declared test copies."""
    metrics = metrics or RoutingMetrics()
    app = make_app(
        app_id,
        settings.kafka,
        # Keys are Study Instance UIDs: the mapping every other producer of ours uses.
        producer_partitioner=CachedMurmur2Partitioner(),
        **faust_overrides,
    )
    view = DirectoryView(
        settings.kafka, directory_topic, metrics=metrics, name=f"{app_id}-directory"
    )
    app.add_dependency(DirectoryViewService(view))
    router = Router(
        directory=view,
        source=app.topic(source_topic),
        resolved_sink=app.topic(resolved_topic),
        failed_sink=app.topic(failed_topic),
        metrics=metrics,
        app=app,
        view_timeout=settings.view_start_timeout_seconds,
        publish_timeout=settings.kafka.request_timeout_ms / 1000 + 5,
    )

    @app.agent(router.source, name=f"{app_id}-route")
    async def route_decisions(stream: StreamT[Any]) -> None:
        async for faust_event in stream.events():
            try:
                await complete(router.on_decision(faust_event))
            except Exception as exc:
                # Fatal: skipping would lose a study. Crash; the restart replays from the
                # last committed offset.
                log.exception(
                    "routing failed; stopping the worker",
                    position=_position(faust_event),
                    error=str(exc),
                )
                await app.crash(exc)
                raise

    return RoutingWorker(app, router, view)


def serve_metrics(settings: RoutingSettings, metrics: RoutingMetrics) -> Any:
    """/metrics on 127.0.0.1:<worker_metrics_port> (a daemon thread); None when not set."""
    if settings.worker_metrics_port is None:
        return None
    server, _thread = start_http_server(
        settings.worker_metrics_port, addr="127.0.0.1", registry=metrics.registry
    )
    return server


def main(settings: RoutingSettings) -> None:
    """Run the routing worker until stopped (``beeldportaal routing route``)."""
    configure_logging(f"{settings.service_name}-worker", settings.log_level, settings.log_json)
    metrics = RoutingMetrics()
    # The worker's own loop, so that faust finds it current (asyncio.run would unset it).
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app = build_routing_app(settings, metrics=metrics)
    serve_metrics(settings, metrics)
    worker = faust.Worker(app, loop=loop, loglevel=settings.log_level, override_logging=False)
    worker.execute_from_commandline()
