"""What the resilience test runs and checks: a private platform, the services as supervised
processes, a paced STOW-RS stream of studies, and the three places a study must end up.

Everything here runs beside the shared development platform without touching it: the platform
is started with the real CLI on a state directory and free ports of its own (its broker is
restarted mid-stream, and the services join the production consumer groups), the services run
with the command lines of ``deploy.local.services.specs()`` on free ports, and the receiving
hospital is a real Orthanc.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import psycopg
from pydicom.uid import generate_uid

from deploy.local.config import LocalConfig
from deploy.local.kafka import Kafka
from deploy.local.orthanc import OrthancPeer
from deploy.local.processes import http_ready
from deploy.local.services import ServiceSpec, specs
from shared.identifiers import BSN_SYSTEM, is_valid_bsn
from tests.dicom_samples import bsn_item, make_dicom_bytes
from tests.e2e import harness

DELIVERED_TOPIC = "delivered"
STUDY_RECEIVED_TOPIC = "study-received"
REFERENCED_SOP_SEQUENCE = "00081199"


def log(message: str) -> None:
    print(f"[resilience {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def valid_test_bsns(count: int) -> list[str]:
    """Valid BSNs from the government's test range (99999xxxx, passing the 11-proof)."""
    found = [str(n) for n in range(999_990_000, 1_000_000_000) if is_valid_bsn(str(n))]
    return found[:count]


# -- the platform -----------------------------------------------------------------------------


class PrivatePlatform(harness.PrivatePlatform):
    """The test's own platform (see harness.PrivatePlatform), whose broker the test restarts."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._broker_restarted = False

    @property
    def bootstrap(self) -> str:
        return self.client_env["BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS"]

    def token(self, ura: str, role: str, uzi: str | None = None, purpose: str | None = None) -> str:
        """A bearer token from the platform's dev issuer (`beeldportaal token mint`)."""
        args = ["token", "mint", "--ura", ura, "--role", role, "--ttl", "7200"]
        if uzi is not None:
            args += ["--uzi", uzi]
        if purpose is not None:
            args += ["--purpose", purpose]
        return self.cli(*args, timeout=60).strip().splitlines()[-1]

    def restart_broker(self, pause: float) -> tuple[float, float]:
        """Stop the broker (SIGTERM, as an operator would), wait, start it on the same ports and
        data. Returns (seconds it took to stop, seconds from the start until it answered)."""
        kafka = Kafka(self.config)
        began = time.monotonic()
        if not kafka.stop():
            raise RuntimeError("the private Kafka broker was not running")
        stopped = time.monotonic()
        time.sleep(pause)
        started = time.monotonic()
        kafka.start()  # waits until the broker answers
        self._broker_restarted = True
        return stopped - began, time.monotonic() - started

    def purge(self) -> None:
        if self._broker_restarted:
            # That broker is a child of this process: stop it here, so that it is reaped.
            with contextlib.suppress(Exception):
                Kafka(self.config).stop()
        super().purge()


# -- the services -----------------------------------------------------------------------------


