"""Timeline benchmark: search latency on 1,000,000 entries, and the projection's replay rate.

    python -m benchmarks.timeline [--patients 100000] [--entries 1000000] [--clients 8]
                                  [--seconds 20] [--replay-studies 25000] [--instances 10]
                                  [--bootstrap HOST:PORT] [--dsn DSN] [--keep]

1. **search**: a database of its own (``bench_timeline_<run>``, dropped at the end unless
   ``--keep``) with the project's migrations is filled with COPY: ``--entries`` visible timeline
   entries (studies, and one report entry for every fifth study) of ``--patients`` patients,
   10 % of the studies from a second institution, plus 5 % more studies denied by consent
   (rows that must be skipped); the study and entry rows are derived with the store's own SQL
   (``DERIVE_STUDIES``, ``DERIVE_ENTRIES``). Then ``--clients`` concurrent clients (one
   connection each) search random patients through ``PostgresTimeline.search`` for
   ``--seconds``, closed loop, with a query mix (60 % the first page, 10 % each a date range,
   a modality, an institution, reports only); p50/p90/p99/max in ms, per kind and overall.
2. **replay**: ``--replay-studies`` studies (``--instances`` instances each) as the pipeline
   announces them (study-received, consent-checked for delivery and for the timeline, delivered;
   4 events a study) plus revocations for 2 % of their patients, on tagged copies of the four
   topics (production partition counts; deleted at the end). Then
   ``services.timeline.entrypoints.rebuild.rebuild`` replays them into the read model (which
   holds the search's entries, when it ran): ``events_per_second`` over the rebuild until the
   projection caught up (offsets noted, events read, decoded and loaded, the new tables built
   and swapped in, the group moved), with ``load_seconds``, ``build_seconds`` and
   ``swap_seconds`` its parts; ``cleanup_seconds`` then dropping the replaced tables, which
   nothing waits for.

Targets (reported in ``targets``, not enforced): search p99 < 20 ms; replay >= 20,000 events/s.
One JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import resource
import sys
import time
import uuid
from collections import defaultdict
from contextlib import ExitStack
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from services.timeline.adapters.store import DERIVE_ENTRIES, DERIVE_STUDIES, PostgresTimeline
from services.timeline.config import TimelineSettings
from services.timeline.domain.ports import EntryKind, TimelineQuery
from services.timeline.entrypoints.projection import TOPICS
from services.timeline.entrypoints.rebuild import rebuild
from shared import migrations, runtime, topics
from shared.codec import Codec
from shared.events import (
    Basis,
    BsnStatus,
    ConsentChecked,
    ConsentRevoked,
    Decision,
    Delivered,
    DeliveryChannel,
    InstanceOutcomes,
    PatientRef,
    Purpose,
    StudyReceived,
)
from shared.identifiers import PSEUDONYM_PREFIX
from shared.kafka import (
    KafkaEventPublisher,
    WireRecord,
    delete_topics_containing,
    provision_topics,
)
from shared.logging import configure_logging
from shared.settings import KafkaSettings, PostgresSettings
from shared.topics import TopicSpec
from tests.factories import make_study

MODALITIES = ("CT", "MR", "US", "CR", "DX", "XA", "MG", "NM", "PT")
HOSPITALS = [(f"{10_000_000 + i:08d}", f"Ziekenhuis {i}") for i in range(80)]
RECIPIENT = "00000101"
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def log(message: str) -> None:
    print(f"[bench-timeline] {message}", file=sys.stderr, flush=True)


def pseudonym(rng: random.Random) -> str:
    return PSEUDONYM_PREFIX + base64.b32encode(rng.randbytes(32)).decode().rstrip("=").lower()


def settle() -> None:
    """Let the kernel write back what the set-up wrote (the fill's gigabytes, the published
    events) before a measured phase: a live system's tables and topics were written long
    before anybody searches or rebuilds them, and write-back meanwhile takes CPU from it."""
    started = time.monotonic()
    os.sync()
    log(f"written back in {time.monotonic() - started:.1f} s")


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {
        "count": len(ordered),
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1], 2),
    }


# --- 1. search ------------------------------------------------------------------------------------


COPIES = {
    "sources": "COPY timeline_sources (study_instance_uid, sender_ura, version, last_received_at, "
    "recipient_ura, first_received_at, patient_pseudonym, accession_number, study_date, "
    "study_time, study_description, institution_name, modalities, number_of_series, "
    "number_of_instances, number_of_images, decision_version, decision_last_received_at, "
    "decision_recipient_ura, permitted, basis, decided_by, decision_patient, withdrawn) "
    "FROM STDIN",
    "series": "COPY timeline_series FROM STDIN",
    "instances": "COPY timeline_instances FROM STDIN",
    "reports": "COPY timeline_reports FROM STDIN",
    "deliveries": "COPY timeline_deliveries FROM STDIN",
}


def fill(dsn: str, patients: list[str], entries: int, rng: random.Random) -> dict[str, int]:
    """COPY the projection's tables (one connection per table, streaming): ``entries`` visible
    entries, and denied studies besides; then derive the study rows with the store's SQL
    (``DERIVE_STUDIES``, ``DERIVE_ENTRIES``, as a rebuild does)."""
    studies = entries * 5 // 6  # one report entry per fifth study: studies + studies / 5
    denied = studies // 20
    counts: dict[str, int] = defaultdict(int)
    uids: list[str] = []
    with ExitStack() as stack:
        copies = {}
        for table, statement in COPIES.items():
            conn = stack.enter_context(psycopg.connect(dsn))
            copies[table] = stack.enter_context(conn.cursor().copy(statement))

        def put(table: str, row: tuple[Any, ...]) -> None:
            copies[table].write_row(row)
            counts[table] += 1

        for n in range(studies + denied):
            permitted = n < studies
            uid = f"2.25.{rng.getrandbits(100)}"
            uids.append(uid)
            patient = rng.choice(patients)
            modality = rng.choice(MODALITIES)
            when = T0 - timedelta(days=rng.randrange(20 * 365), seconds=rng.randrange(86_400))
            senders = dict([rng.choice(HOSPITALS)])
            if rng.random() < 0.10:
                senders.update([rng.choice(HOSPITALS)])
            reported = permitted and n % 5 == 0
            for k, (ura, name) in enumerate(senders.items()):
                received = when + timedelta(days=k, hours=1)
                series = f"{uid}.1"
                put("sources", (
                    uid, ura, 1, received, RECIPIENT, received - timedelta(minutes=2),
                    patient, f"A{n % 10_000_000:07d}", when.date(), when.strftime("%H%M%S"),
                    f"{modality} onderzoek", name, [modality],
                    2 if reported else 1, 3 if reported else 2, 2,
                    1, received, RECIPIENT, permitted,
                    "explicit-consent" if permitted else "no-explicit-consent",
                    "consent-1" if permitted else "rule:no-explicit-consent", patient, False,
                ))  # fmt: skip
                put("series", (uid, ura, series, modality, 1, "serie", 2))
                for i in (1, 2):
                    sop = f"{series}.{i}"
                    put("instances", (
                        uid, ura, sop, series, "1.2.840.10008.5.1.4.1.1.2",
                        "1.2.840.10008.1.2.1", f"{ura}/{sop}.dcm", 524_288,
                        "0" * 64,
                    ))  # fmt: skip
                if reported:
                    sop, report_series = f"{uid}.2.1", f"{uid}.2"
                    put("reports", (uid, ura, sop, report_series, "sr"))
                    put("instances", (
                        uid, ura, sop, report_series, "1.2.840.10008.5.1.4.1.1.88.11",
                        "1.2.840.10008.1.2.1", f"{ura}/{sop}.dcm", 4096, "0" * 64,
                    ))  # fmt: skip
            if permitted and rng.random() < 0.5:
                put("deliveries", (uid, RECIPIENT, "pacs", 1, when + timedelta(hours=2)))
            counts["entries"] += (1 + reported) if permitted else 0
    # (each connection committed as the stack closed it, after its COPY)
    log(f"copied {counts['sources']} sources; deriving {len(uids)} study rows")
    with psycopg.connect(dsn) as conn:
        # As a rebuild derives them: every study at once (the tables are empty).
        conn.execute("SET work_mem = '64MB'")
        conn.execute(DERIVE_STUDIES)
        conn.execute(DERIVE_ENTRIES)
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
        counts["studies"] = conn.execute("SELECT count(*) FROM timeline_studies").fetchone()[0]
        counts["visible_studies"] = conn.execute(
            "SELECT count(*) FROM timeline_studies WHERE visible"
        ).fetchone()[0]
        counts["entry_rows"] = conn.execute(
            "SELECT count(*) FROM timeline_entries WHERE searchable"
        ).fetchone()[0]
    counts["denied_studies"] = denied
    return dict(counts)


def query_for(rng: random.Random, patient: str) -> tuple[str, TimelineQuery]:
    roll = rng.random()
    if roll < 0.6:
        return "first_page", TimelineQuery(patient)
    if roll < 0.7:
        start = date(2005 + rng.randrange(18), 1, 1)
        return "date_range", TimelineQuery(
            patient, date_from=start, date_to=date(start.year + 3, 12, 31)
        )
    if roll < 0.8:
        return "modality", TimelineQuery(patient, modalities=frozenset(rng.sample(MODALITIES, 2)))
    if roll < 0.9:
        return "institution", TimelineQuery(patient, institution=rng.choice(HOSPITALS)[1].lower())
    return "reports", TimelineQuery(patient, kind=EntryKind.REPORT)


async def search_load(
    dsn: str, patients: list[str], clients: int, seconds: float
) -> dict[str, Any]:
    timings: dict[str, list[float]] = defaultdict(list)
    returned = 0
    async with PostgresTimeline(dsn, pool_size=clients) as reader:
        # Warm-up: connections open, statements prepared, caches warm.
        rng = random.Random(1)
        for _ in range(200):
            await reader.search(query_for(rng, rng.choice(patients))[1])

        deadline = time.monotonic() + seconds

        async def client(seed: int) -> None:
            nonlocal returned
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                kind, query = query_for(rng, rng.choice(patients))
                started = time.perf_counter()
                page = await reader.search(query)
                timings[kind].append((time.perf_counter() - started) * 1000)
                returned += len(page.entries)

        started = time.monotonic()
        await asyncio.gather(*(client(100 + i) for i in range(clients)))
        elapsed = time.monotonic() - started
    every = [t for values in timings.values() for t in values]
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "queries_per_second": round(len(every) / elapsed, 1),
        "entries_returned_per_query": round(returned / max(len(every), 1), 2),
        "latency": percentiles(every),
        "by_query": {kind: percentiles(values) for kind, values in sorted(timings.items())},
    }


# --- 2. replay ------------------------------------------------------------------------------------


def pipeline_events(studies: int, instances: int, rng: random.Random) -> list[Any]:
    patients = [pseudonym(rng) for _ in range(max(studies // 4, 1))]
    events: list[Any] = []
    for _ in range(studies):
        patient = rng.choice(patients)
        study = make_study(
            instances,
            patient=PatientRef(pseudonym=patient, bsn_status=BsnStatus.VERIFIED),
            sender_ura=rng.choice(HOSPITALS)[0],
            recipient_ura=RECIPIENT,
            modality=rng.choice(MODALITIES),
        )
        common = {"correlation_id": str(uuid.uuid4()), "producer": "bench"}
        received = StudyReceived(study=study, **common)
        permit = rng.random() < 0.7
        events += [
            received,
            ConsentChecked(
                study=study, purpose=Purpose.DELIVERY, decision=Decision.PERMIT,
                basis=Basis.PRESUMED_REFERRAL, decided_by="rule:presumed-referral",
                registry_version=1, occurred_at=received.occurred_at, **common,
            ),
            ConsentChecked(
                study=study, purpose=Purpose.TIMELINE,
                decision=Decision.PERMIT if permit else Decision.DENY,
                basis=Basis.EXPLICIT_CONSENT if permit else Basis.NO_EXPLICIT_CONSENT,
                decided_by=f"consent-{patient[-8:]}" if permit else "rule:no-explicit-consent",
                registry_version=1, occurred_at=received.occurred_at, **common,
            ),
            Delivered(
                study_instance_uid=study.study_instance_uid, study_version=1,
                destination_ura=RECIPIENT, endpoint_id="pacs", channel=DeliveryChannel.DICOMWEB,
                outcomes=InstanceOutcomes(sent=instances, already_present=0), attempts=1,
                seconds_since_first_received=3.0, delivered_at=study.last_received_at, **common,
            ),
        ]  # fmt: skip
    for patient in rng.sample(patients, len(patients) // 50):
        events.append(
            ConsentRevoked(
                consent_id=f"consent-{patient[-8:]}",
                patient=patient,
                correlation_id=str(uuid.uuid4()),
                producer="bench",
            )
        )
    return events


def wire_records(events: list[Any], names: dict[str, str]) -> list[WireRecord]:
    """The events' records as the pipeline writes them: a decision carries its study-received's
    snapshot text as received (consent forwards it, ``shared.stream.carrying``)."""
    codec = Codec()
    records, snapshot = [], None
    for event in events:
        if isinstance(event, StudyReceived):
            record = codec.encode(event)
            snapshot = codec.member(record, StudyReceived, "study")
        elif isinstance(event, ConsentChecked) and snapshot is not None:
            record = codec.encode(event, carried={"study": snapshot})
        else:
            record = codec.encode(event)
        records.append(WireRecord(names[record.topic], record.key, record.value, record.headers))
    return records


def _checkpoint_writes(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT checkpoints_timed + checkpoints_req, buffers_checkpoint, buffers_backend "
            "FROM pg_stat_bgwriter"
        ).fetchone()
    assert row is not None
    return dict(zip(("checkpoints", "buffers_checkpoint", "buffers_backend"), row, strict=True))


def _cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children."""
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


