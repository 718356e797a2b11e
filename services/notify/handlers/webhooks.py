"""Tell the receiving organisation, by its webhook, that a study arrived or finally could not.

A stream of its own (consumer group ``notify-webhooks``) on ``delivered`` and
``delivery-failed``, read committed: a delivery's transaction is the single source, so a
webhook is only sent for what really happened. The recipient's webhook (URL and shared
secret) is in the provider directory; an organisation without one gets none. Failed attempts
that will be retried are not announced, only the final failure.

Each notification is retried with backoff within :class:`WebhookSender`'s budget while the
batch it came in waits (the offset is committed after the last attempt, so a crash sends it
again: subscribers deduplicate on ``X-Beeldportaal-Delivery``). The studies of a batch are
notified side by side (``parallel_keys``; each study's in order), with at most
``max_concurrent`` requests in flight per receiving organisation; a request holds its slot,
the waits between attempts do not. A subscriber that is down takes no slot from another
organisation's notifications in the batch, which go out at once; the next batch waits for
this one, which with N notifications for a subscriber that hangs takes at most
ceil(N / max_concurrent) times one notification's requests (4 x 10 s timeouts) plus one
budget's waits (36 s): 5 x 40 + 36 = 236 s for a full batch of 50, within Kafka's 5-minute
poll interval (with slots held for a whole budget it was 5 x 76 = 380 s, and one by one
50 x 76 s). The process's HTTP pool holds ``max_records_per_batch`` connections at least
(``entrypoints/worker.py``), so the requests of one batch never wait for one. A
subscriber that stays down past the budget misses that notification: it is logged and
counted, and the same facts remain on the ``delivered`` topic and in the sender's status API.

A study delivered by portal pickup comes with ``data.pickup_url``: a link signed for the
recipient, expiring (``services.notify.domain.pickup``), that the notify API serves as a zip.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from services.notify.adapters.webhooks import (
    DELIVERED_TYPE,
    DELIVERY_FAILED_TYPE,
    WebhookSender,
    delivered_payload,
    delivery_failed_payload,
)
from services.notify.domain.pickup import pickup_path, sign_pickup
from services.notify.worker_metrics import NotifyWorkerMetrics
from services.routing.adapters.directory_view import DirectoryView
from shared.codec import Codec
from shared.events import Delivered, DeliveryChannel, DeliveryFailed, Event
from shared.logging import correlation_context, get_logger
from shared.stream import decode_as

log = get_logger(__name__)


@dataclass(frozen=True)
class PickupLinks:
    """Signed, expiring download links for studies delivered by portal pickup."""

    key: bytes
    base_url: str
    lifetime: timedelta

    def link(self, event: Delivered) -> str:
        token = sign_pickup(
            event.study_instance_uid,
            event.study_version,
            event.destination_ura,
            event.sender_ura,
            event.delivered_at + self.lifetime,
            self.key,
        )
        return self.base_url.rstrip("/") + pickup_path(token)


@dataclass
class Notifier:
    directory: DirectoryView
    sender: WebhookSender
    metrics: NotifyWorkerMetrics
    pickup: PickupLinks | None = None
    codec: Codec = field(default_factory=Codec)
    # Requests in flight at once per receiving organisation (the stream hands a batch's
    # studies over side by side).
    max_concurrent: int = 12
    _slots: dict[str, asyncio.Semaphore] = field(default_factory=dict, init=False, repr=False)

    async def handle(self, record: Any) -> list[Event]:
        event = decode_as(self.codec, record, Delivered, DeliveryFailed)
        if isinstance(event, DeliveryFailed) and not event.final:
            return []
        provider = self.directory.get(event.destination_ura)
        if provider is None or provider.webhook is None:
            return []
        if isinstance(event, Delivered):
            kind, payload = DELIVERED_TYPE, delivered_payload(event)
            if event.channel is DeliveryChannel.PICKUP and self.pickup is not None:
                payload["data"]["pickup_url"] = self.pickup.link(event)
        else:
            kind, payload = DELIVERY_FAILED_TYPE, delivery_failed_payload(event)
        slot = self._slots.get(event.destination_ura)
        if slot is None:
            slot = self._slots[event.destination_ura] = asyncio.Semaphore(self.max_concurrent)
        with correlation_context(event.correlation_id):
            result = await self.sender.deliver(
                provider.webhook.url,
                provider.webhook.secret,
                delivery_id=f"{event.event_id}",
                event_type=kind,
                payload=payload,
                slot=slot,
            )
            self.metrics.webhooks.labels(kind, result.outcome.value).inc()
            if not result.delivered:
                log.warning(
                    "webhook not accepted",
                    destination_ura=event.destination_ura,
                    event_type=kind,
                    outcome=result.outcome.value,
                    attempts=result.attempts,
                    status_code=result.status_code,
                )
        return []
