"""Delivery benchmark: STOW-RS into ingest until every instance is present in the receiver's PACS.

    python -m benchmarks.deliver [--studies 200] [--paced-rate 2] [--flood-studies 200]
                                 [--instances 20] [--routine-backlog 500] [--concurrency 8]
                                 [--quick]

End to end through the whole pipeline, against the running local platform: ingest serve (STOW-RS)
→ ingest assemble → consent decide → routing route → notify deliver → a fresh Orthanc (Debian
package, DICOMweb plugin) as the receiving hospital. The five services run as processes of their
own, with the command lines of ``deploy/local/services.py`` (what ``make up`` runs), on the
production topic names, with the default settings of every service; only the addresses differ
(a free port for ingest, a peers file naming the bench sender and recipient, an S3 bucket and an
assembly state directory of this run). The bench recipient (URA ``00000772``) is seeded into the
provider directory with ``beeldportaal routing seed --file`` as a DICOMweb endpoint on the
Orthanc (no auth, batches of at most 20 instances / 50 MB) and removed again (a tombstone)
at the end.

Each study is ``--instances`` small CT images (``--image-size`` pixels square, 16 bit) of its
own patient (a valid test BSN, 99999xxxx, Patient ID + Issuer NLMINBIZA: a verified identity, so
consent permits delivery by presumed referral), sent as **one** STOW-RS request with
``X-Beeldportaal-Study-Complete: true`` and ``X-Beeldportaal-Urgency``. Bodies are built before
the clock starts. A study's latency runs from the start of its STOW-RS request to the moment the
last of its instances is present in Orthanc: a thread polls Orthanc's ``/changes`` every
``--poll-ms`` (NewInstance), mapping Orthanc's instance ids (SHA-1 of Patient ID, Study, Series
and SOP Instance UID) back to the studies sent, so presence costs one small request per poll.

Phases, after ``--warmup`` studies went all the way through one at a time (that is also the
readiness check of the four workers, which have no HTTP endpoint):

- **paced**: ``--studies`` routine studies, one started every 1 / ``--paced-rate`` seconds
  whatever the answers do (an open loop, up to ``--concurrency`` connections): p50/p99 latency
  at a load the pipeline sustains, which is what the latency targets are about;
- **flood**: ``--flood-studies`` routine studies over ``--concurrency`` keep-alive connections,
  each connection sending its next as soon as its last was answered: studies/s and
  instances/s from the first request to the last study present (the pipeline's capacity);
  its latencies are mostly queueing, since ingest takes studies faster than they are delivered;
- **urgent**: ``--routine-backlog`` routine studies sent as fast as ingest takes them, then, as
  soon as all of them are acknowledged (queued), one study marked ``urgent``: its latency, and
  how many of the backlog had been delivered when it was sent and when it was present.

``stages_ms`` breaks the latency down from the pipeline's own events (matched by correlation id,
which the benchmark sets per study with ``X-Correlation-Id``): time from the request start to the
STOW-RS answer, to study-received, consent-checked, route-resolved, the delivery queued by notify,
notify's ``delivered``, and presence in Orthanc (Kafka record timestamps; one clock, one machine).
``cpu_seconds`` is each process's CPU time per phase.

Stdout is one JSON object; progress goes to stderr. Targets (p50 < 1 s, p99 < 3 s of the paced
phase, urgent < 3 s) are reported in ``targets``, not enforced. Exit status 1 when any study was
not accepted or not delivered (``pipeline_events.undelivered`` says how far each got; waiting for
them stops after ``--stall-timeout`` without progress). Service logs stay in
``.state/bench-deliver/<run>/``.

The workers join the production consumer groups, so the benchmark refuses to start while
``make up``'s services (or another run of it) are running, and reports in ``interference``
whether such services appeared during the run or partitions were taken from its workers
(another member joined a group): such a run's numbers, and possibly its deliveries, are not the
benchmark's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydicom.uid import generate_uid

from benchmarks.ingest import Body, build_bodies
from deploy.local.config import LocalConfig, read_env_file
from deploy.local.orthanc import OrthancConfig, OrthancPeer
from deploy.local.processes import ManagedProcess, PlatformError, http_ready, wait_until
from shared.identifiers import is_valid_bsn

BENCH_SENDER = "00000771"
BENCH_RECIPIENT = "00000772"
ENDPOINT_ID = "bench-orthanc"
BATCH_LIMITS = {"max_instances": 20, "max_bytes": 50 * 1024 * 1024}
# The services of deploy/local/services.py this runs (their command lines come from there).
SERVICES = ("ingest", "ingest-assembly", "consent-decisions", "routing-worker", "notify-worker")
# Stage -> topics whose first record with the study's correlation id marks it.
STAGE_TOPICS: dict[str, tuple[str, ...]] = {
    "study_received": ("study-received",),
    "consent_checked": ("consent-checked",),
    "route_resolved": ("route-resolved",),
    "delivery_queued": ("delivery-urgent", "delivery-routine"),
    "delivered_event": ("delivered",),
}
REFERENCED_SOP_SEQUENCE = "00081199"
T = TypeVar("T")
TARGETS = {"p50_ms": 1000.0, "p99_ms": 3000.0, "urgent_ms": 3000.0}


def log(message: str) -> None:
    print(f"[bench-deliver] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why (and where the logs are)."""


# -- what is sent -----------------------------------------------------------------------------


