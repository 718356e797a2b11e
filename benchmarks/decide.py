"""Consent + routing benchmark: study-received through the decision and routing workers.

    python -m benchmarks.decide [--patients 100000] [--backlog 50000] [--studies 50000]
                                [--instances 10] [--paced-rate 1000] [--paced-seconds 10]
                                [--bootstrap HOST:PORT]

On fresh copies of every topic involved (production partition counts; deleted at the end):

1. the provider directory is seeded from ``deploy/local/demo-directory.yaml`` and a registry of
   ``--patients`` patients is published (one consent-registered each: 10 % an objection for the
   recipient, 30 % an explicit consent, the rest a consent for another data category);
2. **backlog**: ``--backlog`` study-received events are published before the workers start,
   as after an outage; one consent decision worker and one routing worker then start, each in
   its own process (one worker of each, as the issue asks), the consent worker folds the whole
   registry in (``registry_fold_seconds``) and both work the backlog off. Its
   ``decisions_per_second`` and ``routes_per_second`` are the workers' own rate: from the
   answer that ends the first tenth (the group joining, the first batch) to the last, with no
   load generator running beside them on this machine's two cores;
3. **flood**: ``--studies`` study-received events (``--instances`` instances each; 90 % of a
   registered patient, 10 % unverified) are published as fast as the broker takes them;
   ``decisions_per_second`` is study versions decided (two consent-checked each) per second
   from the first study published to the last decision, and ``routes_per_second`` the same for
   route-resolved/route-failed. Latencies here are queueing-dominated and reported as such;
4. **paced**: ``--paced-rate`` studies per second for ``--paced-seconds``; the latency from a
   study-received's publication (its record timestamp) to its delivery decision and to its route
   (their record timestamps) is the ``p50/p99`` a sender sees at that load.

Every study must get exactly two decisions and one route outcome; the exit status is 1 otherwise.
The load is encoded before any clock starts, and while the workers run the benchmark only asks
for the output topics' end offsets; it reads the records (their timestamps are the figures)
afterwards. ``*_worker_cpu_ms_per_study`` is each worker's CPU from ready to stop over every
study of the three phases. One JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import sys
import time
import uuid
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from shared import runtime, topics
from shared.codec import Codec
from shared.events import BsnStatus, PatientRef, StudyReceived
from shared.events.consent import ConsentRegistered, Provision
from shared.kafka import (
    KafkaEventPublisher,
    WireRecord,
    delete_topics_containing,
    provision_topics,
)
from shared.logging import configure_logging
from shared.runtime import tune_gc
from shared.settings import KafkaSettings
from shared.topics import TopicSpec
from tests.factories import make_pseudonym
from tests.factories import make_study as factory_study

ROOT = Path(__file__).resolve().parent.parent
DIRECTORY_YAML = ROOT / "deploy" / "local" / "demo-directory.yaml"
SENDER_URA, RECIPIENT_URA = "00000202", "00000101"
TIMEOUT = 120.0

# The topics of the benchmark: production name -> the tagged copy's spec.
NAMES = (
    "study-received",
    "consent-registered",
    "consent-revoked",
    "treatment-relationships",
    "consent-checked",
    "provider-directory",
    "route-resolved",
    "route-failed",
)


def log(message: str) -> None:
    print(f"[bench-decide] {message}", file=sys.stderr, flush=True)


def tagged(tag: str) -> dict[str, TopicSpec]:
    specs = {}
    for name in NAMES:
        spec = topics.topic(name)
        specs[name] = TopicSpec(
            f"bench-decide-{tag}-{name}", spec.partitions, topics.DAY_MS, compacted=spec.compacted
        )
    return specs


def declare(specs: dict[str, TopicSpec]) -> None:
    """Make the tagged copies known to shared.topics (the workers look their specs up there)."""
    for spec in specs.values():
        topics.BY_NAME[spec.name] = spec


# --- the workers, each in its own process ---------------------------------------------------------


def consent_worker(bootstrap: str, tag: str, patients: int, ready: Any, stop: Any) -> None:
    from services.consent.adapters.registry_view import RegistryTopics
    from services.consent.config import ConsentSettings
    from services.consent.entrypoints.decisions import build_decision_worker

    configure_logging("bench-consent", "WARNING", json=False, stream=sys.stderr)
    specs = tagged(tag)
    declare(specs)
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    name = {k: v.name for k, v in specs.items()}
    worker = build_decision_worker(
        ConsentSettings(kafka=kafka),
        group=f"bench-decide-{tag}-consent",
        study_topic=name["study-received"],
        registry_topics=RegistryTopics(
            name["consent-registered"], name["consent-revoked"], name["treatment-relationships"]
        ),
        sink_topic=name["consent-checked"],
        directory_topic=name["provider-directory"],
    )
    registry = worker.views[0]

    async def run() -> None:
        tune_gc()  # as run_worker does in the production process
        started = time.monotonic()
        async with worker:
            await registry.wait_caught_up(TIMEOUT * 10)  # type: ignore[attr-defined]
            ready.put(
                {
                    "registry_fold_seconds": round(time.monotonic() - started, 2),
                    "registry_patients": registry.patients,  # type: ignore[attr-defined]
                    "consent_worker_cpu_seconds_at_ready": _cpu_seconds(),
                }
            )
            await _run_until(worker, stop)
        ready.put({"consent_worker_cpu_seconds": _cpu_seconds()})

    _profiled("consent", lambda: runtime.run(run()))


def routing_worker(bootstrap: str, tag: str, ready: Any, stop: Any) -> None:
    from services.routing.config import RoutingSettings
    from services.routing.entrypoints.worker import build_routing_worker

    configure_logging("bench-routing", "WARNING", json=False, stream=sys.stderr)
    specs = tagged(tag)
    declare(specs)
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    name = {k: v.name for k, v in specs.items()}
    worker = build_routing_worker(
        RoutingSettings(kafka=kafka),
        group=f"bench-decide-{tag}-routing",
        source_topic=name["consent-checked"],
        resolved_topic=name["route-resolved"],
        failed_topic=name["route-failed"],
        directory_topic=name["provider-directory"],
    )

    async def run() -> None:
        tune_gc()  # as run_worker does in the production process
        async with worker:
            ready.put(
                {"routing_worker": "started", "routing_worker_cpu_seconds_at_ready": _cpu_seconds()}
            )
            await _run_until(worker, stop)
        ready.put({"routing_worker_cpu_seconds": _cpu_seconds()})

    _profiled("routing", lambda: runtime.run(run()))


def _profiled(name: str, run: Any) -> None:
    """Run a worker process's loop, under cProfile when ``BENCH_PROFILE`` names a directory
    (``<dir>/<name>.prof``, for ``python -m pstats``): where a worker's CPU goes."""
    directory = os.environ.get("BENCH_PROFILE")
    if not directory:
        run()
        return
    import cProfile

    profile = cProfile.Profile()
    try:
        profile.runcall(run)
    finally:
        profile.dump_stats(os.path.join(directory, f"{name}.prof"))


