"""End-to-end tier: beeldportaal's own processes against real peers and the real platform."""

from __future__ import annotations

import asyncio

import pytest

from shared.kafka import broker_ready
from shared.settings import KafkaSettings
from tests.e2e.harness import platform_env


@pytest.fixture(scope="session")
def kafka_settings() -> KafkaSettings:
    env = platform_env()
    settings = KafkaSettings(bootstrap_servers=env["BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS"])
    if not asyncio.run(broker_ready(settings.bootstrap_list)):
        pytest.fail(f"Kafka at {settings.bootstrap_servers} is not reachable", pytrace=False)
    return settings
