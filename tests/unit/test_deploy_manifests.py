"""The deployment files (deploy/k8s, deploy/compose, deploy/Containerfile) are valid against
their schemas and agree with the code: processes, settings, ports, partitions, image user."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from pydantic_settings import BaseSettings

from deploy.config_reference import all_variable_names
from deploy.local.config import LocalConfig
from deploy.local.services import specs
from services.consent.config import ConsentSettings
from services.ingest.adapters.peers import PeerDirectory
from services.ingest.config import IngestSettings
from services.notify.api_config import NotifyApiSettings
from services.notify.config import NotifySettings
from services.notify.domain.delivery import ROUTINE_QUEUE, URGENT_QUEUE
from services.notify.domain.retry import RetryPolicy, tier_topic_name
from services.routing.config import RoutingSettings
from services.timeline.config import TimelineSettings
from services.timeline.entrypoints.projection import PROCESS_TOPICS as PROJECTED_TOPICS
from shared import kafka as shared_kafka
from shared.events import (
    ConsentChecked,
    Delivered,
    DeliveryFailed,
    InstanceStored,
    RouteResolved,
    StudyReceived,
)
from shared.topics import BY_NAME, TOPICS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
SCHEMA_DIR = COMPOSE_DIR / "schema"

# The oldest Kubernetes the manifests promise to work on, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", latest_version())
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
LONG_KEY = "k" * 48  # stands in for every secret: long enough for each validator


def _notify_inputs() -> tuple[str, ...]:
    tiers = tuple(dict.fromkeys(tier_topic_name(d) for d in RetryPolicy().delays))
    return (
        RouteResolved.topic,
        URGENT_QUEUE,
        ROUTINE_QUEUE,
        *tiers,
        Delivered.topic,
        DeliveryFailed.topic,
    )


# Process (its CLI arguments) -> settings class, the field holding the port its /healthz,
# /readyz and /metrics answer on, and the topics its consumer group reads (None: an API).
PROCESSES: dict[tuple[str, ...], tuple[type[BaseSettings], str, tuple[str, ...] | None]] = {
    ("ingest", "serve"): (IngestSettings, "http_port", None),
    ("ingest", "assemble"): (IngestSettings, "assembly_metrics_port", (InstanceStored.topic,)),
    ("consent", "serve"): (ConsentSettings, "http_port", None),
    ("consent", "decide"): (ConsentSettings, "decisions_metrics_port", (StudyReceived.topic,)),
    ("routing", "serve"): (RoutingSettings, "http_port", None),
    ("routing", "route"): (RoutingSettings, "worker_metrics_port", (ConsentChecked.topic,)),
    ("notify", "deliver"): (NotifySettings, "worker_metrics_port", _notify_inputs()),
    ("notify", "serve"): (NotifyApiSettings, "http_port", None),
    ("timeline", "project"): (TimelineSettings, "projection_metrics_port", PROJECTED_TOPICS),
    ("timeline", "serve"): (TimelineSettings, "http_port", None),
}
# Workers committing in Kafka transactions named after BEELDPORTAAL_REPLICA_ID.
TRANSACTIONAL = {("ingest", "assemble"), ("notify", "deliver")}


# --- loading ------------------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@functools.cache
def _parsed(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def _k8s_docs(path: Path) -> list[dict[str, Any]]:
    """The manifests of one file (a copy: a test may change it)."""
    return copy.deepcopy(list(_parsed(path)))


def _all_k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in _manifest_files():
        for doc in _parsed(path):
            yield path, doc


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in _all_k8s_docs() if d["kind"] == kind]


def _workloads() -> list[dict[str, Any]]:
    return [d for _, d in _all_k8s_docs() if d["kind"] in WORKLOAD_KINDS]


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container per pod"
    return containers[0]


def _compose() -> dict[str, Any]:
    # PyYAML resolves the << merge keys the file uses for its shared service settings.
    return copy.deepcopy(_parsed_compose())


@functools.cache
def _parsed_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _config_map(name: str) -> dict[str, str]:
    for doc in _by_kind("ConfigMap"):
        if doc["metadata"]["name"] == name:
            return dict(doc["data"])
    raise AssertionError(f"no ConfigMap {name}")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No BEELDPORTAAL_* variable of the developer's shell leaks into what a test computes."""
    for name in list(os.environ):
        if name.upper().startswith("BEELDPORTAAL_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def processes(clean_env: pytest.MonkeyPatch) -> dict[tuple[str, ...], str]:
    """args -> process name, from deploy/local/services.py (what `make up` starts)."""
    return {spec.args: spec.name for spec in specs(LocalConfig.from_env())}


# --- schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_every_kubernetes_manifest_is_valid_against_the_official_schemas(path: Path) -> None:
    docs = _k8s_docs(path)
    assert docs, f"{path.name} holds no manifest"
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            # strict: a misspelt or misplaced field is an error, not silently ignored.
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_kubernetes_validator_rejects_a_misspelt_field() -> None:
    deployment = copy.deepcopy(_workloads()[0])  # the cached original stays as it is
    deployment["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest_except_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    expected = {p.name for p in _manifest_files() if not p.name.endswith(".example.yaml")}
    assert listed == expected
    # Placeholders must never be applied over real secrets.
    assert not any(name.endswith(".example.yaml") for name in listed)


def _compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMA_DIR / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_the_vendored_compose_schema_is_the_recorded_copy() -> None:
    digest = hashlib.sha256((SCHEMA_DIR / "compose-spec.json").read_bytes()).hexdigest()
    assert digest in (SCHEMA_DIR / "README.md").read_text()


def test_the_compose_file_is_valid_against_the_compose_specification() -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _compose_validator().iter_errors(_compose())
    ]
    assert errors == []


def test_the_compose_schema_rejects_a_misspelt_service_field() -> None:
    compose = _compose()
    compose["services"]["ingest"]["helthcheck"] = {"test": ["CMD", "true"]}
    assert list(_compose_validator().iter_errors(compose))


# --- the processes ------------------------------------------------------------------------------


def test_every_service_process_has_exactly_one_kubernetes_workload(
    processes: dict[tuple[str, ...], str],
) -> None:
    found = {tuple(_container(w)["args"]): w["metadata"]["name"] for w in _workloads()}
    assert len(found) == len(_workloads()), "two workloads run the same process"
    assert found == processes


def test_every_service_process_has_a_compose_service_of_its_name(
    processes: dict[tuple[str, ...], str],
) -> None:
    services = _compose()["services"]
    for args, name in processes.items():
        assert name in services, f"no compose service for {name}"
        assert tuple(services[name]["command"]) == args
    image = services["ingest"]["image"]
    runs_image = {n for n, s in services.items() if s.get("image") == image and "command" in s}
    assert runs_image - {"topics"} == set(processes.values())


def test_the_process_table_of_this_test_covers_every_process(
    processes: dict[tuple[str, ...], str],
) -> None:
    assert set(PROCESSES) == set(processes)


# --- settings -----------------------------------------------------------------------------------


def _manifest_variable_names() -> set[str]:
    names: set[str] = set()
    for _, doc in _all_k8s_docs():
        if doc["kind"] == "ConfigMap":
            names |= {k for k in doc["data"] if k.startswith("BEELDPORTAAL_")}
        elif doc["kind"] == "Secret":
            names |= set(doc.get("stringData", {})) - {"issuer.pem"}
        elif doc["kind"] in WORKLOAD_KINDS | {"Job"}:
            spec = doc["spec"]["template"]["spec"]
            for container in spec["containers"]:
                names |= {e["name"] for e in container.get("env", [])}
    return names


def _compose_variable_names() -> set[str]:
    names: set[str] = set()
    for service in _compose()["services"].values():
        names |= {k for k in service.get("environment", {}) if k.startswith("BEELDPORTAAL_")}
    names |= set(re.findall(r"\$\{(BEELDPORTAAL_[A-Z0-9_]+)", COMPOSE.read_text()))
    return names


def test_every_variable_in_the_manifests_is_a_real_setting() -> None:
    names = _manifest_variable_names()
    assert "BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS" in names
    assert names - all_variable_names() == set()


def test_every_variable_in_the_compose_file_is_a_real_setting() -> None:
    names = _compose_variable_names()
    assert "BEELDPORTAAL_PSEUDONYM_KEY" in names
    assert names - all_variable_names() == set()


def test_the_secret_holds_every_secret_setting_and_the_config_map_none() -> None:
    secret = next(d for d in _by_kind("Secret") if d["metadata"]["name"] == "beeldportaal-secrets")
    secret_names = set(secret["stringData"])
    required = {
        "BEELDPORTAAL_S3_SECRET_KEY",
        "BEELDPORTAAL_POSTGRES_DSN",
        "BEELDPORTAAL_PSEUDONYM_KEY",
        "BEELDPORTAAL_NOTIFY_PICKUP_KEY",
    }
    assert required <= secret_names
    assert not required & set(_config_map("beeldportaal-config"))


def _settings_from(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], settings: type[BaseSettings]
) -> BaseSettings:
    for name in list(os.environ):
        if name.startswith("BEELDPORTAAL_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return settings()


def _k8s_env(workload: dict[str, Any]) -> dict[str, str]:
    """What the container's environment holds: the ConfigMap, the Secret's keys, its env."""
    container = _container(workload)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_config_map(source["configMapRef"]["name"]))
        if "secretRef" in source:
            secret = next(
                d
                for d in _by_kind("Secret")
                if d["metadata"]["name"] == source["secretRef"]["name"]
            )
            env.update(dict.fromkeys(secret["stringData"], LONG_KEY))
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", workload["metadata"]["name"])
    return env


