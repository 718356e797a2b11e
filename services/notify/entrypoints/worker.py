"""The notify delivery worker: every route-resolved becomes the study in the receiver's PACS,
or a retried and finally dead-lettered failure, never a silent loss.

One process runs four consumer groups side by side (:class:`~shared.stream.Worker`)::

    route-resolved ─dispatch─▶ delivery-urgent  ─deliver─┐
                          └──▶ delivery-routine ─deliver─┤─▶ delivered / delivery-failed
                               delivery-retry-*  ─deliver─┘   + next retry tier or dead letter
    delivered, delivery-failed ─webhooks─▶ the recipient's webhook (signed POST)

- **dispatch** (``notify-dispatch``) only queues: it never waits on a receiver, so routes are
  taken off ``route-resolved`` at once and an urgent one lands on a queue of its own.
- **deliver** (``notify-urgent``, ``notify-routine``, ``notify-retry``) makes attempts; a
  retry tier's record that is not yet due pauses its partition (``NotDue``) without holding
  the others. On the urgent and routine queues deliveries go side by side, also within a
  partition (each delivery's key in order; ``max_concurrent_deliveries`` at once per queue);
  on the retry tiers a partition's go in order. Up to ``max_records_per_batch`` per fetch.
- **webhooks** (``notify-webhooks``) tells the recipient, by its webhook from the directory,
  of each delivery and each final failure; a partition's studies side by side (each study's
  in order), at most ``max_concurrent_webhooks`` requests at once per organisation.
- The dispatch and deliver groups are **transactional**: a route's queued delivery and its
  offset commit atomically, and so do an attempt's events (delivered, delivery-failed,
  the next tier or the dead letter) and its offset. A crash at any
  point leads at worst to the same instances sent again (the receiver keeps one copy, SOP
  Instance UIDs never change), never to a lost delivery or a second visible ``delivered``
  for a (study version, destination): consumers read with isolation level read_committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
from aiokafka import TopicPartition

from services.notify.adapters.dimse import DimseSender, DimseTimeouts
from services.notify.adapters.stow import StowSender, StowTimeouts
from services.notify.adapters.webhooks import WebhookSender
from services.notify.config import NotifySettings
from services.notify.domain.delivery import ROUTINE_QUEUE, URGENT_QUEUE
from services.notify.domain.retry import retry_topic_names
from services.notify.handlers.deliver import Deliverer, Dispatcher
from services.notify.handlers.webhooks import Notifier, PickupLinks
from services.notify.worker_metrics import NotifyWorkerMetrics
from services.routing.adapters.directory_view import PROVIDER_DIRECTORY, DirectoryView
from shared import runtime
from shared.events import Delivered, DeliveryFailed, RouteResolved
from shared.logging import configure_logging, get_logger
from shared.storage.port import ObjectStore
from shared.storage.s3 import S3ObjectStore
from shared.stream import StreamWorker, Worker, run_worker

log = get_logger(__name__)

SERVICE = "notify"


class NotifyWorker(Worker):
    """The streams and views of notify, plus the senders' connections to close at stop."""

    def __init__(
        self, *args: object, stow: StowSender, http: httpx.AsyncClient, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stow = stow
        self.http = http

    async def stop(self) -> None:
        await super().stop()
        await self.stow.aclose()
        await self.http.aclose()


def build_notify_worker(
    settings: NotifySettings,
    *,
    objects: ObjectStore | None = None,
    group_prefix: str = SERVICE,
    rename: Mapping[str, str] | None = None,
    metrics: NotifyWorkerMetrics | None = None,
) -> NotifyWorker:
    """The worker on the declared topics; ``rename`` maps declared topic names to tagged copies
    (tests and benchmarks), ``group_prefix`` names its consumer groups."""
    metrics = metrics or NotifyWorkerMetrics()
    names = dict(rename or {})

    def topic(name: str) -> str:
        return names.get(name, name)

    policy = settings.retry_policy
    directory = DirectoryView(
        settings.kafka, topic(PROVIDER_DIRECTORY), name=f"{group_prefix}-directory"
    )
    stow = StowSender(
        timeouts=StowTimeouts(
            connect=settings.connect_timeout_seconds,
            write=settings.receiver_timeout_seconds,
            read=settings.receiver_timeout_seconds,
        ),
        metrics=metrics,
    )
    deliverer = Deliverer(
        directory=directory,
        objects=objects or S3ObjectStore.from_settings(settings.s3),
        stow=stow,
        dimse=DimseSender(
            timeouts=DimseTimeouts(
                connection=settings.connect_timeout_seconds,
                acse=settings.receiver_timeout_seconds,
                dimse=settings.receiver_timeout_seconds,
                network=settings.receiver_timeout_seconds,
            ),
            metrics=metrics,
        ),
        policy=policy,
        metrics=metrics,
        view_timeout=settings.view_start_timeout_seconds,
        max_concurrent=settings.max_concurrent_deliveries,
    )
    tiers = [t for t in retry_topic_names(policy) if t.startswith("delivery-retry-")]

    def stream(group: str, sources: list[str], **kwargs: object) -> StreamWorker:
        return StreamWorker(
            settings.kafka,
            name=f"{group_prefix}-{group}",
            group=f"{group_prefix}-{group}",
            topics=[topic(s) for s in sources],
            metrics=metrics,
            rename=names,
            **kwargs,  # type: ignore[arg-type]
        )

    def deliver(group: str, sources: list[str], *, side_by_side: bool) -> StreamWorker:
        async def recall(partitions: set[TopicPartition]) -> None:
            # What was handled there before (a restart, another member): its copies skipped.
            await deliverer.recall(settings.kafka, worker.committed, partitions)

        worker = stream(
            group,
            sources,
            handle=deliverer.handle,
            prepare=deliverer.prepare,
            transactional=True,
            max_records=settings.max_records_per_batch,
            parallel_keys=side_by_side,
            on_assigned=recall,
        )
        return worker

    # Webhooks: no redirects (the signed body must not be replayed elsewhere).
    # A batch's notifications go side by side: one connection each, so a subscriber that hangs
    # never leaves another organisation's request waiting for the pool (httpx's default: 100).
    limits = httpx.Limits(
        max_connections=max(100, settings.max_records_per_batch), max_keepalive_connections=20
    )
    http = httpx.AsyncClient(follow_redirects=False, limits=limits)
    pickup = None
    if settings.pickup_key is not None:
        pickup = PickupLinks(
            settings.pickup_key.get_secret_value().encode(),
            settings.public_base_url,
            timedelta(days=settings.pickup_link_days),
        )
    notifier = Notifier(
        directory,
        WebhookSender(http, backoff=settings.webhook_backoff_seconds),
        metrics,
        pickup,
        max_concurrent=settings.max_concurrent_webhooks,
    )
    streams = [
        # Transactional like the deliver groups: a route queued twice (a publish whose answer
        # was lost, then the batch handled again) would be delivered twice.
        stream(
            "dispatch",
            [RouteResolved.topic],
            handle=Dispatcher(metrics).handle,
            transactional=True,
        ),
        deliver("urgent", [URGENT_QUEUE], side_by_side=True),
        deliver("routine", [ROUTINE_QUEUE], side_by_side=True),
        # A tier's record not yet due stops its partition; what went side by side after it
        # would be sent again later. Retries are few: one by one.
        deliver("retry", tiers, side_by_side=False),
        stream(
            "webhooks",
            [Delivered.topic, DeliveryFailed.topic],
            handle=notifier.handle,
            prepare=deliverer.prepare,
            max_records=settings.max_records_per_batch,
            # A subscriber that is down delays only its own notifications (handlers/webhooks.py).
            parallel_keys=True,
        ),
    ]
    return NotifyWorker(streams, views=(directory,), stow=stow, http=http)


async def _run(settings: NotifySettings) -> None:
    executor = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="notify-io")
    asyncio.get_running_loop().set_default_executor(executor)
    metrics = NotifyWorkerMetrics()
    worker = build_notify_worker(settings, metrics=metrics)
    await run_worker(
        worker,
        metrics=metrics,
        metrics_port=settings.worker_metrics_port,
        metrics_host=settings.worker_metrics_host,
    )


def main(settings: NotifySettings) -> None:
    """Run the delivery worker until SIGTERM (``beeldportaal notify deliver``)."""
    configure_logging(f"{settings.service_name}-worker", settings.log_level, settings.log_json)
    # httpx logs every request with its full URL (a receiver's path may hold a token) and
    # pynetdicom every association at INFO; our own log says what matters, without addresses.
    for noisy in ("httpx", "httpcore", "pynetdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    runtime.run(_run(settings))
