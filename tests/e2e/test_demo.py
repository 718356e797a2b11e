"""`make up` → `make demo` → `make down` on a private platform, as an operator runs them.

Everything runs beside the platform the other tests use: its own state directory and free ports
for Kafka, S3, PostgreSQL, Prometheus, every service and the demo's Orthanc (a directory seed of
its own points the demo hospitals' endpoints at that Orthanc). The test then looks for itself:
the demo's studies in Orthanc (through its REST API, with the credentials of the directory), the
patient's timeline as Demo Ziekenhuis Oost sees it, no BSN in any output or log, and after
`make down` no process of that state directory left running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy.local.demo import DEMO_BSN, OOST
from deploy.local.services import DEMO_DIRECTORY
from shared.auth import ensure_dev_keypair, mint_token
from shared.identifiers import BSN_SYSTEM
from tests.e2e.harness import (
    PrivatePlatform,
    free_ports,
    private_platform,
    processes_mentioning,
    service_ports,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
# The demo seed's Oost endpoint and its credentials (demo-only values of the repository file).
ORTHANC_USER = ("beeldportaal", "demo-only-oost-password")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _seed_for(http_port: int, dicom_port: int, webhook_port: int) -> str:
    """The demo directory with both demo endpoints moved to the private Orthanc's ports, and
    Oost's webhook to a free port."""
    text = DEMO_DIRECTORY.read_text()
    moved = (
        text.replace("http://127.0.0.1:8042/dicom-web", f"http://127.0.0.1:{http_port}/dicom-web")
        .replace("port: 4243", f"port: {dicom_port}")
        .replace("http://127.0.0.1:9101/", f"http://127.0.0.1:{webhook_port}/")
    )
    assert moved.count(str(http_port)) == 1 and moved.count(f"port: {dicom_port}") == 1
    assert moved.count(f"127.0.0.1:{webhook_port}/") == 1
    return moved


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[PrivatePlatform]:
    """For `make up` to start. Afterwards, however the test ends, what `make` left running of it
    is stopped: the services and the demo's Orthanc, then the platform (purged)."""
    with private_platform(tmp_path, start=False) as platform:
        try:
            yield platform
        finally:
            platform.run("services", "down", timeout=300)


