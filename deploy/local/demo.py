"""`beeldportaal demo` (`make demo`): two demo hospitals send a study each through the services.

On top of `make up`: an Orthanc stands in for the receiving PACS of both demo hospitals (its ports,
AE title and credentials read from the seeded provider directory, so they cannot disagree); the
demo patient gets an explicit Mitz consent for the timeline and a treatment relationship with
Demo Ziekenhuis Oost; then Oost sends a study to West over STOW-RS and West one to Oost over
C-STORE. Each study's journey is followed through notify's status API (received → consent →
route → delivered), its instances are looked up in Orthanc, Oost's webhook subscriber (served
by the demo at the directory's webhook URL while it runs) receives the signed notification of
the study delivered to it, and Oost searches the patient's timeline. Exit status 1, with the
reason, when any of that did not happen in time.

The patient is a published test BSN (11-proof); it travels only in request bodies and DICOM
data sets, and is never printed: the output names the patient by its pseudonym.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from deploy.local.config import LocalConfig, read_env_file
from deploy.local.orthanc import OrthancConfig, OrthancPeer
from deploy.local.processes import PlatformError
from services.consent.domain.mitz import PROVIDER_CATEGORY_EXTENSION
from shared.identifiers import BSN_DICOM_ISSUER, BSN_OID, BSN_SYSTEM, URA_SYSTEM, Bsn, Pseudonymizer
from shared.logging import scrub_bsns

OOST = "00000101"  # Demo Ziekenhuis Oost: receives over DICOMweb, sends over STOW-RS
WEST = "00000202"  # Demo Ziekenhuis West: receives over DIMSE, sends over C-STORE
NAMES = {OOST: "Demo Ziekenhuis Oost", WEST: "Demo Ziekenhuis West"}
# demo-peers.json: West's PACS calls as WEST_PACS, ingest answers for Oost as BP_DEMO_OOST.
WEST_CALLING_AE = "WEST_PACS"
OOST_RECEIVE_AE = "BP_DEMO_OOST"
MITZ_URA = "00000001"  # the consent authority's token
DEMO_UZI = "900000001"  # the radiologist of Oost who looks at the timeline
# A published test BSN (passes the 11-proof, issued to nobody).
DEMO_BSN = Bsn("999990056")
HOSPITALS_CATEGORY = "RPZAC104"  # Mitz requesting-provider category of hospitals (V4)
TREATMENT_DATA = "GGC002"  # Mitz data category "Behandelgegevens"
INSTANCES_PER_STUDY = 3
NETHERLANDS = ZoneInfo("Europe/Amsterdam")


class DemoError(RuntimeError):
    """Something the demo needs did not happen; the message says what and where to look."""


# -- the receiving PACS ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivingPacs:
    """Where the directory says the demo hospitals receive: one Orthanc serves both."""

    http_port: int  # Oost's DICOMweb endpoint
    dicom_port: int  # West's DIMSE endpoint
    aet: str
    credentials: tuple[str, str] | None  # Oost's basic auth, if the directory has one

    @classmethod
    def from_directory(cls, seed: Path) -> ReceivingPacs:
        from services.routing.domain.directory import (
            BasicAuth,
            DicomWebEndpoint,
            DimseEndpoint,
            Directory,
            DirectoryError,
        )

        try:
            directory = Directory.load_yaml(seed)
        except DirectoryError as exc:
            raise DemoError(f"the directory seed {seed} cannot be used: {exc}") from None
        oost, west = directory.get(OOST), directory.get(WEST)
        web = [e for e in (oost.endpoints if oost else ()) if isinstance(e, DicomWebEndpoint)]
        dimse = [e for e in (west.endpoints if west else ()) if isinstance(e, DimseEndpoint)]
        if len(web) != 1 or len(dimse) != 1:
            raise DemoError(
                f"{seed} must give {OOST} one DICOMweb endpoint and {WEST} one DIMSE endpoint "
                "(the demo runs an Orthanc there)"
            )
        url = urlsplit(web[0].base_url)
        if url.hostname not in ("127.0.0.1", "localhost") or url.path.rstrip("/") != "/dicom-web":
            raise DemoError(f"{OOST}'s DICOMweb endpoint must be http://127.0.0.1:<port>/dicom-web")
        if dimse[0].host not in ("127.0.0.1", "localhost"):
            raise DemoError(f"{WEST}'s DIMSE endpoint must be on 127.0.0.1")
        auth = web[0].auth
        credentials = (
            (auth.username, auth.password.get_secret_value())
            if isinstance(auth, BasicAuth)
            else None
        )
        return cls(url.port or 80, dimse[0].port, dimse[0].ae_title, credentials)

    def orthanc_config(self) -> OrthancConfig:
        """The Orthanc that stands in for this PACS, asking for the directory's credentials."""
        return OrthancConfig(
            http_port=self.http_port,
            dicom_port=self.dicom_port,
            aet=self.aet,
            name="beeldportaal-demo-pacs",
            credentials=self.credentials,
        )