def _probe_target(probe: dict[str, Any], container: dict[str, Any]) -> tuple[int, str]:
    """(port, path) a probe asks, whether kubelet's httpGet or an exec running Python."""
    if "httpGet" in probe:
        port = probe["httpGet"]["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
        return int(port), probe["httpGet"]["path"]
    command = " ".join(probe["exec"]["command"])
    url = re.search(r"http://127\.0\.0\.1:\d+/\w+", command)
    assert url, f"no local URL in the probe command {command!r}"
    parts = urlsplit(url.group(0))
    return int(parts.port or 0), parts.path


def test_kubernetes_probes_ask_the_port_the_settings_give_each_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for workload in _workloads():
        container = _container(workload)
        settings_class, port_field, inputs = PROCESSES[tuple(container["args"])]
        settings = _settings_from(monkeypatch, _k8s_env(workload), settings_class)
        port = getattr(settings, port_field)
        assert port is not None, f"{workload['metadata']['name']}: {port_field} is not set"
        name = workload["metadata"]["name"]
        assert _probe_target(container["livenessProbe"], container) == (port, "/healthz"), name
        assert _probe_target(container["readinessProbe"], container) == (port, "/readyz"), name
        assert _probe_target(container["startupProbe"], container) == (port, "/healthz"), name
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port), name
        # kubelet probes and Prometheus arrive on the pod's address, not the loopback.
        host_field = "http_host" if inputs is None else port_field.replace("_port", "_host")
        assert getattr(settings, host_field) == "0.0.0.0", name
        if inputs is None:
            assert {"containerPort": port, "name": "http"} in container["ports"], name


