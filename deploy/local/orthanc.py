"""A real Orthanc PACS (Debian package) as a throw-away hospital peer: started, driven, stopped.

Orthanc plays either side of an exchange: the *receiving* hospital (it accepts STOW-RS and
C-STORE) or the *sending* hospital (its DICOMweb client stows to a registered server, its DIMSE
client C-STOREs to a registered modality). Each peer runs as its own process with a generated
JSON configuration, storage and index under a state directory of its own, on loopback ports.

Orthanc 1.10 cannot choose its bind address (it listens on all interfaces): remote access stays
disabled and all traffic goes to 127.0.0.1. The process is identified by its recorded pid and its
configuration path in argv, and stopped by that pid only, never by name.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.local.processes import ManagedProcess, PlatformError, apt_install, wait_until

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
# Where orthanc-dicomweb puts its plugin (a symlink to /usr/lib/orthanc/libOrthancDicomWeb.so.<v>).
DICOMWEB_PLUGIN_CANDIDATES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
# dcmtk's tools, by absolute path: pynetdicom installs console scripts of the same names
# (storescu, echoscu, findscu, ...) that come first on a virtualenv's or pyenv's PATH.
DCMTK_BIN = Path("/usr/bin")
APT_PACKAGES = ("orthanc", "orthanc-dicomweb", "dcmtk")


class OrthancError(PlatformError):
    """Orthanc answered a REST call with an HTTP error; ``status`` and ``body`` say which."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"Orthanc {method} {path} -> HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Modality:
    """A DICOM peer Orthanc may C-STORE to (and accepts C-ECHO/C-STORE from)."""

    aet: str
    port: int
    host: str = "127.0.0.1"

    def to_config(self) -> dict[str, Any]:
        return {"AET": self.aet, "Host": self.host, "Port": self.port}


@dataclass(frozen=True)
class DicomWebServer:
    """A DICOMweb server Orthanc may stow to, e.g. beeldportaal's ingest for one care provider.

    ``url`` is the DICOMweb root: Orthanc appends ``studies`` for STOW-RS, so for beeldportaal it
    is ``http://127.0.0.1:<port>/dicomweb/to/<URA>/``. ``headers`` go with every request (e.g.
    ``{"Authorization": "Bearer <token>"}``). ``chunked_transfers`` None keeps the plugin's
    default (chunked uploads on Orthanc >= 1.5.7).
    """

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    chunked_transfers: bool | None = None

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"Url": self.url if self.url.endswith("/") else self.url + "/"}
        if self.headers:
            config["HttpHeaders"] = dict(self.headers)
        if self.chunked_transfers is not None:
            config["ChunkedTransfers"] = self.chunked_transfers
        return config