def running_as_configured(peer: OrthancPeer) -> bool:
    """Whether the running Orthanc was started with ``peer``'s configuration (else restart it)."""
    try:
        running = json.loads(peer.config_file.read_text())
    except (OSError, ValueError):
        return False
    return all(running.get(key) == value for key, value in peer.config_json().items())


def orthanc_dir(config: LocalConfig) -> Path:
    return config.state_dir / "demo" / "orthanc"


def ensure_orthanc(
    config: LocalConfig, pacs: ReceivingPacs, out: Callable[[str], None]
) -> OrthancPeer:
    """The demo's receiving PACS, started unless it already runs as ``pacs`` says."""
    peer = OrthancPeer(orthanc_dir(config), pacs.orthanc_config())
    if peer.process.running():
        if running_as_configured(peer) and peer.ready():
            out(f"{'demo-orthanc:':17} already running (pid {peer.pid})")
            return peer
        peer.stop()
    try:
        peer.start()
    except PlatformError as exc:
        raise DemoError(f"the demo Orthanc did not start: {exc}") from None
    out(
        f"{'demo-orthanc:':17} started (pid {peer.pid}, log {peer.process.log_file}): "
        f"DICOMweb {peer.dicomweb_url} for {OOST}, C-STORE 127.0.0.1:{peer.dicom_port} "
        f"AE {pacs.aet} for {WEST}"
    )
    return peer


def demo_orthanc_pid(config: LocalConfig) -> int | None:
    return OrthancPeer(orthanc_dir(config)).pid


def stop_demo_orthanc(config: LocalConfig) -> bool:
    """Stop the demo Orthanc if it runs (by its recorded pid); whether it did."""
    return OrthancPeer(orthanc_dir(config)).stop()


# -- Oost's webhook subscriber ----------------------------------------------------------------

MAX_WEBHOOK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class WebhookSubscription:
    url: str
    secret: str

    @classmethod
    def from_directory(cls, seed: Path, ura: str) -> WebhookSubscription | None:
        """The webhook the directory gives ``ura``; None when it has none."""
        from services.routing.domain.directory import Directory, DirectoryError

        try:
            provider = Directory.load_yaml(seed).get(ura)
        except DirectoryError as exc:
            raise DemoError(f"the directory seed {seed} cannot be used: {exc}") from None
        if provider is None or provider.webhook is None:
            return None
        webhook = provider.webhook
        url = urlsplit(webhook.url)
        if url.hostname not in ("127.0.0.1", "localhost") or url.port is None:
            raise DemoError(f"{ura}'s webhook must be http://127.0.0.1:<port>/... for the demo")
        return cls(webhook.url, webhook.secret.get_secret_value())