def test_make_up_demo_down_delivers_both_studies_into_orthanc_and_leaves_nothing_running(
    tmp_path: Path, platform: PrivatePlatform
) -> None:
    state = platform.state
    ports = service_ports()
    orthanc_http, orthanc_dicom, webhook = free_ports(3)
    seed = tmp_path / "directory.yaml"
    seed.write_text(_seed_for(orthanc_http, orthanc_dicom, webhook))
    env = {**platform.env, **ports, "BEELDPORTAAL_ROUTING_DIRECTORY_SEED": str(seed)}
    orthanc = f"http://127.0.0.1:{orthanc_http}"
    timings: dict[str, float] = {}

    def make(target: str, timeout: float) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        result = subprocess.run(
            ["make", "--no-print-directory", "-C", str(REPO), target],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        timings[target] = round(time.monotonic() - started, 1)
        return result

    up = make("up", 900)
    assert up.returncode == 0, f"make up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
    demo = make("demo", 600)
    output = demo.stdout + demo.stderr
    assert demo.returncode == 0, f"make demo failed:\n{output[-6000:]}"

    # The two studies the demo says it sent: one over STOW-RS, one over C-STORE.
    sent = dict(re.findall(r"sends study (\S+) to .* \((STOW-RS|C-STORE)\)", demo.stdout))
    assert sorted(sent.values()) == ["C-STORE", "STOW-RS"], demo.stdout
    for uid in sent:
        assert f"orthanc  study {uid}: all 3 instances present" in demo.stdout
    # Oost's webhook subscriber got the signed notification of the study West sent it.
    assert "webhook  delivered.v1 to Demo Ziekenhuis Oost: endpoint oost-pacs-dicomweb, " in (
        demo.stdout
    )

    # Orthanc itself holds every instance of both, behind the directory's credentials.
    assert httpx.get(f"{orthanc}/studies", timeout=30).status_code == 401
    with httpx.Client(base_url=orthanc, auth=ORTHANC_USER, timeout=30) as pacs:
        for uid in sent:
            found = pacs.post("/tools/lookup", content=uid).json()
            (study,) = [r for r in found if r["Type"] == "Study"]
            instances = pacs.get(f"/studies/{study['ID']}/instances").json()
            assert len({i["MainDicomTags"]["SOPInstanceUID"] for i in instances}) == 3
            tags = pacs.get(f"/instances/{instances[0]['ID']}/simplified-tags").json()
            assert (tags["StudyInstanceUID"], tags["Modality"]) == (uid, "CT")

    # The demo printed the timeline, and the timeline API answers Oost the same.
    timeline = demo.stdout.split("== the timeline", 1)[1]
    for uid in sent:
        assert re.search(rf"^\* ImagingStudy {re.escape(uid)} ", timeline, re.M), timeline
    key, _ = ensure_dev_keypair(state / "secrets" / "dev-jwt")
    token = mint_token(key, ura=OOST, uzi="900000001", roles=("provider",), purpose="TREAT")
    search = httpx.post(
        f"http://127.0.0.1:{ports['BEELDPORTAAL_TIMELINE_HTTP_PORT']}/fhir/ImagingStudy/_search",
        data={"patient.identifier": f"{BSN_SYSTEM}|{DEMO_BSN.value}"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert search.status_code == 200, search.text
    entries = {e["resource"]["id"] for e in search.json()["entry"]}
    assert set(sent) <= entries

    # The BSN is in no output and no log of the run.
    assert DEMO_BSN.value not in output
    logs = [*state.glob("services/*.log"), *state.glob("demo/orthanc/*.log")]
    assert len(logs) >= 11
    assert [p.name for p in logs if DEMO_BSN.value in p.read_text(errors="replace")] == []

    # Prometheus scraped the services during the demo: every dashboard and alert
    # expression reads metrics that exist there.
    _every_dashboard_metric_exists(platform.config.prometheus_port)

    # A service that dies is started again by its supervisor (make up's stand-in for the
    # kubelet), and is ready again.
    supervisor = int((state / "services" / "notify-worker.pid").read_text())
    [first] = _children(supervisor)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while _children(supervisor) in ([], [first]) and time.monotonic() < deadline:
        time.sleep(0.2)
    [second] = _children(supervisor)
    assert second != first
    log = (state / "services" / "notify-worker.log").read_text(errors="replace")
    assert "supervisor: notify-worker exited (killed by SIGKILL)" in log
    status = platform.run("services", "status", env=env, timeout=60)
    while status.returncode != 0 and time.monotonic() < deadline:
        time.sleep(1)
        status = platform.run("services", "status", env=env, timeout=60)
    assert status.returncode == 0, status.stdout

    down = make("down", 600)
    assert down.returncode == 0, f"make down failed:\n{down.stdout}\n{down.stderr}"
    assert "demo-orthanc:     stopped" in down.stdout
    assert processes_mentioning(str(state)) == []
    home = state / "postgres" / "home"
    if home.exists():
        assert processes_mentioning(home.read_text().strip()) == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{orthanc}/system", timeout=5)
    print(f"timings (s): {timings}")


def _every_dashboard_metric_exists(prometheus_port: int) -> None:
    """Every dashboard and alert expression names metrics the live Prometheus has scraped."""
    from deploy.observability import check_live

    url = f"http://127.0.0.1:{prometheus_port}"
    deadline = time.monotonic() + 60
    problems = check_live(url)
    while problems and time.monotonic() < deadline:  # it scrapes every 5 s: wait for a scrape
        time.sleep(5)
        problems = check_live(url)
    assert problems == [], "\n".join(problems)
