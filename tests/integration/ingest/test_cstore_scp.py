"""The C-STORE SCP on the real Kafka and S3: pynetdicom and dcmtk peers send, we check both ends.

Every test builds its own Ingest on a bucket of its own; instance-stored is the shared declared
topic, read from the end offsets taken before sending and filtered by the test's fresh UIDs.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from services.ingest.adapters.peers import PeerDirectory
from services.ingest.bootstrap import Ingest, build
from services.ingest.config import IngestSettings
from services.ingest.entrypoints.scp import StoreSCP
from shared.auth import AuthSettings
from shared.codec import Codec
from shared.events import IngestChannel, InstanceStored
from shared.identifiers import BSN_DICOM_ISSUER
from shared.settings import KafkaSettings, PrivacySettings, S3Settings
from shared.storage import S3ObjectStore
from tests.factories import TEST_BSN

pytestmark = pytest.mark.integration

SENDER_URA = "11111111"
RECIPIENT_URA = "22222222"
REMOTE_URA = "33333333"
SENDER_AE = "ZHOOST_PACS"
RECIPIENT_AE = "BP_ZHWEST"
REMOTE_AE = "REMOTE_PACS"  # known, but only from 10.0.0.1
PEERS = {
    "organisations": [
        {
            "ura": SENDER_URA,
            "name": "Ziekenhuis Oost",
            "receive_ae_title": "BP_ZHOOST",
            "dimse_senders": [{"ae_title": SENDER_AE, "hosts": ["127.0.0.1"]}],
        },
        {"ura": RECIPIENT_URA, "name": "Ziekenhuis West", "receive_ae_title": RECIPIENT_AE},
        {
            "ura": REMOTE_URA,
            "name": "Ziekenhuis Ver Weg",
            "dimse_senders": [{"ae_title": REMOTE_AE, "hosts": ["10.0.0.1"]}],
        },
    ]
}
TOPIC = InstanceStored.topic
DCMTK = Path("/usr/bin")  # pynetdicom's own apps of the same names may come first on PATH
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


# --- DICOM files ----------------------------------------------------------------------------------


def make_ct(path: Path, *, study: str, series: str, number: int = 1, **overrides: Any) -> Path:
    """A tiny CT image (8x8, 16 bit) with fresh UIDs, written as a Part 10 file."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID-SCP-TEST"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101112"
    ds.AccessionNumber = "ACC-SCP"
    ds.StudyDescription = "CT scp test"
    ds.SeriesDescription = "axial"
    ds.Modality = "CT"
    ds.InstitutionName = "Ziekenhuis Oost"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.PixelData = bytes(range(128))
    for keyword, value in overrides.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


def make_cts(directory: Path, count: int, *, study: str | None = None) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    study = study or generate_uid()
    series = generate_uid()
    return [
        make_ct(directory / f"ct{i:04d}.dcm", study=study, series=series, number=i + 1)
        for i in range(count)
    ]


def dataset_offset(data: bytes) -> int:
    """Where the data set starts in a Part 10 file: after the preamble and the file meta group."""
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) group length first
    (group_length,) = struct.unpack("<I", data[140:144])
    return 144 + group_length


def sop_instance_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def auth_settings(tmp_path: Path) -> AuthSettings:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "issuer.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return AuthSettings(public_keys=[pem])


@pytest.fixture
def bucket_settings(s3_settings: S3Settings) -> Iterator[S3Settings]:
    settings = s3_settings.model_copy(update={"bucket": f"test-scp-{uuid.uuid4().hex[:20]}"})
    yield settings
    client = S3ObjectStore.from_settings(settings)._minio()
    if client.bucket_exists(settings.bucket):
        for item in client.list_objects(settings.bucket, recursive=True):
            client.remove_object(settings.bucket, item.object_name)
        client.remove_bucket(settings.bucket)


@pytest.fixture
def make_ingest(
    kafka_settings: KafkaSettings,
    bucket_settings: S3Settings,
    auth_settings: AuthSettings,
) -> Callable[..., Ingest]:
    def make(objects: S3ObjectStore | None = None, max_associations: int = 16) -> Ingest:
        settings = IngestSettings(
            kafka=kafka_settings,
            s3=bucket_settings,
            dimse_host="127.0.0.1",
            dimse_port=0,
            dimse_max_associations=max_associations,
            spool_memory_bytes=64 * 1024,
        )
        return build(
            settings,
            privacy=PrivacySettings(pseudonym_key=SecretStr("k" * 40)),
            auth=auth_settings,
            objects=objects or S3ObjectStore.from_settings(bucket_settings),
            peers=PeerDirectory.from_dict(PEERS),
        )

    return make