class WebhookInbox:
    """What a hospital's webhook subscriber does, for the demo: it listens on the directory's
    webhook URL (127.0.0.1 only) while the demo runs, checks each notification's
    ``X-Beeldportaal-Signature`` with the shared secret (401 when it does not verify) and keeps
    those that verify."""

    def __init__(self, subscription: WebhookSubscription) -> None:
        self.subscription = subscription
        self.received: list[dict[str, Any]] = []
        self.refused = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen; raises OSError when the port is taken."""
        url = urlsplit(self.subscription.url)
        self._server = ThreadingHTTPServer(("127.0.0.1", url.port or 80), self._handler())
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="demo-webhook-inbox", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> WebhookInbox:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        from services.notify.adapters.webhooks import SIGNATURE_HEADER, verify

        inbox = self
        path = urlsplit(self.subscription.url).path or "/"

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if self.path != path or not 0 < length <= MAX_WEBHOOK_BYTES:
                    self._answer(404 if self.path != path else 400)
                    return
                body = self.rfile.read(length)
                if not verify(body, inbox.subscription.secret, self.headers.get(SIGNATURE_HEADER)):
                    with inbox._lock:
                        inbox.refused += 1
                    self._answer(401)
                    return
                try:
                    notification = json.loads(body)
                except ValueError:
                    self._answer(400)
                    return
                with inbox._lock:
                    inbox.received.append(notification)
                self._answer(204)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass  # the demo prints what it received

        return Handler

    def wait_for(self, study_uid: str, deadline: float) -> dict[str, Any] | None:
        """The first verified notification about ``study_uid``, once it came; None if it did
        not come before ``deadline`` (monotonic)."""
        while True:
            with self._lock:
                for notification in self.received:
                    if notification.get("data", {}).get("study_instance_uid") == study_uid:
                        return notification
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)


# -- sample studies --------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoStudy:
    label: str
    sender_ura: str
    recipient_ura: str
    channel: str  # how it is sent: STOW-RS or C-STORE
    uid: str
    datasets: tuple[Dataset, ...]

    @property
    def sop_uids(self) -> set[str]:
        return {str(ds.SOPInstanceUID) for ds in self.datasets}


def make_study(
    *, bsn: Bsn, institution: str, description: str, modality: str, accession: str
) -> tuple[str, tuple[Dataset, ...]]:
    """A small synthetic image study of the patient (8x8 pixels per instance, one series)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    now = datetime.now(NETHERLANDS)  # DICOM dates and times are the hospital's local time
    datasets = []
    for number in range(1, INSTANCES_PER_STUDY + 1):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
        ds.AccessionNumber = accession
        ds.Modality = modality
        ds.InstitutionName = institution
        ds.StudyDescription = description
        ds.SeriesDescription = f"{description}, axial"
        ds.SeriesNumber = 1
        ds.InstanceNumber = number
        ds.PatientName = "Demo^Patient"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.PatientID = bsn.value
        ds.IssuerOfPatientID = BSN_DICOM_ISSUER
        qualifier = Dataset()
        qualifier.UniversalEntityID = BSN_OID
        qualifier.UniversalEntityIDType = "ISO"
        ds.IssuerOfPatientIDQualifiersSequence = Sequence([qualifier])
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = bytes((i * number) % 256 for i in range(128))
        ds["PixelData"].VR = "OW"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        datasets.append(ds)
    return study_uid, tuple(datasets)


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def demo_studies(bsn: Bsn) -> list[DemoStudy]:
    run = datetime.now(UTC).strftime("%H%M%S")
    oost_uid, oost_data = make_study(
        bsn=bsn,
        institution=NAMES[OOST],
        description="CT thorax (demo)",
        modality="CT",
        accession=f"OOST{run}",
    )
    west_uid, west_data = make_study(
        bsn=bsn,
        institution=NAMES[WEST],
        description="CT abdomen (demo)",
        modality="CT",
        accession=f"WEST{run}",
    )
    return [
        DemoStudy("Oost -> West", OOST, WEST, "STOW-RS", oost_uid, oost_data),
        DemoStudy("West -> Oost", WEST, OOST, "C-STORE", west_uid, west_data),
    ]


