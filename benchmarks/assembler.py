"""Study assembly, faust worker against the aiokafka worker, on the same input in one run.

    python -m benchmarks.assembler [--studies 200] [--instances 50] [--partitions 12]
                                   [--rate 0] [--stable-age 3.0] [--impl faust --impl stream]
                                   [--bootstrap HOST:PORT]

One set of instance-stored events (``--studies`` CT studies of ``--instances`` instances in 4
series, made like ``benchmarks.assembly``'s) is given to each implementation, one after the
other, each in a spawned process of its own with its own fresh topics (instance-stored,
study-received) and state (faust: a fresh app id and changelogs; aiokafka: a fresh consumer group
and compacted changelog); everything is deleted at the end. ``--impl`` picks and orders them.

- ``--rate 0`` (default), backlog: the events are all published before the worker starts, so
  the worker takes them in as fast as it can.
- ``--rate R``: a publisher process sends them once the worker is ready, R instances/s, in
  requests of 10 instances of one study (as Orthanc's STOW client does), 8 studies at a time.

Reported per implementation (stdout, one JSON object; progress on stderr):

- ``instances_per_second``: instances taken in over the wall time from the worker being ready
  (owning every partition, its state recovered) to the last instance taken in (with ``--rate``
  that is the publishing rate, as long as the worker keeps up);
- ``cpu_ms_per_instance``: CPU time of the worker's process from ready until every study is
  announced (faust: and its announcement recorded, which is part of its design), per instance;
  reading study-received back to count is included and small;
- ``announce_delay_s`` (``--rate`` only): p50/p95/max of study-received seen minus the last
  instance's acknowledgement, minus the stable age: what the worker adds to the stable age;
- ``announcements``: count, and whether every study came as exactly one v1 listing all of its
  instances (``all_v1_complete``); the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import multiprocessing
import os
import pstats
import resource
import statistics
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

from aiokafka import AIOKafkaConsumer

from benchmarks.assembly import study_events
from shared import topics
from shared.codec import Codec
from shared.events import InstanceStored, StudyReceived
from shared.kafka import KafkaEventPublisher, delete_topics_containing, provision_topics
from shared.logging import configure_logging
from shared.settings import KafkaSettings
from shared.topics import TopicSpec

TIMEOUT = 120.0
IMPLEMENTATIONS = ("faust", "stream")
REQUEST_SIZE = 10
CONCURRENT_STUDIES = 8


def log(message: str) -> None:
    print(f"[assembler] {message}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_input(studies: int, instances: int) -> list[list[InstanceStored]]:
    return [study_events(f"2.25.{uuid.uuid4().int}", instances, 4) for _ in range(studies)]


def requests_in_order(input_: list[list[InstanceStored]]) -> list[list[InstanceStored]]:
    """Requests of 10 instances, ``CONCURRENT_STUDIES`` studies interleaved at a time."""
    pending = [
        [study[i : i + REQUEST_SIZE] for i in range(0, len(study), REQUEST_SIZE)]
        for study in input_
    ]
    order: list[list[InstanceStored]] = []
    active: list[list[list[InstanceStored]]] = []
    while pending or active:
        while pending and len(active) < CONCURRENT_STUDIES:
            active.append(pending.pop(0))
        for requests in list(active):
            order.append(requests.pop(0))
            if not requests:
                active.remove(requests)
    return order


def declare(specs: list[TopicSpec]) -> None:
    for spec in specs:
        topics.BY_NAME[spec.name] = spec


# --- the publisher (parent for a backlog, a child process for --rate) ---------------------------


async def publish_all(kafka: KafkaSettings, topic: str, input_: list[list[InstanceStored]]) -> None:
    async with KafkaEventPublisher(kafka, "bench-assembler") as publisher:
        await publisher.publish_many([e for study in input_ for e in study], topic=topic)


def paced_publisher(
    bootstrap: str, topic: str, input_: list[list[InstanceStored]], rate: float, conn: Connection
) -> None:
    """Child: send the requests at ``rate`` instances/s; report each study's last ack time."""

    async def run() -> dict[str, float]:
        last_ack: dict[str, float] = {}
        kafka = KafkaSettings(bootstrap_servers=bootstrap)
        async with KafkaEventPublisher(kafka, "bench-assembler") as publisher:
            started = time.monotonic()
            sent = 0
            for request in requests_in_order(input_):
                ahead = started + sent / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
                await publisher.publish_many(request, topic=topic)
                sent += len(request)
                last_ack[request[0].study_instance_uid] = time.time()
        return last_ack

    conn.send(asyncio.run(run()))


# --- one implementation, in a child process -------------------------------------------------------


def worker_child(impl: str, config: dict[str, Any], conn: Connection) -> None:
    configure_logging("bench-assembler", config["log_level"], json=False, stream=sys.stderr)
    declare([TopicSpec(**spec) for spec in config["specs"]])
    conn.send(asyncio.run(measure(impl, config, conn)))


