"""Prometheus metrics every service shares, on a registry per service, with patient-free labels."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    gc_collector,
    platform_collector,
    process_collector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase

from shared.identifiers import contains_bsn, contains_pseudonym

PREFIX = "beeldportaal_"
# From 1 ms (a cache hit) to 60 s (a slow STOW-RS delivery); beyond that it is a timeout anyway.
# fmt: off
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
# fmt: on
# One hop of a record through Kafka: a few ms when a worker keeps up, up to hours on a retry tier.
# fmt: off
HOP_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 7200.0, 14400.0,
)
# fmt: on

# The error taxonomy of style.md: dead-letter, retry with backoff, crash.
ErrorClass = Literal["poison", "transient", "fatal"]
ERROR_CLASSES: tuple[str, ...] = get_args(ErrorClass)


class UnsafeLabel(ValueError):
    """A label value that looks like patient data. The message never repeats the value."""


def safe_label(value: str) -> str:
    """Return ``value`` if it may be a label value; raise :class:`UnsafeLabel` if it holds a
    BSN (a 9-digit run passing the 11-proof) or a pseudonym.

    Label values end up in Prometheus, dashboards and alert texts, kept far longer than logs, and
    a per-patient label would also explode the series count.
    """
    if not isinstance(value, str):
        raise UnsafeLabel(f"a label value must be a str, not {type(value).__name__}")
    return _checked_label(value)


# Label values come from small closed sets (topics, schemas, outcomes) and are checked on every
# increment: a worker checked each of them a dozen times per event. A value that passed is
# remembered; one that failed raises again every time (lru_cache keeps no exceptions).
@functools.lru_cache(maxsize=4096)
def _checked_label(value: str) -> str:
    if contains_bsn(value):
        raise UnsafeLabel("label value looks like a BSN")
    if contains_pseudonym(value):
        raise UnsafeLabel("label value looks like a patient pseudonym")
    return value


def initialise(metric: MetricWrapperBase, *values: Iterable[str]) -> None:
    """Create every combination of the given label values (in label order) at zero.

    A labelled series only appears at its first increment, so a rule or a panel on, say, the
    dead-lettered deliveries would see no series at all, not a zero, until the first one; and
    ``rate()`` needs a sample before the increment to see it. Services initialise the closed
    label sets they know (outcomes, channels, bases) when their metrics are made.
    """
    for combination in itertools.product(*values):
        metric.labels(*(safe_label(v) for v in combination))


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """Body and Content-Type for ``/metrics``, honouring the scraper's Accept (OpenMetrics)."""
    # Encoder and content type come as a pair: prometheus-client >= 0.22 advertises text format
    # 1.0.0 in CONTENT_TYPE_LATEST while generate_latest() still writes 0.0.4.
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class ServiceMetrics:
    """The metrics every service exports, on its own registry (never the global default one).

    A service with more metrics subclasses this and adds them with :meth:`counter`,
    :meth:`gauge` and :meth:`histogram`, which put them on the same registry with the prefix.
    """

    def __init__(
        self,
        service: str,
        version: str,
        *,
        registry: CollectorRegistry | None = None,
        runtime_collectors: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # The children of events_consumed / events_produced by label values: taken once per
        # event in every worker, and prometheus_client's labels() costs microseconds each time.
        self._consumed: dict[tuple[str, str, str], Any] = {}
        self._produced: dict[tuple[str, str], Any] = {}
        self._handlers: dict[str, Any] = {}
        if runtime_collectors:
            # What the default registry would have given: CPU, memory, fds, GC, Python version.
            process_collector.ProcessCollector(registry=self.registry)
            platform_collector.PlatformCollector(registry=self.registry)
            gc_collector.GCCollector(registry=self.registry)

        self.service_info = Info(
            f"{PREFIX}service", "The running service and its version.", registry=self.registry
        )
        self.service_info.info({"service": safe_label(service), "version": safe_label(version)})
        self.events_consumed = self.counter(
            "events_consumed",
            "Events taken from Kafka, by how handling ended.",
            ["topic", "schema", "outcome"],
        )
        self.events_produced = self.counter(
            "events_produced", "Events sent to Kafka.", ["topic", "schema"]
        )
        self.events_failed = self.counter(
            "events_failed",
            "Events whose handling failed, by error class.",
            ["topic", "error_class"],
        )
        self.handler_duration = self.histogram(
            "handler_duration_seconds",
            "Time spent in a handler per event.",
            ["handler"],
            buckets=DURATION_BUCKETS,
        )
        # Consumer-group members (shared.stream) record these; a process without one exports
        # the metric families without samples.
        self.consumer_lag = self.gauge(
            "consumer_lag",
            "Records on a partition this consumer-group member owns that it has not fetched "
            "yet (the partition's highwater minus the member's position, after each fetch).",
            ["group", "topic", "partition"],
        )
        self.consumer_partitions = self.gauge(
            "consumer_assigned_partitions",
            "Partitions assigned to this consumer-group member.",
            ["group"],
        )
        self.stream_latency = self.histogram(
            "stream_record_latency_seconds",
            "From a record's append to its topic to the end of the batch that handled it (one "
            "hop: waiting plus handling), by consumer group and topic.",
            ["group", "topic"],
            buckets=HOP_BUCKETS,
        )

    # --- building blocks for service-specific metrics --------------------------------------------

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(PREFIX + name, documentation, labels, registry=self.registry)

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(PREFIX + name, documentation, labels, registry=self.registry)

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        *,
        buckets: Sequence[float] = DURATION_BUCKETS,
    ) -> Histogram:
        return Histogram(
            PREFIX + name, documentation, labels, registry=self.registry, buckets=buckets
        )

    def expect_stream(self, group: str, topics: Sequence[str]) -> None:
        """Create the series a consumer group will record, at zero, before its first record:
        a rule or panel on them works from start-up (a labelled series is otherwise born at
        its first increment, and a rate over a missing series is no rate at all)."""
        group = safe_label(group)
        self.consumer_partitions.labels(group).set(0)
        for topic in topics:
            self.stream_latency.labels(group, safe_label(topic))
            for error_class in ERROR_CLASSES:
                self.events_failed.labels(safe_label(topic), error_class)

    # --- recording, every label value through safe_label -----------------------------------------

    def consumed(self, topic: str, schema: str, outcome: str = "ok") -> None:
        key = (topic, schema, outcome)
        child = self._consumed.get(key)
        if child is None:
            child = self.events_consumed.labels(
                safe_label(topic), safe_label(schema), safe_label(outcome)
            )
            self._consumed[key] = child
        child.inc()

    def produced(self, topic: str, schema: str) -> None:
        key = (topic, schema)
        child = self._produced.get(key)
        if child is None:
            child = self.events_produced.labels(safe_label(topic), safe_label(schema))
            self._produced[key] = child
        child.inc()

    def failed(self, topic: str, error_class: ErrorClass) -> None:
        if error_class not in ERROR_CLASSES:
            raise ValueError(f"error_class must be one of {', '.join(ERROR_CLASSES)}")
        self.events_failed.labels(safe_label(topic), error_class).inc()

    @contextmanager
    def time_handler(self, handler: str) -> Iterator[None]:
        """Observe the duration of the block, also when it raises (slow failures matter most)."""
        child = self._handlers.get(handler)
        if child is None:
            child = self._handlers[handler] = self.handler_duration.labels(safe_label(handler))
        start = time.perf_counter()
        try:
            yield
        finally:
            child.observe(time.perf_counter() - start)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        return render(self.registry, accept)