def test_the_ingest_services_expose_the_configured_stow_and_dimse_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ingest = next(w for w in _workloads() if _container(w)["args"] == ["ingest", "serve"])
    settings = _settings_from(monkeypatch, _k8s_env(ingest), IngestSettings)
    assert isinstance(settings, IngestSettings)
    assert settings.dimse_host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in _container(ingest)["ports"]}
    assert ports == {"http": settings.http_port, "dimse": settings.dimse_port}
    services = {s["metadata"]["name"]: s["spec"] for s in _by_kind("Service")}
    assert services["ingest"]["ports"][0]["port"] == settings.http_port
    assert services["ingest-dimse"]["ports"][0]["port"] == settings.dimse_port
    assert services["ingest-dimse"]["externalTrafficPolicy"] == "Local"


def test_every_api_has_a_service_on_its_port(monkeypatch: pytest.MonkeyPatch) -> None:
    services = {s["metadata"]["name"]: s for s in _by_kind("Service")}
    for workload in _workloads():
        container = _container(workload)
        settings_class, port_field, inputs = PROCESSES[tuple(container["args"])]
        if inputs is not None:
            continue
        name = workload["metadata"]["name"]
        port = getattr(_settings_from(monkeypatch, _k8s_env(workload), settings_class), port_field)
        service = services[name]["spec"]
        assert service["selector"] == workload["spec"]["selector"]["matchLabels"]
        assert [p["port"] for p in service["ports"]] == [port]


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = {k: str(v) for k, v in service.get("environment", {}).items()}
    # Interpolated secrets are filled in from .env by compose; any long value does here.
    return {k: LONG_KEY if "${" in v else v for k, v in env.items()}