@dataclass
class Service:
    """One `beeldportaal <service> <action>` process, restartable with the same argv and env."""

    spec: ServiceSpec
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            out.write(f"\n==== start {self.starts + 1} at {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        return self.spec.ready_url is None or http_ready(self.spec.ready_url)

    def wait_ready(self, timeout: float) -> float:
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if not self.running():
                raise RuntimeError(f"{self.name} exited while starting:\n{self.log_tail()}")
            if self.ready():
                return time.monotonic() - began
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def kill9(self) -> int:
        assert self.proc is not None and self.running(), f"{self.name} is not running"
        pid = self.proc.pid
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return pid

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None:
            harness.terminate(self.proc, timeout)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class Services:
    """Every process of ``deploy.local.services.specs()``, on free ports, supervised.

    The supervisor restarts a process that exits on its own (as Kubernetes or systemd would) and
    records it in ``unexpected_exits``: a service that crashes is worth knowing about even when
    the restart hides it.
    """

    def __init__(
        self,
        config: LocalConfig,
        client_env: Mapping[str, str],
        workdir: Path,
        *,
        peers_file: Path,
        extra_env: Mapping[str, str],
    ) -> None:
        ports = harness.service_ports()
        (config.state_dir / "services" / "spool").mkdir(parents=True, exist_ok=True)
        with mock.patch.dict(
            os.environ, {**ports, "BEELDPORTAAL_INGEST_PEERS_FILE": str(peers_file)}
        ):
            self.specs = specs(config)  # reads the ports and the peers file from the environment
        self.ports = ports
        base = {**harness.inherited_env(), **client_env, **extra_env}
        self.services: dict[str, Service] = {}
        for spec in self.specs:
            marker = str(workdir / spec.name)
            argv = [sys.executable, "-m", "deploy.cli", *spec.args, "--tag", marker]
            env = {**base, **spec.env}
            self.services[spec.name] = Service(spec, argv, env, workdir / f"{spec.name}.log")
        self.unexpected_exits: list[str] = []
        self._lock = threading.Lock()
        self._held: set[str] = set()  # being killed and restarted by the test: not supervised
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="supervisor", daemon=True)

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    @property
    def names(self) -> list[str]:
        return list(self.services)

    def url(self, setting: str) -> str:
        return f"http://127.0.0.1:{self.ports[f'BEELDPORTAAL_{setting}']}"

    def start_all(self, timeout: float = 120) -> None:
        for service in self.services.values():
            service.start()
        for service in self.services.values():
            service.wait_ready(timeout)
        self._thread.start()

    def stop_all(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        for service in reversed(list(self.services.values())):
            try:
                service.stop()
            except Exception as exc:  # cleanup goes on with the others
                log(f"stopping {service.name}: {exc!r}")

    def kill_and_restart(
        self,
        name: str,
        pause: float,
        ready_timeout: float = 120,
        after_kill: Callable[[], None] | None = None,
    ) -> float:
        """SIGKILL, wait ``pause`` seconds, start again; seconds from the start until ready."""
        service = self.services[name]
        with self._lock:
            self._held.add(name)
        try:
            pid = service.kill9()
            log(f"kill -9 {name} (pid {pid})")
            if after_kill is not None:
                after_kill()
            time.sleep(pause)
            service.start()
            took = service.wait_ready(ready_timeout)
            log(f"{name} restarted (pid {service.proc.pid if service.proc else '?'}), "
                f"ready in {took:.1f}s")  # fmt: skip
            return took
        finally:
            with self._lock:
                self._held.discard(name)

    def all_ready(self) -> list[str]:
        """Names of the services that are not running and ready."""
        return [s.name for s in self.services.values() if not (s.running() and s.ready())]

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            for service in self.services.values():
                with self._lock:
                    if service.name in self._held or service.running() or self._stop.is_set():
                        continue
                    code = service.proc.returncode if service.proc else None
                    note = f"{service.name} exited on its own (code {code}); restarted"
                    self.unexpected_exits.append(note)
                    log(note + f"\n{service.log_tail(15)}")
                    service.start()

    def diagnosis(self, lines: int = 6) -> str:
        """Per service: its most frequent warnings and errors, then the last lines of its log."""
        return "\n".join(
            f"---- {s.name} ({s.log_path}, started {s.starts}x) ----\n"
            f"{log_digest(s.log_path)}\n  last lines:\n{s.log_tail(lines)}"
            for s in self.services.values()
        )


# aiokafka's complaints while the broker is away: counted as one line, so the rest shows.
BROKER_AWAY = ("Unable connect to node", "Unable to update metadata", "NodeNotReadyError")


def log_digest(path: Path, top: int = 6) -> str:
    """The most frequent warning and error events of a JSON-lines service log, with counts."""
    counts: Counter[str] = Counter()
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "  (no log)"
    for line in text.splitlines():
        if '"level": "warning"' not in line and '"level": "error"' not in line:
            if "Traceback" in line or line.startswith(("ERROR", "CRITICAL")):
                counts[line[:160]] += 1
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        what = f"{record.get('level')}: {record.get('event')}"
        if any(noise in what for noise in BROKER_AWAY):
            what = "(aiokafka: broker unreachable / not ready, all kinds)"
        elif record.get("error"):
            what += f" ({str(record['error'])[:120]})"
        counts[what[:220]] += 1
    if not counts:
        return "  no warnings or errors"
    return "\n".join(f"  {n:6d} x {what}" for what, n in counts.most_common(top))


def kafka_log_digest(path: Path, top: int = 6) -> str:
    """The broker's ERROR lines by exception, e.g. producers rejected for a sequence gap."""
    counts: Counter[str] = Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "  (no broker log)"
    for line in lines:
        if line.startswith("org.apache.kafka") and "Exception" in line:
            head, _, message = line.partition(": ")
            # Grouped without the numbers (offsets, sequence numbers) but with the partition.
            message = re.sub(r"(?<![\w-])\d+(?![\w-])", "N", message)
            counts[f"{head.rsplit('.', 1)[-1]}: {message[:150]}"] += 1
    if not counts:
        return "  no exceptions"
    return "\n".join(f"  {n:6d} x {what}" for what, n in counts.most_common(top))


# -- the studies and the stream ---------------------------------------------------------------


def orthanc_id(*parts: str) -> str:
    """Orthanc's resource id: SHA-1 of the identifying values joined by '|', 5 groups of 8."""
    digest = hashlib.sha1("|".join(parts).encode()).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


@dataclass
class Study:
    uid: str
    series_uid: str
    bsn: str
    sop_uids: list[str]
    body: bytes
    content_type: str
    attempts: int = 0
    accepted_at: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def orthanc_ids(self) -> list[str]:
        # The receiver keeps the Patient ID as sent (coercion profile "none"): the BSN.
        return [orthanc_id(self.bsn, self.uid, self.series_uid, sop) for sop in self.sop_uids]


def make_studies(count: int, bsns: list[str], label: str) -> list[Study]:
    """``count`` small CT studies (1 or 2 instances of 4x4 pixels), patients round robin."""
    studies = []
    for n in range(count):
        bsn = bsns[n % len(bsns)]
        study_uid, series_uid = generate_uid(), generate_uid()
        sops = [generate_uid() for _ in range(1 + n % 2)]
        instances = [
            make_dicom_bytes(
                patient=bsn_item(bsn),
                StudyInstanceUID=study_uid,
                SeriesInstanceUID=series_uid,
                SOPInstanceUID=sop,
                InstanceNumber=number,
                AccessionNumber=f"R{label[:3].upper()}{n:05d}",
                StudyDescription=f"resilience {label} {n}",
                StudyDate="20250101",
            )
            for number, sop in enumerate(sops, start=1)
        ]
        boundary = uuid.uuid4().hex
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                for data in instances
            )
            + f"--{boundary}--\r\n".encode()
        )
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        studies.append(Study(study_uid, series_uid, bsn, sops, body, content_type))
    return studies


