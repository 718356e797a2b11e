"""The running local platform matches its declarations: topics, buckets, schema, health."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from deploy.local.platform import Platform
from shared.kafka import provision_topics
from shared.settings import KafkaSettings
from shared.topics import TOPICS, TopicSpec

pytestmark = pytest.mark.integration


async def test_every_declared_topic_exists_with_its_partitions_and_configuration(
    kafka_settings: KafkaSettings,
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_list)
    await admin.start()
    try:
        described = {d["topic"]: d for d in await admin.describe_topics([t.name for t in TOPICS])}
        configs = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t.name) for t in TOPICS]
        )
    finally:
        await admin.close()
    actual: dict[str, dict[str, str]] = {}
    for response in configs:
        for resource in response.resources:
            _err, _msg, _type, name, entries = resource[:5]
            actual[name] = {entry[0]: entry[1] for entry in entries}
    for spec in TOPICS:
        assert len(described[spec.name]["partitions"]) == spec.partitions, spec.name
        assert actual[spec.name]["cleanup.policy"] == ("compact" if spec.compacted else "delete")
        assert actual[spec.name]["retention.ms"] == str(spec.retention_ms)


async def test_provisioning_twice_changes_nothing_and_grows_partitions_when_declared(
    kafka_settings: KafkaSettings,
) -> None:
    import uuid

    name = f"provision-{uuid.uuid4().hex[:8]}"
    spec = TopicSpec(name, 2, 60_000)
    try:
        assert await provision_topics(kafka_settings.bootstrap_list, [spec]) == {name: "created"}
        assert await provision_topics(kafka_settings.bootstrap_list, [spec]) == {name: "up to date"}
        grown = TopicSpec(name, 4, 60_000)
        assert await provision_topics(kafka_settings.bootstrap_list, [grown]) == {
            name: "partitions raised"
        }
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_list)
        await admin.start()
        try:
            [described] = await admin.describe_topics([name])
        finally:
            await admin.close()
        assert len(described["partitions"]) == 4
    finally:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_list)
        await admin.start()
        await admin.delete_topics([name])
        await admin.close()


def test_status_reports_every_component_ready_and_up_is_idempotent() -> None:
    lines: list[str] = []
    platform = Platform(out=lines.append)
    assert platform.status() is True
    assert [line.split(":")[0] for line in lines] == ["kafka", "s3", "postgres", "prometheus"]
    lines.clear()
    platform.up()  # already running: must not start a second anything
    assert any(line.startswith("kafka:") and "already running" in line for line in lines)
    assert any(line.startswith("s3:") and "already running" in line for line in lines)
    assert any(line.startswith("postgres:") and "already running" in line for line in lines)
    assert any(line.startswith("prometheus:") and "already running" in line for line in lines)
    assert any(line.startswith("schema:") and "up to date" in line for line in lines)
