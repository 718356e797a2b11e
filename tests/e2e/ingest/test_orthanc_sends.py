"""A hospital's Orthanc sends studies to beeldportaal's running ingest and assembly processes.

Orthanc's DICOMweb client splits a study over several STOW-RS requests (at most 10 instances
each) and its DIMSE client sends over one association: either way the receiver must hear of the
study once, complete, and again (as version 2) only for instances that arrive later.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from deploy.local.orthanc import DicomWebServer, Modality, OrthancPeer
from shared.auth import mint_token
from shared.events import BsnStatus, StudyReceived
from shared.settings import KafkaSettings
from tests.dicom_samples import bsn_item, make_dicom_bytes
from tests.e2e.harness import IngestDeployment, ingest_deployment
from tests.kafka_tap import EventTap

pytestmark = pytest.mark.e2e

SENDER = "44444444"
RECIPIENT = "55555555"
PEERS = {
    "organisations": [
        {
            "ura": SENDER,
            "name": "Ziekenhuis Zuid",
            "dimse_senders": [{"ae_title": "ZHZUID_PACS", "hosts": ["127.0.0.1"]}],
        },
        {"ura": RECIPIENT, "name": "Ziekenhuis Midden", "receive_ae_title": "BP_ZHMIDDEN"},
    ]
}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[IngestDeployment]:
    with ingest_deployment(tmp_path, PEERS, stable_age=3.0) as running:
        yield running


@pytest.fixture
def hospital(tmp_path: Path, deployment: IngestDeployment) -> Iterator[OrthancPeer]:
    key = Path(deployment.env["BEELDPORTAAL_AUTH_PUBLIC_KEYS"]).with_suffix(".key")
    token = mint_token(key, ura=SENDER, client_id="orthanc-zuid")
    with OrthancPeer.running(tmp_path / "orthanc", aet="ZHZUID_PACS") as pacs:
        pacs.add_dicomweb_server(
            "beeldportaal",
            DicomWebServer(
                deployment.dicomweb_root(RECIPIENT), headers={"Authorization": f"Bearer {token}"}
            ),
        )
        pacs.add_modality("beeldportaal", Modality("BP_ZHMIDDEN", deployment.dimse_port))
        yield pacs


def _study(pacs: OrthancPeer, count: int, **attrs: object) -> tuple[str, str, list[str]]:
    """Upload ``count`` instances of one new study into Orthanc: (Orthanc id, Study UID, SOPs)."""
    study_uid = pydicom.uid.generate_uid()
    series_uid = pydicom.uid.generate_uid()
    sops, orthanc_id = [], ""
    for number in range(1, count + 1):
        data = make_dicom_bytes(
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=series_uid,
            InstanceNumber=number,
            **attrs,
        )
        sops.append(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        orthanc_id = pacs.upload(data)["ParentStudy"]
    return orthanc_id, study_uid, sops


def _announcements(tap: EventTap, study_uid: str, expect: int) -> list[StudyReceived]:
    def of_study(event: object) -> bool:
        return isinstance(event, StudyReceived) and event.study.study_instance_uid == study_uid

    found = tap.read(of_study, expect=expect, timeout=90, settle=5.0)
    return sorted(found, key=lambda e: e.study.version)  # type: ignore[attr-defined]


def test_a_study_stowed_by_orthanc_in_several_requests_is_announced_once_complete(
    kafka_settings: KafkaSettings, deployment: IngestDeployment, hospital: OrthancPeer
) -> None:
    tap = EventTap(kafka_settings, StudyReceived.topic)
    orthanc_study, study_uid, sops = _study(hospital, 23, patient=bsn_item("999991772"))
    answer = hospital.stow_to_server("beeldportaal", [orthanc_study])
    assert answer.get("FailedInstancesCount", 0) == 0, answer

    [first] = _announcements(tap, study_uid, expect=1)
    study = first.study
    assert study.version == 1
    assert sorted(i.sop_instance_uid for i in study.instances) == sorted(sops)
    assert sorted(study.new_sop_instance_uids) == sorted(sops)
    assert (study.sender_ura, study.recipient_ura) == (SENDER, RECIPIENT)
    assert study.patient.bsn_status is BsnStatus.VERIFIED
    assert study.modalities == ("CT",)
    assert study.series[0].number_of_instances == 23

    # A late instance of the same study: a second version naming only what is new.
    tap = EventTap(kafka_settings, StudyReceived.topic)
    late = make_dicom_bytes(
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=study.series[0].series_instance_uid,
        patient=bsn_item("999991772"),
    )
    late_sop = pydicom.dcmread(io.BytesIO(late), stop_before_pixels=True).SOPInstanceUID
    late_id = hospital.upload(late)["ID"]
    hospital.stow_to_server("beeldportaal", [late_id])
    [second] = _announcements(tap, study_uid, expect=1)
    assert second.study.version == 2
    assert second.study.new_sop_instance_uids == (late_sop,)
    assert len(second.study.instances) == 24


def test_a_study_sent_by_orthanc_over_c_store_is_announced_once_complete(
    kafka_settings: KafkaSettings, deployment: IngestDeployment, hospital: OrthancPeer
) -> None:
    tap = EventTap(kafka_settings, StudyReceived.topic)
    orthanc_study, study_uid, sops = _study(hospital, 15)
    hospital.store_to_modality("beeldportaal", [orthanc_study])
    [announced] = _announcements(tap, study_uid, expect=1)
    assert announced.study.version == 1
    assert sorted(i.sop_instance_uid for i in announced.study.instances) == sorted(sops)
    assert announced.study.patient.bsn_status is BsnStatus.ABSENT
    assert announced.study.patient.pseudonym is None
    # The same study's bytes from the two channels are one set of objects in S3.
    assert all(
        i.object_key == f"{SENDER}/{i.sop_instance_uid}.dcm" for i in announced.study.instances
    )