# -- talking to the services -----------------------------------------------------------------


@dataclass
class Demo:
    config: LocalConfig
    env: dict[str, str]
    out: Callable[[str], None] = print
    timeout: float = 180.0
    urls: dict[str, str] = field(default_factory=dict)
    dimse_port: int = 11112

    def __post_init__(self) -> None:
        from deploy.local.services import api_base_url, dimse_port

        self.urls = {s: api_base_url(s) for s in ("ingest", "consent", "notify", "timeline")}
        self.dimse_port = dimse_port()
        from shared.auth import ensure_dev_keypair

        self._key, _ = ensure_dev_keypair(self.config.dev_jwt_dir)
        self._http = httpx.Client(timeout=60)

    def token(self, ura: str, role: str = "provider", **claims: Any) -> dict[str, str]:
        from shared.auth import mint_token

        token = mint_token(self._key, ura=ura, roles=(role,), ttl_s=900, **claims)
        return {"Authorization": f"Bearer {token}"}

    def section(self, title: str) -> None:
        self.out("")
        self.out(f"== {title}")

    # -- consent ------------------------------------------------------------------------------

    def register_consent(self, bsn: Bsn) -> None:
        """A Mitz permit for hospitals (the timeline) and Oost's treatment relationship."""
        consent = self.urls["consent"]
        relationship = {
            "bsn": bsn.value,
            "organisation_ura": OOST,
            "start": "2020-01-01",
            "source": "referral",
            "relationship_id": "demo-oost-referral",
        }
        answer = self._http.post(
            f"{consent}/treatment-relationships", json=relationship, headers=self.token(OOST)
        )
        if answer.status_code not in (200, 201, 202):
            raise DemoError(f"treatment relationship refused: HTTP {answer.status_code}")
        self.out(
            f"treatment relationship  {NAMES[OOST]} ({OOST}) treats the patient: "
            f"{answer.json()['status']}"
        )
        answer = self._http.post(
            f"{consent}/mitz/notifications",
            content=json.dumps(mitz_bundle(bsn)),
            headers={
                "Content-Type": "application/fhir+json",
                **self.token(MITZ_URA, "consent-authority"),
            },
        )
        if answer.status_code not in (200, 201, 202):
            raise DemoError(f"Mitz consent refused: HTTP {answer.status_code}: {_issues(answer)}")
        self.out(
            f"explicit consent        Mitz permit for {HOSPITALS_CATEGORY} (hospitals), "
            f"{TREATMENT_DATA}: {_issues(answer)}"
        )

    # -- sending ------------------------------------------------------------------------------

    def send(self, study: DemoStudy) -> None:
        if study.channel == "STOW-RS":
            self._stow(study)
        else:
            self._c_store(study)

    def _stow(self, study: DemoStudy) -> None:
        boundary = uuid.uuid4().hex
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + part10(ds)
                + b"\r\n"
                for ds in study.datasets
            )
            + f"--{boundary}--\r\n".encode()
        )
        url = f"{self.urls['ingest']}/dicomweb/to/{study.recipient_ura}/studies"
        answer = self._http.post(
            url,
            content=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
                "X-Beeldportaal-Study-Complete": "true",
                **self.token(study.sender_ura),
            },
        )
        stored = 0
        if answer.headers.get("content-type", "").startswith("application/dicom+json"):
            stored = len(answer.json().get("00081199", {}).get("Value", []))
        if answer.status_code != 200 or stored != len(study.datasets):
            raise DemoError(
                f"{study.label}: STOW-RS answered HTTP {answer.status_code}, "
                f"{stored}/{len(study.datasets)} stored: {scrub_bsns(answer.text[:500])}"
            )
        self.out(f"sent     {len(study.datasets)} instances by STOW-RS POST {url}: HTTP 200")

    def _c_store(self, study: DemoStudy) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=WEST_CALLING_AE)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.dimse_port, ae_title=OOST_RECEIVE_AE)
        if not assoc.is_established:
            raise DemoError(
                f"{study.label}: ingest's C-STORE SCP at 127.0.0.1:{self.dimse_port} did not "
                f"accept an association from {WEST_CALLING_AE} to {OOST_RECEIVE_AE}"
            )
        statuses = []
        try:
            for ds in study.datasets:
                # As a PACS sends a file: read back from its Part 10 bytes.
                status = assoc.send_c_store(dcmread(io.BytesIO(part10(ds))))
                statuses.append(int(status.Status) if "Status" in status else -1)
        finally:
            assoc.release()
        if any(s != 0 for s in statuses):
            raise DemoError(f"{study.label}: C-STORE statuses {[hex(s) for s in statuses]}")
        self.out(
            f"sent     {len(study.datasets)} instances by C-STORE {WEST_CALLING_AE} -> "
            f"{OOST_RECEIVE_AE} at 127.0.0.1:{self.dimse_port}: Success"
        )

    # -- the journey --------------------------------------------------------------------------

    def follow(self, study: DemoStudy, deadline: float) -> dict[str, Any]:
        """Print each step of the study's journey as notify reports it, until delivered."""
        url = f"{self.urls['notify']}/studies/{study.uid}/status"
        printed: set[str] = set()  # each step once, as it first appears
        version: dict[str, Any] = {}
        while True:
            answer = self._http.get(url, headers=self.token(study.sender_ura))
            if answer.status_code == 200:
                version = answer.json()["versions"][-1]
                for line in journey_lines(version):
                    if line not in printed:
                        printed.add(line)
                        self.out(line)
                if version["state"] == "delivered":
                    return version
                if version["state"] in ("failed", "not-routed"):
                    raise DemoError(
                        f"{study.label}: the study was {version['state']}: "
                        f"{json.dumps(version, default=str)[:1000]}"
                    )
            elif answer.status_code != 404:  # 404: not announced yet (assembly waits)
                raise DemoError(f"{study.label}: study status answered HTTP {answer.status_code}")
            if time.monotonic() > deadline:
                where = version.get("state", "not even received") if version else "not received"
                raise DemoError(
                    f"{study.label}: not delivered within {self.timeout:.0f}s (last state: "
                    f"{where}); see the logs in {self.config.state_dir / 'services'}"
                )
            time.sleep(1)

    # -- the receiving PACS -------------------------------------------------------------------

    def check_orthanc(self, orthanc: OrthancPeer, study: DemoStudy) -> None:
        found = [r for r in orthanc.lookup(study.uid) if r.get("Type") == "Study"]
        present: set[str] = set()
        if found:
            instances = orthanc.rest("GET", f"/studies/{found[0]['ID']}/instances")
            present = {i["MainDicomTags"]["SOPInstanceUID"] for i in instances}
        missing = study.sop_uids - present
        if missing:
            raise DemoError(
                f"{study.label}: Orthanc holds {len(study.sop_uids) - len(missing)} of the "
                f"{len(study.sop_uids)} instances of study {study.uid}"
            )
        self.out(
            f"orthanc  study {study.uid}: all {len(present)} instances present "
            f"({orthanc.base_url}/studies/{found[0]['ID']})"
        )

    def check_webhook(self, inbox: WebhookInbox, study: DemoStudy, deadline: float) -> None:
        """The recipient's subscriber got the signed notification that the study arrived."""
        notification = inbox.wait_for(study.uid, deadline)
        if notification is None:
            raise DemoError(
                f"{NAMES[study.recipient_ura]}'s webhook got no notification of study "
                f"{study.uid} within {self.timeout:.0f}s ({inbox.refused} refused: bad signature)"
            )
        data = notification.get("data", {})
        self.out(
            f"webhook  {notification.get('type')} to {NAMES[study.recipient_ura]}: "
            f"endpoint {data.get('endpoint_id')}, signature verified"
        )

    # -- the timeline -------------------------------------------------------------------------

    def timeline(self, bsn: Bsn, studies: list[DemoStudy], deadline: float) -> list[dict[str, Any]]:
        """Oost's search of the patient's timeline, until it shows every demo study."""
        url = f"{self.urls['timeline']}/fhir/ImagingStudy/_search"
        form = {"patient.identifier": f"{BSN_SYSTEM}|{bsn.value}", "_count": "50"}
        wanted = {s.uid for s in studies}
        while True:
            answer = self._http.post(
                url, data=form, headers=self.token(OOST, uzi=DEMO_UZI, purpose="TREAT")
            )
            if answer.status_code != 200:
                raise DemoError(
                    f"timeline search answered HTTP {answer.status_code}: {_issues(answer)}"
                )
            resources = [e["resource"] for e in answer.json().get("entry", [])]
            if wanted <= {r.get("id") for r in resources}:
                return resources
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the timeline did not show every demo study within {self.timeout:.0f}s "
                    f"({len(wanted - {r.get('id') for r in resources})} missing)"
                )
            time.sleep(1)

    def run(self) -> None:
        from deploy.local.services import Services, directory_seed

        if not Services(self.config, out=lambda *_: None).status():
            raise DemoError(
                "the services are not all running and ready (`beeldportaal services status`): "
                "run `make up` first"
            )
        orthanc = ensure_orthanc(
            self.config, ReceivingPacs.from_directory(directory_seed()), self.out
        )
        subscription = WebhookSubscription.from_directory(directory_seed(), OOST)
        if subscription is None:
            self._run(orthanc, None)
            return
        inbox = WebhookInbox(subscription)
        try:
            inbox.start()
        except OSError as exc:
            raise DemoError(
                f"{OOST}'s webhook subscriber cannot listen at {subscription.url}: {exc}"
            ) from None
        try:
            self.out(f"{'demo-webhook:':17} {NAMES[OOST]}'s subscriber at {subscription.url}")
            self._run(orthanc, inbox)
        finally:
            inbox.stop()

    def _run(self, orthanc: OrthancPeer, inbox: WebhookInbox | None) -> None:
        pseudonym = Pseudonymizer(self.env["BEELDPORTAAL_PSEUDONYM_KEY"].encode()).pseudonym(
            DEMO_BSN
        )
        self.section(f"the demo patient {pseudonym[:20]}... (pseudonym; the BSN is never shown)")
        self.register_consent(DEMO_BSN)
        studies = demo_studies(DEMO_BSN)
        for study in studies:
            self.section(
                f"{study.label}: {NAMES[study.sender_ura]} sends study {study.uid} "
                f"to {NAMES[study.recipient_ura]} ({study.channel})"
            )
            self.send(study)
        deadline = time.monotonic() + self.timeout
        for study in studies:
            self.section(f"{study.label}: the journey of study {study.uid}")
            self.follow(study, deadline)
            self.check_orthanc(orthanc, study)
            if inbox is not None and study.recipient_ura == OOST:
                self.check_webhook(inbox, study, deadline)
        self.section(f"the timeline, as {NAMES[OOST]} ({OOST}) searches it (* sent just now)")
        entries = self.timeline(DEMO_BSN, studies, deadline)
        for line in timeline_lines(entries, {s.uid for s in studies}):
            self.out(line)
        self.out("")
        self.out(
            f"demo done: {len(studies)} studies delivered into Orthanc ({orthanc.base_url}) "
            "and in the patient's timeline"
        )


