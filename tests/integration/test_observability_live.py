"""The rules and dashboards against the platform's own Prometheus, fed by the services' metrics.

How this proves the metric names exist, honestly: the Prometheus is the one `platform up`
starts (the same binary, configuration and rule files as `make up`). The exporters are the
services' real metric classes (every ServiceMetrics subclass a service process exports, with
their start-up initialisation), served through the real exposition (shared.probes.ProbeServer)
and scraped by that Prometheus through its file-based discovery, under the job names of the
service processes. The consumer lag and hop latency come from real StreamWorkers consuming a
topic of the real Kafka. Series born only of an event are recorded through the classes' own
methods as the services call them (an attempt at a destination; the API processes' read
models watched). Then ``check_live`` must find nothing: every expression runs, every name it
reads is one Prometheus has, every rule is loaded and healthy. And it must be able to fail.

The stream metrics of shared.stream (lag per partition, hop latency, assigned partitions) are
tested on their own against the real broker too.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from deploy.local.config import LocalConfig
from deploy.local.prometheus import Prometheus, Target
from deploy.observability import Expression, check_live
from services.consent.metrics import ConsentMetrics, DecisionMetrics
from services.ingest.metrics import IngestMetrics
from services.notify.metrics import NotifyApiMetrics
from services.notify.worker_metrics import NotifyWorkerMetrics
from services.routing.metrics import RoutingMetrics
from services.timeline.entrypoints.projection import ProjectionMetrics
from services.timeline.metrics import TimelineMetrics
from shared.metrics import ServiceMetrics
from shared.probes import ProbeServer
from shared.settings import KafkaSettings
from shared.stream import StreamWorker, Worker
from tests.workers import running

pytestmark = pytest.mark.integration

# Scrapes and rule evaluations every 5 s, target files reread within 5 s.
SCRAPED_WITHIN = 90.0


@pytest.fixture(scope="module")
def prometheus(platform_env: dict[str, str]) -> Prometheus:
    """The platform's Prometheus, as the local configuration that started it knows it."""
    local = Prometheus(LocalConfig.from_env())
    url = platform_env.get("BEELDPORTAAL_PROMETHEUS_URL", local.url)
    if url != local.url:
        pytest.fail(f"the platform's Prometheus is {url}, the local configuration's {local.url}")
    if not local.ready():
        pytest.fail(f"Prometheus at {local.url} is not ready: `beeldportaal platform up`")
    return local


@dataclass
class StubView:
    """A read model as the API processes' metrics watch it (caught up, nothing behind)."""

    applied: int = 0
    skipped: int = 0
    patients: int = 0
    is_caught_up: bool = True
    failed: bool = False

    def lag(self) -> int:
        return 0


def exporters() -> dict[str, ServiceMetrics]:
    """Each service process (its job name) with the metrics class it exports, wired as the
    process wires it at start."""
    consent, notify, timeline = ConsentMetrics(), NotifyApiMetrics(), TimelineMetrics()
    consent.watch_view(StubView())
    for name in ("journeys", "dead-letters"):
        notify.watch_view(name, StubView())
    for name in ("consent-registry", "provider-directory"):
        timeline.watch_view(name, StubView())
    return {
        "ingest": IngestMetrics(),
        "ingest-assembly": IngestMetrics(),
        "consent": consent,
        "consent-decisions": DecisionMetrics(),
        "routing": RoutingMetrics(),
        "routing-worker": RoutingMetrics(),
        "notify": notify,
        "notify-worker": NotifyWorkerMetrics(),
        "timeline": timeline,
        "timeline-projection": ProjectionMetrics(),
    }


WORKERS = ("ingest-assembly", "consent-decisions", "routing-worker", "notify-worker")


async def produce(kafka: KafkaSettings, topic: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_list)
    await producer.start()
    try:
        for i in range(count):
            await producer.send_and_wait(topic, f"record {i}".encode(), key=str(i).encode())
    finally:
        await producer.stop()


async def test_every_rule_and_panel_expression_runs_on_the_platforms_prometheus_and_reads_only_metrics_the_services_export(  # noqa: E501
    prometheus: Prometheus,
    kafka_settings: KafkaSettings,
    make_topic: Callable[..., Awaitable[str]],
    tag: str,
) -> None:
    topic = await make_topic(partitions=2, prefix="observability")
    metrics = exporters()
    notify_worker = metrics["notify-worker"]
    assert isinstance(notify_worker, NotifyWorkerMetrics)

    async def deliver(record: Any) -> list[Any]:
        # As handlers.deliver records a concluded attempt at a destination endpoint.
        outcome = "delivered" if record.offset % 2 == 0 else "retry"
        notify_worker.attempt_concluded(
            "00000101", "oost-pacs-dicomweb", "dicomweb", outcome, retried=False
        )
        return []

    async def nothing(record: Any) -> list[Any]:
        return []

    targets_name = f"observability-live-{tag}"
    async with AsyncExitStack() as stack:
        targets = []
        for job, exporter in metrics.items():
            probe = await stack.enter_async_context(
                ProbeServer(0, exporter.registry, ready=lambda: True)
            )
            url = f"http://127.0.0.1:{probe.port}/metrics"
            targets.append(Target(job, url, {"test": targets_name}))
        stack.callback(prometheus.remove_targets, targets_name)
        prometheus.write_targets(targets_name, targets)
        for job in WORKERS:
            worker = Worker(
                StreamWorker(
                    kafka_settings,
                    name=f"{job}-{tag}",
                    group=f"{job}-{tag}",
                    topics=[topic],
                    handle=deliver if job == "notify-worker" else nothing,
                    metrics=metrics[job],
                )
            )
            await stack.enter_async_context(running(worker))
        await produce(kafka_settings, topic, 10)

        deadline = time.monotonic() + SCRAPED_WITHIN
        problems = await asyncio.to_thread(check_live, prometheus.url)
        while problems and time.monotonic() < deadline:
            await asyncio.sleep(2)
            problems = await asyncio.to_thread(check_live, prometheus.url)
        assert problems == []