async def _run_until(worker: Any, stop: Any) -> None:
    """Run the worker's loop until the parent sets ``stop``."""
    task = asyncio.create_task(worker.run())
    while not stop.is_set() and not task.done():
        await asyncio.sleep(0.2)
    worker.request_stop()
    await task


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 2)


# --- the load ---------------------------------------------------------------------------------


def make_patients(count: int) -> list[str]:
    # Random pseudonyms in the real format: the workers never see a BSN, only these.
    return [make_pseudonym() for _ in range(count)]


def registry_events(patients: list[str]) -> list[ConsentRegistered]:
    rng = random.Random(7)
    events = []
    for i, patient in enumerate(patients):
        roll = rng.random()
        if roll < 0.1:
            terms: dict[str, Any] = {
                "provision": Provision.DENY,
                "organisation_ura": RECIPIENT_URA,
                "data_category": "GGC002",
            }
        elif roll < 0.4:
            terms = {"provision": Provision.PERMIT, "data_category": "GGC002"}
        else:
            terms = {"provision": Provision.PERMIT, "data_category": "GGC011"}
        events.append(
            ConsentRegistered(
                correlation_id=str(uuid.uuid4()),
                producer="bench",
                consent_id=f"bench-{i}",
                patient=patient,
                **terms,
            )
        )
    return events


def make_study(patients: list[str], rng: random.Random, instances: int) -> StudyReceived:
    if rng.random() < 0.1:
        patient = PatientRef(pseudonym=None, bsn_status=BsnStatus.INVALID)
    else:
        patient = PatientRef(pseudonym=rng.choice(patients), bsn_status=BsnStatus.VERIFIED)
    study = factory_study(
        instances, sender_ura=SENDER_URA, recipient_ura=RECIPIENT_URA, patient=patient
    )
    return StudyReceived(correlation_id=str(uuid.uuid4()), producer="bench", study=study)


