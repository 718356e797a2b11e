"""The topic declaration: every event has a declared topic, sized and retained for what reads it."""

from __future__ import annotations

import re

import pytest

from shared.events import registry
from shared.topics import (
    BY_NAME,
    DAY_MS,
    FOREVER,
    MAX_MESSAGE_BYTES,
    TOPICS,
    TopicSpec,
    topic,
    undeclared_event_topics,
)

BY_TOPIC = pytest.mark.parametrize("spec", TOPICS, ids=[t.name for t in TOPICS])
# Five calendar years can hold two leap days; the NEN 7513 minimum must hold for all of them.
FIVE_YEARS_MS = (5 * 365 + 2) * DAY_MS
# Projections (timeline) and the event-sourced consent registry are rebuilt by replaying these.
REPLAYED = [
    "study-received",
    "consent-registered",
    "consent-revoked",
    "treatment-relationships",
    "consent-checked",
    "delivered",
]
# Folded together into one registry per patient pseudonym by the consent registry view.
CONSENT_REGISTRY_INPUTS = ["consent-registered", "consent-revoked", "treatment-relationships"]


def test_every_event_models_topic_is_declared() -> None:
    assert undeclared_event_topics() == []


def test_an_event_on_an_undeclared_topic_would_be_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    model = registry.models()[0]
    monkeypatch.setattr(model, "topic", "not-declared-anywhere")
    assert undeclared_event_topics() == ["not-declared-anywhere"]


def test_topic_names_are_unique() -> None:
    names = [t.name for t in TOPICS]
    assert len(names) == len(set(names))
    assert set(BY_NAME) == set(names)


@BY_TOPIC
def test_topic_names_are_kebab_case(spec: TopicSpec) -> None:
    assert re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", spec.name)


@BY_TOPIC
def test_every_topic_has_at_least_one_partition(spec: TopicSpec) -> None:
    assert spec.partitions >= 1


@BY_TOPIC
def test_retention_is_forever_or_a_positive_duration(spec: TopicSpec) -> None:
    assert spec.retention_ms == FOREVER or spec.retention_ms > 0


@BY_TOPIC
def test_every_topic_config_is_strings_kafka_understands(spec: TopicSpec) -> None:
    config = spec.config()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in config.items())
    assert config["retention.ms"] == str(spec.retention_ms)
    assert config["cleanup.policy"] == ("compact" if spec.compacted else "delete")
    assert int(config["max.message.bytes"]) == MAX_MESSAGE_BYTES


def test_access_logged_is_kept_at_least_five_years() -> None:
    retention = topic("access-logged").retention_ms
    assert retention == FOREVER or retention >= FIVE_YEARS_MS
    assert not topic("access-logged").compacted  # compaction would drop audit records


def test_the_provider_directory_is_a_compacted_table() -> None:
    spec = topic("provider-directory")
    assert spec.compacted
    assert spec.config()["cleanup.policy"] == "compact"


@pytest.mark.parametrize("name", REPLAYED)
def test_topics_that_feed_rebuildable_state_keep_every_record_forever(name: str) -> None:
    spec = topic(name)
    assert spec.retention_ms == FOREVER
    assert spec.config()["retention.ms"] == "-1"
    assert not spec.compacted  # a replay needs every version, not the latest per key


def test_the_consent_registry_inputs_are_co_partitioned() -> None:
    assert len({topic(name).partitions for name in CONSENT_REGISTRY_INPUTS}) == 1


def test_a_topic_that_is_not_declared_raises_key_error_naming_it() -> None:
    with pytest.raises(KeyError, match=r"topic 'nope' is not declared in shared\.topics"):
        topic("nope")


def test_declared_topics_are_found_by_name() -> None:
    for spec in TOPICS:
        assert topic(spec.name) is spec


def test_extra_settings_override_the_defaults() -> None:
    spec = TopicSpec("t", 1, DAY_MS, extra={"min.insync.replicas": "2", "segment.ms": "1000"})
    config = spec.config()
    assert config["min.insync.replicas"] == "2"
    assert config["segment.ms"] == "1000"
    assert config["retention.ms"] == str(DAY_MS)
