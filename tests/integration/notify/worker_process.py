"""Runs the notify worker in a process of its own, for tests that kill it (``kill -9``).

``python -m tests.integration.notify.worker_process`` with ``NOTIFY_TEST_CONFIG`` holding JSON:
the Kafka and S3 settings, the topic renames, the consumer-group prefix and the retry delays.
"""

from __future__ import annotations

import asyncio
import json
import os

from services.notify.config import NotifySettings
from services.notify.entrypoints.worker import build_notify_worker
from services.notify.worker_metrics import NotifyWorkerMetrics
from shared import topics
from shared.logging import configure_logging
from shared.settings import KafkaSettings, S3Settings
from shared.stream import run_worker
from shared.topics import TopicSpec


def main() -> None:
    config = json.loads(os.environ["NOTIFY_TEST_CONFIG"])
    for name in config["declared"]:  # the test's own retry tiers
        topics.BY_NAME[name] = TopicSpec(name, 3, topics.DAY_MS)
    settings = NotifySettings(
        kafka=KafkaSettings(**config["kafka"]),
        s3=S3Settings(**config["s3"]),
        retry_delays=tuple(config["retry_delays"]),
        view_start_timeout_seconds=10,
    )
    configure_logging("notify-test", "INFO", json=True)
    metrics = NotifyWorkerMetrics()
    worker = build_notify_worker(
        settings, group_prefix=config["group_prefix"], rename=config["rename"], metrics=metrics
    )
    asyncio.run(run_worker(worker, metrics=metrics))


if __name__ == "__main__":
    main()