def mitz_bundle(
    bsn: Bsn, organisation_ura: str = OOST, consent_id: str = "demo-timeline-consent"
) -> dict[str, Any]:
    """A Mitz notification: the patient permits hospitals to see their treatment data (the
    consent ``consent_id``, recorded at ``organisation_ura``)."""
    consent = {
        "resourceType": "Consent",
        "id": consent_id,
        "status": "active",
        "extension": [
            {
                "url": PROVIDER_CATEGORY_EXTENSION,
                "valueCoding": {"system": "urn:example:mitz", "code": HOSPITALS_CATEGORY},
            }
        ],
        "category": [
            {"coding": [{"system": "http://loinc.org", "code": "59284-0"}]},
            {"coding": [{"system": "urn:example:mitz", "code": TREATMENT_DATA}]},
        ],
        "patient": {"reference": "urn:uuid:demo-patient"},
        "organization": [{"reference": "Organization/demo-oost"}],
        "provision": {"type": "permit", "period": {"start": date(2020, 1, 1).isoformat()}},
    }
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:demo-consent", "resource": consent},
            {
                "fullUrl": "urn:uuid:demo-patient",
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": BSN_SYSTEM, "value": bsn.value}],
                },
            },
            {
                "fullUrl": "https://mitz.example/Organization/demo-oost",
                "resource": {
                    "resourceType": "Organization",
                    "id": "demo-oost",
                    "identifier": [{"system": URA_SYSTEM, "value": organisation_ura}],
                },
            },
        ],
    }


