"""Ingest benchmark: STOW-RS 2,000 real DICOM instances into any STOW-RS endpoint, Orthanc built in.

    python -m benchmarks.ingest [--instances 2000] [--clients 4] [--per-request 20]
                                [--per-study 20] [--per-series 10] [--rounds 3]
                                [--target NAME=URL[,pid=N][,header=K:V]...] [--no-orthanc]

The instances are pydicom's own test images (``pydicom.data``; nothing is downloaded): every
well-formed single-frame image with a file meta header, in a little-endian uncompressed or an
image-compressed transfer syntax (JPEG, JPEG-LS, JPEG 2000, RLE), cycled round-robin. Every copy
gets a fresh SOP Instance UID; every ``--per-study`` consecutive copies are one study of one
patient (fresh Study Instance UID and Patient ID), in series of ``--per-series``, as a PACS sends
a study. ``--per-study 1 --per-series 1`` gives every instance a study of its own (the layout
before 2026-11-26). The multipart/related request bodies of ``--per-request`` instances are all
built before the clock starts; a target gets its own UIDs, so no target sees another one's
instances.

``--rounds`` turns are taken: in each, every target in turn, each built-in one a fresh server.
A target reports its median round (by instances/s), with every round listed under ``rounds``;
``ratios_vs_orthanc`` compares the median rounds and lists the ratio of each round's pair. On
this shared 2-core machine one run of one target differs from the next by up to a quarter.

``--clients`` threads each hold one keep-alive ``http.client`` connection (TCP_NODELAY) and POST
the pre-built bodies from a shared queue as fast as the server answers. Measured per target, from
the first request to the last answer: ``instances_per_s``, ``mb_per_s`` (DICOM bytes, MB = 10^6),
``request_latency_ms`` p50/p99, and ``peak_rss_mb`` of the server process and its children
(``VmHWM`` from /proc, MB = 2^20 bytes; without a pid it is null), and CPU per instance of the
server and, where the target has one of its own, of its storage process (beeldportaal's S3
server; Kafka's broker is shared with the platform and not counted). A failure is an instance the
server did not list in the STOW-RS ReferencedSOPSequence (0008,1199) of a 2xx answer.

The built-in Orthanc target is a fresh Orthanc (Debian package, DICOMweb plugin, TCP_NODELAY=1);
its instance count is verified over REST afterwards: it must hold exactly the instances sent.
The built-in beeldportaal target is ``beeldportaal ingest serve`` with the local platform's
Kafka and a fresh versitygw of its own; what is durable in its bucket is counted afterwards.
Both keep what they store side by side in one directory (``--state-dir``, default a temporary
one), deleted only after every target was measured. Any other running STOW-RS endpoint is
measured with ``--target``, e.g. beeldportaal's ingest::

    --target "beeldportaal=$URL,pid=$PID,header=Authorization:Bearer $TOKEN"

with URL=http://127.0.0.1:<port>/dicomweb/to/<URA>/studies and PID its server process.
A target given a pid reports ``VmHWM`` since that process started, not since this run.

Stdout is one JSON object (``targets.<name>``, ``ratios_vs_orthanc.<name>``); progress goes to
stderr. Exit status 0 when every instance was stored (and Orthanc's count matches), else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import platform
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_files
from pydicom.datadict import dictionary_has_tag
from pydicom.dataset import FileDataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from deploy.local.orthanc import OrthancConfig, OrthancPeer

# Files pydicom ships as deliberately broken although they parse (see pydicom's test_files docs).
KNOWN_MALFORMED = frozenset(
    {"J2K_pixelrep_mismatch.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"}
)
UNCOMPRESSED = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"


def log(message: str) -> None:
    print(f"[ingest] {message}", file=sys.stderr, flush=True)


# -- what is sent -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    name: str
    dataset: FileDataset
    transfer_syntax: UID
    size: int


def select_sources() -> list[Source]:
    """Well-formed single-frame images among pydicom's top-level test files."""
    root = Path(pydicom.data.__file__).parent / "test_files"
    sources = []
    for path in sorted(Path(p) for p in get_testdata_files()):
        if path.parent != root or not path.is_file() or path.name in KNOWN_MALFORMED:
            continue
        dataset = _read_well_formed(path)
        if dataset is not None:
            ts = UID(dataset.file_meta.TransferSyntaxUID)
            sources.append(Source(path.name, dataset, ts, path.stat().st_size))
    if not sources:
        raise RuntimeError("no usable pydicom test images found")
    return sources


