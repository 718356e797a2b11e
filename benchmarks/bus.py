"""Event-bus benchmark: round-trip InstanceStored events through Kafka with the project's codec.

    python -m benchmarks.bus [--bootstrap HOST:PORT] [--events N] [--latency-events N] [--rate R]

Two phases, each on a fresh topic of its own that is deleted afterwards:

1. throughput: ``--events`` events are built, then encoded (``Codec.encode``) and produced as fast
   as possible by ``KafkaEventPublisher`` with the project's producer settings (idempotent,
   acks=all, the configured compression) from this process; one consumer group in a separate
   process decodes (``Codec.decode``, i.e. full pydantic validation) and checks every record.
   Reported: produce rate (first send to last acknowledgement), round-trip rate (first send to the
   last event consumed) and, by event id, how many events went missing or arrived twice.
2. latency: ``--latency-events`` events are produced at a fixed ``--rate`` per second, each built
   at the moment it is sent, so its ``occurred_at`` is the send time; the consumer records
   ``now - occurred_at`` after decoding it. Same machine, same clock. Reported: p50/p95/p99/max ms.

Exactly one JSON object goes to stdout; progress and (with ``--profile``) cProfile summaries go to
stderr. Exit status: 0 when every event arrived intact (whether or not the targets were met;
``--check`` makes a missed target fail too), 1 when events went missing, were invalid or a phase
failed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import platform
import pstats
import secrets
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import date
from multiprocessing.connection import Connection
from typing import Any

import aiokafka
import pydantic
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner

from shared.codec import Codec
from shared.errors import PoisonEvent
from shared.events import BsnStatus, IngestChannel, InstanceRef, InstanceStored, PatientRef
from shared.identifiers import Pseudonymizer, is_valid_bsn, parse_bsn
from shared.kafka import KafkaEventPublisher
from shared.settings import KafkaSettings
from shared.topics import topic as topic_spec

log = logging.getLogger("benchmarks.bus")

TARGET_ROUNDTRIP_PER_S = 10_000
TARGET_P99_MS = 50.0
# Instances per study: events of one study share a key (the Study Instance UID), as in ingest.
STUDY_SIZE = 100
PATIENTS = 50
# Event ids are uuid4-shaped: a random per-run prefix and the event's index in the low bits, so
# the consumer can tell which event it got (and whether it is from this run) without a lookup.
INDEX_BITS = 48
INDEX_MASK = (1 << INDEX_BITS) - 1
CONSUMER_READY_TIMEOUT_S = 30.0
# After the last expected event, keep fetching this long to see late duplicates.
DRAIN_S = 1.0


# --------------------------------------------------------------------------------------------
# Events


class EventFactory:
    """Valid, realistic InstanceStored events: 100 instances per study, CT, verified patient."""

    def __init__(self, run_prefix: int) -> None:
        self.id_high = uuid.UUID(int=run_prefix << INDEX_BITS, version=4).int >> INDEX_BITS
        # Random per run so that two runs never share a UID; 2.25.<decimal> has no leading zero.
        self._uid_base = 10**37 + secrets.randbelow(10**37)
        # Real pseudonyms (keyed HMAC of a valid BSN) under a throwaway key, one per patient.
        pseudonymizer = Pseudonymizer(secrets.token_bytes(32))
        bsns = (f"{n:09d}" for n in range(100_000_000, 1_000_000_000))
        self._pseudonyms = [
            pseudonymizer.pseudonym(parse_bsn(b))
            for b, _ in zip((b for b in bsns if is_valid_bsn(b)), range(PATIENTS), strict=False)
        ]

    def event_id(self, index: int) -> uuid.UUID:
        return uuid.UUID(int=(self.id_high << INDEX_BITS) | index)

    def make(self, index: int) -> InstanceStored:
        study_no = index // STUDY_SIZE
        study_uid = f"2.25.{self._uid_base + study_no}"
        sop_uid = f"2.25.{self._uid_base + 10**36 + index}"
        series_no = 1 + (index % STUDY_SIZE) // 50
        series_uid = f"2.25.{self._uid_base + 2 * 10**36 + study_no * 10 + series_no}"
        return InstanceStored(
            event_id=self.event_id(index),
            correlation_id=study_uid,
            producer="ingest-bench",
            study_instance_uid=study_uid,
            instance=InstanceRef(
                sop_instance_uid=sop_uid,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_instance_uid=series_uid,
                transfer_syntax_uid="1.2.840.10008.1.2.4.90",
                object_key=f"12345678/{sop_uid}.dcm",  # ingest's key: {sender}/{sop}.dcm
                size=524_288 + index % 4096,
                sha256=hashlib.sha256(sop_uid.encode()).hexdigest(),
            ),
            channel=IngestChannel.C_STORE,
            sender_ura="12345678",
            sender_endpoint="CT_SCANNER_01",
            recipient_ura="87654321",
            patient=PatientRef(
                pseudonym=self._pseudonyms[study_no % PATIENTS],
                bsn_status=BsnStatus.VERIFIED,
            ),
            accession_number=f"ACC{study_no:08d}",
            study_date=date(2025, 3, 12),
            study_time="101500",
            study_description="CT thorax met contrast",
            institution_name="Ziekenhuis Benchmark",
            modality="CT",
            series_number=series_no,
            series_description="Thorax 1.0 B31f",
        )


# --------------------------------------------------------------------------------------------
# Consumer process


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:  # nearest-rank percentile
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {
        "p50": round(rank(0.50), 2),
        "p95": round(rank(0.95), 2),
        "p99": round(rank(0.99), 2),
        "max": round(ordered[-1], 2),
    }


def _consumer_process(conn: Connection, cfg: dict[str, Any]) -> None:
    """Entry point of the consumer process: one group, one member, all partitions."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    profiler = cProfile.Profile() if cfg["profile"] else None
    try:
        if profiler:
            profiler.enable()
        result = asyncio.run(_consume(conn, cfg))
    except BaseException as exc:  # reported to the parent, which decides
        result = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        if profiler:
            profiler.disable()
            _print_profile(profiler, f"consumer ({cfg['phase']})")
    conn.send(("result", result))
    conn.close()


