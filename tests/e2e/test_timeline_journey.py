"""The timeline end to end: hospitals push studies over STOW-RS into beeldportaal's own processes
on a private platform, and treating providers find them in the timeline.

Everything on the path is the real thing: `beeldportaal platform up` (Kafka, S3, PostgreSQL on
free ports), the directory seeded by `beeldportaal routing seed`, and the processes `make up` runs
(ingest, its assembler, the consent API and decision worker, the routing worker, the notify API
for the portal pickup, the timeline projection and API). Consent and the treatment relationship
arrive through the consent API as Mitz and the hospital would send them. The assertions are on
what a provider, a viewer and the patient see.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from fhir.resources.R4B.bundle import Bundle
from pydicom.uid import BasicTextSRStorage, generate_uid

from deploy.local.config import LocalConfig
from deploy.local.services import specs
from services.notify.domain.pickup import sign_pickup
from services.timeline.domain.fhir import accession_identifier
from shared.auth import ensure_dev_keypair, mint_token
from shared.identifiers import BSN_SYSTEM, URA_SYSTEM
from tests.dicom_samples import bsn_item, make_dicom_bytes
from tests.e2e.harness import ServiceProcess, private_platform, service, service_ports
from tests.factories import TEST_BSN
from tests.integration.consent.test_consent_api import make_bundle

pytestmark = pytest.mark.e2e

SENDER = "00000101"  # Demo Ziekenhuis Oost: made the study
SECOND_SOURCE = "00000404"  # Demo Ziekenhuis Zuid: holds a copy of the same study
TREATING = "00000202"  # Demo Ziekenhuis West: treats the patient (relationship registered)
STRANGER = "00000303"  # Demo Ziekenhuis Noord: a hospital without a relationship
PORTAL = "00000002"  # the patient portal, acting for the patient
MITZ = "00000001"
UZI = "900000001"
BOUNDARY = "journey-boundary"
# The processes of `make up` the timeline needs, and those of the portal pickup (routing to
# the recipient's pickup endpoint, the notify API serving the download).
PROCESSES = (
    "ingest",
    "ingest-assembly",
    "consent",
    "consent-decisions",
    "routing-worker",
    "notify",
    "timeline-projection",
    "timeline",
)
T = TypeVar("T")


def _directory_yaml() -> str:
    entries = []
    for ura, name in (
        (SENDER, "Demo Ziekenhuis Oost"),
        (TREATING, "Demo Ziekenhuis West"),
        (STRANGER, "Demo Ziekenhuis Noord"),
        (SECOND_SOURCE, "Demo Ziekenhuis Zuid"),
    ):
        entries.append(
            f'  - ura: "{ura}"\n    name: {name}\n    type_code: V4\n    city: Utrecht\n'
            f"    endpoints:\n      - channel: pickup\n        id: portal-{ura}\n"
        )
    return "providers:\n" + "".join(entries)


def _peers() -> dict[str, Any]:
    return {
        "organisations": [
            {"ura": ura, "name": f"org {ura}", "receive_ae_title": f"BP_{ura}"}
            for ura in (SENDER, TREATING, STRANGER, SECOND_SOURCE)
        ]
    }


@dataclass
class Stack:
    env: dict[str, str]
    key: Path
    urls: dict[str, str]
    processes: dict[str, ServiceProcess]

    def token(self, ura: str, roles: tuple[str, ...] = ("provider",), **claims: Any) -> str:
        return mint_token(self.key, ura=ura, roles=roles, **claims)

    def auth(self, ura: str, roles: tuple[str, ...] = ("provider",), **claims: Any) -> dict:
        return {"Authorization": f"Bearer {self.token(ura, roles, **claims)}"}

    def reader(self, ura: str) -> dict[str, str]:
        return self.auth(ura, ("provider",), uzi=UZI, purpose="TREAT")

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.log(3000)}" for n, p in self.processes.items())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("journey")
    with contextlib.ExitStack() as cleanup:
        platform = cleanup.enter_context(private_platform(root))
        env = {**platform.env, **platform.client_env}
        ports = service_ports()
        peers = root / "peers.json"
        peers.write_text(json.dumps(_peers()))
        directory = root / "directory.yaml"
        directory.write_text(_directory_yaml())
        env.update(
            ports,
            BEELDPORTAAL_INGEST_PEERS_FILE=str(peers),
            BEELDPORTAAL_INGEST_STABLE_AGE_SECONDS="2",
            BEELDPORTAAL_LOG_JSON="false",
        )
        platform.cli("routing", "seed", "--file", str(directory), env=env)

        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            chosen = [s for s in specs(LocalConfig.from_env()) if s.name in PROCESSES]
        processes: dict[str, ServiceProcess] = {}
        for spec in chosen:
            processes[spec.name] = cleanup.enter_context(
                service(spec.name, list(spec.args), {**env, **spec.env}, root)
            )
        for spec in chosen:
            assert spec.ready_url is not None
            processes[spec.name].wait_ready(spec.ready_url, timeout=120)
        key, _public = ensure_dev_keypair(platform.state / "secrets" / "dev-jwt")
        urls = {
            "ingest": f"http://127.0.0.1:{ports['BEELDPORTAAL_INGEST_HTTP_PORT']}",
            "consent": f"http://127.0.0.1:{ports['BEELDPORTAAL_CONSENT_HTTP_PORT']}",
            "timeline": f"http://127.0.0.1:{ports['BEELDPORTAAL_TIMELINE_HTTP_PORT']}",
            "notify": f"http://127.0.0.1:{ports['BEELDPORTAAL_NOTIFY_HTTP_PORT']}",
        }
        yield Stack(env, key, urls, processes)


def eventually(check: Callable[[], T | None], what: str, stack: Stack, timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s\n{stack.logs()}", pytrace=False)
        time.sleep(0.5)


# --- what the hospitals and the patient do ------------------------------------------------------


def push(stack: Stack, sender: str, recipient: str, parts: list[bytes]) -> None:
    body = io.BytesIO()
    for part in parts:
        body.write(f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        body.write(part)
    body.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    response = requests.post(
        f"{stack.urls['ingest']}/dicomweb/to/{recipient}/studies",
        data=body.getvalue(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "X-Beeldportaal-Study-Complete": "true",
            **stack.auth(sender, ("provider",), uzi=UZI),
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text


def consent_api(stack: Stack, path: str, body: Any, headers: dict[str, str]) -> int:
    response = requests.post(
        f"{stack.urls['consent']}{path}", data=json.dumps(body), headers=headers, timeout=30
    )
    assert response.status_code in (200, 201, 202), response.text
    return response.status_code


def mitz(stack: Stack, status: str) -> None:
    headers = {
        "Content-Type": "application/fhir+json",
        **stack.auth(MITZ, ("consent-authority",)),
    }
    consent_api(stack, "/mitz/notifications", make_bundle(status=status), headers)


def search(stack: Stack, ura: str) -> requests.Response:
    return requests.post(
        f"{stack.urls['timeline']}/fhir/ImagingStudy/_search",
        data=[("patient.identifier", f"{BSN_SYSTEM}|{TEST_BSN}")],
        headers=stack.reader(ura),
        timeout=30,
    )


def entries(response: requests.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    Bundle.model_validate(response.json())  # valid FHIR R4, checked by an independent library
    return [e["resource"] for e in response.json().get("entry", [])]


def study_uid_of(resource: dict[str, Any]) -> str | None:
    for identifier in resource.get("identifier", []):
        if identifier.get("system") == "urn:dicom:uid":
            return str(identifier["value"]).removeprefix("urn:oid:")
    return None


def make_study(accession: str) -> tuple[str, list[bytes]]:
    study = generate_uid()
    series = generate_uid()
    common = {
        "StudyInstanceUID": study,
        "AccessionNumber": accession,
        "patient": bsn_item(TEST_BSN),
        "StudyDate": "20260310",
        "InstitutionName": "Demo Ziekenhuis Oost",
    }
    images = [
        make_dicom_bytes(SeriesInstanceUID=series, InstanceNumber=n, **common) for n in (1, 2)
    ]
    report = make_dicom_bytes(sop_class_uid=BasicTextSRStorage, **common)
    return study, [*images, report]


# --- the journey --------------------------------------------------------------------------------


def test_a_study_reaches_the_timeline_of_treating_providers_only_and_leaves_it_on_revocation(
    stack: Stack,
) -> None:
    # The patient consents (Mitz) and hospital West registers its treatment relationship.
    mitz(stack, "active")
    relationship = {
        "bsn": TEST_BSN,
        "organisation_ura": TREATING,
        "start": "2025-01-01",
        "source": "referral",
    }
    consent_api(
        stack,
        "/treatment-relationships",
        relationship,
        {"Content-Type": "application/json", **stack.auth(TREATING)},
    )

    # Hospital Oost sends its study (two images and a report) to West; Zuid sends its copy.
    study, parts = make_study("ACC-JOURNEY-1")
    push(stack, SENDER, TREATING, parts)
    push(stack, SECOND_SOURCE, TREATING, parts)

    def both_sources_and_the_report() -> list[dict[str, Any]] | None:
        response = search(stack, TREATING)
        if response.status_code != 200:
            return None
        found = entries(response)
        images = [r for r in found if r["resourceType"] == "ImagingStudy"]
        if len(found) == 2 and len(images) == 1 and len(contained_uras(images[0])) == 2:
            return found
        return None

    found = eventually(both_sources_and_the_report, "the study with both sources", stack)
    images = next(r for r in found if r["resourceType"] == "ImagingStudy")
    report = next(r for r in found if r["resourceType"] == "DocumentReference")
    # One entry for the study however many institutions hold it, each listed as a source.
    assert study_uid_of(images) == study
    assert sorted(contained_uras(images)) == sorted([SENDER, SECOND_SOURCE])
    assert images["numberOfInstances"] == 3
    # The report is its own entry, linked to its images by accession number and by reference.
    accession = {"identifier": accession_identifier("ACC-JOURNEY-1")}
    assert accession in report["context"]["related"]
    assert {"reference": f"ImagingStudy/{images['id']}"} in report["context"]["related"]
    assert report["content"][0]["attachment"]["title"] == "DICOM SR report"
    assert TEST_BSN not in json.dumps(found)

    # A hospital without a treatment relationship is refused, and told why.
    refused = search(stack, STRANGER)
    assert refused.status_code == 403, refused.text
    assert refused.json()["resourceType"] == "OperationOutcome"
    assert "treatment" in refused.text.lower()

    # West's viewer retrieves the instances byte for byte through dicomweb-client (WADO-RS).
    client = DICOMwebClient(
        url=f"{stack.urls['timeline']}/dicomweb", headers=stack.reader(TREATING)
    )
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    raw = client._http_get(
        f"{stack.urls['timeline']}/dicomweb/studies/{study}",
        headers={**stack.reader(TREATING), **accept},
    )
    assert sorted(client._decode_multipart_message(raw, stream=False)) == sorted(parts)
    datasets = client.retrieve_study(study)
    assert sorted(d.SOPInstanceUID for d in datasets) == sorted(
        pydicom.dcmread(io.BytesIO(p), stop_before_pixels=True).SOPInstanceUID for p in parts
    )
    qido = client.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert len(qido) == 1

    # The patient revokes consent (Mitz): the study leaves West's timeline within seconds.
    mitz(stack, "inactive")

    def hidden() -> requests.Response | None:
        response = search(stack, TREATING)
        if response.status_code == 200 and any(study_uid_of(r) == study for r in entries(response)):
            return None
        return response

    after = eventually(hidden, "the study withdrawn after the revocation", stack, timeout=30)
    assert after.status_code == 403 and "consent" in after.text.lower(), after.text
    gone = requests.get(
        f"{stack.urls['timeline']}/dicomweb/studies/{study}/metadata",
        headers=stack.reader(TREATING),
        timeout=30,
    )
    assert gone.status_code in (403, 404), gone.text

    # West also downloads Oost's study from the portal (delivery rests on the presumed
    # referral, not on the timeline consent), with a link signed as notify signs the one in
    # West's webhook; Noord, handed the same link, is refused.
    link = sign_pickup(
        study,
        1,
        TREATING,
        SENDER,
        datetime.now(UTC) + timedelta(hours=1),
        stack.env["BEELDPORTAAL_NOTIFY_PICKUP_KEY"].encode(),
    )
    pickup_url = f"{stack.urls['notify']}/pickup/{link}"

    def downloaded() -> requests.Response | None:
        response = requests.get(pickup_url, headers=stack.reader(TREATING), timeout=60)
        return response if response.status_code == 200 else None  # 404 until routed

    download = eventually(downloaded, "the study downloadable from the portal", stack)
    archive = zipfile.ZipFile(io.BytesIO(download.content))
    assert sorted(archive.read(name) for name in archive.namelist()) == sorted(parts)
    stranger = requests.get(pickup_url, headers=stack.reader(STRANGER), timeout=30)
    assert stranger.status_code == 403, stranger.text

    # The patient (through the portal) sees every access: allowed, refused, by whom; the
    # pickups too, once the timeline's archive has loaded notify's records.
    def access_log_with_the_pickups() -> list[dict[str, Any]] | None:
        log = requests.post(
            f"{stack.urls['timeline']}/access-log/_search",
            json={"bsn": TEST_BSN},
            headers=stack.auth(
                PORTAL, ("patient-representative",), uzi=UZI, represents=(TEST_BSN,)
            ),
            timeout=30,
        )
        assert log.status_code == 200, log.text
        Bundle.model_validate(log.json())
        found = [e["resource"] for e in log.json().get("entry", [])]
        pickups = {
            (_organisation(e), e.get("outcome"))
            for e in found
            if any(s["code"] == "portal-pickup" for s in e.get("subtype", []))
        }
        return found if {(TREATING, "0"), (STRANGER, "4")} <= pickups else None

    events = eventually(access_log_with_the_pickups, "the pickups in the access log", stack)
    observers = {
        e["source"]["observer"]["display"]
        for e in events
        if any(s["code"] == "portal-pickup" for s in e.get("subtype", []))
    }
    assert observers == {"beeldportaal notify"}
    text = json.dumps(events)
    assert TEST_BSN not in text
    outcomes = {
        (_organisation(e), e.get("outcome")) for e in events if _organisation(e) is not None
    }
    assert (TREATING, "0") in outcomes  # West's allowed searches and retrievals
    assert (STRANGER, "4") in outcomes  # Noord was refused
    kinds = {(_organisation(e), s["code"]) for e in events for s in e.get("subtype", [])}
    assert {(TREATING, "wado-rs"), (TREATING, "qido-rs")} <= kinds, kinds


def contained_uras(resource: dict[str, Any]) -> list[str]:
    return [
        identifier["value"]
        for contained in resource.get("contained", [])
        if contained.get("resourceType") == "Organization"
        for identifier in contained.get("identifier", [])
        if identifier.get("system") == URA_SYSTEM
    ]


def _organisation(event: dict[str, Any]) -> str | None:
    for agent in event.get("agent", []):
        who = agent.get("who", {}).get("identifier", {})
        if who.get("system", "").endswith("ura"):
            return str(who.get("value"))
    return None