class Stream:
    """Sends the studies at a steady pace, one STOW-RS request each, from ``clients`` threads.

    A request that fails (ingest down, 503, a cut connection) is sent again, identical, after a
    short wait, as a hospital's PACS would; a study is done when ingest answered 200 naming
    every instance. Identical bytes are idempotent at ingest.
    """

    def __init__(
        self,
        stow_base: str,
        token: str,
        studies: list[Study],
        *,
        interval: float,
        clients: int = 3,
        give_up_after: float = 240,
    ) -> None:
        url = urllib.parse.urlsplit(stow_base)
        self.host, self.port, self.path = url.hostname or "127.0.0.1", url.port or 80, url.path
        self.token = token
        self.studies = studies
        self.interval = interval
        self.give_up_after = give_up_after
        self._queue: queue.SimpleQueue[Study | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._client, name=f"stow-{i}", daemon=True)
            for i in range(clients)
        ]
        self._pacer = threading.Thread(target=self._pace, name="stow-pacer", daemon=True)
        self._closed = threading.Event()
        self._accepted = 0
        self._queued = 0
        self._lock = threading.Lock()
        self.started_at = 0.0
        self.finished_at: float | None = None

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def accepted(self) -> int:
        with self._lock:
            return self._accepted

    def start(self) -> Stream:
        self.started_at = time.monotonic()
        for thread in self._threads:
            thread.start()
        self._pacer.start()
        return self

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for thread in [self._pacer, *self._threads]:
            thread.join(max(0.0, deadline - time.monotonic()))
        done = not any(t.is_alive() for t in [self._pacer, *self._threads])
        if done and self.finished_at is None:
            self.finished_at = time.monotonic()
        return done

    def close(self) -> None:
        """Stop sending (what is not accepted by now stays so) and wait for the clients."""
        self._closed.set()
        for thread in [self._pacer, *self._threads]:
            if thread.is_alive():
                thread.join(70)

    def wait_queued(self, count: int) -> None:
        while self._queued < count and self._pacer.is_alive():
            time.sleep(0.05)

    def _pace(self) -> None:
        next_at = time.monotonic()
        for study in self.studies:
            if self._closed.wait(max(0.0, next_at - time.monotonic())):
                break
            self._queue.put(study)
            self._queued += 1
            next_at += self.interval
        for _ in self._threads:
            self._queue.put(None)

    def _client(self) -> None:
        conn: http.client.HTTPConnection | None = None
        try:
            while (study := self._queue.get()) is not None:
                began = time.monotonic()
                while True:
                    if conn is None:
                        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                    ok, conn = self._send(conn, study)
                    if ok:
                        with self._lock:
                            self._accepted += 1
                        break
                    if time.monotonic() - began > self.give_up_after:
                        break
                    if self._closed.wait(0.5):
                        return
        finally:
            if conn is not None:
                conn.close()

    def _send(
        self, conn: http.client.HTTPConnection, study: Study
    ) -> tuple[bool, http.client.HTTPConnection | None]:
        study.attempts += 1
        headers = {
            "Content-Type": study.content_type,
            "Accept": "application/dicom+json",
            "Authorization": f"Bearer {self.token}",
            "X-Beeldportaal-Study-Complete": "true",
        }
        try:
            conn.request("POST", f"{self.path}/{study.uid}", body=study.body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            study.errors.append(type(exc).__name__)
            return False, None
        stored: list[Any] = []
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            stored = json.loads(payload).get(REFERENCED_SOP_SEQUENCE, {}).get("Value", [])
        if response.status == 200 and len(stored) == len(study.sop_uids):
            study.accepted_at = time.monotonic()
            return True, conn
        study.errors.append(f"HTTP {response.status}")
        return False, conn


# -- consent for the timeline -----------------------------------------------------------------


def post_json(url: str, body: Any, token: str, content_type: str = "application/json") -> int:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": content_type, "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {url} -> {exc.code}: {exc.read()[:800]!r}") from None


# -- where a study must end up ----------------------------------------------------------------


def read_topic(bootstrap: str, name: str, timeout: float = 60) -> list[dict[str, Any]]:
    """Every committed record of a topic (read_committed, offset 0 to the end): the value as
    JSON plus ``_schema``, ``_partition`` and ``_offset``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from shared.topics import topic

    async def read() -> list[dict[str, Any]]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            isolation_level="read_committed",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        try:
            parts = [TopicPartition(name, p) for p in range(topic(name).partitions)]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            ends = await consumer.end_offsets(parts)  # read_committed: the last stable offsets
            out: list[dict[str, Any]] = []
            deadline = time.monotonic() + timeout
            while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not read {name} to its end")
                batch = await consumer.getmany(timeout_ms=300)
                for records in batch.values():
                    for record in records:
                        value = json.loads(record.value)
                        headers = dict(record.headers)
                        value["_schema"] = headers.get("schema", b"").decode()
                        value["_partition"], value["_offset"] = record.partition, record.offset
                        out.append(value)
            return out
        finally:
            await consumer.stop()

    return asyncio.run(read())


def announced_versions(
    bootstrap: str, uids: Iterable[str]
) -> dict[str, list[tuple[int, int, int]]]:
    """Per study: (version, instances it adds, instances in all) of each ``study-received``."""
    wanted = set(uids)
    found: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for event in read_topic(bootstrap, STUDY_RECEIVED_TOPIC):
        study = event["study"]
        if study["study_instance_uid"] in wanted:
            found[study["study_instance_uid"]].append(
                (study["version"], len(study["new_sop_instance_uids"]), len(study["instances"]))
            )
    return {uid: sorted(v) for uid, v in found.items()}


def orthanc_instances(peer: OrthancPeer) -> set[str]:
    return set(peer.rest("GET", "/instances", timeout=30))


def timeline_rows(dsn: str, uids: list[str]) -> tuple[set[str], set[str]]:
    """(studies visible on the timeline, studies the timeline knows were delivered)."""
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        visible = conn.execute(
            "SELECT study_instance_uid FROM timeline_studies"
            " WHERE visible AND study_instance_uid = ANY(%s)",
            (uids,),
        ).fetchall()
        delivered = conn.execute(
            "SELECT DISTINCT study_instance_uid FROM timeline_deliveries"
            " WHERE study_instance_uid = ANY(%s)",
            (uids,),
        ).fetchall()
    return {r[0] for r in visible}, {r[0] for r in delivered}


def fhir_timeline(base_url: str, token: str, bsn: str) -> set[str]:
    """Study Instance UIDs the FHIR timeline search shows the requester for one patient."""
    form = urllib.parse.urlencode(
        {"patient.identifier": f"{BSN_SYSTEM}|{bsn}", "_type": "ImagingStudy", "_count": "100"}
    ).encode()
    request = urllib.request.Request(
        f"{base_url}/fhir/ImagingStudy/_search",
        data=form,
        method="POST",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Authorization": f"Bearer {token}",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        bundle = json.loads(answer.read())
    uids = set()
    for entry in bundle.get("entry", []):
        for identifier in entry.get("resource", {}).get("identifier", []):
            value = identifier.get("value", "")
            if value.startswith("urn:oid:"):
                uids.add(value.removeprefix("urn:oid:"))
    return uids


@dataclass
class Outcome:
    """Where the studies of one run are, and what is missing or doubled."""

    studies: int
    missing_instances: dict[str, int]  # study uid -> instances not in Orthanc
    delivered: dict[tuple[str, int, str, str], list[dict[str, Any]]]  # per (study, v, ura, ep)
    undelivered: list[str]  # studies without any `delivered` event
    not_visible: list[str]  # studies not (yet) visible on the timeline
    no_timeline_delivery: list[str]  # studies whose delivery the timeline did not record
    failed_outcomes: list[str]  # delivered events reporting failed instances

    @property
    def doubled(self) -> dict[tuple[str, int, str, str], list[dict[str, Any]]]:
        return {k: v for k, v in self.delivered.items() if len(v) > 1}

    @property
    def complete(self) -> bool:
        return not (
            self.missing_instances
            or self.undelivered
            or self.not_visible
            or self.no_timeline_delivery
        )

    def versions(self) -> Counter[int]:
        return Counter(key[1] for key in self.delivered)

    def resent(self) -> list[tuple[str, int, int, int]]:
        """Deliveries that found instances already present (a repeated send after a crash, or
        a retry): (study, version, attempts, instances already present)."""
        return [
            (k[0], k[1], e["attempts"], e["outcomes"].get("already_present", 0))
            for k, events in self.delivered.items()
            for e in events
            if e["outcomes"].get("already_present") or e["attempts"] > 1
        ]

    def summary(self) -> str:
        doubled = self.doubled
        lines = [
            f"{self.studies} studies: {len(self.missing_instances)} incomplete in Orthanc, "
            f"{len(self.undelivered)} without a delivered event, {len(doubled)} (study, version,"
            f" destination) with more than one delivered event, {len(self.not_visible)} not on"
            f" the timeline, {len(self.no_timeline_delivery)} without the timeline's delivery"
            f" record, {len(self.failed_outcomes)} delivered events with failed instances;"
            f" delivered versions {dict(self.versions())}",
        ]
        for title, items in (
            ("incomplete in Orthanc (study: instances missing)", self.missing_instances.items()),
            ("no delivered event", self.undelivered),
            ("not on the timeline", self.not_visible),
            ("no delivery in the timeline", self.no_timeline_delivery),
            ("failed instances", self.failed_outcomes),
        ):
            listed = list(items)
            if listed:
                lines.append(f"  {title}: {listed[:20]}{' ...' if len(listed) > 20 else ''}")
        for key, events in list(doubled.items())[:20]:
            where = [
                (e["event_id"], e["_partition"], e["_offset"], e["attempts"], e["occurred_at"])
                for e in events
            ]
            lines.append(f"  doubled {key}: (event_id, partition, offset, attempts, at) {where}")
        return "\n".join(lines)


def observe(
    studies: list[Study],
    *,
    peer: OrthancPeer,
    bootstrap: str,
    dsn: str,
    endpoint: tuple[str, str],
) -> Outcome:
    uids = [s.uid for s in studies]
    wanted = set(uids)
    present = orthanc_instances(peer)
    missing = {s.uid: n for s in studies if (n := sum(i not in present for i in s.orthanc_ids)) > 0}
    delivered: dict[tuple[str, int, str, str], list[dict[str, Any]]] = defaultdict(list)
    failed = []
    for event in read_topic(bootstrap, DELIVERED_TOPIC):
        if event["study_instance_uid"] not in wanted:
            continue
        key = (
            event["study_instance_uid"],
            int(event["study_version"]),
            event["destination_ura"],
            event["endpoint_id"],
        )
        delivered[key].append(event)
        if event.get("outcomes", {}).get("failed"):
            failed.append(f"{key}: {event.get('refused')}")
    delivered_studies = {k[0] for k in delivered if (k[2], k[3]) == endpoint}
    visible, timeline_delivered = timeline_rows(dsn, uids)
    return Outcome(
        studies=len(studies),
        missing_instances=missing,
        delivered=dict(delivered),
        undelivered=[u for u in uids if u not in delivered_studies],
        not_visible=[u for u in uids if u not in visible],
        no_timeline_delivery=[u for u in uids if u not in timeline_delivered],
        failed_outcomes=failed,
    )


def converge(
    observe_now: Callable[[], Outcome], timeout: float, settle: float, every: float = 3.0
) -> tuple[Outcome, float]:
    """Observe until complete (or ``timeout``), then once more after ``settle`` seconds so that
    a late duplicate is seen too. Returns the last outcome and the seconds it took to complete."""
    began = time.monotonic()
    last_report = began
    outcome = observe_now()
    while not outcome.complete and time.monotonic() - began < timeout:
        time.sleep(every)
        outcome = observe_now()
        if time.monotonic() - last_report > 15:
            last_report = time.monotonic()
            log("converging: " + outcome.summary().splitlines()[0])
    took = time.monotonic() - began
    if outcome.complete:
        time.sleep(settle)
        outcome = observe_now()
    return outcome, took