async def measure(impl: str, config: dict[str, Any], conn: Connection) -> dict[str, Any]:
    from services.ingest.config import IngestSettings
    from services.ingest.metrics import IngestMetrics

    kafka = KafkaSettings(bootstrap_servers=config["bootstrap"])
    settings = IngestSettings(
        kafka=kafka,
        stable_age_seconds=config["stable_age"],
        assembly_check_interval_seconds=0.2,
        assembly_completion_quiet_seconds=0.5,
    )
    metrics = IngestMetrics()
    source, sink, tag = config[f"source_{impl}"], config[f"sink_{impl}"], config["tag"]
    stop: Any
    if impl == "faust":
        from benchmarks.faust_assembly import build_assembly_app
        from shared.faust_app import declare_changelogs

        app = build_assembly_app(
            settings,
            app_id=f"bench-assembler-faust-{tag}",
            source_topic=source,
            sink_topic=sink,
            metrics=metrics,
        )
        await declare_changelogs(app, kafka)
        await asyncio.wait_for(app.start(), TIMEOUT)
        async with asyncio.timeout(TIMEOUT):
            while True:
                ours = {tp for tp in app.assignor.assigned_actives() if tp.topic == source}
                if len(ours) == config["partitions"] and not (app.rebalancing or app.in_recovery):
                    break
                await asyncio.sleep(0.1)

        async def stop() -> None:
            await asyncio.wait_for(app.stop(), TIMEOUT)

    else:
        from services.ingest.entrypoints.assembler import build_assembler

        worker = build_assembler(
            settings,
            group=f"bench-assembler-stream-{tag}",
            source_topic=source,
            sink_topic=sink,
            state_topic=config["state"],
            metrics=metrics,
            transactional_id=f"bench-assembler-stream-{tag}",
        )
        await worker.start()
        task = asyncio.create_task(worker.run())
        await worker.wait_assigned(TIMEOUT)

        async def stop() -> None:
            worker.request_stop()
            await asyncio.wait_for(task, TIMEOUT)
            await worker.stop()

    reader = AIOKafkaConsumer(
        sink,
        bootstrap_servers=kafka.bootstrap_list,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await reader.start()
    codec = Codec()
    total = config["studies"] * config["instances"]
    new = metrics.events_consumed.labels(source, InstanceStored.schema_name, "new")
    recorded = metrics.events_consumed.labels(sink, StudyReceived.schema_name, "recorded")
    announced: list[StudyReceived] = []
    seen_at: dict[str, float] = {}
    try:
        conn.send("ready")
        profiler = cProfile.Profile() if config["profile"] else None
        if profiler:
            profiler.enable()
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        intake_wall = None
        async with asyncio.timeout(config["timeout"]):
            while (
                len(announced) < config["studies"]
                or (impl == "faust" and recorded._value.get() < config["studies"])
                or intake_wall is None
            ):
                if intake_wall is None and new._value.get() >= total:
                    intake_wall = time.monotonic() - wall0
                for records in (await reader.getmany(timeout_ms=50)).values():
                    for record in records:
                        event = codec.decode_record(record)
                        assert isinstance(event, StudyReceived)
                        announced.append(event)
                        seen_at.setdefault(event.study.study_instance_uid, time.time())
        cpu = cpu_seconds() - cpu0
        wall = time.monotonic() - wall0
        if profiler:
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
            print(f"--- {impl} ---\n{out.getvalue()}", file=sys.stderr)
        # A second announcement of anything would be in after another stable age.
        deadline = time.monotonic() + config["stable_age"] + 1.0
        while time.monotonic() < deadline:
            for records in (await reader.getmany(timeout_ms=200)).values():
                announced.extend(codec.decode_record(r) for r in records)  # type: ignore[misc]
    finally:
        await reader.stop()
        await stop()
    versions = Counter(a.study.version for a in announced)
    complete = all(
        a.study.version == 1 and len(a.study.instances) == config["instances"] for a in announced
    )
    return {
        "instances": total,
        "instances_per_second": round(total / intake_wall, 1),
        "intake_seconds": round(intake_wall, 3),
        "cpu_seconds": round(cpu, 3),
        "cpu_ms_per_instance": round(cpu * 1000 / total, 3),
        "wall_seconds_to_last_announcement": round(wall, 3),
        "announcements": {
            "count": len(announced),
            "versions": dict(sorted(versions.items())),
            "all_v1_complete": complete and len(announced) == config["studies"],
        },
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "_seen_at": seen_at,
    }


def run_one(
    impl: str, config: dict[str, Any], input_: list[list[InstanceStored]], rate: float
) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=worker_child, args=(impl, config, child))
    process.start()
    try:
        if not parent.poll(TIMEOUT):
            raise RuntimeError(f"{impl}: the worker did not get ready")
        assert parent.recv() == "ready"
        log(f"{impl}: ready; measuring")
        last_ack: dict[str, float] = {}
        if rate > 0:
            pub_parent, pub_child = context.Pipe()
            publisher = context.Process(
                target=paced_publisher,
                args=(config["bootstrap"], config[f"source_{impl}"], input_, rate, pub_child),
            )
            publisher.start()
            last_ack = pub_parent.recv()
            publisher.join()
        if not parent.poll(config["timeout"] + TIMEOUT):
            raise RuntimeError(f"{impl}: no result")
        result: dict[str, Any] = parent.recv()
    finally:
        process.join(TIMEOUT)
        if process.is_alive():
            process.kill()
    seen_at = result.pop("_seen_at")
    if last_ack:
        stable_age = config["stable_age"]
        delays = sorted(seen_at[u] - at - stable_age for u, at in last_ack.items() if u in seen_at)
        result["announce_delay_s"] = {
            "p50": round(statistics.median(delays), 3),
            "p95": round(delays[int(0.95 * (len(delays) - 1))], 3),
            "max": round(delays[-1], 3),
        }
    return result


