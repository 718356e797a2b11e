"""deploy/local without running anything: apt installs and an Orthanc peer's credentials."""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from deploy.local import orthanc, processes, prometheus
from deploy.local.config import LocalConfig
from deploy.local.demo import (
    OOST,
    ReceivingPacs,
    WebhookInbox,
    WebhookSubscription,
    running_as_configured,
)
from deploy.local.orthanc import OrthancConfig, OrthancPeer
from deploy.local.platform import Platform
from deploy.local.processes import PlatformError, apt_install
from deploy.local.services import DEMO_DIRECTORY, Services

# -- apt_install -----------------------------------------------------------------------------


class AptRecorder:
    """Stands in for ``processes.run``: records each command and whether services were denied."""

    def __init__(self, policy: Path, failures: int = 0) -> None:
        self.policy = policy
        self.failures = failures
        self.calls: list[tuple[list[str], bool, dict[str, str]]] = []

    def __call__(self, argv: list[str], what: str, **kwargs: Any) -> None:
        self.calls.append((list(argv), self.policy.exists(), dict(kwargs["env"])))
        if argv[1] == "install" and self.failures:
            self.failures -= 1
            raise PlatformError(f"{what} failed")

    @property
    def commands(self) -> list[str]:
        return [" ".join(argv[:2]) for argv, _, _ in self.calls]


@pytest.fixture
def apt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AptRecorder:
    """Root, with apt-get, a policy-rc.d path of the test's own and apt-get recorded."""
    policy = tmp_path / "policy-rc.d"
    recorder = AptRecorder(policy)
    monkeypatch.setattr(processes, "POLICY_RC_D", policy)
    monkeypatch.setattr(processes, "run", recorder)
    monkeypatch.setattr(processes.os, "geteuid", lambda: 0)
    monkeypatch.setattr(processes.shutil, "which", lambda name: f"/usr/bin/{name}")
    return recorder


def test_apt_install_runs_noninteractive_with_services_denied(apt: AptRecorder) -> None:
    apt_install(("orthanc", "dcmtk"), "Orthanc")

    [(argv, denied, env)] = apt.calls
    assert argv[:2] == ["apt-get", "install"]
    assert argv[-2:] == ["orthanc", "dcmtk"]
    assert "-y" in argv and "--no-install-recommends" in argv
    assert env["DEBIAN_FRONTEND"] == "noninteractive"
    assert denied, "the packages' services could start during the install"
    assert not apt.policy.exists(), "the policy-rc.d written for the install stayed behind"


def test_apt_install_updates_the_package_lists_once_after_a_failed_install(
    apt: AptRecorder,
) -> None:
    apt.failures = 1
    apt_install(("prometheus",), "Prometheus")

    assert apt.commands == ["apt-get install", "apt-get update", "apt-get install"]
    assert all(denied for _, denied, _ in apt.calls)


def test_apt_install_leaves_the_machines_own_policy_alone(apt: AptRecorder) -> None:
    apt.policy.write_text("#!/bin/sh\nexit 101\n")

    apt_install(("prometheus",), "Prometheus")

    assert apt.policy.read_text() == "#!/bin/sh\nexit 101\n"


def test_apt_install_as_another_user_says_what_to_run(
    apt: AptRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processes.os, "geteuid", lambda: 1000)

    with pytest.raises(PlatformError) as error:
        apt_install(("orthanc", "dcmtk"), "Orthanc")

    assert str(error.value) == (
        "Orthanc is not installed and this is not root: "
        "apt-get install -y --no-install-recommends orthanc dcmtk"
    )
    assert apt.calls == []


def test_apt_install_without_apt_says_which_packages_are_needed(
    apt: AptRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processes.shutil, "which", lambda name: None)

    with pytest.raises(PlatformError, match=r"no apt-get.*prometheus"):
        apt_install(("prometheus",), "Prometheus")
    assert apt.calls == []


@pytest.mark.parametrize(
    ("module", "what"),
    [(orthanc, "Orthanc"), (prometheus, "Prometheus")],
    ids=["orthanc", "prometheus"],
)
def test_the_installers_apt_install_their_packages_when_missing(
    monkeypatch: pytest.MonkeyPatch, module: Any, what: str
) -> None:
    installs: list[tuple[tuple[str, ...], str]] = []
    monkeypatch.setattr(module, "installed", lambda: bool(installs))
    monkeypatch.setattr(module, "apt_install", lambda *args: installs.append(args))
    monkeypatch.setattr(orthanc, "system_orthanc_pids", lambda: [])

    assert module.install() == "installed"
    assert module.install() == "already installed"
    assert installs == [(module.APT_PACKAGES, what)]


# -- OrthancPeer credentials ------------------------------------------------------------------


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """config_json names the DICOMweb plugin: a path will do, installed or not."""
    monkeypatch.setattr(orthanc, "dicomweb_plugin", lambda: Path("/plugins/libdicomweb.so"))


def peer(tmp_path: Path, credentials: tuple[str, str] | None = None) -> OrthancPeer:
    return OrthancPeer(tmp_path, OrthancConfig(http_port=8042, credentials=credentials))