def journey_lines(version: dict[str, Any]) -> Iterator[str]:
    """The steps a status answer (one study version) shows, one line each, in order."""
    yield (
        f"received v{version['version']}: {version['instances']} instances "
        f"for {version['recipient_ura']}"
    )
    consent = version.get("consent")
    if consent:
        flagged = ", flagged" if consent["flagged"] else ""
        yield f"consent  delivery {consent['decision']} ({consent['basis']}{flagged})"
    for route in version.get("routes", []):
        yield (
            f"route    {route['destination_ura']} endpoint {route['endpoint_id']} "
            f"({route['channel']}, {route['priority']})"
        )
    failure = version.get("route_failure")
    if failure:
        yield f"route    FAILED: {failure['reason']}"
    for delivery in version.get("deliveries", []):
        endpoint = f"{delivery['endpoint_id']} ({delivery['channel']})"
        last = delivery.get("last_failure")
        if delivery["state"] == "delivered":
            outcomes = delivery.get("outcomes") or {}
            yield (
                f"delivered to {endpoint}: {outcomes.get('sent', 0)} sent, "
                f"{outcomes.get('already_present', 0)} already present, "
                f"{outcomes.get('failed', 0)} failed (attempt {delivery.get('attempts')})"
            )
        elif last:
            yield f"{delivery['state']} {endpoint}: attempt {last['attempt']}: {last['reason']}"


