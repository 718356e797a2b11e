"""The routing worker: consent-checked in, route-resolved / route-failed out.

For every consent decision it looks the recipient up in the provider directory and publishes
what :func:`services.routing.domain.route.route` decides. How it fits together:

- The directory is a :class:`DirectoryView` (a whole-topic read model: what faust calls a global
  table). Before its first batch the worker waits until the view holds everything that was on
  the topic when it started: routing against a half-read directory would fail studies to
  recipients it simply had not read yet.
- ``consent-checked`` is consumed by a :class:`~shared.stream.StreamWorker` (consumer group
  ``routing``): at-least-once, a batch's offsets committed only when every route it caused is
  acknowledged (acks=all, idempotent producer). A crash replays the batch; ``route`` is
  deterministic (uuid5 event ids, the decision's time), so a replay yields the same events,
  which consumers recognise by event id.
- Errors (style.md taxonomy): a record that cannot be decoded is poison, logged with its
  ``topic[partition]@offset`` and skipped; a publish that fails is transient and the batch is
  handled again with backoff, holding the partitions (a skipped decision would be a study
  silently never routed); a failed directory view or anything unexpected is fatal: the worker
  exits without committing and its supervisor restarts it, which replays the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.routing.adapters.directory_view import PROVIDER_DIRECTORY, DirectoryView
from services.routing.adapters.route_records import RouteRecords
from services.routing.config import RoutingSettings
from services.routing.domain.route import PRODUCER, Routes, plan
from services.routing.metrics import RoutingMetrics
from shared import runtime
from shared.codec import Codec, header
from shared.errors import FatalError
from shared.events import PURPOSE_HEADER, ConsentChecked, Purpose
from shared.events.routing import RouteFailed, RouteFailureReason, RouteResolved
from shared.logging import configure_logging, correlation_context, debug_enabled, get_logger
from shared.stream import Encoded, StreamWorker, Worker, decode_as, run_worker
from shared.topic_view import ViewFailed

log = get_logger(__name__)

SERVICE = "routing"
# Timeline decisions carry this purpose header (Event.filter_headers).
_TIMELINE = Purpose.TIMELINE.value.encode()


@dataclass
class Router:
    """Decode a decision, wait (once) for the directory, route it, return what to publish."""

    directory: DirectoryView
    metrics: RoutingMetrics
    codec: Codec = field(default_factory=Codec)
    view_timeout: float = 60.0
    _directory_ready: bool = False

    def __post_init__(self) -> None:
        self.records = RouteRecords(self.codec, PRODUCER)

    async def prepare(self) -> None:
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
        if self.directory.failed:
            raise FatalError("the provider directory view failed")

    async def handle(self, record: Any) -> Sequence[RouteFailed | Encoded]:
        if header(record, PURPOSE_HEADER) == _TIMELINE:
            # A timeline decision, said by its header: not ours, and not worth decoding.
            self.metrics.consumed(record.topic, ConsentChecked.schema_name, "not-routed")
            return ()
        checked = decode_as(self.codec, record, ConsentChecked)
        with correlation_context(checked.correlation_id):
            with self.metrics.time_handler("route"):
                planned = plan(checked, self.directory, producer=PRODUCER)
                # Each route carries the snapshot on as received: its text, not written anew.
                routes = self.records.write(record, planned) if isinstance(planned, Routes) else ()
            if planned is None:  # a timeline decision: not ours to route
                self.metrics.consumed(record.topic, checked.schema_name, "not-routed")
                return ()
            if isinstance(planned, RouteFailed):
                self._failed(record.topic, checked, planned)
                return [planned]
            self._routed(record.topic, checked, planned)
        return routes

    def _failed(self, source: str, checked: ConsentChecked, failed: RouteFailed) -> None:
        study = checked.study
        self.metrics.consumed(source, checked.schema_name, "failed")
        code = failed.reason_code.value if failed.reason_code else "unknown"
        self.metrics.route_failed(code)
        # A patient's objection is the system working; the other reasons (an unknown
        # recipient, no usable endpoint) need an operator.
        denied = failed.reason_code is RouteFailureReason.CONSENT_DENIED
        (log.info if denied else log.warning)(
            "study not routed",
            study_instance_uid=study.study_instance_uid,
            version=study.version,
            recipient_ura=study.recipient_ura,
            reason_code=code,
            reason=failed.reason,
        )

    def _routed(self, source: str, checked: ConsentChecked, routes: Routes) -> None:
        self.metrics.consumed(source, checked.schema_name, "routed")
        channels = routes.parts.destinations
        for endpoint_id in routes.endpoint_ids:
            self.metrics.resolved(channels[endpoint_id].channel.value, routes.priority.value)
        # The route-resolved event is the record; the log names what needs a look.
        if not debug_enabled(__name__):
            return
        study = checked.study
        for endpoint_id in routes.endpoint_ids:
            log.debug(
                "study routed",
                study_instance_uid=study.study_instance_uid,
                version=study.version,
                recipient_ura=study.recipient_ura,
                endpoint_id=endpoint_id,
                priority=routes.priority.value,
                instances=len(routes.selected),
                event_id=routes.event_id(endpoint_id),
            )


def build_routing_worker(
    settings: RoutingSettings,
    *,
    group: str = SERVICE,
    source_topic: str = ConsentChecked.topic,
    resolved_topic: str = RouteResolved.topic,
    failed_topic: str = RouteFailed.topic,
    directory_topic: str = PROVIDER_DIRECTORY,
    metrics: RoutingMetrics | None = None,
    max_records: int = 500,
) -> Worker:
    """The routing worker (consumer group ``beeldportaal-<group>``); topic names can be replaced
    by declared test copies."""
    metrics = metrics or RoutingMetrics()
    view = DirectoryView(
        settings.kafka, directory_topic, metrics=metrics, name=f"{group}-directory"
    )
    router = Router(
        directory=view, metrics=metrics, view_timeout=settings.view_start_timeout_seconds
    )
    stream = StreamWorker(
        settings.kafka,
        name=group,
        group=group,
        topics=[source_topic],
        handle=router.handle,
        prepare=router.prepare,
        metrics=metrics,
        rename={RouteResolved.topic: resolved_topic, RouteFailed.topic: failed_topic},
        max_records=max_records,
    )
    return Worker(stream, views=(view,))


def main(settings: RoutingSettings) -> None:
    """Run the routing worker until SIGTERM (``beeldportaal routing route``)."""
    configure_logging(f"{settings.service_name}-worker", settings.log_level, settings.log_json)
    metrics = RoutingMetrics()
    worker = build_routing_worker(settings, metrics=metrics)
    runtime.run(
        run_worker(
            worker,
            metrics=metrics,
            metrics_port=settings.worker_metrics_port,
            metrics_host=settings.worker_metrics_host,
        )
    )
