"""The examples in docs/ run against the real broker and say what the docs promise."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from shared.codec import Codec
from shared.events import Delivered
from shared.settings import KafkaSettings
from shared.topics import DAY_MS, TopicSpec
from tests.factories import make_delivered

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


async def test_the_delivered_consumer_example_prints_each_committed_delivery_once(
    kafka_settings: KafkaSettings, declare_topics: object, tag: str
) -> None:
    topic = f"test-delivered-{tag}"
    await declare_topics(TopicSpec(topic, 3, DAY_MS))  # type: ignore[operator]
    first, second = make_delivered(), make_delivered()
    aborted = make_delivered()
    codec = Codec()
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_settings.bootstrap_list, transactional_id=f"test-docs-{tag}"
    )
    await producer.start()
    try:
        for events, commit in (([first, first], True), ([aborted], False), ([second], True)):
            await producer.begin_transaction()
            for event in events:
                record = codec.encode(event)
                await producer.send(
                    topic, record.value, key=record.key, headers=list(record.headers)
                )
            if commit:
                await producer.commit_transaction()
            else:
                await producer.abort_transaction()
    finally:
        await producer.stop()

    run = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            str(ROOT / "docs" / "examples" / "delivered_consumer.py"),
            "--bootstrap",
            kafka_settings.bootstrap_servers,
            "--group",
            f"test-docs-{tag}",
            "--topic",
            topic,
            "--limit",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2  # the repeat skipped by id, the aborted transaction never seen
    assert {first.study_instance_uid, second.study_instance_uid} == {
        line.split()[2] for line in lines
    }
    assert all(f" from {first.sender_ura} -> " in line for line in lines)
    assert aborted.study_instance_uid not in run.stdout
    assert Delivered.schema_name == "delivered.v1"  # the version the docs and example name