@pytest.fixture
async def ingest(make_ingest: Callable[..., Ingest]) -> AsyncIterator[Ingest]:
    ingest = make_ingest()
    async with ingest.lifespan():
        yield ingest


@pytest.fixture
async def scp(ingest: Ingest) -> AsyncIterator[StoreSCP]:
    scp = StoreSCP(shutdown_timeout=10)
    scp.start(ingest, asyncio.get_running_loop())
    yield scp
    await scp.stop()


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom then sends each file's data set bytes as they are in the file, undecoded: what
    # we sent is exactly the file's bytes after its file meta.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


class EventWatch:
    """instance-stored events published after ``start()``, by SOP Instance UID."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._bootstrap = settings.bootstrap_list
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_list,
            group_id=f"test-scp-{uuid.uuid4().hex[:12]}",
            enable_auto_commit=False,
        )
        self._codec = Codec()
        self.seen: dict[str, InstanceStored] = {}

    async def start(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap)
        await admin.start()
        try:
            (described,) = await admin.describe_topics([TOPIC])
        finally:
            await admin.close()
        if described["error_code"] or not described["partitions"]:
            pytest.fail(f"topic {TOPIC} is not provisioned", pytrace=False)
        await self._consumer.start()
        tps = [TopicPartition(TOPIC, p["partition"]) for p in described["partitions"]]
        self._consumer.assign(tps)
        for tp, offset in (await self._consumer.end_offsets(tps)).items():
            self._consumer.seek(tp, offset)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def collect(
        self, uids: set[str], timeout: float = 30.0, *, settle: float = 0.0
    ) -> dict[str, InstanceStored]:
        """Events for ``uids``: wait until all arrived (or timeout), then ``settle`` s more."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not uids <= self.seen.keys():
            await self._poll()
        settle_until = time.monotonic() + settle
        while time.monotonic() < settle_until:
            await self._poll()
        return {uid: event for uid, event in self.seen.items() if uid in uids}

    async def _poll(self) -> None:
        batch = await self._consumer.getmany(timeout_ms=300)
        for records in batch.values():
            for record in records:
                event = self._codec.decode_record(record)
                assert isinstance(event, InstanceStored)
                self.seen.setdefault(event.instance.sop_instance_uid, event)


@pytest.fixture
async def events(kafka_settings: KafkaSettings) -> AsyncIterator[EventWatch]:
    watch = EventWatch(kafka_settings)
    await watch.start()
    yield watch
    await watch.stop()


# --- SCU helpers (blocking: run them in a worker thread, the SCP needs the test's loop) -----------


def scu(calling: str = SENDER_AE) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def send_files(
    port: int,
    files: list[Path],
    *,
    calling: str = SENDER_AE,
    called: str = RECIPIENT_AE,
    contexts: list[tuple[str, str]] | None = None,
) -> list[int]:
    """C-STORE every file over one association; the status of each, in order."""
    ae = scu(calling)
    for sop_class, syntax in contexts or [(CTImageStorage, ExplicitVRLittleEndian)]:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association was not accepted"
    try:
        statuses = []
        for path in files:
            rsp = assoc.send_c_store(path)
            assert rsp is not None and "Status" in rsp, f"no C-STORE response for {path.name}"
            statuses.append(int(rsp.Status))
        return statuses
    finally:
        assoc.release()


def associate(port: int, *, calling: str, called: str) -> Any:
    ae = scu(calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        assoc.release()
    return assoc


async def run(
    cmd: list[str], env: dict[str, str] | None = None, unset: tuple[str, ...] = ()
) -> tuple[int, str]:
    environment = {k: v for k, v in os.environ.items() if k not in unset}
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**environment, **(env or {})},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def needs_dcmtk() -> None:
    for tool in ("storescu", "echoscu"):
        if not (DCMTK / tool).exists():
            pytest.fail(
                f"dcmtk's {tool} is missing: apt-get install -y --no-install-recommends dcmtk",
                pytrace=False,
            )