async def _consume(conn: Connection, cfg: dict[str, Any]) -> dict[str, Any]:
    codec = Codec()
    expected = cfg["events"]
    id_high = cfg["id_high"]
    latency = cfg["phase"] == "latency"
    consumer = AIOKafkaConsumer(
        cfg["topic"],
        bootstrap_servers=cfg["bootstrap"],
        group_id=cfg["group"],
        client_id=f"beeldportaal-bench-consumer-{cfg['phase']}",
        auto_offset_reset="earliest",
        enable_auto_commit=True,
        max_partition_fetch_bytes=cfg["max_partition_fetch_bytes"],
        fetch_max_bytes=cfg["fetch_max_bytes"],
        fetch_max_wait_ms=cfg["fetch_max_wait_ms"],
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + CONSUMER_READY_TIMEOUT_S
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise TimeoutError("no partitions assigned")
            await consumer.getmany(timeout_ms=100)
        conn.send(("ready", len(consumer.assignment())))

        seen = bytearray(expected)  # times each event index arrived (saturates at 255)
        unique = duplicates = invalid = foreign = 0
        latencies: list[float] = []
        first_at: float | None = None
        last_new_at: float | None = None
        cpu0 = time.process_time()
        deadline = time.monotonic() + cfg["timeout_s"]
        drain_until: float | None = None

        while True:
            now = time.monotonic()
            if drain_until is None and unique >= expected:
                drain_until = now + DRAIN_S
            if (drain_until is not None and now >= drain_until) or now >= deadline:
                break
            batches = await consumer.getmany(timeout_ms=100, max_records=cfg["max_records"])
            for records in batches.values():
                if first_at is None and records:
                    first_at = time.monotonic()
                for record in records:
                    try:
                        event = codec.decode(record.value, record.headers)
                    except PoisonEvent:
                        invalid += 1
                        continue
                    if latency:
                        latencies.append(
                            (time.time() - event.occurred_at.timestamp()) * 1000.0  # type: ignore[union-attr]
                        )
                    if not isinstance(event, InstanceStored) or (
                        event.patient.bsn_status is not BsnStatus.VERIFIED
                        or event.partition_key().encode() != record.key
                    ):
                        invalid += 1
                        continue
                    eid = event.event_id.int
                    index = eid & INDEX_MASK
                    if eid >> INDEX_BITS != id_high or index >= expected:
                        foreign += 1
                        continue
                    count = seen[index]
                    if count == 0:
                        unique += 1
                    else:
                        duplicates += 1
                    seen[index] = min(count + 1, 255)
                last_new_at = time.monotonic()
        cpu = time.process_time() - cpu0
        try:
            await asyncio.wait_for(consumer.commit(), 10)
        except Exception as exc:  # the figures stand without the final commit
            log.warning("final commit failed: %s", exc)
        return {
            "unique": unique,
            "missing": expected - unique,
            "duplicates": duplicates,
            "invalid": invalid,
            "foreign": foreign,
            "first_consumed_at": first_at,
            "last_consumed_at": last_new_at,
            "cpu_s": cpu,
            "latencies_ms": latencies,
            "timed_out": unique < expected,
        }
    finally:
        await consumer.stop()


class ConsumerProcess:
    """The consumer group's single member, in a process of its own (spawned, not forked)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_consumer_process, args=(child, cfg), daemon=True)
        self._proc.start()
        child.close()
        self.result: dict[str, Any] | None = None

    async def _recv(self, kind: str, timeout_s: float) -> Any:
        ready = await asyncio.to_thread(self._conn.poll, timeout_s)
        if not ready:
            raise TimeoutError(f"consumer process sent no {kind!r} within {timeout_s:.0f} s")
        got, payload = self._conn.recv()
        if got == "result" and kind != "result":
            raise RuntimeError(f"consumer process failed before {kind!r}: {payload}")
        return payload

    async def ready(self) -> int:
        return int(await self._recv("ready", CONSUMER_READY_TIMEOUT_S + 30))

    async def finish(self, timeout_s: float) -> dict[str, Any]:
        self.result = await self._recv("result", timeout_s)
        await asyncio.to_thread(self._proc.join, 10)
        return self.result

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)


# --------------------------------------------------------------------------------------------
# Phases


def _print_profile(profiler: cProfile.Profile, title: str, lines: int = 30) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(lines)
    print(
        f"\n===== cProfile: {title} (sorted by own time) =====\n{out.getvalue()}", file=sys.stderr
    )


def _consumer_cfg(
    args: argparse.Namespace, phase: str, topic: str, events: int, id_high: int, timeout_s: float
) -> dict[str, Any]:
    return {
        "phase": phase,
        "topic": topic,
        "group": f"{topic}-group",
        "bootstrap": args.bootstrap_list,
        "events": events,
        "id_high": id_high,
        "timeout_s": timeout_s,
        "max_records": args.max_records,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        "fetch_max_bytes": 64 * 1024 * 1024,
        "fetch_max_wait_ms": args.fetch_max_wait_ms,
        "profile": args.profile,
    }


async def _await_acks(futures: list[asyncio.Future[Any]]) -> int:
    """Wait for every acknowledgement; return how many sends failed."""
    results = await asyncio.gather(*futures, return_exceptions=True)
    return sum(1 for r in results if isinstance(r, BaseException))


async def throughput_phase(args: argparse.Namespace, topic: str) -> dict[str, Any]:
    factory = EventFactory(secrets.randbits(72))
    n = args.events
    consumer = ConsumerProcess(
        _consumer_cfg(args, "throughput", topic, n, factory.id_high, args.phase_timeout)
    )
    try:
        t = time.perf_counter()
        events = [factory.make(i) for i in range(n)]
        build_s = time.perf_counter() - t
        log.info("throughput: built %d events in %.1f s", n, build_s)

        publisher = KafkaEventPublisher(args.settings, "bench-bus", **args.producer_overrides)
        await publisher.start()
        profiler = cProfile.Profile() if args.profile else None
        try:
            await publisher.producer.partitions_for(topic)  # metadata before the clock starts
            partitions = await consumer.ready()
            log.info("throughput: consumer ready with %d partitions; producing", partitions)
            failed = 0
            pending: deque[asyncio.Future[Any]] = deque()
            window = args.window
            if profiler:
                profiler.enable()
            cpu0 = time.process_time()
            started = time.monotonic()
            yield_s = args.yield_ms / 1000
            next_yield = time.monotonic() + yield_s
            for event in events:
                pending.append(await publisher.send(event, topic))
                if time.monotonic() >= next_yield:
                    # send() only suspends when a partition's batch is full; without this the
                    # loop would starve aiokafka's sender task while batches have room.
                    await asyncio.sleep(0)
                    next_yield = time.monotonic() + yield_s
                if len(pending) >= window:
                    # Bound what is in flight: wait for the older half's acknowledgements.
                    failed += await _await_acks([pending.popleft() for _ in range(window // 2)])
            failed += await _await_acks(list(pending))
            acked = time.monotonic()
            cpu = time.process_time() - cpu0
            if profiler:
                profiler.disable()
        finally:
            await publisher.stop()
        del events
        log.info(
            "throughput: %d acknowledged in %.2f s; waiting for the consumer", n, acked - started
        )
        result = await consumer.finish(args.phase_timeout + 30)
    finally:
        consumer.kill()
    if profiler:
        _print_profile(profiler, "producer (throughput)")
    if "error" in result:
        raise RuntimeError(f"throughput consumer: {result['error']}")
    last = result["last_consumed_at"]
    roundtrip_s = (last - started) if last is not None else None
    return {
        "events": n,
        "build_s": round(build_s, 3),
        "produce_s": round(acked - started, 3),
        "produce_events_per_s": round(n / (acked - started), 1),
        "send_failures": failed,
        "roundtrip_s": round(roundtrip_s, 3) if roundtrip_s else None,
        "roundtrip_events_per_s": (
            round(result["unique"] / roundtrip_s, 1) if roundtrip_s else 0.0
        ),
        "first_consume_after_ms": (
            round((result["first_consumed_at"] - started) * 1000, 1)
            if result["first_consumed_at"] is not None
            else None
        ),
        "producer_cpu_us_per_event": round(cpu / n * 1e6, 1),
        "consumer_cpu_us_per_event": round(result["cpu_s"] / max(1, result["unique"]) * 1e6, 1),
        **{
            k: result[k]
            for k in ("unique", "missing", "duplicates", "invalid", "foreign", "timed_out")
        },
    }


async def latency_phase(args: argparse.Namespace, topic: str) -> dict[str, Any]:
    factory = EventFactory(secrets.randbits(72))
    n, rate = args.latency_events, args.rate
    timeout_s = n / rate + args.phase_timeout
    consumer = ConsumerProcess(_consumer_cfg(args, "latency", topic, n, factory.id_high, timeout_s))
    try:
        overrides = {**args.producer_overrides, "linger_ms": args.latency_linger_ms}
        publisher = KafkaEventPublisher(args.settings, "bench-bus-latency", **overrides)
        await publisher.start()
        try:
            await publisher.producer.partitions_for(topic)
            await consumer.ready()
            log.info("latency: producing %d events at %d/s", n, rate)
            futures: list[asyncio.Future[Any]] = []
            max_behind_ms = 0.0
            started = time.monotonic()
            i = 0
            while i < n:
                now = time.monotonic()
                due = min(n, int((now - started) * rate) + 1)
                if due - 1 > i:
                    max_behind_ms = max(max_behind_ms, (now - started - i / rate) * 1000)
                while i < due:
                    # Built now, so occurred_at is the send time the consumer measures from.
                    futures.append(await publisher.send(factory.make(i), topic))
                    i += 1
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent_s = time.monotonic() - started
            failed = await _await_acks(futures)
        finally:
            await publisher.stop()
        result = await consumer.finish(timeout_s + 30)
    finally:
        consumer.kill()
    if "error" in result:
        raise RuntimeError(f"latency consumer: {result['error']}")
    return {
        "events": n,
        "rate_per_s": rate,
        "achieved_rate_per_s": round(n / sent_s, 1),
        "max_pacing_lag_ms": round(max_behind_ms, 1),
        "linger_ms": args.latency_linger_ms,
        "send_failures": failed,
        "latency_ms": _percentiles(result["latencies_ms"]),
        "consumer_cpu_us_per_event": round(result["cpu_s"] / max(1, result["unique"]) * 1e6, 1),
        **{
            k: result[k]
            for k in ("unique", "missing", "duplicates", "invalid", "foreign", "timed_out")
        },
    }


# --------------------------------------------------------------------------------------------
# Topics and the run


async def _with_admin(bootstrap: list[str], action: Callable[[AIOKafkaAdminClient], Any]) -> Any:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000)
    await asyncio.wait_for(admin.start(), 20)
    try:
        return await asyncio.wait_for(action(admin), 30)
    finally:
        await admin.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
    topics = {phase: f"bench-bus-{run_id}-{phase}" for phase in ("throughput", "latency")}
    config = topic_spec(InstanceStored.topic).config()  # the real topic's settings

    async def create(admin: AIOKafkaAdminClient) -> dict[str, Any]:
        await admin.create_topics(
            [NewTopic(t, args.partitions, 1, topic_configs=config) for t in topics.values()]
        )
        return await admin.describe_cluster()

    cluster = await _with_admin(args.bootstrap_list, create)
    log.info("created topics %s (%d partitions)", ", ".join(topics.values()), args.partitions)
    try:
        throughput = await throughput_phase(args, topics["throughput"])
        log.info("throughput: %s", {k: v for k, v in throughput.items()})
        latency = await latency_phase(args, topics["latency"]) if args.latency_events > 0 else None
    finally:
        try:
            await _with_admin(args.bootstrap_list, lambda a: a.delete_topics(list(topics.values())))
            log.info("deleted topics")
        except Exception as exc:
            log.error("could not delete topics %s: %s", list(topics.values()), exc)

    lat = latency["latency_ms"] if latency else {"p50": None, "p95": None, "p99": None, "max": None}
    producer_cfg = KafkaEventPublisher(args.settings, "bench-bus", **args.producer_overrides)
    effective = {  # what KafkaEventPublisher hands aiokafka (its defaults + our overrides)
        k: v if isinstance(v, str | int | float | bool | None) else type(v).__name__
        for k, v in getattr(producer_cfg, "_config", args.producer_overrides).items()
        if k not in ("bootstrap_servers", "client_id")
    }
    sample = Codec().encode(EventFactory(0).make(0))
    phases = [throughput] + ([latency] if latency else [])
    return {
        "benchmark": "bus",
        "events": throughput["events"],
        "roundtrip_events_per_s": throughput["roundtrip_events_per_s"],
        "produce_events_per_s": throughput["produce_events_per_s"],
        "latency_rate_per_s": args.rate,
        "latency_events": args.latency_events,
        "latency_ms": lat,
        "duplicates": sum(p["duplicates"] for p in phases),
        "missing": sum(p["missing"] for p in phases),
        "invalid": sum(p["invalid"] + p["foreign"] for p in phases),
        "targets": {
            f"roundtrip_events_per_s>={TARGET_ROUNDTRIP_PER_S}": (
                throughput["roundtrip_events_per_s"] >= TARGET_ROUNDTRIP_PER_S
            ),
            f"p99_ms<{TARGET_P99_MS:g}": lat["p99"] is not None and lat["p99"] < TARGET_P99_MS,
        },
        "phases": {"throughput": throughput, "latency": latency},
        "event": {
            "schema": InstanceStored.schema_name,
            "value_bytes": len(sample.value),
            "headers_bytes": sum(len(k) + len(v) for k, v in sample.headers),
        },
        "producer_config": effective,
        "partitions": args.partitions,
        "kafka": {
            "bootstrap": args.settings.bootstrap_servers,
            "cluster_id": cluster.get("cluster_id"),
            "brokers": len(cluster.get("brokers", [])),
        },
        "python": platform.python_version(),
        "aiokafka": aiokafka.__version__,
        "pydantic": pydantic.VERSION,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_bootstrap = os.environ.get("BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    p = argparse.ArgumentParser(prog="python -m benchmarks.bus", description=__doc__.split("\n")[0])
    p.add_argument("--bootstrap", default=default_bootstrap, help="Kafka bootstrap servers")
    p.add_argument("--events", type=int, default=100_000, help="events in the throughput phase")
    p.add_argument("--latency-events", type=int, default=20_000, help="events in the latency phase")
    p.add_argument("--rate", type=int, default=2_000, help="events/s in the latency phase")
    p.add_argument("--partitions", type=int, default=6, help="partitions of each benchmark topic")
    p.add_argument("--window", type=int, default=20_000, help="max unacknowledged sends")
    p.add_argument(
        "--yield-ms",
        type=float,
        default=1.0,
        help="throughput phase: let aiokafka's sender run at least this often while sending",
    )
    p.add_argument("--max-records", type=int, default=10_000, help="consumer getmany max_records")
    p.add_argument("--fetch-max-wait-ms", type=int, default=100, help="consumer fetch_max_wait_ms")
    p.add_argument(
        "--latency-linger-ms", type=int, default=1, help="producer linger_ms in the latency phase"
    )
    p.add_argument(
        "--producer",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a KafkaEventPublisher setting for both phases (e.g. compression_type=none,"
        " max_batch_size=262144, linger_ms=20); default: the project's settings",
    )
    p.add_argument(
        "--partitioner",
        choices=("project", "aiokafka"),
        default="project",
        help="'aiokafka': aiokafka's uncached murmur2 instead of the project's memoised one "
        "(same mapping), to measure the difference",
    )
    p.add_argument("--phase-timeout", type=float, default=60.0, help="seconds a phase may take")
    p.add_argument("--profile", action="store_true", help="cProfile producer and consumer")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    for name in ("events", "rate", "partitions", "window", "max_records"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    args.window = max(2, args.window)
    args.producer_overrides = dict(_parse_override(p, o) for o in args.producer)
    if args.partitioner == "aiokafka":
        args.producer_overrides["partitioner"] = DefaultPartitioner()
    args.settings = KafkaSettings(bootstrap_servers=args.bootstrap)
    args.bootstrap_list = args.settings.bootstrap_list
    return args


def _parse_override(p: argparse.ArgumentParser, text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        p.error(f"--producer expects KEY=VALUE, got {text!r}")
    value: Any
    if raw.lower() in ("none", "null"):
        value = None
    else:
        try:
            value = int(raw)
        except ValueError:
            value = raw
    return key, value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    log.setLevel(logging.INFO)  # this module's progress lines (stderr) are few; -v adds aiokafka's
    budget = args.phase_timeout * 2 + args.latency_events / args.rate + 120
    try:
        report = asyncio.run(asyncio.wait_for(run(args), budget))
    except Exception as exc:
        print(json.dumps({"benchmark": "bus", "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(report, indent=2))
    if (
        report["missing"]
        or report["invalid"]
        or any(p and (p["send_failures"] or p["timed_out"]) for p in report["phases"].values())
    ):
        return 1
    if args.check and not all(report["targets"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