@pytest.mark.usefixtures("plugin")
def test_a_peer_without_credentials_needs_none(tmp_path: Path) -> None:
    config = peer(tmp_path).config_json()

    assert config["AuthenticationEnabled"] is False
    assert "RegisteredUsers" not in config


@pytest.mark.usefixtures("plugin")
def test_a_peer_with_credentials_requires_them(tmp_path: Path) -> None:
    config = peer(tmp_path, ("beeldportaal", "s3cret")).config_json()

    assert config["AuthenticationEnabled"] is True
    assert config["RegisteredUsers"] == {"beeldportaal": "s3cret"}


class Answer(io.BytesIO):
    headers = {"Content-Type": "application/json"}

    def __enter__(self) -> Answer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[urllib.request.Request]:
    """The requests the peer's REST calls make, each answered with ``{}``."""
    requests: list[urllib.request.Request] = []

    def urlopen(request: urllib.request.Request, timeout: float) -> Answer:
        requests.append(request)
        return Answer(b"{}")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return requests


def test_the_rest_calls_of_a_peer_with_credentials_authenticate(
    tmp_path: Path, sent: list[urllib.request.Request]
) -> None:
    peer(tmp_path, ("beeldportaal", "s3cret")).rest("PUT", "/modalities/x", json={"AET": "X"})

    [request] = sent
    expected = base64.b64encode(b"beeldportaal:s3cret").decode()
    assert request.get_header("Authorization") == f"Basic {expected}"
    assert request.get_header("Content-type") == "application/json"


def test_the_rest_calls_of_a_peer_without_credentials_do_not(
    tmp_path: Path, sent: list[urllib.request.Request]
) -> None:
    peer(tmp_path).rest("GET", "/system")

    [request] = sent
    assert request.get_header("Authorization") is None


def test_the_credentials_stay_out_of_the_configs_repr() -> None:
    assert "s3cret" not in repr(OrthancConfig(credentials=("beeldportaal", "s3cret")))


# -- the demo's PACS ---------------------------------------------------------------------------


@pytest.mark.usefixtures("plugin")
def test_the_demo_orthanc_requires_the_credentials_the_directory_gives(tmp_path: Path) -> None:
    pacs = ReceivingPacs.from_directory(DEMO_DIRECTORY)
    assert pacs.credentials is not None
    demo = OrthancPeer(tmp_path, pacs.orthanc_config())

    config = demo.config_json()

    assert (config["HttpPort"], config["DicomPort"]) == (pacs.http_port, pacs.dicom_port)
    assert config["RegisteredUsers"] == dict([pacs.credentials])
    assert demo.config.credentials == pacs.credentials


@pytest.mark.usefixtures("plugin")
def test_the_demo_orthanc_is_restarted_unless_it_runs_as_configured(tmp_path: Path) -> None:
    pacs = ReceivingPacs.from_directory(DEMO_DIRECTORY)
    demo = OrthancPeer(tmp_path, pacs.orthanc_config())
    assert not running_as_configured(demo)  # never started: no configuration file

    demo.config_file.write_text(json.dumps(demo.config_json()))
    assert running_as_configured(demo)

    other = OrthancPeer(tmp_path, OrthancConfig(http_port=pacs.http_port, aet=pacs.aet))
    assert not running_as_configured(other)


def test_purge_stops_the_services_before_the_platform_and_before_deleting_their_pid_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BEELDPORTAAL_LOCAL_STATE_DIR", str(tmp_path / "state"))
    config = LocalConfig.from_env()
    pid_files = config.state_dir / "services"
    pid_files.mkdir(parents=True)
    (pid_files / "ingest.pid").write_text("1\n")
    steps: list[str] = []

    def services_down(self: Services) -> None:
        steps.append(f"services down, pid files there: {(pid_files / 'ingest.pid').exists()}")

    monkeypatch.setattr(Services, "down", services_down)
    monkeypatch.setattr(Platform, "down", lambda self: steps.append("platform down"))
    Platform(config, out=lambda line: None).purge()

    assert steps == ["services down, pid files there: True", "platform down"]
    assert not config.state_dir.exists()


def test_the_demo_webhook_subscriber_keeps_only_notifications_signed_with_the_secret() -> None:
    import socket
    import time
    import urllib.error

    from services.notify.adapters.webhooks import SIGNATURE_HEADER, encode_body, sign

    seeded = WebhookSubscription.from_directory(DEMO_DIRECTORY, OOST)
    assert seeded is not None and seeded.url == "http://127.0.0.1:9101/beeldportaal/events"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subscription = WebhookSubscription(f"http://127.0.0.1:{port}/hook", seeded.secret)
    body = encode_body({"type": "delivered.v1", "data": {"study_instance_uid": "1.2.3"}})

    def post(signature: str, path: str = "/hook") -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}",
            data=body,
            headers={SIGNATURE_HEADER: signature, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as refused:
            return refused.code

    with WebhookInbox(subscription) as inbox:
        assert post(sign(body, "another secret")) == 401
        assert post(sign(body, seeded.secret), "/elsewhere") == 404
        assert inbox.wait_for("1.2.3", time.monotonic() + 0.5) is None
        assert post(sign(body, seeded.secret)) == 204
        found = inbox.wait_for("1.2.3", time.monotonic() + 5)

    assert found == json.loads(body)
    assert inbox.refused == 1 and len(inbox.received) == 1