async def assert_stored_as_sent(
    ingest: Ingest, files: list[Path], events: dict[str, InstanceStored], transfer_syntax: str
) -> None:
    """Each file's data set is in S3 byte for byte, behind a file meta naming it; event matches."""
    for path in files:
        sent = path.read_bytes()
        uid = sop_instance_uid(path)
        event = events[uid]
        assert event.channel == IngestChannel.C_STORE
        assert event.sender_ura == SENDER_URA
        assert event.recipient_ura == RECIPIENT_URA
        assert event.sender_endpoint == SENDER_AE
        assert event.instance.transfer_syntax_uid == transfer_syntax
        stored = await asyncio.to_thread(ingest.objects.get, event.instance.object_key)
        assert stored[dataset_offset(stored) :] == sent[dataset_offset(sent) :]
        assert hashlib.sha256(stored).hexdigest() == event.instance.sha256
        assert len(stored) == event.instance.size
        meta = dcmread(io.BytesIO(stored), stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == transfer_syntax
        assert meta.MediaStorageSOPInstanceUID == uid
        assert meta.MediaStorageSOPClassUID == dcmread(path, stop_before_pixels=True).SOPClassUID


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("chunked_send")
async def test_twenty_instances_over_one_association_are_stored_byte_for_byte_and_announced(
    scp: StoreSCP, ingest: Ingest, events: EventWatch, tmp_path: Path
) -> None:
    files = make_cts(tmp_path / "study", 20)
    statuses = await asyncio.to_thread(send_files, scp.address[1], files)

    assert statuses == [0x0000] * 20
    stored = await events.collect({sop_instance_uid(f) for f in files})
    assert len(stored) == 20
    await assert_stored_as_sent(ingest, files, stored, ExplicitVRLittleEndian)
    # One association, one correlation id for all of its instances.
    assert len({e.correlation_id for e in stored.values()}) == 1


async def test_dcmtk_storescu_sends_a_directory_over_one_association(
    scp: StoreSCP, ingest: Ingest, events: EventWatch, tmp_path: Path
) -> None:
    needs_dcmtk()
    files = make_cts(tmp_path / "dir", 12)
    code, out = await run(
        [
            str(DCMTK / "storescu"),
            "-v",
            "-aet",
            SENDER_AE,
            "-aec",
            RECIPIENT_AE,
            "-R",
            "+sd",
            "+r",
            "127.0.0.1",
            str(scp.address[1]),
            str(tmp_path / "dir"),
        ],
        env={"TCP_NODELAY": "1"},
    )

    assert code == 0, out
    assert out.count("Received Store Response (Success)") == 12, out
    stored = await events.collect({sop_instance_uid(f) for f in files})
    assert len(stored) == 12
    await assert_stored_as_sent(ingest, files, stored, ExplicitVRLittleEndian)


async def test_an_unknown_calling_ae_title_is_rejected(scp: StoreSCP, ingest: Ingest) -> None:
    assoc = await asyncio.to_thread(
        associate, scp.address[1], calling="STRANGER", called=RECIPIENT_AE
    )

    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    assert _count(ingest, "rejected-calling-ae") == 1


async def test_an_unknown_called_ae_title_is_rejected(scp: StoreSCP, ingest: Ingest) -> None:
    assoc = await asyncio.to_thread(associate, scp.address[1], calling=SENDER_AE, called="NOBODY")

    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)
    assert _count(ingest, "rejected-called-ae") == 1


async def test_a_known_calling_ae_title_from_another_address_is_rejected(
    scp: StoreSCP, ingest: Ingest
) -> None:
    assoc = await asyncio.to_thread(
        associate, scp.address[1], calling=REMOTE_AE, called=RECIPIENT_AE
    )

    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)


async def test_dcmtk_sees_the_rejection_reason(scp: StoreSCP) -> None:
    needs_dcmtk()
    code, out = await run(
        [
            str(DCMTK / "echoscu"),
            "-aet",
            "STRANGER",
            "-aec",
            RECIPIENT_AE,
            "127.0.0.1",
            str(scp.address[1]),
        ]
    )

    assert code != 0
    assert "Calling AE Title Not Recognized" in out, out


async def test_c_echo_answers_pynetdicom_and_dcmtk(scp: StoreSCP, ingest: Ingest) -> None:
    def echo() -> int:
        ae = scu()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", scp.address[1], ae_title=RECIPIENT_AE)
        assert assoc.is_established
        try:
            return int(assoc.send_c_echo().Status)
        finally:
            assoc.release()

    assert await asyncio.to_thread(echo) == 0x0000
    needs_dcmtk()
    code, out = await run(
        [
            str(DCMTK / "echoscu"),
            "-aet",
            SENDER_AE,
            "-aec",
            RECIPIENT_AE,
            "127.0.0.1",
            str(scp.address[1]),
        ],
        env={"TCP_NODELAY": "1"},
    )
    assert code == 0, out
    assert _count(ingest, "accepted") == 2