@dataclass
class Study:
    """One study: built before the clock starts, then what happened to it (monotonic seconds)."""

    name: str
    uid: str
    correlation_id: str
    urgency: str
    orthanc_ids: list[str]
    sop_uids: list[str]
    body: Body
    sent_at: float | None = None
    answered_at: float | None = None
    status: int | None = None
    stored: int = 0
    error: str | None = None
    present_at: float | None = None

    @property
    def accepted(self) -> bool:
        return self.status == 200 and self.stored == len(self.sop_uids)

    @property
    def latency_s(self) -> float | None:
        if self.sent_at is None or self.present_at is None:
            return None
        return self.present_at - self.sent_at


def test_bsns() -> Iterator[str]:
    """Valid BSNs of the test range (99999xxxx, passing the 11-proof), round and round."""
    numbers = [str(n) for n in range(999_990_000, 1_000_000_000) if is_valid_bsn(str(n))]
    while True:
        yield from numbers


def orthanc_id(*parts: str) -> str:
    """Orthanc's resource id: SHA-1 of the identifying UIDs joined by '|', in 5 groups of 8."""
    digest = hashlib.sha1("|".join(parts).encode()).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


class StudyFactory:
    def __init__(self, run: str, instances: int, image_size: int) -> None:
        from tests.dicom_samples import bsn_item

        self._bsn_item = bsn_item
        self.run = run
        self.instances = instances
        self.image_size = image_size
        self.pixels = bytes(2 * image_size * image_size)
        self._bsns = test_bsns()
        self._count = 0

    def make(self, label: str, urgency: str = "routine") -> Study:
        from tests.dicom_samples import make_dicom_bytes

        self._count += 1
        bsn = next(self._bsns)
        study_uid, series_uid = generate_uid(), generate_uid()
        n = self.image_size
        datasets, sop_uids, ids = [], [], []
        for number in range(1, self.instances + 1):
            sop_uid = generate_uid()
            datasets.append(
                make_dicom_bytes(
                    patient=self._bsn_item(bsn),
                    StudyInstanceUID=study_uid,
                    SeriesInstanceUID=series_uid,
                    SOPInstanceUID=sop_uid,
                    InstanceNumber=number,
                    AccessionNumber=f"BENCH{self._count:06d}",
                    StudyDescription=f"bench-deliver {label}",
                    Rows=n,
                    Columns=n,
                    PixelData=self.pixels,
                )
            )
            sop_uids.append(sop_uid)
            ids.append(orthanc_id(bsn, study_uid, series_uid, sop_uid))
        (body,) = build_bodies(datasets, len(datasets))
        return Study(
            name=label,
            uid=study_uid,
            correlation_id=f"bench-deliver-{self.run}-{self._count}",
            urgency=urgency,
            orthanc_ids=ids,
            sop_uids=sop_uids,
            body=body,
        )


# -- sending ----------------------------------------------------------------------------------