async def seed_directory(kafka: KafkaSettings, topic: str) -> int:
    from services.routing.domain.directory import Directory

    directory = Directory.load_yaml(DIRECTORY_YAML)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_list, acks="all")
    await producer.start()
    try:
        for provider in directory:
            await producer.send_and_wait(
                topic, key=provider.ura.encode(), value=provider.to_record().encode()
            )
    finally:
        await producer.stop()
    return len(directory)


class Outcomes:
    """Watches the output topics while the workers run, reads them once they are done.

    While the workers run it only asks the broker for the topics' end offsets (a few requests
    a second): reading and parsing every output as it came cost the benchmark's own process
    15-20 % of a core, taken from the workers on this 2-core machine. What a study's records
    say (when it was published, decided, routed: their record timestamps, set when the
    producer appended them) is read afterwards and is the same whenever it is read.
    """

    def __init__(self, kafka: KafkaSettings, specs: dict[str, TopicSpec]) -> None:
        self.kafka = kafka
        self.specs = specs
        self.studies = specs["study-received"].name
        self.checked = specs["consent-checked"].name
        self.routes = (specs["route-resolved"].name, specs["route-failed"].name)
        self.sent_at: dict[str, float] = {}  # correlation id -> record timestamp (s)
        self.decision_at: dict[str, float] = {}
        self.route_at: dict[str, float] = {}
        self.checked_events = 0
        self.route_events = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: dict[str, list[TopicPartition]] = {}

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap_list,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_bytes=64 * 1024 * 1024,
        )
        await self._consumer.start()
        for spec in self.specs.values():
            if spec.name in (self.studies, self.checked, *self.routes):
                self._partitions[spec.name] = [
                    TopicPartition(spec.name, p) for p in range(spec.partitions)
                ]
        self._consumer.assign([tp for tps in self._partitions.values() for tp in tps])

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def _ends(self) -> dict[TopicPartition, int]:
        assert self._consumer is not None
        every = [tp for tps in self._partitions.values() for tp in tps]
        return await self._consumer.end_offsets(every)

    async def wait(self, decided: int, routed: int, timeout: float, every: float = 0.05) -> None:
        """Until the output topics hold two decisions per ``decided`` study and ``routed``
        route outcomes (records, not yet read: the count is checked when they are)."""
        routes = set(self.routes)
        async with asyncio.timeout(timeout):
            while True:
                ends = await self._ends()
                checked = sum(o for tp, o in ends.items() if tp.topic == self.checked)
                outcomes = sum(o for tp, o in ends.items() if tp.topic in routes)
                if checked >= 2 * decided and outcomes >= routed:
                    return
                await asyncio.sleep(every)

    async def read_all(self) -> None:
        """Read every record on the watched topics up to their current ends."""
        assert self._consumer is not None
        ends = await self._ends()
        for tp in ends:
            self._consumer.seek(tp, 0)
        remaining = {tp for tp, end in ends.items() if end > 0}
        self.sent_at.clear()
        self.decision_at.clear()
        self.route_at.clear()
        self.checked_events = self.route_events = 0
        while remaining:
            batches = await self._consumer.getmany(timeout_ms=500, max_records=20_000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    correlation = dict(record.headers)["correlation-id"].decode()
                    stamp = record.timestamp / 1000
                    if tp.topic == self.studies:
                        self.sent_at.setdefault(correlation, stamp)
                    elif tp.topic == self.checked:
                        self.checked_events += 1
                        # The delivery decision comes first; the time of the first one counts.
                        self.decision_at.setdefault(correlation, stamp)
                    else:
                        self.route_events += 1
                        self.route_at.setdefault(correlation, stamp)
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)


def encode_studies(studies: list[StudyReceived], topic: str) -> list[WireRecord]:
    """The studies as records, encoded before the clock starts: the load generator's work is
    not the workers' (it shares this machine's two cores with them)."""
    codec = Codec()
    records = []
    for study in studies:
        record = codec.encode(study)
        records.append(WireRecord(topic, record.key, record.value, record.headers))
    return records