def _read_well_formed(path: Path) -> FileDataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pydicom warns about every irregularity it repairs
            ds = pydicom.dcmread(path)  # no force: a preamble and file meta are required
            ts = UID(ds.file_meta.TransferSyntaxUID)
            if "PixelData" not in ds or "SOPClassUID" not in ds or "Rows" not in ds:
                return None
            if int(ds.get("NumberOfFrames", 1) or 1) != 1:
                return None
            if any(e.VR == "UN" and dictionary_has_tag(e.tag) for e in ds.elements()):
                return None  # known attributes encoded as UN (rtdose_rle_1frame.dcm)
            if ts.is_compressed and not ts.is_deflated:
                frames = list(generate_frames(ds.PixelData, number_of_frames=1))
                return ds if len(frames) == 1 and frames[0] else None
            if ts in UNCOMPRESSED:
                samples = 2 if ds.PhotometricInterpretation == "YBR_FULL_422" else 1
                samples = max(samples, int(ds.SamplesPerPixel))
                expected = ds.Rows * ds.Columns * samples * ds.BitsAllocated // 8
                return ds if len(ds.PixelData) in (expected, expected + 1) else None
            return None  # big endian (retired) and deflated: not what hospitals send
    except Exception:
        return None


def build_instances(
    sources: list[Source], count: int, per_study: int = 20, per_series: int = 10
) -> list[bytes]:
    """``count`` Part 10 files cycling through ``sources``, with fresh UIDs, laid out as studies:
    every ``per_study`` consecutive instances are one study of one patient, in series of
    ``per_series``. ``per_study=1`` gives every instance a study of its own."""
    instances = []
    study_uid = series_uid = ""
    patient = 0
    for i in range(count):
        ds = sources[i % len(sources)].dataset
        in_study = i % per_study
        if in_study == 0:
            study_uid = _uid()
            patient = i // per_study
        if in_study % per_series == 0:
            series_uid = _uid()
        ds.PatientID = f"BENCH{patient:07d}"
        ds.PatientName = f"Bench^Patient{patient}"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = _uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = io.BytesIO()
        ds.save_as(buffer)
        instances.append(buffer.getvalue())
    return instances


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


@dataclass(frozen=True)
class Body:
    data: bytes
    content_type: str
    instances: int
    dicom_bytes: int