class Sender:
    """STOW-RS to ingest, one request per study, from keep-alive connections."""

    def __init__(self, base_url: str, token: str) -> None:
        url = urllib.parse.urlsplit(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.path = f"/dicomweb/to/{BENCH_RECIPIENT}/studies"
        self.token = token

    def connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def send(self, conn: http.client.HTTPConnection, study: Study) -> None:
        headers = {
            "Content-Type": study.body.content_type,
            "Content-Length": str(len(study.body.data)),
            "Accept": "application/dicom+json",
            "Authorization": f"Bearer {self.token}",
            "X-Correlation-Id": study.correlation_id,
            "X-Beeldportaal-Urgency": study.urgency,
            "X-Beeldportaal-Study-Complete": "true",
        }
        study.sent_at = time.monotonic()
        try:
            conn.request("POST", f"{self.path}/{study.uid}", body=study.body.data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            study.answered_at = time.monotonic()
            study.status = response.status
        except (OSError, http.client.HTTPException) as exc:
            study.answered_at = time.monotonic()
            study.error = repr(exc)
            conn.close()  # http.client reconnects on the next request
            return
        try:
            answer = json.loads(payload) if payload else {}
            study.stored = len(answer.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", []))
        except (ValueError, AttributeError):
            study.stored = 0
        if not study.accepted:
            study.error = f"HTTP {study.status}: {payload[:300].decode(errors='replace')}"

    def send_all(self, studies: list[Study], concurrency: int) -> None:
        """Every study, ``concurrency`` requests in flight, in order of the list."""
        work: queue.SimpleQueue[Study] = queue.SimpleQueue()
        for study in studies:
            work.put(study)
        self._clients(work, concurrency, self.send)

    def send_paced(self, studies: list[Study], rate: float, concurrency: int) -> float:
        """Study i sent at start + i / ``rate`` (an open loop: a slow answer does not delay
        the next study), from up to ``concurrency`` connections; returns how late the latest
        request started, in seconds (the senders ran short of connections when > 0.1)."""
        work: queue.SimpleQueue[tuple[float, Study]] = queue.SimpleQueue()
        start = time.monotonic() + 0.05
        for i, study in enumerate(studies):
            work.put((start + i / rate, study))
        lateness = [0.0]

        def send_at(conn: http.client.HTTPConnection, item: tuple[float, Study]) -> None:
            at, study = item
            wait = at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            lateness[0] = max(lateness[0], time.monotonic() - at)
            self.send(conn, study)

        self._clients(work, concurrency, send_at)
        return lateness[0]

    def _clients(
        self,
        work: queue.SimpleQueue[T],
        concurrency: int,
        send: Callable[[http.client.HTTPConnection, T], None],
    ) -> None:
        """Threads, one keep-alive connection each, taking items off ``work`` until it is empty."""
        connections = [self.connect() for _ in range(min(concurrency, work.qsize()))]

        def client(conn: http.client.HTTPConnection) -> None:
            try:
                while True:
                    try:
                        item = work.get_nowait()
                    except queue.Empty:
                        return
                    send(conn, item)
            finally:
                conn.close()

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in connections]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def send_one(self, study: Study) -> None:
        conn = self.connect()
        try:
            self.send(conn, study)
        finally:
            conn.close()


# -- watching the receiver --------------------------------------------------------------------


class OrthancWatcher:
    """Polls Orthanc's /changes; a study is present when its last expected instance is seen."""

    def __init__(self, peer: OrthancPeer, poll_interval: float) -> None:
        self.peer = peer
        self.poll_interval = poll_interval
        self._lock = threading.Condition()
        self._expected: dict[str, Study] = {}  # orthanc instance id -> study
        self._by_sop: dict[str, Study] = {}
        self._seen: dict[str, set[str]] = {}  # study uid -> orthanc instance ids present
        self._since = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orthanc-watcher", daemon=True)
        self.polls = 0
        self.fallback_lookups = 0
        self.unexpected = 0
        self.error: str | None = None

    def expect(self, studies: Iterable[Study]) -> None:
        with self._lock:
            for study in studies:
                self._seen.setdefault(study.uid, set())
                for ident, sop in zip(study.orthanc_ids, study.sop_uids, strict=True):
                    self._expected[ident] = study
                    self._by_sop[sop] = study

    def __enter__(self) -> OrthancWatcher:
        self._since = int(self.peer.rest("GET", "/changes?last")["Last"])
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.peer.http_port, timeout=30)
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self._poll(conn)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    conn.close()
                    self.error = repr(exc)
                self._stop.wait(max(0.0, self.poll_interval - (time.monotonic() - started)))
        finally:
            conn.close()

    def _poll(self, conn: http.client.HTTPConnection) -> None:
        while True:
            conn.request("GET", f"/changes?since={self._since}&limit=5000")
            response = conn.getresponse()
            answer = json.loads(response.read())
            if response.status != 200:
                raise ValueError(f"Orthanc /changes answered {response.status}")
            now = time.monotonic()
            self.polls += 1
            new = [
                c["ID"]
                for c in answer.get("Changes", [])
                if c.get("ChangeType") == "NewInstance" and c.get("ResourceType") == "Instance"
            ]
            self._since = int(answer.get("Last", self._since))
            if new:
                self._record(new, now)
            if answer.get("Done", True):
                return

    def _record(self, instance_ids: list[str], now: float) -> None:
        with self._lock:
            for ident in instance_ids:
                study = self._expected.get(ident)
                if study is None:
                    study = self._lookup(ident)
                    if study is None:
                        self.unexpected += 1
                        continue
                seen = self._seen[study.uid]
                seen.add(ident)
                if study.present_at is None and len(seen) >= len(study.sop_uids):
                    study.present_at = now
            self._lock.notify_all()

    def _lookup(self, ident: str) -> Study | None:
        # Only when Orthanc's id is not the one computed (should not happen): ask Orthanc.
        self.fallback_lookups += 1
        try:
            tags = self.peer.rest("GET", f"/instances/{ident}", timeout=10)
        except (OSError, PlatformError):
            return None
        return self._by_sop.get(tags.get("MainDicomTags", {}).get("SOPInstanceUID", ""))

    def present(self, studies: Iterable[Study]) -> int:
        with self._lock:
            return sum(s.present_at is not None for s in studies)

    def wait(
        self,
        studies: list[Study],
        timeout: float,
        alive: Callable[[], None],
        what: str,
        stall: float | None = None,
    ) -> bool:
        """Until every study is present; False when ``timeout`` ran out or, with ``stall``, when
        no study became present for that long (the rest is lost, not late)."""
        deadline = time.monotonic() + timeout
        last_report = last_progress = time.monotonic()
        present = -1
        while True:
            with self._lock:
                if all(s.present_at is not None for s in studies):
                    return True
                self._lock.wait(0.5)
            alive()
            now = time.monotonic()
            if now > deadline:
                log(f"{what}: gave up after {timeout:.0f}s")
                return False
            count = self.present(studies)
            if count != present:
                present, last_progress = count, now
            elif stall is not None and now - last_progress > stall:
                log(f"{what}: nothing new present for {stall:.0f}s; the rest counts as lost")
                return False
            if now - last_report > 10:
                last_report = now
                error = f" (last poll error: {self.error})" if self.error else ""
                log(f"{what}: {self.present(studies)}/{len(studies)} present{error}")


# -- the services -----------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    process: ManagedProcess
    cpu_marks: dict[str, float] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def platform_env(config: LocalConfig) -> dict[str, str]:
    """The running platform's settings; a clear exit when it is not up."""
    from aiokafka import AIOKafkaConsumer

    from shared.kafka import broker_ready
    from shared.topics import TOPICS

    if not config.env_file.exists():
        raise SystemExit("the local platform is not up: run `beeldportaal platform up` first")
    env = {**os.environ, **read_env_file(config.env_file)}
    bootstrap = env["BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS"].split(",")
    if not asyncio.run(broker_ready(bootstrap, timeout_ms=3000)):
        raise SystemExit(
            f"Kafka does not answer on {','.join(bootstrap)}: run `beeldportaal platform up`"
        )

    async def topics() -> set[str]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await consumer.start()
        try:
            return set(await consumer.topics())
        finally:
            await consumer.stop()

    have = asyncio.run(topics())
    missing = [spec.name for spec in TOPICS if spec.name not in have]
    if missing:
        raise SystemExit(
            f"topics missing on the broker: {', '.join(missing)} (auto-create is off); "
            "`beeldportaal platform up` creates every declared topic"
        )
    return env


def make_up_services(config: LocalConfig) -> list[str]:
    """The services of ``make up`` (this checkout's state directory) that are running."""
    from deploy.local.services import Services, specs

    services = Services(config, out=lambda *_: None)
    return [s.name for s in specs(config) if services._process(s).running()]


def other_bench_runs(config: LocalConfig) -> list[str]:
    """Services of another run of this benchmark that are still running."""
    running = []
    for pid_file in sorted((config.state_dir / "bench-deliver").glob("*/*.pid")):
        name = pid_file.stem
        process = ManagedProcess(
            name, pid_file, pid_file.with_suffix(".log"), marker=str(pid_file.with_suffix(""))
        )
        if process.running():
            running.append(f"{pid_file.parent.name}/{name} (pid {process.pid()})")
    return running


def refuse_if_make_up_runs(config: LocalConfig) -> None:
    """``make up``'s workers share the consumer groups: they would take part of the load."""
    others = other_bench_runs(config)
    if others:
        raise SystemExit(
            f"another run of this benchmark is running ({', '.join(others)}); its workers share "
            "the consumer groups. Wait for it to finish."
        )
    running = make_up_services(config)
    if running:
        raise SystemExit(
            f"`make up` services are running ({', '.join(running)}); they share the consumer "
            "groups this benchmark's workers join. Stop them with `make down` (the platform "
            "may stay up), then run the benchmark again."
        )


class Pipeline:
    """The receiving Orthanc, the bench's directory entry, bucket and the five services."""

    def __init__(self, config: LocalConfig, env: dict[str, str], work: Path, run: str) -> None:
        self.config = config
        self.work = work
        self.run = run
        self.bucket = f"bench-deliver-{run}"
        self.env = {**env, "BEELDPORTAAL_S3_BUCKET": self.bucket}
        self.bootstrap = env["BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS"]
        self.services: list[Service] = []
        self.peer: OrthancPeer | None = None
        self.ingest_url = ""
        self.seeded = False
        self._orthanc_cpu: dict[str, float] = {}
        self.intruders: set[str] = set()
        self._log_marks: dict[str, int] = {}

    # lifecycle

    def start(self, stack: contextlib.ExitStack) -> None:
        self.peer = OrthancPeer(
            self.work / "orthanc", OrthancConfig(aet="BENCH_RCV", name="bench-deliver-receiver")
        )
        stack.callback(self.peer.purge)
        self.peer.start()
        log(
            f"orthanc {self.peer.rest('GET', '/system')['Version']} pid {self.peer.pid} "
            f"on {self.peer.base_url}"
        )
        self._make_bucket()
        stack.callback(self._drop_bucket)
        stack.callback(self._unseed)
        self._seed()
        stack.callback(self.stop_services)
        self._start_services()

    def _s3(self) -> Any:
        from minio import Minio

        return Minio(
            self.env["BEELDPORTAAL_S3_ENDPOINT"],
            access_key=self.env["BEELDPORTAAL_S3_ACCESS_KEY"],
            secret_key=self.env["BEELDPORTAAL_S3_SECRET_KEY"],
            region=self.env.get("BEELDPORTAAL_S3_REGION", "us-east-1"),
            secure=self.env.get("BEELDPORTAAL_S3_SECURE", "false").lower() == "true",
        )

    def _make_bucket(self) -> None:
        s3 = self._s3()
        if not s3.bucket_exists(self.bucket):
            s3.make_bucket(self.bucket)

    def _drop_bucket(self) -> None:
        from minio.deleteobjects import DeleteObject

        try:
            s3 = self._s3()
            names = (
                DeleteObject(o.object_name) for o in s3.list_objects(self.bucket, recursive=True)
            )
            for error in s3.remove_objects(self.bucket, names):  # batches of 1000
                log(f"could not remove {error.name} from {self.bucket}: {error.message}")
            s3.remove_bucket(self.bucket)
        except Exception as exc:  # cleanup: say so, go on with the rest
            log(f"could not remove the bucket {self.bucket}: {exc!r}")

    def _seed(self) -> None:
        assert self.peer is not None
        provider = {
            "ura": BENCH_RECIPIENT,
            "name": "Bench ontvanger (benchmarks.deliver)",
            "type_code": "V4",
            "city": "Loopback",
            "endpoints": [
                {
                    "channel": "dicomweb",
                    "id": ENDPOINT_ID,
                    "base_url": self.peer.dicomweb_url,
                    "auth": {"type": "none"},
                }
            ],
            "preferences": {"coercion": {"profile": "none"}, "batch_limits": BATCH_LIMITS},
        }
        seed_file = self.work / "directory.yaml"
        # JSON is YAML; the URA stays a quoted string.
        seed_file.write_text(json.dumps({"providers": [provider]}, indent=2))
        result = subprocess.run(
            [sys.executable, "-m", "deploy.cli", "routing", "seed", "--file", str(seed_file)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if result.returncode != 0:
            raise BenchError(f"routing seed failed:\n{result.stdout}{result.stderr}")
        self.seeded = True
        said = (result.stdout.strip().splitlines() or [""])[-1]  # its logs go to stdout too
        log(f"directory: {BENCH_RECIPIENT} -> {self.peer.dicomweb_url} ({said})")

    def _unseed(self) -> None:
        """Remove the bench recipient again (a tombstone), so the directory keeps no dead URL."""
        if not self.seeded:
            return
        from services.routing.adapters.directory_view import KafkaDirectoryWriter
        from shared.settings import KafkaSettings

        async def remove() -> None:
            kafka = KafkaSettings(bootstrap_servers=self.bootstrap)
            async with KafkaDirectoryWriter(kafka, client_id="bench-deliver") as writer:
                await writer.remove(BENCH_RECIPIENT)

        try:
            asyncio.run(remove())
        except Exception as exc:  # cleanup: say so, go on with the rest
            log(f"could not remove {BENCH_RECIPIENT} from the directory: {exc!r}")

    def _start_services(self) -> None:
        from deploy.local.services import specs

        argv_of = {spec.name: spec.args for spec in specs(self.config)}
        unknown = [name for name in SERVICES if name not in argv_of]
        if unknown:
            raise BenchError(f"deploy/local/services.py does not define {unknown}")
        http_port = _free_port()
        self.ingest_url = f"http://127.0.0.1:{http_port}"
        peers = self.work / "peers.json"
        peers.write_text(
            json.dumps(
                {
                    "organisations": [
                        {"ura": BENCH_SENDER, "name": "Bench zender"},
                        {"ura": BENCH_RECIPIENT, "name": "Bench ontvanger"},
                    ]
                }
            )
        )
        (self.work / "spool").mkdir(exist_ok=True)
        ingest_env = {
            "BEELDPORTAAL_INGEST_HTTP_PORT": str(http_port),
            "BEELDPORTAAL_INGEST_DIMSE_PORT": str(_free_port()),
            "BEELDPORTAAL_INGEST_PEERS_FILE": str(peers),
            "BEELDPORTAAL_INGEST_SPOOL_DIR": str(self.work / "spool"),
            "BEELDPORTAAL_INGEST_STATE_DIR": str(self.work / "ingest-assembly-state"),
        }
        for name in SERVICES:
            marker = str(self.work / name)
            process = ManagedProcess(
                name, self.work / f"{name}.pid", self.work / f"{name}.log", marker=marker
            )
            argv = [sys.executable, "-m", "deploy.cli", *argv_of[name], "--tag", marker]
            env = {**self.env, **(ingest_env if name.startswith("ingest") else {})}
            process.start(argv, env=env)
            self.services.append(Service(name, process))
            log(f"{name}: pid {process.pid()} ({' '.join(argv_of[name])}), log {process.log_file}")
        ingest = self.services[0].process
        wait_until(lambda: http_ready(f"{self.ingest_url}/readyz"), 90, "ingest", ingest)
        log(f"ingest ready on {self.ingest_url}")

    def alive(self) -> None:
        intruders = make_up_services(self.config)
        if intruders and not self.intruders:
            log(
                f"warning: `make up` services started meanwhile ({', '.join(intruders)}); they "
                "join the same consumer groups and take part of the load"
            )
        self.intruders.update(intruders)
        for service in self.services:
            if not service.process.running():
                raise BenchError(
                    f"{service.name} exited; last lines of {service.process.log_file}:\n"
                    f"{service.process.log_tail(40)}"
                )

    def mark_logs(self) -> None:
        for service in self.services:
            with contextlib.suppress(OSError):
                self._log_marks[service.name] = service.process.log_file.stat().st_size

    def rebalances(self) -> dict[str, int]:
        """Partitions taken from our workers since ``mark_logs``: only another member joining
        their consumer group does that (ours are the only members)."""
        out = {}
        for service in self.services:
            try:
                with service.process.log_file.open("rb") as f:
                    f.seek(self._log_marks.get(service.name, 0))
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            # aiokafka's line, for the stream workers and faust alike; "set()" is a first join.
            out[service.name] = sum(
                1
                for line in text.splitlines()
                if "Revoking previously assigned partitions" in line
                and "partitions set()" not in line
            )
        return out

    def stop_services(self) -> None:
        for service in reversed(self.services):
            try:
                service.process.stop(timeout=45)
            except OSError as exc:
                log(f"stopping {service.name}: {exc!r}")

    def mark_cpu(self, label: str) -> None:
        for service in self.services:
            cpu = _cpu_seconds(service.process.pid())
            if cpu is not None:
                service.cpu_marks[label] = cpu
        if self.peer is not None:
            cpu = _cpu_seconds(self.peer.pid)
            if cpu is not None:
                self._orthanc_cpu[label] = cpu

    def cpu_between(self, start: str, end: str) -> dict[str, float | None]:
        def between(marks: Mapping[str, float]) -> float | None:
            if start in marks and end in marks:
                return round(marks[end] - marks[start], 2)
            return None

        out = {s.name: between(s.cpu_marks) for s in self.services}
        out["orthanc"] = between(self._orthanc_cpu)
        return out


# -- the pipeline's own timestamps ------------------------------------------------------------


def _all_topics() -> list[str]:
    return sorted({t for topics in STAGE_TOPICS.values() for t in topics})


async def _end_offsets(bootstrap: str) -> dict[Any, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from shared.topics import topic

    # Partition counts as declared (shared.topics): what `platform up` provisioned.
    tps = [TopicPartition(name, p) for name in _all_topics() for p in range(topic(name).partitions)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap.split(","), isolation_level="read_committed"
    )
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


@dataclass
class PipelineEvents:
    """What the pipeline's topics say about the studies sent."""

    # Stage -> correlation id -> first record timestamp (epoch seconds).
    stamps: dict[str, dict[str, float]]
    # Correlation id -> the outcomes of each ``delivered`` event (sent, failed, ...).
    delivered: dict[str, list[dict[str, Any]]]
    # Why instances of a ``delivered`` study were not sent -> how many.
    refusals: dict[str, int]


async def _pipeline_events(
    bootstrap: str, starts: Mapping[Any, int], wanted: set[str], timeout: float = 120
) -> PipelineEvents:
    """The records of the studies sent, on the stage topics from ``starts`` on."""
    from aiokafka import AIOKafkaConsumer

    stage_of = {t: stage for stage, topics in STAGE_TOPICS.items() for t in topics}
    stamps: dict[str, dict[str, float]] = {stage: {} for stage in STAGE_TOPICS}
    delivered: dict[str, list[dict[str, Any]]] = {}
    refusals: dict[str, int] = {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tps = list(starts)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, starts[tp])
        todo = {tp for tp in tps if ends[tp] > starts[tp]}
        async with asyncio.timeout(timeout):
            while todo:
                batches = await consumer.getmany(timeout_ms=500, max_records=20_000)
                for tp, records in batches.items():
                    stage = stamps[stage_of[tp.topic]]
                    for record in records:
                        headers = dict(record.headers or ())
                        cid = headers.get("correlation-id", b"").decode(errors="replace")
                        if cid not in wanted:
                            continue
                        at = record.timestamp / 1000
                        stage[cid] = min(at, stage.get(cid, at))
                        if tp.topic == "delivered":
                            event = json.loads(record.value)
                            delivered.setdefault(cid, []).append(event.get("outcomes", {}))
                            for refused in event.get("refused", ()):
                                reason = str(refused.get("reason"))
                                refusals[reason] = refusals.get(reason, 0) + 1
                for tp in list(todo):
                    if await consumer.position(tp) >= ends[tp]:
                        todo.discard(tp)
    finally:
        await consumer.stop()
    return PipelineEvents(stamps, delivered, refusals)


# -- statistics -------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest rank."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary_ms(values_s: list[float]) -> dict[str, float | None]:
    ms = [v * 1000 for v in values_s]

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 1)

    return {
        "p50": r(percentile(ms, 50)),
        "p90": r(percentile(ms, 90)),
        "p99": r(percentile(ms, 99)),
        "max": r(max(ms)) if ms else None,
        "min": r(min(ms)) if ms else None,
    }


def stage_summary(
    studies: list[Study], stamps: Mapping[str, Mapping[str, float]], wall_offset: float
) -> dict[str, Any]:
    """Per stage, the time from each study's request start to it (ms)."""
    out: dict[str, Any] = {
        "stow_answered": summary_ms(
            [s.answered_at - s.sent_at for s in studies if s.answered_at and s.sent_at]
        )
    }
    for stage, by_cid in stamps.items():
        values = [
            by_cid[s.correlation_id] - wall_offset - s.sent_at
            for s in studies
            if s.sent_at is not None and s.correlation_id in by_cid
        ]
        out[stage] = {**summary_ms(values), "seen": len(values)}
    out["present_in_orthanc"] = summary_ms([s.latency_s for s in studies if s.latency_s])
    return out


def one_study_stages(
    study: Study, stamps: Mapping[str, Mapping[str, float]], wall_offset: float
) -> dict[str, float | None]:
    def ms(at: float | None) -> float | None:
        if at is None or study.sent_at is None:
            return None
        return round((at - study.sent_at) * 1000, 1)

    out = {"stow_answered": ms(study.answered_at)}
    for stage, by_cid in stamps.items():
        at = by_cid.get(study.correlation_id)
        out[stage] = ms(None if at is None else at - wall_offset)
    out["present_in_orthanc"] = ms(study.present_at)
    return out


# -- the run ----------------------------------------------------------------------------------


def _check_accepted(studies: list[Study], what: str) -> list[str]:
    refused = [s for s in studies if not s.accepted]
    if refused:
        log(f"{what}: {len(refused)} studies not accepted by ingest, e.g. {refused[0].error}")
    return [s.error or "?" for s in refused[:5]]


def run(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    from shared.auth import ensure_dev_keypair, mint_token

    config = LocalConfig.from_env()
    env = platform_env(config)
    refuse_if_make_up_runs(config)
    run_id = uuid.uuid4().hex[:10]
    work = config.state_dir / "bench-deliver" / run_id
    work.mkdir(parents=True)
    factory = StudyFactory(run_id, args.instances, args.image_size)

    log(
        f"building {args.warmup} + {args.studies} + {args.flood_studies} + "
        f"{args.routine_backlog} + 1 studies of "
        f"{args.instances} instances"
    )
    warmups = [factory.make(f"warmup-{i}") for i in range(args.warmup)]
    paced = [factory.make(f"paced-{i}") for i in range(args.studies)]
    flood = [factory.make(f"flood-{i}") for i in range(args.flood_studies)]
    backlog = [factory.make(f"backlog-{i}") for i in range(args.routine_backlog)]
    urgent = factory.make("urgent", urgency="urgent")
    everything = [*warmups, *paced, *flood, *backlog, urgent]
    instance_bytes = sum(s.body.dicom_bytes for s in everything) / (
        len(everything) * args.instances
    )

    report: dict[str, Any] = {
        "benchmark": "deliver",
        "run": run_id,
        "config": {
            "studies": args.studies,
            "paced_rate_per_s": args.paced_rate,
            "flood_studies": args.flood_studies,
            "instances_per_study": args.instances,
            "routine_backlog": args.routine_backlog,
            "concurrency": args.concurrency,
            "warmup_studies": args.warmup,
            "image_size": f"{args.image_size}x{args.image_size}x16bit",
            "avg_instance_bytes": round(instance_bytes),
            "poll_ms": args.poll_ms,
            "batch_limits": BATCH_LIMITS,
            "service_settings": "defaults (as `make up`)",
        },
        "machine": {"cpus": os.cpu_count()},
    }
    ok = True
    with contextlib.ExitStack() as stack:
        stack.callback(_drop_state, work)
        pipeline = Pipeline(config, env, work, run_id)
        try:
            pipeline.start(stack)
        except PlatformError as exc:
            raise BenchError(str(exc)) from None
        private_key, _ = ensure_dev_keypair(config.dev_jwt_dir)
        token = mint_token(private_key, ura=BENCH_SENDER, ttl_s=6 * 3600)
        sender = Sender(pipeline.ingest_url, token)
        assert pipeline.peer is not None
        watcher = stack.enter_context(OrthancWatcher(pipeline.peer, args.poll_ms / 1000))
        watcher.expect(everything)

        # Warm-up: one study at a time, all the way through (the workers' readiness check).
        for study in warmups:
            sender.send_one(study)
            if not study.accepted:
                raise BenchError(f"warm-up study refused by ingest: {study.error}")
            if not watcher.wait([study], args.start_timeout, pipeline.alive, "warm-up"):
                raise BenchError(
                    f"warm-up study not delivered within {args.start_timeout:.0f}s; logs in {work}"
                )
            log(f"warm-up {study.name}: {study.latency_s * 1000:.0f} ms")  # type: ignore[operator]
        if watcher.fallback_lookups:
            log(f"note: {watcher.fallback_lookups} Orthanc ids looked up (computed id differs)")
        report["warmup_latency_ms"] = [round(s.latency_s * 1000, 1) for s in warmups]  # type: ignore[operator]

        offsets = asyncio.run(_end_offsets(pipeline.bootstrap))
        pipeline.mark_logs()
        wall_offset = time.time() - time.monotonic()

        # Paced: studies at a fixed rate (an open loop), the latency the targets are about.
        log(f"paced: {len(paced)} studies at {args.paced_rate}/s")
        report["paced"], phase_ok = _measure(
            "paced",
            paced,
            lambda: sender.send_paced(paced, args.paced_rate, args.concurrency),
            watcher,
            pipeline,
            args,
        )
        report["paced"]["rate_per_s"] = args.paced_rate
        ok &= phase_ok
        log(f"paced: {report['paced']['latency_ms']} {report['paced']['throughput']}")

        # Flood: as fast as ingest takes them, bounded concurrency: the throughput (latencies
        # here are mostly queueing: the senders outrun delivery).
        log(f"flood: {len(flood)} studies, {args.concurrency} in flight")
        report["flood"], phase_ok = _measure(
            "flood",
            flood,
            lambda: sender.send_all(flood, args.concurrency),
            watcher,
            pipeline,
            args,
        )
        ok &= phase_ok
        log(f"flood: {report['flood']['latency_ms']} {report['flood']['throughput']}")

        # Urgent: a routine backlog, then at once one urgent study.
        log(f"urgent: {len(backlog)} routine studies as fast as ingest takes them")
        pipeline.mark_cpu("urgent-start")
        backlog_started = time.monotonic()
        sender.send_all(backlog, args.concurrency)
        backlog_sent = time.monotonic()
        delivered_when_sent = watcher.present(backlog)
        sender.send_one(urgent)
        errors = _check_accepted([*backlog, urgent], "urgent")
        urgent_done = urgent.accepted and watcher.wait(
            [urgent], args.timeout, pipeline.alive, "urgent study"
        )
        delivered_when_present = watcher.present(backlog)
        log(
            f"urgent: {urgent.latency_s and round(urgent.latency_s * 1000)} ms; backlog delivered "
            f"{delivered_when_sent} when sent, {delivered_when_present} when present"
        )
        accepted_backlog = [s for s in backlog if s.accepted]
        drained = watcher.wait(
            accepted_backlog,
            args.timeout,
            pipeline.alive,
            "routine backlog",
            stall=args.stall_timeout,
        )
        pipeline.mark_cpu("urgent-end")
        backlog_delivered = [s for s in backlog if s.present_at is not None]
        last = max((s.present_at for s in backlog_delivered), default=None)  # type: ignore[type-var]
        ok &= bool(urgent_done) and drained and not errors
        ok &= len(backlog_delivered) == len(backlog)
        report["urgent"] = {
            "routine_backlog": len(backlog),
            "backlog_send_seconds": round(backlog_sent - backlog_started, 2),
            "latency_ms": round(urgent.latency_s * 1000, 1) if urgent.latency_s else None,
            "routine_delivered_when_urgent_sent": delivered_when_sent,
            "routine_delivered_when_urgent_present": delivered_when_present,
            "backlog_delivered": len(backlog_delivered),
            "backlog_drained_seconds": (
                round(last - backlog_started, 2) if last is not None else None
            ),
            "backlog_latency_ms": summary_ms([s.latency_s for s in backlog_delivered]),  # type: ignore[misc]
            "first_errors": errors,
        }

        # Where the time went, from the pipeline's own events.
        wanted = {s.correlation_id for s in (*paced, *flood, *backlog, urgent)}
        events = asyncio.run(_pipeline_events(pipeline.bootstrap, offsets, wanted))
        stamps = events.stamps
        report["paced"]["stages_ms"] = stage_summary(paced, stamps, wall_offset)
        report["flood"]["stages_ms"] = stage_summary(flood, stamps, wall_offset)
        report["urgent"]["stages_ms"] = one_study_stages(urgent, stamps, wall_offset)
        report["urgent"]["backlog_stages_ms"] = stage_summary(backlog, stamps, wall_offset)
        report["cpu_seconds"] = {
            "paced": pipeline.cpu_between("paced-start", "paced-end"),
            "flood": pipeline.cpu_between("flood-start", "flood-end"),
            "urgent": pipeline.cpu_between("urgent-start", "urgent-end"),
        }
        report["pipeline_events"] = {
            "delivered_events": sum(len(v) for v in events.delivered.values()),
            "studies_with_delivered_event": len(events.delivered),
            "delivered_events_with_refused_instances": sum(
                1 for v in events.delivered.values() for o in v if o.get("failed")
            ),
            "refusal_reasons": events.refusals,
            "undelivered": [
                _undelivered(s, events)
                for s in (*paced, *flood, *backlog, urgent)
                if not s.present_at
            ][:20],
        }
        rebalances = pipeline.rebalances()
        report["interference"] = {
            "make_up_services_seen": sorted(pipeline.intruders),
            # Partitions taken from our workers after the warm-up: another member joined.
            "rebalances_after_warmup": rebalances,
        }
        if pipeline.intruders or any(rebalances.values()):
            log(f"warning: other consumers joined our groups during the run: {rebalances}")
        report["orthanc"] = {
            "polls": watcher.polls,
            "unexpected_instances": watcher.unexpected,
            "id_fallback_lookups": watcher.fallback_lookups,
            "instances": pipeline.peer.statistics().get("CountInstances"),
        }
        log("stopping the services, Orthanc, the bucket and the directory entry")

    p50 = report["paced"]["latency_ms"]["p50"]
    p99 = report["paced"]["latency_ms"]["p99"]
    urgent_ms = report["urgent"]["latency_ms"]
    report["targets"] = {
        "p50_ms": {"target": TARGETS["p50_ms"], "measured": p50, "met": _met(p50, "p50_ms")},
        "p99_ms": {"target": TARGETS["p99_ms"], "measured": p99, "met": _met(p99, "p99_ms")},
        "urgent_ms": {
            "target": TARGETS["urgent_ms"],
            "measured": urgent_ms,
            "met": _met(urgent_ms, "urgent_ms"),
        },
    }
    report["complete"] = ok
    report["logs"] = str(work)
    report["load_avg_1m"] = round(os.getloadavg()[0], 2)
    report["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return report, ok


def _measure(
    name: str,
    studies: list[Study],
    send: Callable[[], float | None],
    watcher: OrthancWatcher,
    pipeline: Pipeline,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], bool]:
    """Send ``studies`` with ``send`` and wait until they are present in Orthanc (or stall)."""
    pipeline.mark_cpu(f"{name}-start")
    started = time.monotonic()
    lateness = send()
    sent_seconds = time.monotonic() - started
    errors = _check_accepted(studies, name)
    accepted = [s for s in studies if s.accepted]
    complete = watcher.wait(accepted, args.timeout, pipeline.alive, name, stall=args.stall_timeout)
    pipeline.mark_cpu(f"{name}-end")
    delivered = [s for s in studies if s.present_at is not None]
    last = max((s.present_at for s in delivered), default=None)  # type: ignore[type-var]
    seconds = (last - started) if last is not None else None
    ok = complete and not errors and len(delivered) == len(studies)
    report: dict[str, Any] = {
        "studies": len(studies),
        "accepted": len(accepted),
        "delivered": len(delivered),
        "latency_ms": summary_ms([s.latency_s for s in delivered]),  # type: ignore[misc]
        "throughput": {
            "seconds": round(seconds, 2) if seconds else None,
            "send_seconds": round(sent_seconds, 2),
            "studies_per_s": round(len(delivered) / seconds, 2) if seconds else None,
            "instances_per_s": (
                round(len(delivered) * args.instances / seconds, 1) if seconds else None
            ),
        },
        "first_errors": errors,
    }
    if lateness is not None:
        report["latest_send_late_ms"] = round(lateness * 1000, 1)
    return report, ok


def _undelivered(study: Study, events: PipelineEvents) -> dict[str, Any]:
    reached = [stage for stage, by_cid in events.stamps.items() if study.correlation_id in by_cid]
    return {
        "study": study.name,
        "correlation_id": study.correlation_id,
        "stow_status": study.status,
        "last_stage": reached[-1] if reached else None,
        "delivered_outcomes": events.delivered.get(study.correlation_id),
    }


def _met(value: float | None, name: str) -> bool:
    return value is not None and value < TARGETS[name]


def _drop_state(work: Path) -> None:
    """Keep the logs; the assembly worker's RocksDB and the spool go."""
    for name in ("ingest-assembly-state", "spool"):
        shutil.rmtree(work / name, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.deliver", description=__doc__.split("\n")[0]
    )
    p.add_argument("--studies", type=int, default=200, help="studies in the paced phase")
    p.add_argument(
        "--paced-rate", type=float, default=2.0, help="studies/s sent in the paced phase"
    )
    p.add_argument("--flood-studies", type=int, default=200, help="studies in the flood phase")
    p.add_argument("--instances", type=int, default=20, help="instances per study")
    p.add_argument("--routine-backlog", type=int, default=500, help="routine studies queued")
    p.add_argument("--concurrency", type=int, default=8, help="STOW-RS requests in flight")
    p.add_argument("--warmup", type=int, default=2, help="studies sent through first, one by one")
    p.add_argument("--image-size", type=int, default=64, help="rows = columns of each image")
    p.add_argument("--poll-ms", type=float, default=50.0, help="Orthanc /changes poll interval")
    p.add_argument("--timeout", type=float, default=900.0, help="per phase, seconds")
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        help="give up on the missing studies when none became present for this long",
    )
    p.add_argument(
        "--start-timeout", type=float, default=240.0, help="for a warm-up study, seconds"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 10 paced and 10 flood studies, a backlog of 20, 1 warm-up",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.studies, args.flood_studies, args.routine_backlog, args.warmup = 10, 10, 20, 1
    if min(args.studies, args.flood_studies, args.instances, args.concurrency, args.warmup) < 1:
        p.error(
            "--studies, --flood-studies, --instances, --concurrency and --warmup must be at least 1"
        )
    if args.paced_rate <= 0:
        p.error("--paced-rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM like Ctrl-C: unwind, so everything started is stopped by pid.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report, ok = run(args)
    except BenchError as exc:
        log(f"failed: {exc}")
        return 1
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