async def publish_studies(
    kafka: KafkaSettings, records: list[WireRecord], rate: float | None
) -> None:
    """Publish pre-encoded studies: all at once (``rate`` None) or ``rate`` per second."""
    async with KafkaEventPublisher(kafka, "bench-decide") as publisher:
        producer = await publisher.ready()
        if rate is None:
            pending = []
            for start in range(0, len(records), 1000):
                pending += await publisher.send_many(producer, records[start : start + 1000])
            await asyncio.gather(*pending)
            return
        started = time.monotonic()
        futures = []
        for i, record in enumerate(records):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            futures.append(
                await producer.send(
                    record.topic, value=record.value, key=record.key, headers=list(record.headers)
                )
            )
        await asyncio.gather(*futures)


def steady_rate(answered: dict[str, float], which: Collection[str], warmup: float = 0.1) -> float:
    """Answers per second over a backlog, from the answer that ends the first ``warmup`` share
    (the consumer group joining, the first batch) to the last one."""
    times = sorted(answered[c] for c in which if c in answered)
    skip = int(len(times) * warmup)
    if len(times) - skip < 2 or times[-1] <= times[skip]:
        return float("nan")
    return round((len(times) - 1 - skip) / (times[-1] - times[skip]), 1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latencies(
    sent: dict[str, float], answered: dict[str, float], which: Collection[str]
) -> dict[str, float]:
    """p50/p99/max from publication to answer (ms) of the studies named in ``which``."""
    values = [(answered[c] - sent[c]) * 1000 for c in which if c in answered and c in sent]
    return {
        "p50_ms": round(percentile(values, 0.50), 1),
        "p99_ms": round(percentile(values, 0.99), 1),
        "max_ms": round(max(values, default=float("nan")), 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    kafka = KafkaSettings(bootstrap_servers=args.bootstrap)
    tag = uuid.uuid4().hex[:10]
    specs = tagged(tag)
    declare(specs)
    await provision_topics(kafka.bootstrap_list, specs.values())
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    workers = []
    outcomes = Outcomes(kafka, specs)
    result: dict[str, Any] = {}
    try:
        providers = await seed_directory(kafka, specs["provider-directory"].name)
        log(f"directory: {providers} providers; publishing a registry of {args.patients} patients")
        patients = make_patients(args.patients)
        async with KafkaEventPublisher(kafka, "bench-decide") as publisher:
            events = registry_events(patients)
            for start in range(0, len(events), 5000):
                await publisher.publish_many(
                    events[start : start + 5000], topic=specs["consent-registered"].name
                )
        rng = random.Random(11)
        routes = 0 if args.consent_only else 1
        backlog = [make_study(patients, rng, args.instances) for _ in range(args.backlog)]
        if backlog:
            log(f"backlog: {len(backlog)} studies waiting before the workers start")
            await publish_studies(
                kafka, encode_studies(backlog, specs["study-received"].name), None
            )
        log("starting one consent worker and one routing worker")
        workers = [
            ctx.Process(
                target=consent_worker,
                args=(args.bootstrap, tag, args.patients, ready, stop),
            ),
        ]
        if not args.consent_only:
            workers.append(
                ctx.Process(target=routing_worker, args=(args.bootstrap, tag, ready, stop))
            )
        for worker in workers:
            worker.start()
        for _ in workers:
            result.update(await asyncio.to_thread(ready.get, True, args.timeout))
        log(f"workers ready ({result})")
        await outcomes.start()
        if backlog:
            await outcomes.wait(len(backlog), routes * len(backlog), args.timeout)

        studies = [make_study(patients, rng, args.instances) for _ in range(args.studies)]
        flood_records = encode_studies(studies, specs["study-received"].name)
        log(f"flood: {len(studies)} studies")
        flood_started = time.time()
        await publish_studies(kafka, flood_records, None)
        published = time.time()
        decided = len(backlog) + len(studies)
        await outcomes.wait(decided, routes * decided, args.timeout)
        flood_seen = time.time()

        paced_count = int(args.paced_rate * args.paced_seconds)
        paced_studies = [make_study(patients, rng, args.instances) for _ in range(paced_count)]
        paced_records = encode_studies(paced_studies, specs["study-received"].name)
        log(f"paced: {paced_count} studies at {args.paced_rate}/s")
        await publish_studies(kafka, paced_records, args.paced_rate)
        total = len(backlog) + len(studies) + paced_count
        await outcomes.wait(total, routes * total, args.timeout)
        # Anything decided or routed twice would be on the topics by now.
        await asyncio.sleep(2)
        await outcomes.read_all()

        if backlog:
            backlog_ids = [s.correlation_id for s in backlog]
            result["backlog"] = {
                "studies": len(backlog),
                "decisions_per_second": steady_rate(outcomes.decision_at, backlog_ids),
                "consent_checked_per_second": 2 * steady_rate(outcomes.decision_at, backlog_ids),
            }
            if routes:
                result["backlog"]["routes_per_second"] = steady_rate(outcomes.route_at, backlog_ids)
            log(f"backlog: {result['backlog']}")
        flood_ids = [s.correlation_id for s in studies]
        paced_ids = [s.correlation_id for s in paced_studies]
        last_decision = max(outcomes.decision_at[c] for c in flood_ids)
        flood: dict[str, Any] = {
            "studies": len(studies),
            "publish_seconds": round(published - flood_started, 2),
            "decisions_per_second": round(len(studies) / (last_decision - flood_started), 1),
            # Each study version is decided for two purposes, each its own consent-checked.
            "consent_checked_per_second": round(
                2 * len(studies) / (last_decision - flood_started), 1
            ),
            "decision_latency_queueing": latencies(
                outcomes.sent_at, outcomes.decision_at, flood_ids
            ),
            "observed_done_after_seconds": round(flood_seen - flood_started, 2),
        }
        if routes:
            last_route = max(outcomes.route_at[c] for c in flood_ids)
            flood["routes_per_second"] = round(len(studies) / (last_route - flood_started), 1)
        log(f"flood: {flood}")
        paced = {
            "rate_per_second": args.paced_rate,
            "studies": paced_count,
            "decision_latency": latencies(outcomes.sent_at, outcomes.decision_at, paced_ids),
            "route_latency": latencies(outcomes.sent_at, outcomes.route_at, paced_ids),
        }
        log(f"paced: {paced}")
        result.update(
            {
                "patients": args.patients,
                "instances_per_study": args.instances,
                "flood": flood,
                "paced": paced,
                "consent_checked_events": outcomes.checked_events,
                "route_events": outcomes.route_events,
                "complete": outcomes.checked_events == 2 * total
                and outcomes.route_events == routes * total
                and len(outcomes.decision_at) == total,
            }
        )
    finally:
        stop.set()
        for _ in [w for w in workers if w.is_alive()]:
            try:
                result.update(await asyncio.to_thread(ready.get, True, 60))
            except Exception:  # a worker that died says nothing more
                break
        for worker in workers:
            worker.join(60)
            if worker.is_alive():
                worker.kill()
        await outcomes.stop()
        await delete_topics_containing(kafka.bootstrap_list, tag)
    total = sum(result.get(phase, {}).get("studies", 0) for phase in ("backlog", "flood", "paced"))
    for name in ("consent", "routing"):
        # CPU while deciding: the registry fold and start-up before "ready" left out.
        used = result.get(f"{name}_worker_cpu_seconds")
        before = result.pop(f"{name}_worker_cpu_seconds_at_ready", None)
        if used is not None and before is not None and total:
            result[f"{name}_worker_cpu_ms_per_study"] = round((used - before) * 1000 / total, 3)
    result["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["load_avg_1m"] = os.getloadavg()[0]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_bootstrap = os.environ.get("BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.decide", description=__doc__.split("\n")[0]
    )
    p.add_argument("--bootstrap", default=default_bootstrap, help="Kafka bootstrap servers")
    p.add_argument("--patients", type=int, default=100_000, help="patients in the registry")
    p.add_argument(
        "--backlog", type=int, default=50_000, help="studies waiting before the workers start"
    )
    p.add_argument("--studies", type=int, default=50_000, help="studies in the flood")
    p.add_argument("--instances", type=int, default=10, help="instances per study")
    p.add_argument("--paced-rate", type=float, default=1000.0, help="studies/s, paced phase")
    p.add_argument("--paced-seconds", type=float, default=10.0, help="length of the paced phase")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this long")
    p.add_argument("--consent-only", action="store_true", help="no routing worker")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("bench-decide", "WARNING", json=False, stream=sys.stderr)
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    return 0 if result.get("complete") else 1


if __name__ == "__main__":
    sys.exit(main())