@pytest.mark.usefixtures("chunked_send")
async def test_four_concurrent_associations_of_ten_instances_are_all_stored(
    scp: StoreSCP, ingest: Ingest, events: EventWatch, tmp_path: Path
) -> None:
    batches = [make_cts(tmp_path / f"batch{i}", 10) for i in range(4)]

    def send_all() -> list[list[int]]:
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda files: send_files(scp.address[1], files), batches))

    results = await asyncio.to_thread(send_all)

    assert results == [[0x0000] * 10] * 4
    files = [f for batch in batches for f in batch]
    stored = await events.collect({sop_instance_uid(f) for f in files})
    assert len(stored) == 40
    await assert_stored_as_sent(ingest, files, stored, ExplicitVRLittleEndian)
    assert len({e.correlation_id for e in stored.values()}) == 4


@pytest.mark.usefixtures("chunked_send")
async def test_a_jpeg_instance_is_kept_in_the_transfer_syntax_it_was_sent_in(
    scp: StoreSCP, ingest: Ingest, events: EventWatch, tmp_path: Path
) -> None:
    source = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm", download=False)
    assert source is not None
    ds = dcmread(source)
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    path = tmp_path / "jpeg.dcm"
    ds.save_as(path, enforce_file_format=True)

    statuses = await asyncio.to_thread(
        send_files,
        scp.address[1],
        [path],
        # Only JPEG baseline proposed: accepted as is, nothing is transcoded.
        contexts=[(SECONDARY_CAPTURE, JPEGBaseline8Bit)],
    )

    assert statuses == [0x0000]
    stored = await events.collect({sop_instance_uid(path)})
    await assert_stored_as_sent(ingest, [path], stored, JPEGBaseline8Bit)


