"""The configuration reference and the topic table of docs/operations.md, made from the code.

Every ``BEELDPORTAAL_*`` variable comes from a pydantic-settings class (its ``env_prefix`` plus
the field name); its meaning from the comment above the field in the class's source. The topic
table comes from ``shared.topics``. ``python -m deploy.config_reference --write`` rewrites the
generated blocks of the guide; ``--check`` exits 1 when they are out of date (a unit test does
the same).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings

from services.consent.config import ConsentSettings
from services.ingest.config import IngestSettings
from services.notify.api_config import NotifyApiSettings
from services.notify.config import NotifySettings
from services.routing.config import RoutingSettings
from services.timeline.config import TimelineSettings
from shared.auth import AuthSettings
from shared.settings import KafkaSettings, PostgresSettings, PrivacySettings, S3Settings
from shared.topics import DAY_MS, FOREVER, TOPICS

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


@dataclass(frozen=True)
class Section:
    title: str
    settings: type[BaseSettings]
    read_by: str


# Every settings class a process reads, in the order the guide lists them.
SECTIONS: tuple[Section, ...] = (
    Section("Kafka", KafkaSettings, "every process"),
    Section("S3", S3Settings, "every process (ingest writes, notify and timeline read)"),
    Section("PostgreSQL", PostgresSettings, "timeline serve, project, rebuild"),
    Section(
        "Privacy", PrivacySettings, "ingest serve, consent serve/decide, timeline serve/project"
    ),
    Section(
        "Bearer tokens",
        AuthSettings,
        "every HTTP API (ingest, consent, routing, notify, timeline serve)",
    ),
    Section("ingest", IngestSettings, "`beeldportaal ingest serve` and `ingest assemble`"),
    Section("consent", ConsentSettings, "`beeldportaal consent serve` and `consent decide`"),
    Section("routing", RoutingSettings, "`beeldportaal routing serve`, `route` and `seed`"),
    Section(
        "notify (delivery worker)",
        NotifySettings,
        "`beeldportaal notify deliver` and `dead-letters list|redrive`",
    ),
    Section("notify (API)", NotifyApiSettings, "`beeldportaal notify serve`"),
    Section("timeline", TimelineSettings, "`beeldportaal timeline serve`, `project`, `rebuild`"),
)

# Read with os.environ outside the settings classes (shared.stream.replica_id).
EXTRA_VARIABLES: dict[str, str] = {
    "BEELDPORTAAL_REPLICA_ID": (
        "This replica's stable, unique name (default: the host name); it names the Kafka "
        "transactions of the transactional workers (ingest assemble, notify deliver), so a "
        "restarted replica fences what its predecessor left open. Use the StatefulSet pod name."
    ),
}

# Meanings of fields whose purpose is their name; a comment in the class says more where needed.
GENERIC: dict[str, str] = {
    "service_name": "Name in log lines and metrics.",
    "log_level": "Log level (DEBUG, INFO, WARNING, ERROR).",
    "log_json": "Structured JSON logs (false: human-readable console lines).",
    "http_host": "Address the HTTP API binds to (0.0.0.0 in a container).",
    "http_port": "Port of the HTTP API, also serving /healthz, /readyz and /metrics.",
    "bootstrap_servers": "Comma-separated host:port list of Kafka brokers.",
    "client_id_prefix": "Prefix of Kafka client ids and consumer group names.",
    "linger_ms": "Producer linger: how long a batch may wait for more records.",
    "request_timeout_ms": "Kafka request timeout.",
    "endpoint": "host:port of the S3 server (no scheme; see `secure`).",
    "access_key": "S3 access key id.",
    "secret_key": "S3 secret key.",
    "region": "S3 region.",
    "secure": "Use HTTPS to the S3 server.",
    "bucket": "Bucket holding the DICOM bytes (ingest creates it when missing).",
    "issuer": "Expected `iss` claim of bearer tokens.",
    "audience": "Expected `aud` claim of bearer tokens.",
    "leeway_s": "Clock skew tolerated on `exp`/`nbf`, seconds.",
    "dimse_host": "Address the C-STORE SCP binds to (0.0.0.0 in a container).",
    "dimse_port": "Port of the C-STORE SCP.",
    "dimse_max_associations": "Concurrent DIMSE associations accepted.",
    "max_instance_bytes": "Largest single instance accepted, bytes.",
    "max_instances_per_request": "Most instances in one STOW-RS request.",
    "connect_timeout_seconds": "Seconds to open a connection or association to a receiver.",
    "min_insync_replicas": "min.insync.replicas of every topic created (see replication_factor).",
    "assembly_check_interval_seconds": "How often the assembly worker looks for due studies.",
}

_FIELD = re.compile(r"^    ([a-z_][a-z0-9_]*)\s*:")
_COMMENT = re.compile(r"^    # ?(.*)$")


def env_name(settings: type[BaseSettings], field: str) -> str:
    return f"{settings.model_config.get('env_prefix', '')}{field}".upper()


def _nested(annotation: object) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseSettings)


def settings_fields(settings: type[BaseSettings]) -> list[str]:
    """Fields read from the environment (nested settings objects read their own prefix)."""
    return [n for n, f in settings.model_fields.items() if not _nested(f.annotation)]


def _comments(settings: type[BaseSettings]) -> dict[str, tuple[str, bool]]:
    """field -> (comment, own): the comment right above it (own) or its paragraph's."""
    found: dict[str, tuple[str, bool]] = {}
    for cls in reversed(settings.__mro__):
        if not (inspect.isclass(cls) and issubclass(cls, BaseSettings)) or cls is BaseSettings:
            continue
        block: list[str] = []
        paragraph = ""
        for line in inspect.getsource(cls).splitlines():
            comment = _COMMENT.match(line)
            field = _FIELD.match(line)
            if comment:
                block.append(comment.group(1).strip())
            elif field:
                if block:
                    paragraph = " ".join(block)
                    found[field.group(1)] = (paragraph, True)
                elif paragraph:
                    found[field.group(1)] = (paragraph, False)
                block = []
            elif not line.strip():
                block, paragraph = [], ""
            elif not line.startswith("        "):
                block = []
    return found


