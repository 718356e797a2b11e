"""Seeding the directory from YAML against the real broker: all or nothing, and idempotent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.routing.adapters.directory_view import DirectoryView
from services.routing.config import RoutingSettings
from services.routing.main import seed
from shared.settings import KafkaSettings

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[3] / "deploy" / "local" / "demo-directory.yaml"


async def directory_of(kafka: KafkaSettings, topic: str) -> dict[str, str]:
    view = DirectoryView(kafka, topic, name="test-seed-check")
    await view.start()
    try:
        await view.wait_caught_up(30)
        return {p.ura: p.name for p in view.search("demo")}
    finally:
        await view.stop()


def test_the_demo_seed_is_published_once_and_seeding_again_writes_nothing(
    kafka_settings: KafkaSettings,
    directory_topic: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = RoutingSettings(kafka=kafka_settings, log_json=False)
    assert seed(DEMO, settings, topic=directory_topic) == 0
    assert "published 2, unchanged 0" in capsys.readouterr().out
    assert seed(DEMO, settings, topic=directory_topic) == 0
    assert "published 0, unchanged 2" in capsys.readouterr().out
    assert asyncio.run(directory_of(kafka_settings, directory_topic)) == {
        "00000101": "Demo Ziekenhuis Oost",
        "00000202": "Demo Ziekenhuis West",
    }


def test_a_seed_with_any_invalid_entry_is_refused_whole_listing_every_problem(
    kafka_settings: KafkaSettings,
    directory_topic: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "directory.yaml"
    bad.write_text(
        "providers:\n"
        "  - {ura: '00000303', name: Goed, type_code: V4, city: Ede}\n"
        "  - {ura: 303, name: Fout, type_code: V4, city: Ede}\n"
        "  - ura: '00000404'\n"
        "    name: Ook fout\n"
        "    type_code: V4\n"
        "    city: Ede\n"
        "    webhook: {url: 'ftp://x.nl', secret: hunter2}\n"
    )
    settings = RoutingSettings(kafka=kafka_settings, log_json=False)
    assert seed(bad, settings, topic=directory_topic) == 2
    err = capsys.readouterr().err
    assert "providers[1]" in err and "leading zeros" in err
    assert "providers[2] (URA 00000404): webhook.url" in err
    assert "webhook.secret: must be at least 32 characters" in err
    assert "hunter2" not in err
    # Not even the valid entry was published.
    assert asyncio.run(directory_of(kafka_settings, directory_topic)) == {}