@dataclass(frozen=True)
class OrthancConfig:
    """What varies between peers; everything else is fixed in ``OrthancPeer.config_json``.

    Ports of 0 are replaced by free ones when the peer starts. ``credentials`` (user, password),
    when given, are what the peer's REST API requires (HTTP basic auth) and what its own REST
    calls send, so the two cannot disagree. ``extra`` is merged last into the generated
    configuration, for any Orthanc option not named here.
    """

    http_port: int = 0
    dicom_port: int = 0
    aet: str = "ORTHANC"
    name: str = "beeldportaal-peer"
    modalities: Mapping[str, Modality] = field(default_factory=dict)
    dicomweb_servers: Mapping[str, DicomWebServer] = field(default_factory=dict)
    stable_age: int = 60
    verbose: bool = False
    credentials: tuple[str, str] | None = field(default=None, repr=False)
    extra: Mapping[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dicomweb_plugin() -> Path:
    for candidate in DICOMWEB_PLUGIN_CANDIDATES:
        if candidate.exists():
            return candidate
    found = sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    if found:
        return found[0]
    raise PlatformError(
        "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    )


def dcmtk_tool(name: str) -> str:
    """Absolute path of a dcmtk program (``storescu``, ``echoscu``, ``storescp``, ``dcmsend``)."""
    path = DCMTK_BIN / name
    if not path.exists():
        raise PlatformError(f"dcmtk's {name} not found at {path} (apt-get install dcmtk)")
    return str(path)


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk programs and Orthanc: Nagle off on every DIMSE socket.

    Debian's dcmtk leaves Nagle's algorithm on unless TCP_NODELAY=1 is set; a C-STORE then stalls
    ~90 ms per instance on loopback.
    """
    return dict(os.environ, TCP_NODELAY="1")


def installed() -> bool:
    try:
        dicomweb_plugin()
    except PlatformError:
        return False
    return ORTHANC_BINARY.exists() and (DCMTK_BIN / "storescu").exists()


def install() -> str:
    """Install orthanc, orthanc-dicomweb and dcmtk with apt when missing (root only).

    The orthanc package's maintainer scripts start (and a trigger of orthanc-dicomweb restarts)
    a system Orthanc service, on ports 8042/4242 with /etc/orthanc's configuration:
    :func:`apt_install` keeps it from starting. One that runs nevertheless is reported, not stopped.
    """
    if installed():
        return "already installed"
    apt_install(APT_PACKAGES, "Orthanc")
    if not installed():
        raise PlatformError("Orthanc, its DICOMweb plugin or dcmtk still missing after apt-get")
    stray = system_orthanc_pids()
    if stray:
        # Not ours to stop: say so, the peers themselves run on ports of their own.
        return f"installed; a system Orthanc runs nevertheless (pids {stray}), left alone"
    return "installed"


def system_orthanc_pids() -> list[int]:
    """Orthanc processes not started by an ``OrthancPeer`` (e.g. the Debian service)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and argv[0].endswith(b"Orthanc")
            and not any(b"orthanc-peer.json" in a for a in argv)
        ):
            pids.append(int(proc.name))
    return pids


class OrthancPeer:
    """One Orthanc process under ``state_dir``: ``start()``, the REST helpers, ``stop()``."""

    CONFIG_NAME = "orthanc-peer.json"

    def __init__(self, state_dir: Path, config: OrthancConfig | None = None) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.config = config or OrthancConfig()
        self.config_file = self.state_dir / self.CONFIG_NAME
        self.process = ManagedProcess(
            f"orthanc:{self.config.aet}",
            self.state_dir / "orthanc.pid",
            self.state_dir / "orthanc.log",
            marker=str(self.config_file),
        )
        self.http_port = self.config.http_port
        self.dicom_port = self.config.dicom_port

    @classmethod
    @contextlib.contextmanager
    def running(cls, state_dir: Path, **config: Any) -> Iterator[OrthancPeer]:
        """``with OrthancPeer.running(tmp_path / "pacs", aet="SENDER") as pacs: ...``"""
        peer = cls(state_dir, OrthancConfig(**config))
        peer.start()
        try:
            yield peer
        finally:
            peer.stop()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO/WADO/STOW-RS): ``<base>/dicom-web``."""
        return f"{self.base_url}/dicom-web"

    @property
    def stow_url(self) -> str:
        return f"{self.dicomweb_url}/studies"

    @property
    def modality(self) -> Modality:
        """This peer as a modality another peer can C-STORE to."""
        return Modality(self.config.aet, self.dicom_port)

    def config_json(self) -> dict[str, Any]:
        storage = self.state_dir / "storage"
        config: dict[str, Any] = {
            "Name": self.config.name,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [str(dicomweb_plugin())],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            **self._authentication(),
            "KeepAlive": True,
            "TcpNoDelay": True,
            "HttpCompressionEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.config.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {
                name: modality.to_config() for name, modality in self.config.modalities.items()
            },
            "DicomModalitiesInDatabase": False,
            "OrthancPeers": {},
            "StableAge": self.config.stable_age,
            "SaveJobs": False,
            "LogExportedResources": False,
            "ExecuteLuaEnabled": False,
            "RestApiWriteToFileSystemEnabled": False,
            "OverwriteInstances": False,
            "DeidentifyLogs": True,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Host": f"127.0.0.1:{self.http_port}",
                "Ssl": False,
                "Servers": {
                    name: server.to_config()
                    for name, server in self.config.dicomweb_servers.items()
                },
            },
        }
        config.update(self.config.extra)
        return config

    def _authentication(self) -> dict[str, Any]:
        """Orthanc's basic auth options: one registered user when the peer has credentials."""
        if self.config.credentials is None:
            return {"AuthenticationEnabled": False}
        user, password = self.config.credentials
        return {"AuthenticationEnabled": True, "RegisteredUsers": {user: password}}

    def start(self, timeout: float = 60.0) -> OrthancPeer:
        if self.process.running():
            raise PlatformError(f"{self.process.name} already runs as pid {self.pid}")
        install()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.http_port = self.config.http_port or free_port()
        self.dicom_port = self.config.dicom_port or free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.config_file.write_text(json.dumps(self.config_json(), indent=2))
        argv = [str(ORTHANC_BINARY)]
        if self.config.verbose:
            argv.append("--verbose")
        argv.append(str(self.config_file))
        self.process.start(argv, env=dcmtk_env(), cwd=self.state_dir)
        try:
            wait_until(self.ready, timeout, f"Orthanc {self.config.aet}", self.process)
            plugins = self.rest("GET", "/plugins")
            if "dicom-web" not in plugins:
                raise PlatformError(f"Orthanc started without its DICOMweb plugin: {plugins}")
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        try:
            self.rest("GET", "/system", timeout=2)
        except (OSError, PlatformError):
            return False
        # The DICOM server starts before the HTTP one, but make sure C-STORE can connect too.
        try:
            socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2).close()
        except OSError:
            return False
        return True

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM to the recorded pid, SIGKILL after ``timeout``; whether it was running."""
        return self.process.stop(timeout)

    def purge(self) -> None:
        """Stop and delete the state directory (storage, index, log)."""
        self.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- REST --------------------------------------------------------------------------------

    def rest(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        data: bytes | None = None,
        content_type: str | None = None,
        timeout: float = 120.0,
    ) -> Any:
        """Call the REST API; JSON answers are decoded, anything else is returned as bytes."""
        body = data
        headers = self._authorization()
        if json is not None:
            body = _json_dumps(json)
            headers["Content-Type"] = "application/json"
        if content_type is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(
            self.base_url + path, data=body, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise OrthancError(method, path, exc.code, exc.read().decode(errors="replace")) from exc
        if kind.startswith("application/json") or kind.startswith("application/dicom+json"):
            return _json_loads(payload) if payload else None
        return payload

    def _authorization(self) -> dict[str, str]:
        """The basic auth header a peer with credentials requires on every REST call."""
        if self.config.credentials is None:
            return {}
        token = base64.b64encode(":".join(self.config.credentials).encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def studies(self) -> list[str]:
        return list(self.rest("GET", "/studies"))

    def instances(self) -> list[str]:
        return list(self.rest("GET", "/instances"))

    def instance_file(self, instance_id: str) -> bytes:
        return bytes(self.rest("GET", f"/instances/{instance_id}/file"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.rest("GET", f"/instances/{instance_id}/simplified-tags"))

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Orthanc resources (``Type``, ``ID``, ``Path``) carrying a DICOM UID."""
        return list(
            self.rest("POST", "/tools/lookup", data=uid.encode(), content_type="text/plain")
        )

    def upload(self, dicom_bytes: bytes) -> dict[str, Any]:
        """POST /instances: ``{"ID", "ParentStudy", "Status": "Success"|"AlreadyStored", ...}``."""
        return dict(
            self.rest("POST", "/instances", data=dicom_bytes, content_type="application/dicom")
        )

    def stow_to_server(self, server_id: str, resources: Sequence[str]) -> dict[str, Any]:
        """Send Orthanc resources (patients/studies/series/instances) to a DICOMweb server."""
        return dict(
            self.rest(
                "POST",
                f"/dicom-web/servers/{server_id}/stow",
                json={"Resources": list(resources), "Synchronous": True},
            )
            or {}
        )

    def store_to_modality(self, modality: str, resources: Sequence[str]) -> dict[str, Any]:
        """C-STORE Orthanc resources to a registered modality (one association, synchronous)."""
        return dict(
            self.rest(
                "POST",
                f"/modalities/{modality}/store",
                json={"Resources": list(resources), "Synchronous": True},
            )
            or {}
        )

    def add_modality(self, name: str, modality: Modality) -> None:
        """Register (or replace) a modality at runtime, e.g. once beeldportaal's port is known."""
        self.rest("PUT", f"/modalities/{name}", json=modality.to_config())

    def add_dicomweb_server(self, name: str, server: DicomWebServer) -> None:
        """Register (or replace) a DICOMweb server at runtime."""
        self.rest("PUT", f"/dicom-web/servers/{name}", json=server.to_config())

    def echo(self, modality: str) -> bool:
        try:
            self.rest("POST", f"/modalities/{modality}/echo", json={})
        except OrthancError:
            return False
        return True

    def statistics(self) -> dict[str, Any]:
        """``CountInstances``, ``CountStudies``, ``TotalDiskSizeMB``, ..."""
        return dict(self.rest("GET", "/statistics"))

    def __repr__(self) -> str:
        return (
            f"OrthancPeer(aet={self.config.aet!r}, http={self.http_port}, "
            f"dicom={self.dicom_port}, pid={self.pid})"
        )


def _json_dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def _json_loads(payload: bytes) -> Any:
    return json.loads(payload)