def test_compose_healthchecks_ask_readyz_on_the_port_the_settings_give(
    monkeypatch: pytest.MonkeyPatch, processes: dict[tuple[str, ...], str]
) -> None:
    services = _compose()["services"]
    for args, name in processes.items():
        service = services[name]
        settings_class, port_field, inputs = PROCESSES[args]
        settings = _settings_from(monkeypatch, _compose_env(service), settings_class)
        port = getattr(settings, port_field)
        assert port is not None, f"{name}: {port_field} is not set"
        command = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/readyz" in command, name
        # Prometheus scrapes each container over the compose network, not its loopback.
        host_field = "http_host" if inputs is None else port_field.replace("_port", "_host")
        assert getattr(settings, host_field) == "0.0.0.0", name


def test_prometheus_in_compose_scrapes_every_process_on_its_metrics_port(
    monkeypatch: pytest.MonkeyPatch, processes: dict[tuple[str, ...], str]
) -> None:
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    jobs = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]
    }
    services = _compose()["services"]
    for args, name in processes.items():
        settings_class, port_field, _ = PROCESSES[args]
        env = _compose_env(services[name])
        port = getattr(_settings_from(monkeypatch, env, settings_class), port_field)
        assert jobs.get(name) == [f"{name}:{port}"]
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    mounts = services["prometheus"]["volumes"]
    assert "../prometheus/rules:/etc/prometheus/rules:ro" in mounts


# --- scaling ------------------------------------------------------------------------------------


def test_worker_replicas_never_exceed_their_input_topics_partitions() -> None:
    for workload in _workloads():
        inputs = PROCESSES[tuple(_container(workload)["args"])][2]
        name = workload["metadata"]["name"]
        if inputs is None:
            continue
        bound = min(BY_NAME[t].partitions for t in inputs)
        annotations = workload["metadata"]["annotations"]
        assert annotations["beeldportaal.nl/input-topics"].split(",") == list(inputs), name
        assert annotations["beeldportaal.nl/max-replicas"] == str(bound), name
        assert 1 <= workload["spec"]["replicas"] <= bound, name
        assert f"beyond {bound} " in (K8S / f"{name}.yaml").read_text(), name