def test_a_misspelt_metric_a_broken_query_and_a_rule_not_loaded_are_reported(
    prometheus: Prometheus, tmp_path: Any
) -> None:
    checked = [
        Expression("typo", "rate(beeldportaal_notify_deliveries_delivred_total[5m])"),
        Expression("syntax", "sum(rate(up[5m])"),
        Expression("fine", 'sum by (job) (up{job="prometheus"})'),
    ]
    problems = check_live(prometheus.url, checked=checked, rules=[])
    assert any(
        p.startswith("typo: metric beeldportaal_notify_deliveries_delivred_total is not known")
        for p in problems
    )
    assert any(p.startswith("syntax: query failed") for p in problems)
    assert not any(p.startswith("fine:") for p in problems)
    assert len(problems) == 2

    rules = tmp_path / "extra.yml"
    rules.write_text(
        "groups:\n  - name: not-loaded\n    rules:\n"
        "      - record: job:misspelt:rate5m\n"
        "        expr: sum by (job) (rate(beeldportaal_no_such_metric_total[5m]))\n"
    )
    problems = check_live(
        prometheus.url, checked=[Expression("recorded", "job:misspelt:rate5m > 0")], rules=[rules]
    )
    assert any(
        "recorded: metric beeldportaal_no_such_metric_total is not known" in p
        and "(read by the rule recording job:misspelt:rate5m)" in p
        for p in problems
    )
    assert any("record job:misspelt:rate5m: not loaded by" in p for p in problems)


def test_the_platforms_prometheus_scrapes_itself_and_evaluates_the_rules(
    prometheus: Prometheus,
) -> None:
    with urllib.request.urlopen(f"{prometheus.url}/api/v1/rules?type=alert", timeout=5) as answer:
        body = answer.read().decode()
    assert "BeeldportaalServiceDown" in body and '"health":"err"' not in body


# --- shared.stream's metrics ----------------------------------------------------------------------


def value(metrics: ServiceMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f}s: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def gate() -> AsyncIterator[asyncio.Event]:
    event = asyncio.Event()
    yield event
    event.set()


async def test_a_workers_lag_is_what_it_has_not_fetched_its_hops_are_timed_and_its_series_go_when_it_stops(  # noqa: E501
    kafka_settings: KafkaSettings,
    make_topic: Callable[..., Awaitable[str]],
    tag: str,
    gate: asyncio.Event,
) -> None:
    topic = await make_topic(partitions=1, prefix="observability")
    await produce(kafka_settings, topic, 30)
    metrics = ServiceMetrics("test", "0", registry=CollectorRegistry(), runtime_collectors=False)
    group = f"{kafka_settings.client_id_prefix}-lag-{tag}"
    handled: list[int] = []

    async def handle(record: Any) -> list[Any]:
        await gate.wait()  # the first batch (one record) waits: the rest is not fetched yet
        handled.append(record.offset)
        return []

    stream = StreamWorker(
        kafka_settings,
        name=f"lag-{tag}",
        group=f"lag-{tag}",
        topics=[topic],
        handle=handle,
        metrics=metrics,
        max_records=1,
    )
    lag = {"group": group, "topic": topic, "partition": "0"}
    hops = {"group": group, "topic": topic}
    assert value(metrics, "beeldportaal_stream_record_latency_seconds_count", **hops) == 0
    async with running(Worker(stream)):
        assert value(metrics, "beeldportaal_consumer_assigned_partitions", group=group) == 1
        await wait_for(
            lambda: value(metrics, "beeldportaal_consumer_lag", **lag) == 29,
            "lag 29: one record fetched of 30",
        )
        gate.set()
        await wait_for(lambda: len(handled) == 30, "every record handled")
        await wait_for(
            lambda: value(metrics, "beeldportaal_consumer_lag", **lag) == 0, "lag back to 0"
        )
        count = "beeldportaal_stream_record_latency_seconds_count"
        await wait_for(lambda: value(metrics, count, **hops) == 30, "30 hops timed")
        total = value(metrics, "beeldportaal_stream_record_latency_seconds_sum", **hops)
        assert total is not None and 0 < total < 30 * 60
    # Stopped: its partitions are someone else's to report.
    assert value(metrics, "beeldportaal_consumer_lag", **lag) is None
    assert value(metrics, "beeldportaal_consumer_assigned_partitions", group=group) == 0
