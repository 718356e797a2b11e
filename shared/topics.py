"""Every Kafka topic the system uses, declared once: provisioning reads this, never auto-create.

Partition counts bound each consumer group's parallelism (a service scales to at most that many
replicas). Topics that feed a projection or the event-sourced consent registry keep their history
forever, so a read model can be rebuilt by replaying them from the start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.events import registry

DAY_MS = 24 * 60 * 60 * 1000
FOREVER = -1
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int
    # A compacted topic is a table: the latest record per key is kept, older ones dropped.
    compacted: bool = False
    purpose: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def config(self, min_insync_replicas: int = 1) -> dict[str, str]:
        cfg = {
            "cleanup.policy": "compact" if self.compacted else "delete",
            "retention.ms": str(self.retention_ms),
            "max.message.bytes": str(MAX_MESSAGE_BYTES),
            "min.insync.replicas": str(min_insync_replicas),
        }
        cfg.update(self.extra)
        return cfg


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(
        "instance-stored",
        12,
        30 * DAY_MS,
        purpose="one per stored DICOM instance, and the end of each completing STOW-RS request",
    ),
    TopicSpec("study-received", 12, FOREVER, purpose="a stable study, per version"),
    # Internal to ingest: the study assembly's state (changelog), co-partitioned with
    # instance-stored (same count, key = Study Instance UID), written in the transaction of the
    # batch that changed it (services.ingest.entrypoints.assembler).
    TopicSpec(
        "ingest-assembly-state",
        12,
        FOREVER,
        compacted=True,
        purpose="study assembly state (changelog)",
    ),
    TopicSpec("consent-registered", 12, FOREVER, purpose="explicit consent/objection (Mitz)"),
    TopicSpec("consent-revoked", 12, FOREVER, purpose="consent/objection withdrawn"),
    TopicSpec("treatment-relationships", 12, FOREVER, purpose="organisation treats patient"),
    TopicSpec("consent-checked", 12, FOREVER, purpose="the decision per study version/purpose"),
    TopicSpec("route-resolved", 12, 90 * DAY_MS, purpose="a destination to deliver to"),
    TopicSpec("route-failed", 3, 90 * DAY_MS, purpose="permitted but no usable destination"),
    TopicSpec("delivered", 12, FOREVER, purpose="public: a study version reached a destination"),
    TopicSpec("delivery-failed", 6, 90 * DAY_MS, purpose="an attempt failed; final = dead"),
    # Internal to notify: deliveries waiting for an attempt. Urgent and routine are separate
    # topics (and consumers), so an urgent study never waits behind a routine backlog.
    TopicSpec("delivery-urgent", 12, 14 * DAY_MS, purpose="deliveries due now, urgent"),
    TopicSpec("delivery-routine", 12, 14 * DAY_MS, purpose="deliveries due now, routine"),
    # One topic per retry delay (services.notify.domain.retry): a notify configured with
    # other delays needs their topics declared here.
    *(
        TopicSpec(f"delivery-retry-{tier}", 6, 14 * DAY_MS, purpose=f"retried after {tier}")
        for tier in ("10s", "1m", "5m", "30m", "2h")
    ),
    TopicSpec("delivery-dead-letter", 6, FOREVER, compacted=True, purpose="deliveries given up on"),
    TopicSpec(
        "provider-directory", 1, FOREVER, compacted=True, purpose="address book, keyed by URA"
    ),
    # NEN 7513: audit records are kept at least five years; six gives margin for legal holds.
    TopicSpec("access-logged", 6, 6 * 366 * DAY_MS, purpose="NEN 7513 access audit"),
)

BY_NAME: dict[str, TopicSpec] = {t.name: t for t in TOPICS}


def topic(name: str) -> TopicSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"topic {name!r} is not declared in shared.topics") from None


def undeclared_event_topics() -> list[str]:
    """Event topics no TopicSpec declares (a test keeps this empty)."""
    return sorted({m.topic for m in registry.models()} - BY_NAME.keys())
