"""Study assembly benchmark: one study of N instances through the assembly worker, measured.

    python -m benchmarks.assembly [--instances 2000] [--series 4] [--partitions 12]
                                  [--store memory|rocksdb] [--stable-age 3.0]
                                  [--bootstrap HOST:PORT]

The faust assembly agent (``benchmarks.faust_assembly``) runs in this process against the
real broker, on a fresh pair of instance-stored/study-received topics and a fresh app id (so fresh
changelogs), all deleted at the end. Once it owns every partition, a spawned child process
publishes ``--instances`` instance-stored events of one study (``--series`` series) as ingest
would, and the benchmark waits until the study is announced and the announcement recorded.

Reported (stdout, one JSON object; progress on stderr):

- ``cpu_seconds``: CPU time of this process from the first instance published until the
  announcement is recorded: the worker's agents, timer and producer. The publisher runs in its
  own process and is not counted; reading study-received back (undecoded) is, and is small.
- ``changelog``: records and bytes (key + value, before compression) the worker produced to each
  changelog topic, counted by a faust sensor on the worker's producer; ``changelog_bytes`` and
  ``changelog_bytes_per_instance`` sum them.
- ``seconds_after_last_instance``: wall time from the last instance's acknowledgement by the
  broker to study-received on the broker; it includes the stable age (``stable_age_seconds``),
  so the worker's own delay is the difference. The stable age defaults to 3 s: the faust
  consumer here regularly stops delivering for about a second (after the first fetch of a
  partition that is being written), and a worker that saw no instance for the stable age
  rightly announces what it has; 1 s would measure that stall, not the assembly.
- ``announcements``/``instances_announced``: what study-received said (one v1 with every
  instance is the expected outcome; the exit status is 1 otherwise).
- ``peak_rss_mb`` of this process.

``--profile`` prints a cProfile summary of the measured stretch to stderr.
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
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer

from benchmarks.faust_assembly import build_assembly_app
from services.ingest.config import IngestSettings
from services.ingest.metrics import IngestMetrics
from shared import topics
from shared.codec import Codec
from shared.events import (
    BsnStatus,
    IngestChannel,
    InstanceRef,
    InstanceStored,
    PatientRef,
    StudyReceived,
)
from shared.faust_app import App, declare_changelogs
from shared.kafka import KafkaEventPublisher, delete_topics_containing, provision_topics
from shared.logging import configure_logging
from shared.settings import KafkaSettings
from shared.topics import TopicSpec

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
TIMEOUT = 60.0


def log(message: str) -> None:
    print(f"[assembly] {message}", file=sys.stderr, flush=True)


def make_uid() -> str:
    # A UUID-derived UID (PS3.5 B.2): realistic length, no registered root needed.
    return f"2.25.{uuid.uuid4().int}"


def study_events(study_uid: str, count: int, series: int) -> list[InstanceStored]:
    """``count`` instance-stored of one CT study in ``series`` series, as ingest publishes them."""
    series_uids = [make_uid() for _ in range(series)]
    patient = PatientRef(pseudonym=None, bsn_status=BsnStatus.ABSENT)
    correlation_id = str(uuid.uuid4())
    events = []
    for i in range(count):
        number = i % series
        sop = make_uid()
        events.append(
            InstanceStored(
                correlation_id=correlation_id,
                producer="bench-assembly",
                study_instance_uid=study_uid,
                instance=InstanceRef(
                    sop_instance_uid=sop,
                    sop_class_uid=CT_IMAGE_STORAGE,
                    series_instance_uid=series_uids[number],
                    transfer_syntax_uid=EXPLICIT_VR_LITTLE_ENDIAN,
                    object_key=f"11111111/{sop}.dcm",  # ingest's key: {sender}/{sop}.dcm
                    size=526_000,
                    sha256=uuid.uuid4().hex * 2,
                ),
                channel=IngestChannel.STOW_RS,
                sender_ura="11111111",
                sender_endpoint="bench-pacs",
                recipient_ura="22222222",
                patient=patient,
                accession_number="ACC0001",
                study_date=date(2025, 3, 14),
                study_description="CT thorax",
                institution_name="Ziekenhuis Oost",
                modality="CT",
                series_number=number + 1,
                series_description=f"series {number + 1}",
            )
        )
    return events


def publish_study(bootstrap: str, topic: str, study_uid: str, count: int, series: int) -> None:
    """Child process: publish the study and return once the broker acknowledged all of it."""

    async def publish() -> None:
        events = study_events(study_uid, count, series)
        async with KafkaEventPublisher(KafkaSettings(bootstrap_servers=bootstrap), "bench") as pub:
            await pub.publish_many(events, topic=topic)

    asyncio.run(publish())


class ChangelogVolume(faust.Sensor):
    """Records and key + value bytes the worker's producer sends to each changelog topic."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.records: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)

    def on_send_initiated(
        self, producer: Any, topic: str, message: Any, keysize: int, valsize: int
    ) -> Any:
        if topic.endswith("-changelog"):
            self.records[topic] += 1
            self.bytes[topic] += keysize + valsize
        return super().on_send_initiated(producer, topic, message, keysize, valsize)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def wait_until_owning(app: App, source: str, partitions: int) -> None:
    async with asyncio.timeout(TIMEOUT):
        while True:
            ours = {tp for tp in app.assignor.assigned_actives() if tp.topic == source}
            if len(ours) == partitions and not (app.rebalancing or app.in_recovery):
                return
            await asyncio.sleep(0.1)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    kafka = KafkaSettings(bootstrap_servers=args.bootstrap)
    tag = uuid.uuid4().hex[:12]
    source = TopicSpec(f"bench-assembly-{tag}-instance-stored", args.partitions, topics.DAY_MS)
    sink = TopicSpec(f"bench-assembly-{tag}-study-received", args.partitions, topics.DAY_MS)
    for spec in (source, sink):
        topics.BY_NAME[spec.name] = spec
    await provision_topics(kafka.bootstrap_list, (source, sink))
    state_dir = (
        Path(tempfile.mkdtemp(prefix="bench-assembly-")) if args.store == "rocksdb" else None
    )
    settings = IngestSettings(
        kafka=kafka,
        stable_age_seconds=args.stable_age,
        assembly_check_interval_seconds=0.2,
    )
    metrics = IngestMetrics()
    app = build_assembly_app(
        settings,
        app_id=f"bench-assembly-{tag}",
        source_topic=source.name,
        sink_topic=sink.name,
        metrics=metrics,
        state_dir=state_dir,
    )
    volume = ChangelogVolume()
    app.sensors.add(volume)
    await declare_changelogs(app, kafka)
    study_uid = make_uid()
    consumer = AIOKafkaConsumer(
        sink.name,
        bootstrap_servers=kafka.bootstrap_list,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=32 * 1024 * 1024,
    )
    try:
        await asyncio.wait_for(app.start(), TIMEOUT)
        await wait_until_owning(app, source.name, args.partitions)
        await consumer.start()
        log(f"worker ready; publishing {args.instances} instances of one study")
        recorded = metrics.events_consumed.labels(sink.name, StudyReceived.schema_name, "recorded")

        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        child = multiprocessing.get_context("spawn").Process(
            target=publish_study,
            args=(args.bootstrap, source.name, study_uid, args.instances, args.series),
        )
        child.start()
        raw: list[Any] = []
        announced_at = last_ack_at = None
        async with asyncio.timeout(args.timeout):
            while recorded._value.get() < 1:
                if last_ack_at is None and not child.is_alive():
                    if child.exitcode != 0:
                        raise RuntimeError(f"publisher exited with {child.exitcode}")
                    last_ack_at = time.monotonic()
                batches = await consumer.getmany(timeout_ms=50)
                for records in batches.values():
                    raw.extend(records)
                    if records and announced_at is None:
                        announced_at = time.monotonic()
            # The changelog records of the recording go out with the next producer flush.
            await app.producer.flush()
        cpu = cpu_seconds() - cpu0
        wall = time.monotonic() - wall0
        if profiler:
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
            print(out.getvalue(), file=sys.stderr)
        child.join()
        if last_ack_at is None:
            last_ack_at = time.monotonic()
        # Anything announced twice would be on the topic by now (stable age plus a tick).
        await asyncio.sleep(args.stable_age + 1.0)
        raw.extend(r for rs in (await consumer.getmany(timeout_ms=500)).values() for r in rs)
    finally:
        await consumer.stop()
        await asyncio.wait_for(app.stop(), TIMEOUT)
        await delete_topics_containing(kafka.bootstrap_list, tag)

    codec = Codec()
    announcements = [codec.decode_record(r) for r in raw]
    assert all(isinstance(a, StudyReceived) for a in announcements)
    changelog_bytes = sum(volume.bytes.values())
    return {
        "instances": args.instances,
        "series": args.series,
        "partitions": args.partitions,
        "store": args.store,
        "stable_age_seconds": args.stable_age,
        "cpu_seconds": round(cpu, 3),
        "wall_seconds": round(wall, 3),
        "seconds_after_last_instance": round((announced_at or wall0) - last_ack_at, 3),
        "changelog": {
            topic.rsplit(tag + "-", 1)[-1]: {"records": volume.records[topic], "bytes": size}
            for topic, size in sorted(volume.bytes.items())
        },
        "changelog_bytes": changelog_bytes,
        "changelog_bytes_per_instance": round(changelog_bytes / max(args.instances, 1)),
        "announcements": [
            {"version": a.study.version, "instances": len(a.study.instances)}  # type: ignore[attr-defined]
            for a in announcements
        ],
        "instances_announced": sum(
            len(a.study.new_sop_instance_uids)  # type: ignore[attr-defined]
            for a in announcements
        ),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_avg_1m": os.getloadavg()[0],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_bootstrap = os.environ.get("BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.assembly", description=__doc__.split("\n")[0]
    )
    p.add_argument("--bootstrap", default=default_bootstrap, help="Kafka bootstrap servers")
    p.add_argument("--instances", type=int, default=2000, help="instances in the study")
    p.add_argument("--series", type=int, default=4, help="series they are spread over")
    p.add_argument("--partitions", type=int, default=12, help="partitions of both topics")
    p.add_argument("--store", choices=("memory", "rocksdb"), default="memory")
    p.add_argument("--stable-age", type=float, default=3.0, help="seconds (IngestSettings)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this long")
    p.add_argument("--profile", action="store_true", help="cProfile summary to stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("bench-assembly", "WARNING", json=False, stream=sys.stderr)
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    expected = [{"version": 1, "instances": args.instances}]
    ok = result["announcements"] == expected and result["instances_announced"] == args.instances
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