def test_transactional_workers_have_stable_replica_ids() -> None:
    for workload in _workloads():
        args = tuple(_container(workload)["args"])
        env = {e["name"]: e for e in _container(workload).get("env", [])}
        if args in TRANSACTIONAL:
            assert workload["kind"] == "StatefulSet"
            source = env["BEELDPORTAAL_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
            assert source == "metadata.name"
            headless = next(
                s
                for s in _by_kind("Service")
                if s["metadata"]["name"] == workload["metadata"]["name"]
            )
            assert headless["spec"]["clusterIP"] == "None"
            assert workload["spec"]["serviceName"] == headless["metadata"]["name"]
        else:
            assert workload["kind"] == "Deployment"


def test_compose_gives_transactional_workers_distinct_replica_ids(
    processes: dict[tuple[str, ...], str],
) -> None:
    services = _compose()["services"]
    ids = [
        services[processes[args]]["environment"]["BEELDPORTAAL_REPLICA_ID"]
        for args in TRANSACTIONAL
    ]
    assert len(set(ids)) == len(TRANSACTIONAL)


# --- the pods and the image ---------------------------------------------------------------------


def _containerfile() -> str:
    return CONTAINERFILE.read_text()


def test_every_pod_runs_as_the_image_user_without_privileges() -> None:
    user = re.search(r"^USER (\d+):(\d+)$", _containerfile(), re.MULTILINE)
    assert user, "the Containerfile sets a numeric USER uid:gid"
    uid, gid = int(user.group(1)), int(user.group(2))
    pods = [d for d in _by_kind("Job") + _workloads()]
    assert pods
    for pod in pods:
        spec = pod["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (
            uid,
            gid,
        )
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_every_container_has_resource_requests_and_limits_and_probes() -> None:
    for workload in _workloads():
        container = _container(workload)
        for bound in ("requests", "limits"):
            assert set(container["resources"][bound]) == {"cpu", "memory"}
        assert {"livenessProbe", "readinessProbe"} <= set(container)
        assert workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30


def test_processes_run_the_image_entrypoint_with_their_arguments() -> None:
    assert re.search(r'^ENTRYPOINT \["beeldportaal"\]$', _containerfile(), re.MULTILINE)
    for workload in _workloads():
        container = _container(workload)
        assert "command" not in container, "the entrypoint is `beeldportaal`; pass args"
        assert container["image"].split(":")[0] == "beeldportaal"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert [i["name"] for i in kustomization["images"]] == ["beeldportaal"]


def test_the_image_exposes_every_configured_port() -> None:
    exposed = set()
    for line in re.findall(r"^EXPOSE (.+)$", _containerfile(), re.MULTILINE):
        exposed |= {int(p) for p in line.split()}
    config = _config_map("beeldportaal-config")
    ports = {int(v) for k, v in config.items() if k.endswith("_PORT")}
    assert ports and ports == exposed


def test_the_containerfile_installs_the_package_without_tests_or_local_state() -> None:
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", _containerfile(), re.MULTILINE)
    sources = {s for line in copied for s in line.split()}
    assert sources == {"pyproject.toml", "README.md", "shared", "services", "deploy"}


# --- topics, peers, extras ----------------------------------------------------------------------


def _provision_script_runs(
    script: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Run a provisioning script as its container would, against a recording fake."""
    calls: dict[str, Any] = {}

    async def fake(bootstrap, specs, replication_factor=1, min_insync_replicas=1):  # type: ignore[no-untyped-def]
        calls.update(
            bootstrap=list(bootstrap),
            topics=tuple(specs),
            replication_factor=replication_factor,
            min_insync_replicas=min_insync_replicas,
        )
        return {s.name: "created" for s in specs}

    for name in list(os.environ):
        if name.startswith("BEELDPORTAAL_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(shared_kafka, "provision_topics", fake)
    exec(compile(script, "<provisioning script>", "exec"), {"__name__": "__main__"})
    return calls


def test_the_topics_job_provisions_every_declared_topic_with_the_configured_durability(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job = next(j for j in _by_kind("Job") if j["metadata"]["name"] == "beeldportaal-topics")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["python", "-c"]
    config = _config_map("beeldportaal-config")
    calls = _provision_script_runs(container["command"][2], config, monkeypatch)
    assert calls["topics"] == TOPICS
    assert calls["bootstrap"] == config["BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS"].split(",")
    assert calls["replication_factor"] == int(config["BEELDPORTAAL_KAFKA_REPLICATION_FACTOR"])
    assert calls["min_insync_replicas"] == int(config["BEELDPORTAAL_KAFKA_MIN_INSYNC_REPLICAS"])
    assert calls["replication_factor"] > calls["min_insync_replicas"] >= 2
    assert f"{TOPICS[0].name}: created" in capsys.readouterr().out


def test_the_compose_topics_service_provisions_every_topic_before_any_service_starts(
    monkeypatch: pytest.MonkeyPatch, processes: dict[tuple[str, ...], str]
) -> None:
    services = _compose()["services"]
    topics = services["topics"]
    assert topics["entrypoint"] == ["python", "-c"]
    calls = _provision_script_runs(topics["command"][0], _compose_env(topics), monkeypatch)
    assert calls["topics"] == TOPICS
    assert calls["bootstrap"] == ["kafka:9092"]
    assert (calls["replication_factor"], calls["min_insync_replicas"]) == (1, 1)  # one broker
    for name in processes.values():
        condition = services[name]["depends_on"]["topics"]["condition"]
        assert condition == "service_completed_successfully"


@pytest.mark.parametrize(
    "load",
    [
        lambda: _config_map("beeldportaal-ingest-peers")["peers.json"],
        lambda: (COMPOSE_DIR / "peers.json").read_text(),
    ],
    ids=["k8s", "compose"],
)
def test_the_shipped_peers_files_load(load: Any) -> None:
    peers = PeerDirectory.from_dict(json.loads(load()))
    assert peers.recipient_for_called_ae("BP_DEMO_OOST") == "00000101"


def test_grafana_is_opt_in_and_no_agpl_server_is_started_by_default() -> None:
    services = _compose()["services"]
    assert services["grafana"]["profiles"] == ["grafana"]
    default = {n: s for n, s in services.items() if not s.get("profiles")}
    images = [s.get("image", "") for s in default.values()]
    assert not any("minio" in i or "grafana" in i for i in images)
    assert services["s3"]["image"].startswith("versity/versitygw:")
    mounts = services["grafana"]["volumes"]
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert "../grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
