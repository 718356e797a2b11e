"""A real Orthanc as receiving and as sending hospital: REST, DICOMweb, C-STORE, stop by pid."""

from __future__ import annotations

import http.server
import io
import json
import re
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from benchmarks.ingest import build_bodies, build_instances, measure, orthanc_target, select_sources
from deploy.local.orthanc import (
    DicomWebServer,
    Modality,
    OrthancConfig,
    OrthancPeer,
    dcmtk_env,
    dcmtk_tool,
)
from tests.factories import CT_IMAGE_STORAGE, EXPLICIT_VR_LITTLE_ENDIAN, make_uid

pytestmark = pytest.mark.integration

MakeCt = Callable[..., tuple[Dataset, bytes]]


def _ct(patient_id: str = "BP-TEST-1", rows: int = 4, columns: int = 4) -> tuple[Dataset, bytes]:
    """A CT image of ``rows`` x ``columns`` 16-bit pixels with fresh UIDs, and its Part 10 bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID(make_uid())
    meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = make_uid()
    ds.SeriesInstanceUID = make_uid()
    ds.PatientID = patient_id
    ds.PatientName = "Test^Orthanc"
    ds.StudyDate = "20250314"
    ds.StudyTime = "092653"
    ds.AccessionNumber = "BP0001"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = b"".join(i.to_bytes(2, "little") for i in range(rows * columns))
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return ds, buffer.getvalue()


@pytest.fixture
def make_ct() -> MakeCt:
    return _ct


@pytest.fixture(scope="module")
def hospitals(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[OrthancPeer, OrthancPeer]]:
    """A sending and a receiving Orthanc, each knowing the other as a DICOM modality."""
    root = tmp_path_factory.mktemp("orthanc")
    receiver = OrthancPeer(root / "receiver", _config(aet="RECEIVER"))
    receiver.start()
    sender = OrthancPeer(
        root / "sender",
        _config(aet="SENDER", modalities={"receiver": receiver.modality}),
    )
    try:
        sender.start()
        yield sender, receiver
    finally:
        pids = [pid for pid in (sender.pid, receiver.pid) if pid is not None]
        sender.stop()
        receiver.stop()
        assert pids, "the peers had no pids while running"
        assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def _config(**kwargs: Any) -> OrthancConfig:
    return OrthancConfig(stable_age=2, **kwargs)


def test_an_uploaded_ct_is_found_over_rest_with_its_bytes_intact(
    hospitals: tuple[OrthancPeer, OrthancPeer], make_ct: MakeCt
) -> None:
    sender, _ = hospitals
    ds, data = make_ct()

    stored = sender.upload(data)

    assert stored["Status"] == "Success"
    assert stored["ParentStudy"] in sender.studies()
    assert stored["ID"] in sender.instances()
    assert sender.instance_file(stored["ID"]) == data
    assert sender.instance_tags(stored["ID"])["SOPInstanceUID"] == ds.SOPInstanceUID
    assert [r["ID"] for r in sender.lookup(ds.StudyInstanceUID)] == [stored["ParentStudy"]]
    assert sender.statistics()["CountInstances"] >= 1
    assert sender.upload(data)["Status"] == "AlreadyStored"


def test_its_dicomweb_serves_metadata_and_answers_qido_from_dicomweb_client(
    hospitals: tuple[OrthancPeer, OrthancPeer], make_ct: MakeCt
) -> None:
    sender, _ = hospitals
    ds, data = make_ct(patient_id="BP-QIDO-1")
    sender.upload(data)

    with urllib.request.urlopen(
        f"{sender.dicomweb_url}/studies/{ds.StudyInstanceUID}/metadata", timeout=30
    ) as response:
        metadata = json.loads(response.read())
    client = DICOMwebClient(url=sender.dicomweb_url)
    studies = client.search_for_studies(search_filters={"PatientID": "BP-QIDO-1"})
    instances = client.search_for_instances(study_instance_uid=ds.StudyInstanceUID)

    assert [m["00080018"]["Value"] for m in metadata] == [[ds.SOPInstanceUID]]
    assert [s["0020000D"]["Value"][0] for s in studies] == [ds.StudyInstanceUID]
    assert [i["00080018"]["Value"][0] for i in instances] == [ds.SOPInstanceUID]


def test_dcmtk_storescu_c_stores_a_file_into_a_second_orthanc(
    hospitals: tuple[OrthancPeer, OrthancPeer], make_ct: MakeCt, tmp_path: Path
) -> None:
    _, receiver = hospitals
    ds, data = make_ct()
    path = tmp_path / "ct.dcm"
    path.write_bytes(data)

    result = subprocess.run(
        [
            dcmtk_tool("storescu"),
            "-aet",
            "STORESCU",
            "-aec",
            receiver.config.aet,
            "127.0.0.1",
            str(receiver.dicom_port),
            str(path),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    [found] = receiver.lookup(ds.SOPInstanceUID)
    assert found["Type"] == "Instance"
    # Over DIMSE the receiver writes its own file meta (group 0002); the dataset is unchanged.
    assert pydicom.dcmread(io.BytesIO(receiver.instance_file(found["ID"]))) == ds


def test_the_sending_orthanc_c_stores_a_study_to_a_registered_modality(
    hospitals: tuple[OrthancPeer, OrthancPeer], make_ct: MakeCt
) -> None:
    sender, receiver = hospitals
    ds, data = make_ct()
    study = sender.upload(data)["ParentStudy"]

    assert sender.echo("receiver")
    sender.store_to_modality("receiver", [study])

    [found] = receiver.lookup(ds.SOPInstanceUID)
    assert receiver.instance_tags(found["ID"])["StudyInstanceUID"] == ds.StudyInstanceUID


def test_the_sending_orthanc_stows_to_another_orthancs_dicomweb(
    hospitals: tuple[OrthancPeer, OrthancPeer], make_ct: MakeCt
) -> None:
    sender, receiver = hospitals
    ds, data = make_ct()
    study = sender.upload(data)["ParentStudy"]
    sender.add_dicomweb_server("receiver", DicomWebServer(receiver.dicomweb_url))

    answer = sender.stow_to_server("receiver", [study])

    assert answer["InstancesCount"] == "1"
    assert [r["Type"] for r in receiver.lookup(ds.SOPInstanceUID)] == ["Instance"]


class _StowRecorder(http.server.BaseHTTPRequestHandler):
    """A STOW-RS endpoint that records each request and answers like a PS3.18 origin server."""

    protocol_version = "HTTP/1.1"
    requests: list[dict[str, Any]]

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while size := int(self.rfile.readline().strip(), 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        boundary = re.search(r'boundary="?([^";]+)', self.headers["Content-Type"])
        assert boundary is not None
        datasets = [
            pydicom.dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")))
            for part in body.split(b"--" + boundary.group(1).encode())
            if part.strip() not in (b"", b"--")
        ]
        self.requests.append({"path": self.path, "headers": dict(self.headers), "ds": datasets})
        answer = json.dumps(
            {
                "00081199": {
                    "vr": "SQ",
                    "Value": [
                        {
                            "00081150": {"vr": "UI", "Value": [d.SOPClassUID]},
                            "00081155": {"vr": "UI", "Value": [d.SOPInstanceUID]},
                        }
                        for d in datasets
                    ],
                }
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_the_sending_orthanc_stows_with_a_bearer_token_to_a_registered_stow_url(
    hospitals: tuple[OrthancPeer, OrthancPeer], make_ct: MakeCt, chunked: bool
) -> None:
    sender, _ = hospitals
    recorded: list[dict[str, Any]] = []
    handler = type("Recorder", (_StowRecorder,), {"requests": recorded})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ds, data = make_ct()
    study = sender.upload(data)["ParentStudy"]
    try:
        sender.add_dicomweb_server(
            "beeldportaal",
            DicomWebServer(
                f"http://127.0.0.1:{server.server_port}/dicomweb/to/87654321",
                headers={"Authorization": "Bearer test-token"},
                chunked_transfers=chunked,
            ),
        )
        sender.stow_to_server("beeldportaal", [study])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)

    [request] = recorded
    assert request["path"] == "/dicomweb/to/87654321/studies"
    assert request["headers"]["Authorization"] == "Bearer test-token"
    assert ("Transfer-Encoding" in request["headers"]) is chunked
    assert [d.SOPInstanceUID for d in request["ds"]] == [ds.SOPInstanceUID]


def test_running_starts_on_free_ports_and_stops_by_pid(tmp_path: Path) -> None:
    with (
        OrthancPeer.running(tmp_path / "a", aet="PEER_A") as a,
        OrthancPeer.running(tmp_path / "b", aet="PEER_B", modalities={"a": a.modality}) as b,
    ):
        pids = [a.pid, b.pid]
        assert None not in pids
        assert len({a.http_port, a.dicom_port, b.http_port, b.dicom_port}) == 4
        assert b.echo("a")
        assert b.rest("GET", "/system")["DicomAet"] == "PEER_B"
        config = json.loads(b.config_file.read_text())
        assert config["RemoteAccessAllowed"] is False
        assert config["StorageDirectory"].startswith(str(tmp_path))
        assert Path(f"/proc/{b.pid}/environ").read_bytes().count(b"TCP_NODELAY=1\0") == 1

    assert a.pid is None
    assert b.pid is None
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_it_registers_a_modality_at_runtime(tmp_path: Path) -> None:
    with (
        OrthancPeer.running(tmp_path / "a", aet="PEER_A") as a,
        OrthancPeer.running(tmp_path / "b", aet="PEER_B") as b,
    ):
        assert not b.echo("a")
        b.add_modality("a", Modality("PEER_A", a.dicom_port))
        assert b.echo("a")


def test_the_ingest_benchmark_stows_every_selected_test_image_into_orthanc(tmp_path: Path) -> None:
    sources = select_sources()
    bodies = build_bodies(build_instances(sources, len(sources)), per_request=10)

    with orthanc_target(tmp_path) as (target, peer):
        result = measure(target, bodies, clients=2)
        stored = peer.statistics()["CountInstances"]
        pid = peer.pid

    assert (result["stored"], result["failures"], stored) == (len(sources), 0, len(sources))
    assert result["server_pids"] == [pid]
    assert result["peak_rss_mb"] > 0
    assert {s.transfer_syntax.is_compressed for s in sources} == {True, False}
    assert not Path(f"/proc/{pid}").exists()