@pytest.mark.usefixtures("chunked_send")
async def test_s3_down_answers_out_of_resources_and_announces_nothing(
    make_ingest: Callable[..., Ingest],
    bucket_settings: S3Settings,
    events: EventWatch,
    tmp_path: Path,
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    dead = S3ObjectStore(
        f"127.0.0.1:{closed_port}",
        bucket_settings.access_key,
        bucket_settings.secret_key.get_secret_value(),
        bucket_settings.bucket,
        secure=False,
        connect_timeout=1,
        retries=0,
    )
    ingest = make_ingest(objects=dead)
    await ingest.publisher.start()  # not lifespan: its ensure_bucket would fail first
    scp = StoreSCP(shutdown_timeout=10)
    scp.start(ingest, asyncio.get_running_loop())
    try:
        files = make_cts(tmp_path / "s3down", 2)
        statuses = await asyncio.to_thread(send_files, scp.address[1], files)
    finally:
        await scp.stop()
        await ingest.publisher.stop()

    assert statuses == [0xA700, 0xA700]
    assert await events.collect({sop_instance_uid(f) for f in files}, timeout=0, settle=3) == {}


@pytest.mark.usefixtures("chunked_send")
async def test_malformed_instances_fail_alone_and_their_siblings_are_stored(
    scp: StoreSCP, ingest: Ingest, events: EventWatch, tmp_path: Path
) -> None:
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = [make_ct(folder / f"good{i}.dcm", study=study, series=series) for i in range(3)]
    # The file meta (and so the C-STORE request) names a UID the data set does not carry.
    no_uid = make_ct(folder / "no_uid.dcm", study=study, series=series, SOPInstanceUID=None)
    other = make_ct(folder / "other.dcm", study=study, series=series)
    mismatch = _with_file_meta_uid(other, generate_uid())
    files = [good[0], no_uid, good[1], mismatch, good[2]]

    statuses = await asyncio.to_thread(send_files, scp.address[1], files)

    assert statuses[0] == statuses[2] == statuses[4] == 0x0000
    for status in (statuses[1], statuses[3]):
        assert 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF, hex(status)
    stored = await events.collect(
        {sop_instance_uid(f) for f in good}
        | {sop_instance_uid(no_uid), sop_instance_uid(mismatch), _dataset_uid(mismatch)},
        timeout=15,
        settle=1,
    )
    assert set(stored) == {sop_instance_uid(f) for f in good}


async def test_an_instance_whose_uid_holds_the_bsn_is_refused_and_its_uid_never_logged(
    scp: StoreSCP, events: EventWatch, tmp_path: Path
) -> None:
    # A BSN inside a longer number: the log scrubber's nine-digit pattern does not see it.
    uid = f"2.25.{TEST_BSN}001"
    ct = make_ct(
        tmp_path / "bsn_uid.dcm",
        study=generate_uid(),
        series=generate_uid(),
        SOPInstanceUID=uid,
        PatientID=TEST_BSN,
        IssuerOfPatientID=BSN_DICOM_ISSUER,
    )

    with structlog.testing.capture_logs() as logs:
        [status] = await asyncio.to_thread(send_files, scp.address[1], [ct])

    assert 0xA900 <= status <= 0xA9FF, hex(status)
    refused = [entry for entry in logs if entry["event"] == "C-STORE refused"]
    assert refused and refused[0]["sop_instance_uid"] is None
    assert TEST_BSN not in repr(logs)
    assert await events.collect({uid}, timeout=3, settle=1) == {}


async def test_associations_beyond_the_limit_are_rejected_as_transient(
    make_ingest: Callable[..., Ingest],
) -> None:
    ingest = make_ingest(max_associations=1)
    async with ingest.lifespan():
        scp = StoreSCP(shutdown_timeout=10)
        scp.start(ingest, asyncio.get_running_loop())
        try:
            ae = scu()
            ae.add_requested_context(Verification)
            first = await asyncio.to_thread(
                ae.associate, "127.0.0.1", scp.address[1], ae_title=RECIPIENT_AE
            )
            assert first.is_established
            second = await asyncio.to_thread(
                associate, scp.address[1], calling=SENDER_AE, called=RECIPIENT_AE
            )
            await asyncio.to_thread(first.release)
        finally:
            await scp.stop()

    assert second.is_rejected
    rj = second.acceptor.primitive
    # Rejected-transient by the service provider (presentation): local limit exceeded.
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    assert _count(ingest, "rejected-limit") == 1


async def test_stop_waits_for_an_open_association_and_then_refuses_new_ones(
    make_ingest: Callable[..., Ingest], tmp_path: Path
) -> None:
    ingest = make_ingest()
    async with ingest.lifespan():
        scp = StoreSCP(shutdown_timeout=10)
        scp.start(ingest, asyncio.get_running_loop())
        port = scp.address[1]
        ae = scu()
        ae.add_requested_context(Verification)
        assoc = await asyncio.to_thread(ae.associate, "127.0.0.1", port, ae_title=RECIPIENT_AE)
        assert assoc.is_established

        async def release_later() -> None:
            await asyncio.sleep(0.5)
            status = await asyncio.to_thread(assoc.send_c_echo)
            assert status.Status == 0x0000  # still served while stop() waits
            await asyncio.to_thread(assoc.release)

        releasing = asyncio.create_task(release_later())
        started = time.monotonic()
        await scp.stop()
        await releasing
        assert 0.4 < time.monotonic() - started < 9
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


async def test_dcmtk_storescu_throughput_over_one_association(
    scp: StoreSCP, events: EventWatch, tmp_path: Path, record_property: Any
) -> None:
    """Instances/s for 200 small CTs on one association; reported, not asserted.

    Measured twice: with ``TCP_NODELAY=1`` in dcmtk's environment, and without it (Nagle's
    algorithm on at the peer, as in a default dcmtk or Orthanc install), 50 instances.
    """
    needs_dcmtk()
    rates = {}
    for label, count, env in (("nodelay", 200, {"TCP_NODELAY": "1"}), ("nagle", 50, {})):
        folder = tmp_path / label
        files = make_cts(folder, count)
        started = time.perf_counter()
        code, out = await run(
            [
                str(DCMTK / "storescu"),
                "-aet",
                SENDER_AE,
                "-aec",
                RECIPIENT_AE,
                "-R",
                "+sd",
                "127.0.0.1",
                str(scp.address[1]),
                str(folder),
            ],
            env=env,
            unset=() if env else ("TCP_NODELAY",),
        )
        rates[label] = count / (time.perf_counter() - started)

        assert code == 0, out
        stored = await events.collect({sop_instance_uid(f) for f in files}, timeout=60)
        assert len(stored) == count
    for label, rate in rates.items():
        record_property(f"cstore_instances_per_second_{label}", round(rate, 1))
    print(
        "\nC-STORE, dcmtk storescu, one association: "
        f"{rates['nodelay']:.0f} instances/s with TCP_NODELAY=1, "
        f"{rates['nagle']:.0f} instances/s without"
    )


# --- helpers --------------------------------------------------------------------------------------


def _count(ingest: Ingest, outcome: str) -> float:
    value = ingest.metrics.registry.get_sample_value(
        "beeldportaal_ingest_associations_total", {"outcome": outcome}
    )
    return value or 0.0


def _with_file_meta_uid(path: Path, uid: str) -> Path:
    ds = dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    ds.save_as(path, enforce_file_format=False)
    return path


def _dataset_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