def meaning(settings: type[BaseSettings], field: str) -> str:
    """The field's own comment (after a generic line for well-known names), else the generic
    line, else the comment its paragraph opens with."""
    comment, own = _comments(settings).get(field, ("", False))
    generic = GENERIC.get(field, "")
    if own:
        return f"{generic} {comment}".strip()
    return generic or comment


def _default(settings: type[BaseSettings], field: str) -> str:
    info = settings.model_fields[field]
    if info.is_required():
        return "**required**"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, SecretStr):
        return "a development value: set it"
    if value is None:
        return "unset"
    if isinstance(value, Path):
        return f"`{value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple | list | dict):
        return f"`{json.dumps(value, separators=(',', ':'))}`"
    return f"`{value}`"


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    meaning: str
    secret: bool


def variables(settings: type[BaseSettings]) -> Iterator[Variable]:
    for field in settings_fields(settings):
        annotation = repr(settings.model_fields[field].annotation)
        yield Variable(
            env_name(settings, field),
            _default(settings, field),
            meaning(settings, field),
            "SecretStr" in annotation,
        )


def all_variable_names() -> set[str]:
    """Every environment variable a beeldportaal process reads."""
    names = {v.name for s in SECTIONS for v in variables(s.settings)}
    return names | set(EXTRA_VARIABLES)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    lines: list[str] = []
    for section in SECTIONS:
        prefix = section.settings.model_config.get("env_prefix", "")
        lines += [
            f"#### {section.title} (`{prefix}*`)",
            "",
            f"Read by {section.read_by}.",
            "",
            "| variable | default | meaning |",
            "|---|---|---|",
        ]
        for var in variables(section.settings):
            secret = " Secret: keep it in a Secret, never a ConfigMap." if var.secret else ""
            lines.append(f"| `{var.name}` | {var.default} | {_cell(var.meaning)}{secret} |")
        lines.append("")
    lines += [
        "#### Outside the settings classes",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    for name, text in EXTRA_VARIABLES.items():
        lines.append(f"| `{name}` | the host name | {_cell(text)} |")
    return "\n".join(lines).rstrip() + "\n"


# Who writes and who reads each topic (shared.topics declares partitions and retention).
TOPIC_FLOW: dict[str, tuple[str, str]] = {
    "instance-stored": ("ingest serve", "ingest assemble"),
    "study-received": (
        "ingest assemble",
        "consent decide, timeline project, notify serve (study status)",
    ),
    "ingest-assembly-state": ("ingest assemble", "ingest assemble (rebuilds its state)"),
    "consent-registered": ("consent serve (Mitz notifications)", "consent serve/decide views"),
    "consent-revoked": ("consent serve", "consent and timeline serve views, timeline project"),
    "treatment-relationships": ("consent serve", "consent serve/decide and timeline serve views"),
    "consent-checked": (
        "consent decide",
        "routing route, timeline project, notify serve (study status)",
    ),
    "route-resolved": ("routing route", "notify deliver (dispatch), notify serve (study status)"),
    "route-failed": ("routing route", "notify serve (study status)"),
    "delivered": (
        "notify deliver",
        "timeline project, notify webhooks and study status, external subscribers",
    ),
    "delivery-failed": ("notify deliver", "notify webhooks, notify serve (study status)"),
    "delivery-urgent": ("notify deliver (dispatch), notify serve (re-drive)", "notify deliver"),
    "delivery-routine": ("notify deliver (dispatch), notify serve (re-drive)", "notify deliver"),
    **{
        f"delivery-retry-{tier}": ("notify deliver", "notify deliver (retry)")
        for tier in ("10s", "1m", "5m", "30m", "2h")
    },
    "delivery-dead-letter": ("notify deliver", "notify serve, the `dead-letters` CLI"),
    "provider-directory": (
        "routing serve / `routing seed`",
        "routing, consent decide, notify, timeline serve (whole-topic views)",
    ),
    # The access-log search reads the append-only access_log table: the timeline API writes
    # its own records there with the event, the archive in `timeline project` loads the rest.
    "access-logged": (
        "timeline serve, notify serve (portal pickup)",
        "timeline project (access-log archive), SIEM subscribers",
    ),
}


def _retention(ms: int) -> str:
    if ms == FOREVER:
        return "forever"
    days = ms / DAY_MS
    if days >= 365:
        return f"{days:g} days (≥ {int(days // 365)} years)"
    return f"{days:g} days"


def topic_table() -> str:
    lines = [
        "| topic | partitions | retention | cleanup | producer | consumers | what |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in TOPICS:
        producer, consumers = TOPIC_FLOW[spec.name]
        cleanup = "compact" if spec.compacted else "delete"
        lines.append(
            f"| `{spec.name}` | {spec.partitions} | {_retention(spec.retention_ms)} | {cleanup} "
            f"| {producer} | {consumers} | {_cell(spec.purpose)} |"
        )
    return "\n".join(lines) + "\n"


BLOCKS = {"config-reference": config_reference, "topic-table": topic_table}


def _marker(name: str, end: bool = False) -> str:
    return f"<!-- {name}:{'end' if end else 'start'} (generated by deploy/config_reference.py) -->"


def render(text: str) -> str:
    """``text`` with every generated block replaced by what the code says now."""
    for name, make in BLOCKS.items():
        start, end = _marker(name), _marker(name, end=True)
        if text.count(start) != 1 or text.count(end) != 1:
            raise ValueError(f"the guide needs exactly one {start!r} and one {end!r}")
        head, rest = text.split(start)
        _, tail = rest.split(end)
        text = f"{head}{start}\n{make()}{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the blocks in the guide")
    parser.add_argument("--check", action="store_true", help="exit 1 when the guide is stale")
    parser.add_argument("--guide", type=Path, default=GUIDE)
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        sys.stdout.write(config_reference() + "\n" + topic_table())
        return 0
    current = args.guide.read_text()
    wanted = render(current)
    if args.write:
        if wanted != current:
            args.guide.write_text(wanted)
        print(f"{args.guide}: {'updated' if wanted != current else 'up to date'}")
        return 0
    if wanted != current:
        print(f"{args.guide} is out of date: python -m deploy.config_reference --write")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