async def replay(
    kafka: KafkaSettings, dsn: str, tag: str, studies: int, instances: int, rebuilds: int = 1
) -> dict[str, Any]:
    names = {t: f"bench-timeline-{tag}-{t}" for t in TOPICS}
    specs = [TopicSpec(names[t], topics.topic(t).partitions, topics.DAY_MS) for t in TOPICS]
    for spec in specs:
        topics.BY_NAME[spec.name] = spec
    await provision_topics(kafka.bootstrap_list, specs)
    events = pipeline_events(studies, instances, random.Random(5))
    records = wire_records(events, names)
    log(f"replay: publishing {len(events)} events ({studies} studies of {instances} instances)")
    started = time.monotonic()
    async with KafkaEventPublisher(kafka, "bench-timeline") as publisher:
        producer = await publisher.ready()
        for start in range(0, len(records), 5000):
            chunk = records[start : start + 5000]
            await asyncio.gather(*await publisher.send_many(producer, chunk))
    log(f"published in {time.monotonic() - started:.1f} s")
    settle()
    settings = TimelineSettings(kafka=kafka, postgres=PostgresSettings(dsn=dsn))
    runs = []
    for attempt in range(1, rebuilds + 1):
        log(f"rebuilding from the topics ({attempt} of {rebuilds})")
        # The rebuild's loading processes are its children, reaped before it returns.
        cpu_before, writes_before = _cpu_seconds(), _checkpoint_writes(dsn)
        report = await rebuild(settings, group=f"bench-timeline-{tag}", rename=names, progress=log)
        cpu = _cpu_seconds() - cpu_before
        writes = {k: v - writes_before[k] for k, v in _checkpoint_writes(dsn).items()}
        runs.append(
            {
                **report.as_dict(),
                "python_cpu_seconds_per_1000_events": round(1000 * cpu / max(report.events, 1), 3),
                # The server's own writes meanwhile: checkpoints, buffers its backends wrote.
                "postgres_during_replay": writes,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
    with psycopg.connect(dsn) as conn:
        visible = conn.execute("SELECT count(*) FROM timeline_studies WHERE visible").fetchone()
        instances_rows = conn.execute("SELECT count(*) FROM timeline_instances").fetchone()
    # Several rebuilds of the same topics (each a whole rebuild, replacing the last one's
    # tables): the median by rate is reported, every run beside it.
    median = sorted(runs, key=lambda r: r["events_per_second"])[(len(runs) - 1) // 2]
    return {
        "studies": studies,
        "instances_per_study": instances,
        **median,
        "visible_studies": visible[0] if visible else 0,
        "instance_rows": instances_rows[0] if instances_rows else 0,
        **({"runs": runs} if len(runs) > 1 else {}),
    }


# --- the run --------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    name = f"bench_timeline_{tag}"
    base, _, _ = args.dsn.rpartition("/")
    dsn = f"{base}/{name}"
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    kafka = KafkaSettings(bootstrap_servers=args.bootstrap)
    result: dict[str, Any] = {"database": name}
    try:
        migrations.migrate(dsn)
        rng = random.Random(7)
        patients = [pseudonym(rng) for _ in range(args.patients)]
        if args.entries:
            log(f"search: copying {args.entries} entries of {args.patients} patients")
            started = time.monotonic()
            counts = fill(dsn, patients, args.entries, rng)
            result["dataset"] = {**counts, "fill_seconds": round(time.monotonic() - started, 1)}
            settle()
            log(f"dataset: {result['dataset']}")
            result["search"] = await search_load(dsn, patients, args.clients, args.seconds)
            log(f"search: {result['search']['latency']}")
        if args.replay_studies:
            result["replay"] = await replay(
                kafka, dsn, tag, args.replay_studies, args.instances, args.rebuilds
            )
            log(f"replay: {result['replay']}")
    finally:
        await delete_topics_containing(kafka.bootstrap_list, f"bench-timeline-{tag}")
        if not args.keep:
            with psycopg.connect(args.dsn, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    p99 = result.get("search", {}).get("latency", {}).get("p99_ms")
    rate = result.get("replay", {}).get("events_per_second")
    result["targets"] = {
        "search_p99_ms": {"target": 20, "measured": p99, "met": p99 is not None and p99 < 20},
        "replay_events_per_second": {
            "target": 20_000,
            "measured": rate,
            "met": rate is not None and rate >= 20_000,
        },
    }
    result["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["load_avg_1m"] = os.getloadavg()[0]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.timeline", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument(
        "--bootstrap",
        default=env.get("BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"),
        help="Kafka bootstrap servers",
    )
    p.add_argument(
        "--dsn",
        default=env.get("BEELDPORTAAL_POSTGRES_DSN", PostgresSettings().conninfo),
        help="PostgreSQL DSN of a database to create the benchmark's own database from",
    )
    p.add_argument("--patients", type=int, default=100_000)
    p.add_argument("--entries", type=int, default=1_000_000, help="visible entries (0: skip)")
    p.add_argument("--clients", type=int, default=8, help="concurrent search clients")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the search load")
    p.add_argument("--replay-studies", type=int, default=25_000, help="0: skip the replay")
    p.add_argument("--instances", type=int, default=10, help="instances per replayed study")
    p.add_argument(
        "--rebuilds",
        type=int,
        default=1,
        help="rebuilds of the replayed topics, one after another (the median is reported)",
    )
    p.add_argument("--keep", action="store_true", help="keep the benchmark database")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("bench-timeline", "WARNING", json=False, stream=sys.stderr)
    result = runtime.run(run(args))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