def timeline_lines(resources: list[dict[str, Any]], sent_now: set[str]) -> Iterator[str]:
    """One line per entry (and who sent it); ``*`` marks the studies this run sent."""
    for resource in resources:
        mark = "*" if resource.get("id") in sent_now else " "
        kind = resource.get("resourceType")
        modalities = ",".join(m.get("code", "?") for m in resource.get("modality", []))
        senders = "; ".join(n.get("text", "") for n in resource.get("note", []))
        yield (
            f"{mark} {kind} {resource.get('id')}  {resource.get('started', '-')}  "
            f"{modalities or '-'}  "
            f"{resource.get('description', '')}  {resource.get('numberOfSeries', '?')} series, "
            f"{resource.get('numberOfInstances', '?')} instances"
        )
        if senders:
            yield f"      {senders}"


def _issues(answer: httpx.Response) -> str:
    try:
        issues = answer.json().get("issue", [])
    except ValueError:
        return scrub_bsns(answer.text[:300])
    return scrub_bsns("; ".join(i.get("diagnostics", "") for i in issues)) or "-"


def main(timeout: float) -> int:
    config = LocalConfig.from_env()
    if not config.env_file.exists():
        print("error: the platform is not up: run `make up` first", file=sys.stderr)
        return 1
    env = read_env_file(config.env_file)

    def out(line: str) -> None:
        print(line, flush=True)

    demo = Demo(config, env, out, timeout)
    try:
        demo.run()
    except (DemoError, PlatformError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
