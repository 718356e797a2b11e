"""The directory API against the real broker: writes land on the compacted topic, reads see them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import requests
from aiokafka import AIOKafkaConsumer

from services.routing.adapters.directory_view import DirectoryView
from services.routing.domain.directory import Provider
from shared.settings import KafkaSettings
from tests.integration.routing.conftest import READER_URA, RunningRouting

pytestmark = pytest.mark.integration

URA = "24681357"
PASSWORD = "integration-pacs-password"
WEBHOOK_SECRET = "integration-webhook-secret-0123456789abcdef"


def entry(ura: str = URA, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ura": ura,
        "name": "Gelre Testziekenhuis",
        "type_code": "V4",
        "city": "Apeldoorn",
        "endpoints": [
            {
                "channel": "dicomweb",
                "id": "pacs-web",
                "base_url": "https://pacs.gelre.example.nl/dicom-web",
                "auth": {"type": "basic", "username": "bp", "password": PASSWORD},
            }
        ],
        "webhook": {"url": "https://hooks.gelre.example.nl/bp", "secret": WEBHOOK_SECRET},
    }
    fields.update(overrides)
    return fields


def wait_ready(api: RunningRouting, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while requests.get(f"{api.base_url}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the directory view did not catch up"
        time.sleep(0.1)


async def topic_records(
    kafka: KafkaSettings, topic: str, count: int
) -> list[tuple[bytes, bytes | None]]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka.bootstrap_list, auto_offset_reset="earliest"
    )
    await consumer.start()
    found: list[tuple[bytes, bytes | None]] = []
    try:
        async with asyncio.timeout(30):
            while len(found) < count:
                batches = await consumer.getmany(timeout_ms=200)
                found += [(r.key, r.value) for rs in batches.values() for r in rs]
    finally:
        await consumer.stop()
    return found


def test_put_get_search_delete_round_trip_with_read_your_writes(
    routing_api: RunningRouting, kafka_settings: KafkaSettings, directory_topic: str
) -> None:
    base, operator = routing_api.base_url, routing_api.headers("operator")
    reader = routing_api.headers("provider", ura=READER_URA)
    wait_ready(routing_api)
    assert requests.get(f"{base}/providers/{URA}", headers=reader, timeout=10).status_code == 404

    created = requests.put(f"{base}/providers/{URA}", json=entry(), headers=operator, timeout=30)
    assert created.status_code == 201, created.text
    # The write answered only once the view had it: an immediate read sees it.
    got = requests.get(f"{base}/providers/{URA}", headers=reader, timeout=10)
    assert got.status_code == 200
    assert got.json()["channels"] == [{"id": "pacs-web", "channel": "dicomweb"}]
    assert PASSWORD not in got.text and "gelre.example.nl" not in got.text

    moved = requests.put(
        f"{base}/providers/{URA}", json=entry(city="Zutphen"), headers=operator, timeout=30
    )
    assert moved.status_code == 200
    found = requests.get(
        f"{base}/providers", params={"q": "zutphen"}, headers=reader, timeout=10
    ).json()
    assert [p["ura"] for p in found] == [URA]

    denied = requests.delete(f"{base}/providers/{URA}", headers=reader, timeout=10)
    assert denied.status_code == 403
    assert (
        requests.delete(f"{base}/providers/{URA}", headers=operator, timeout=30).status_code == 204
    )
    assert requests.get(f"{base}/providers/{URA}", headers=reader, timeout=10).status_code == 404
    assert (
        requests.get(
            f"{base}/providers", params={"q": "zutphen"}, headers=reader, timeout=10
        ).json()
        == []
    )

    # On the topic: two records with the secrets (the topic is the store) and a tombstone.
    records = asyncio.run(topic_records(kafka_settings, directory_topic, 3))
    assert [key for key, _ in records] == [URA.encode()] * 3
    first, second, tombstone = (value for _, value in records)
    assert first is not None and second is not None and tombstone is None
    stored = Provider.from_record(second)
    assert stored.city == "Zutphen"
    assert stored.webhook.secret.get_secret_value() == WEBHOOK_SECRET  # type: ignore[union-attr]


def test_another_process_reading_the_topic_sees_the_same_directory(
    routing_api: RunningRouting, kafka_settings: KafkaSettings, directory_topic: str
) -> None:
    operator = routing_api.headers("operator")
    wait_ready(routing_api)
    for n in range(3):
        ura = f"1357900{n}"
        response = requests.put(
            f"{routing_api.base_url}/providers/{ura}",
            json=entry(ura, name=f"Ziekenhuis {n}"),
            headers=operator,
            timeout=30,
        )
        assert response.status_code == 201
    requests.delete(f"{routing_api.base_url}/providers/13579001", headers=operator, timeout=30)

    async def fresh_view() -> tuple[list[str], Provider | None]:
        view = DirectoryView(kafka_settings, directory_topic, name="second-process")
        await view.start()
        try:
            await view.wait_caught_up(30)
            return sorted(p.ura for p in view.search("ziekenhuis")), view.get("13579002")
        finally:
            await view.stop()

    uras, provider = asyncio.run(fresh_view())
    assert uras == ["13579000", "13579002"]
    assert provider is not None and provider.name == "Ziekenhuis 2"