def build_bodies(instances: list[bytes], per_request: int) -> list[Body]:
    bodies = []
    for start in range(0, len(instances), per_request):
        chunk = instances[start : start + per_request]
        boundary = uuid.uuid4().hex
        parts = []
        for instance in chunk:
            parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            parts.append(instance)
            parts.append(b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        bodies.append(Body(b"".join(parts), content_type, len(chunk), sum(map(len, chunk))))
    return bodies


# -- where it is sent -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A running STOW-RS endpoint: its ``stow_url`` (ending in ``/studies``), extra headers and
    the pid of its server process (for peak RSS), if known."""

    name: str
    stow_url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    pid: int | None = None
    # A process of the target's own besides its server, whose CPU and memory count too
    # (beeldportaal's S3 server; Orthanc stores in its own process).
    storage_pid: int | None = None


def parse_target(spec: str) -> Target:
    """``name=url[,pid=N][,header=K:V]...`` (commas inside the URL are fine)."""
    head, *options = re.split(r",(?=(?:pid|header)=)", spec)
    name, sep, url = head.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected NAME=URL[,pid=N][,header=K:V]: {spec!r}")
    pid = None
    headers: dict[str, str] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key == "pid":
            pid = int(value)
        else:
            header, colon, header_value = value.partition(":")
            if not colon:
                raise argparse.ArgumentTypeError(f"header needs K:V, got {value!r}")
            headers[header.strip()] = header_value.strip()
    return Target(name, url, headers, pid)


@contextlib.contextmanager
def orthanc_target(state_dir: Path) -> Iterator[tuple[Target, OrthancPeer]]:
    """A fresh Orthanc keeping its storage and index in ``state_dir``, stopped afterwards. The
    directory is left for its owner to delete."""
    with contextlib.ExitStack() as stack:
        peer = OrthancPeer(state_dir / "orthanc", OrthancConfig(aet="BENCH", stable_age=3600))
        stack.callback(peer.stop)
        peer.start()
        log(f"orthanc {peer.rest('GET', '/system')['Version']} pid {peer.pid} on {peer.base_url}")
        yield Target("orthanc", peer.stow_url, {}, peer.pid), peer


def _s3_env(server: Any) -> dict[str, str]:
    env = server.config.client_env()
    return {name: value for name, value in env.items() if name.startswith("BEELDPORTAAL_S3_")}


BENCH_SENDER = "00000001"
BENCH_RECIPIENT = "00000002"


@contextlib.contextmanager
def beeldportaal_target(state_dir: Path) -> Iterator[tuple[Target, Any]]:
    """``beeldportaal ingest serve`` as its own process, with the running local platform's
    Kafka and a fresh S3 server (the platform's versitygw build) keeping its objects in
    ``state_dir``, as Orthanc keeps its own; both are stopped afterwards, and the directory is
    left for its owner to delete. The second value counts what is durably in the bucket, to
    check that every acknowledged instance really was stored.
    """
    from deploy.local.config import LocalConfig, read_env_file
    from deploy.local.s3 import S3Server
    from shared.auth import mint_token

    config = LocalConfig.from_env()
    if not config.env_file.exists():
        raise SystemExit("the local platform is not up: run `beeldportaal platform up` first")
    bucket = "bench"
    with contextlib.ExitStack() as stack:
        work = state_dir / "beeldportaal"
        s3_server = S3Server(replace(config, state_dir=work, s3_port=_free_port()))
        stack.callback(s3_server.stop)
        s3_server.start()
        s3 = s3_server.client()
        s3.make_bucket(bucket)
        env = {**os.environ, **read_env_file(config.env_file), **_s3_env(s3_server)}
        peers = work / "peers.json"
        peers.write_text(
            json.dumps(
                {
                    "organisations": [
                        {"ura": BENCH_SENDER, "name": "Bench sender"},
                        {"ura": BENCH_RECIPIENT, "name": "Bench recipient"},
                    ]
                }
            )
        )
        http_port, dimse_port = _free_port(), _free_port()
        env.update(
            BEELDPORTAAL_S3_BUCKET=bucket,
            BEELDPORTAAL_INGEST_HTTP_PORT=str(http_port),
            BEELDPORTAAL_INGEST_DIMSE_PORT=str(dimse_port),
            BEELDPORTAAL_INGEST_PEERS_FILE=str(peers),
            BEELDPORTAAL_INGEST_SPOOL_DIR=str(work),
            BEELDPORTAAL_INGEST_LOG_LEVEL="WARNING",
        )
        log_file = open(work / "ingest.log", "wb")  # noqa: SIM115 - closed by the stack
        stack.callback(log_file.close)
        # BENCH_PROFILE=<dir>: the server runs under cProfile (its event loop thread), written
        # to <dir>/ingest.prof when it stops (benchmarks/profiled.py).
        profile = os.environ.get("BENCH_PROFILE")
        run = (
            ["-m", "benchmarks.profiled", f"{profile}/ingest.prof", "deploy.cli"]
            if profile
            else ["-m", "deploy.cli"]
        )
        server = subprocess.Popen(
            [sys.executable, *run, "ingest", "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )

        def stop() -> None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)

        stack.callback(stop)
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    "beeldportaal ingest did not become ready:\n"
                    + (work / "ingest.log").read_text(errors="replace")[-3000:]
                )
            time.sleep(0.2)

        def durable_instances() -> int:
            return sum(
                1
                for obj in s3.list_objects(bucket, prefix=f"{BENCH_SENDER}/", recursive=True)
                if obj.object_name.endswith(".dcm")
            )

        token = mint_token(config.dev_jwt_dir / "dev-jwt.key", ura=BENCH_SENDER)
        log(f"beeldportaal ingest pid {server.pid} on {base}, S3 on {s3_server.endpoint}")
        yield (
            Target(
                "beeldportaal",
                f"{base}/dicomweb/to/{BENCH_RECIPIENT}/studies",
                {"Authorization": f"Bearer {token}"},
                server.pid,
                s3_server.process.pid(),
            ),
            durable_instances,
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- measuring --------------------------------------------------------------------------------


class RssWatcher:
    """Peak RSS of a process tree: the ``VmHWM`` of every pid seen in it while running."""

    def __init__(self, pid: int | None, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.hwm_kb: dict[int, int] = {}
        self.first_ticks: dict[int, int] = {}
        self.last_ticks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> RssWatcher:
        if self.pid is not None:
            self.sample()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pid is not None:
            self._stop.set()
            self._thread.join()
            self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        assert self.pid is not None
        for pid in _process_tree(self.pid):
            hwm = _status_kb(pid, "VmHWM")
            if hwm is not None:
                self.hwm_kb[pid] = max(hwm, self.hwm_kb.get(pid, 0))
            ticks = _cpu_ticks(pid)
            if ticks is not None:
                self.first_ticks.setdefault(pid, ticks)
                self.last_ticks[pid] = ticks

    @property
    def cpu_s(self) -> float | None:
        """CPU time (user + system) the tree used while watched."""
        if not self.last_ticks:
            return None
        ticks = sum(self.last_ticks[p] - self.first_ticks[p] for p in self.last_ticks)
        return ticks / os.sysconf("SC_CLK_TCK")

    @property
    def peak_mb(self) -> float | None:
        return round(sum(self.hwm_kb.values()) / 1024, 1) if self.hwm_kb else None


def _process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in (task / "children").read_text().split())
    return tree


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime


def _status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class RequestOutcome:
    latency_s: float
    status: int
    stored: int
    failed: int
    error: str | None = None
    reasons: list[str] = field(default_factory=list)


def _post(
    conn: http.client.HTTPConnection, path: str, body: Body, headers: Mapping[str, str]
) -> tuple[int, bytes]:
    request_headers = {
        "Content-Type": body.content_type,
        "Accept": "application/dicom+json",
        "Content-Length": str(len(body.data)),
        **headers,
    }
    conn.request("POST", path, body=body.data, headers=request_headers)
    response = conn.getresponse()
    return response.status, response.read()


def _count_stored(payload: bytes, sent: int) -> tuple[int, list[str]]:
    """Instances stored according to a PS3.18 STOW-RS answer, and the failure reasons given.

    The ReferencedSOPSequence counts whatever the status: Orthanc answers 400 when any instance
    of a request failed, yet stores and lists the others.
    """
    try:
        answer = json.loads(payload) if payload else {}
    except ValueError:
        answer = {}
    if not isinstance(answer, dict):
        return 0, []
    stored = len(answer.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", []))
    reasons = [
        str(item.get(FAILURE_REASON, {}).get("Value", ["?"])[0])
        for item in answer.get(FAILED_SOP_SEQUENCE, {}).get("Value", [])
    ]
    return min(stored, sent), reasons


def measure(
    target: Target, bodies: list[Body], clients: int, timeout: float = 300
) -> dict[str, Any]:
    url = urllib.parse.urlsplit(target.stow_url)
    if url.scheme != "http":
        raise ValueError(f"only http:// targets are supported: {target.stow_url}")
    path = url.path + (f"?{url.query}" if url.query else "")
    work: queue.SimpleQueue[Body] = queue.SimpleQueue()
    for body in bodies:
        work.put(body)
    outcomes: list[RequestOutcome] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)
    finished: list[float] = []

    def client() -> None:
        conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=timeout)
        conn.connect()  # sets TCP_NODELAY itself; connecting is outside the timed window
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ready.wait()
        try:
            while True:
                try:
                    body = work.get_nowait()
                except queue.Empty:
                    break
                started = time.perf_counter()
                try:
                    status, payload = _post(conn, path, body, target.headers)
                    latency = time.perf_counter() - started
                    stored, reasons = _count_stored(payload, body.instances)
                    failed = body.instances - stored
                    outcome = RequestOutcome(latency, status, stored, failed, reasons=reasons)
                    if failed and not reasons:
                        outcome.error = f"HTTP {status}: {payload[:300].decode(errors='replace')}"
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()  # reconnects on the next request
                    outcome = RequestOutcome(
                        time.perf_counter() - started, 0, 0, body.instances, repr(exc)
                    )
                with lock:
                    outcomes.append(outcome)
        finally:
            conn.close()
            with lock:
                finished.append(time.perf_counter())

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    load_before = os.getloadavg()[0]
    with RssWatcher(target.pid) as rss, RssWatcher(target.storage_pid) as storage:
        ready.wait()
        started = time.perf_counter()
        client_cpu = time.process_time()
        for thread in threads:
            thread.join()
        client_cpu = time.process_time() - client_cpu
    elapsed = max(finished) - started
    sent = sum(b.instances for b in bodies)
    stored = sum(o.stored for o in outcomes)
    stored_bytes = sum(b.dicom_bytes for b in bodies) * (stored / sent if sent else 0)
    latencies = sorted(o.latency_s * 1000 for o in outcomes)
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    errors = [o.error for o in outcomes if o.error][:5]
    reasons: dict[str, int] = {}
    for o in outcomes:
        for reason in o.reasons:
            reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "stow_url": target.stow_url,
        "instances": sent,
        "stored": stored,
        "failures": sent - stored,
        "requests": len(outcomes),
        "http_statuses": statuses,
        "seconds": round(elapsed, 3),
        "instances_per_s": round(stored / elapsed, 1),
        "mb_per_s": round(stored_bytes / 1e6 / elapsed, 2),
        "request_latency_ms": {
            "p50": round(_percentile(latencies, 50), 1),
            "p99": round(_percentile(latencies, 99), 1),
            "max": round(latencies[-1], 1) if latencies else None,
        },
        "peak_rss_mb": rss.peak_mb,
        # CPU per stored instance: comparable across runs even when the machine is shared.
        "server_cpu_ms_per_instance": (
            round(rss.cpu_s * 1000 / stored, 2) if rss.cpu_s is not None and stored else None
        ),
        # The target's storage process (beeldportaal's S3 server), and server plus storage:
        # what storing an instance costs the machine, Kafka's broker aside (it is shared).
        "storage_cpu_ms_per_instance": (
            round(storage.cpu_s * 1000 / stored, 2)
            if storage.cpu_s is not None and stored
            else None
        ),
        "storage_peak_rss_mb": storage.peak_mb,
        "server_and_storage_cpu_ms_per_instance": (
            round(((rss.cpu_s or 0.0) + (storage.cpu_s or 0.0)) * 1000 / stored, 2)
            if rss.cpu_s is not None and stored
            else None
        ),
        "client_cpu_ms_per_instance": round(client_cpu * 1000 / stored, 2) if stored else None,
        "load_avg_1m_before": round(load_before, 2),
        "server_pids": sorted(rss.hwm_kb),
        "failure_reasons": reasons,
        "first_errors": errors,
    }


def _percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]  # nearest-rank


def ratios(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    return {
        "instances_per_s": ratio(result["instances_per_s"], baseline["instances_per_s"]),
        "mb_per_s": ratio(result["mb_per_s"], baseline["mb_per_s"]),
        "latency_p50": ratio(
            result["request_latency_ms"]["p50"], baseline["request_latency_ms"]["p50"]
        ),
        "latency_p99": ratio(
            result["request_latency_ms"]["p99"], baseline["request_latency_ms"]["p99"]
        ),
        "peak_rss": ratio(result["peak_rss_mb"], baseline["peak_rss_mb"]),
        "server_cpu_per_instance": ratio(
            result["server_cpu_ms_per_instance"], baseline["server_cpu_ms_per_instance"]
        ),
        "server_and_storage_cpu_per_instance": ratio(
            result["server_and_storage_cpu_ms_per_instance"],
            baseline["server_and_storage_cpu_ms_per_instance"],
        ),
    }


# -- entry point ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ingest", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-request", type=int, default=20)
    parser.add_argument(
        "--per-study",
        type=int,
        default=20,
        help="consecutive instances that make one study of one patient (1: a study each)",
    )
    parser.add_argument("--per-series", type=int, default=10, help="instances per series")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="turns of every target, alternating; each target reports its median round",
    )
    parser.add_argument(
        "--target",
        type=parse_target,
        action="append",
        default=[],
        metavar="NAME=URL[,pid=N][,header=K:V]",
        help="a running STOW-RS endpoint to measure as well (repeatable)",
    )
    parser.add_argument("--no-orthanc", action="store_true", help="skip the built-in Orthanc")
    parser.add_argument(
        "--no-beeldportaal",
        action="store_true",
        help="skip the built-in beeldportaal ingest (needs `beeldportaal platform up`)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where the built-in targets keep what they store, side by side (default: a new "
        "temporary directory, deleted afterwards)",
    )
    args = parser.parse_args(argv)
    for name in ("instances", "clients", "per_request", "per_study", "per_series", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.no_orthanc and args.no_beeldportaal and not args.target:
        parser.error("nothing to measure")
    names = (
        [t.name for t in args.target]
        + ([] if args.no_orthanc else ["orthanc"])
        + ([] if args.no_beeldportaal else ["beeldportaal"])
    )
    if len(set(names)) != len(names):
        parser.error(f"target names must be unique (orthanc is built in): {names}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sources = select_sources()
    mix = {
        "sources": len(sources),
        "uncompressed": sum(s.transfer_syntax in UNCOMPRESSED for s in sources),
        "compressed": sum(s.transfer_syntax not in UNCOMPRESSED for s in sources),
        "transfer_syntaxes": sorted({s.transfer_syntax.name for s in sources}),
    }
    report: dict[str, Any] = {
        "benchmark": "ingest",
        "instances": args.instances,
        "clients": args.clients,
        "per_request": args.per_request,
        "per_study": args.per_study,
        "per_series": args.per_series,
        "rounds": args.rounds,
        "mix": mix,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "targets": {},
    }
    # Both built-in targets are fresh servers keeping what they store side by side in one
    # directory, deleted only after every round of every target was measured. Where a file is
    # created matters on this machine: its root file system is ext4 without a journal, where
    # creating an inode skips the ones deleted in the last 5 s (305 s while their inode table
    # block is dirty), one page cache lookup each. Creating 2,000 objects as versitygw lays
    # them out cost 0.8-1.3 ms of kernel CPU each under /tmp and 1.7-2.7 ms under the
    # repository's .state (measured 2026-11-26), and perf put 60 % of versitygw's CPU in
    # recently_deleted() when it wrote to the platform's data directory while Orthanc wrote
    # to /tmp.
    rounds: dict[str, list[dict[str, Any]]] = {}
    ok = True
    with contextlib.ExitStack() as cleanup:
        state_dir = args.state_dir or Path(
            cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-ingest-"))
        )
        report["state_dir"] = str(state_dir)
        for number in range(1, args.rounds + 1):
            # The targets take turns within a round, so a slow minute of this shared machine
            # falls on both; every round has fresh servers and fresh UIDs.
            results, round_ok = measure_round(
                args, sources, state_dir / f"round-{number}", report, number
            )
            ok &= round_ok
            for name, result in results.items():
                rounds.setdefault(name, []).append(result)
    for name, results in rounds.items():
        report["targets"][name] = {
            **_median_round(results),
            "rounds": [_round_summary(r) for r in results],
        }
    if "orthanc" in rounds:
        baseline = report["targets"]["orthanc"]
        report["ratios_vs_orthanc"] = {
            name: {
                **ratios(report["targets"][name], baseline),
                # Same-round pairs: the ratio of each round, whose spread shows the noise.
                "instances_per_s_per_round": [
                    ratios(mine, theirs)["instances_per_s"]
                    for mine, theirs in zip(rounds[name], rounds["orthanc"], strict=True)
                ],
            }
            for name in rounds
            if name != "orthanc"
        }
    report["load_avg_1m"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


def measure_round(
    args: argparse.Namespace,
    sources: list[Source],
    state_dir: Path,
    report: dict[str, Any],
    number: int,
) -> tuple[dict[str, dict[str, Any]], bool]:
    """One turn of every target: (name -> result, every instance stored and verified)."""
    results: dict[str, dict[str, Any]] = {}
    ok = True

    def bodies() -> list[Body]:
        instances = build_instances(sources, args.instances, args.per_study, args.per_series)
        report["mix"]["avg_instance_kb"] = round(sum(map(len, instances)) / len(instances) / 1e3, 1)
        return build_bodies(instances, args.per_request)

    label = f"round {number}/{args.rounds}"
    if not args.no_orthanc:
        built = bodies()
        with orthanc_target(state_dir) as (target, peer):
            log(f"{label} orthanc: {args.instances} instances in {len(built)} requests")
            result = measure(target, built, args.clients)
            count = peer.statistics()["CountInstances"]
            result["verified_instances"] = count
            result["verified"] = count == args.instances
            report["orthanc_version"] = peer.rest("GET", "/system")["Version"]
        ok &= result["verified"] and result["failures"] == 0
        results["orthanc"] = result
        log(f"{label} orthanc: {result['instances_per_s']} instances/s, {count} stored")
    if not args.no_beeldportaal:
        built = bodies()
        with beeldportaal_target(state_dir) as (target, durable_instances):
            log(f"{label} beeldportaal: {args.instances} instances in {len(built)} requests")
            result = measure(target, built, args.clients)
            count = durable_instances()
            result["verified_instances"] = count
            result["verified"] = count == args.instances
        ok &= result["verified"] and result["failures"] == 0
        results["beeldportaal"] = result
        log(f"{label} beeldportaal: {result['instances_per_s']} instances/s, {count} durable in S3")
    for target in args.target:
        built = bodies()
        log(f"{label} {target.name}: {args.instances} instances to {target.stow_url}")
        result = measure(target, built, args.clients)
        ok &= result["failures"] == 0
        results[target.name] = result
        log(f"{label} {target.name}: {result['instances_per_s']} instances/s")
    return results, ok


def _median_round(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median instances/s (the lower middle one of an even count)."""
    ranked = sorted(results, key=lambda r: r["instances_per_s"])
    return ranked[(len(ranked) - 1) // 2]


def _round_summary(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "instances_per_s": result["instances_per_s"],
        "request_latency_ms_p50": result["request_latency_ms"]["p50"],
        "request_latency_ms_p99": result["request_latency_ms"]["p99"],
        "peak_rss_mb": result["peak_rss_mb"],
        "server_cpu_ms_per_instance": result["server_cpu_ms_per_instance"],
        "server_and_storage_cpu_ms_per_instance": result["server_and_storage_cpu_ms_per_instance"],
        "failures": result["failures"],
    }


if __name__ == "__main__":
    sys.exit(main())