async def provision(kafka: KafkaSettings, specs: list[TopicSpec]) -> None:
    declare(specs)
    await provision_topics(kafka.bootstrap_list, specs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("bench-assembler", "WARNING", json=False, stream=sys.stderr)
    kafka = KafkaSettings(bootstrap_servers=args.bootstrap)
    tag = uuid.uuid4().hex[:12]
    p, impls = args.partitions, args.impl
    sources = {i: f"bench-assembler-{tag}-instance-stored-{i}" for i in impls}
    sinks = {i: f"bench-assembler-{tag}-study-received-{i}" for i in impls}
    specs = [
        TopicSpec(f"bench-assembler-{tag}-state", p, topics.FOREVER, compacted=True),
        *(TopicSpec(name, p, topics.DAY_MS) for name in [*sources.values(), *sinks.values()]),
    ]
    config = {
        "bootstrap": args.bootstrap,
        "tag": tag,
        "partitions": p,
        "studies": args.studies,
        "instances": args.instances,
        "stable_age": args.stable_age,
        "timeout": args.timeout,
        "log_level": args.log_level,
        "profile": args.profile,
        "state": specs[0].name,
        **{f"source_{i}": name for i, name in sources.items()},
        **{f"sink_{i}": name for i, name in sinks.items()},
        "specs": [
            {
                "name": s.name,
                "partitions": s.partitions,
                "retention_ms": s.retention_ms,
                "compacted": s.compacted,
            }
            for s in specs
        ],
    }
    input_ = make_input(args.studies, args.instances)
    results: dict[str, Any] = {}
    try:
        asyncio.run(provision(kafka, specs))
        for impl in impls:
            if args.rate <= 0:
                log(f"{impl}: publishing {args.studies * args.instances} instances, a backlog")
                asyncio.run(publish_all(kafka, sources[impl], input_))
            results[impl] = run_one(impl, config, input_, args.rate)
            log(f"{impl}: {json.dumps(results[impl])}")
    finally:
        asyncio.run(delete_topics_containing(kafka.bootstrap_list, tag))
    summary = {
        "mode": f"paced at {args.rate:g} instances/s" if args.rate > 0 else "backlog",
        "studies": args.studies,
        "instances_per_study": args.instances,
        "partitions": p,
        "stable_age_seconds": args.stable_age,
        "results": results,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_avg_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    if {"faust", "stream"} <= results.keys():
        f, s = results["faust"], results["stream"]
        summary["stream_vs_faust"] = {
            "instances_per_second": round(s["instances_per_second"] / f["instances_per_second"], 2),
            "cpu_ms_per_instance": round(s["cpu_ms_per_instance"] / f["cpu_ms_per_instance"], 3),
        }
    print(json.dumps(summary, indent=2))
    ok = all(r["announcements"]["all_v1_complete"] for r in results.values())
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_bootstrap = os.environ.get("BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.assembler", description=__doc__.split("\n")[0]
    )
    p.add_argument("--bootstrap", default=default_bootstrap, help="Kafka bootstrap servers")
    p.add_argument("--studies", type=int, default=200)
    p.add_argument("--instances", type=int, default=50, help="instances per study")
    p.add_argument("--partitions", type=int, default=12, help="partitions of every topic")
    p.add_argument("--rate", type=float, default=0.0, help="instances/s; 0: a backlog")
    p.add_argument("--stable-age", type=float, default=3.0, help="seconds (IngestSettings)")
    p.add_argument("--timeout", type=float, default=900.0, help="per implementation")
    p.add_argument("--log-level", default="WARNING", help="of the workers' processes")
    p.add_argument("--profile", action="store_true", help="cProfile of each worker to stderr")
    p.add_argument(
        "--impl",
        action="append",
        choices=IMPLEMENTATIONS,
        help="which to run, in this order (default: both, faust first)",
    )
    args = p.parse_args(argv)
    args.impl = args.impl or list(IMPLEMENTATIONS)
    return args


if __name__ == "__main__":
    sys.exit(main())
