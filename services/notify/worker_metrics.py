"""What the notify delivery worker exports on /metrics: deliveries, failed attempts and
instances by channel, the end-to-end latency by priority, and each destination's health.

Labels are closed sets (channel, priority, final, outcome) and, for the per-destination series
only, the destination organisation's URA and the endpoint id from the provider directory:
organisations, not people, as many as the directory has endpoints. Never a patient, a study
UID or an endpoint URL.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from shared.events.common import DeliveryChannel, Urgency
from shared.metrics import ServiceMetrics, initialise, safe_label

# End to end: from the first instance received to the receiver's last acknowledgement.
LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 10, 30, 60, 120, 300, 900, 3600, 4 * 3600)
CHANNELS = tuple(c.value for c in DeliveryChannel)
PRIORITIES = tuple(u.value for u in Urgency)
# How an attempt ended: the study delivered, a retry scheduled, or dead-lettered.
ATTEMPT_OUTCOMES = ("delivered", "retry", "dead")
WEBHOOK_TYPES = ("delivered.v1", "delivery.failed.v1")
WEBHOOK_OUTCOMES = ("delivered", "rejected", "exhausted")


class NotifyWorkerMetrics(ServiceMetrics):
    def __init__(self, *, registry: CollectorRegistry | None = None, version: str = "0.1.0"):
        super().__init__("notify", version, registry=registry)
        self.delivered = self.counter(
            "notify_deliveries_delivered",
            "Deliveries completed (one delivered event each), by channel and priority.",
            ["channel", "priority"],
        )
        self.failed_attempts = self.counter(
            "notify_delivery_attempts_failed",
            "Failed delivery attempts, by channel; final=true went to the dead letters.",
            ["channel", "final"],
        )
        self.instances = self.counter(
            "notify_instances",
            "Instances sent to receivers, by channel and outcome (sent, failed).",
            ["channel", "outcome"],
        )
        self.instances_decompressed = self.counter(
            "notify_instances_decompressed",
            "Compressed instances sent decompressed, their receiver accepting the SOP class "
            "only uncompressed (C-STORE) or refusing its transfer syntax (STOW-RS C122), by "
            "outcome (sent; failed: not decodable, not sent).",
            ["outcome"],
        )
        self.webhooks = self.counter(
            "notify_webhooks",
            "Webhook notifications, by type and outcome (delivered, rejected, exhausted).",
            ["type", "outcome"],
        )
        self.delivery_latency = self.histogram(
            "notify_delivery_latency_seconds",
            "From a study's first instance received to its delivery, by priority.",
            ["priority"],
            buckets=LATENCY_BUCKETS,
        )
        self.destination_attempts = self.counter(
            "notify_destination_attempts",
            "Delivery attempts per destination endpoint, by how they ended (delivered, retry: "
            "failed and scheduled again, dead: failed for good).",
            ["destination", "endpoint", "channel", "outcome"],
        )
        self.destination_retries_taken = self.counter(
            "notify_destination_retries_taken",
            "Attempts made from a retry tier per destination endpoint (a retry leaving the "
            "queue); scheduled minus taken is the retry backlog.",
            ["destination", "endpoint"],
        )
        self.destination_last_success = self.gauge(
            "notify_destination_last_success_timestamp_seconds",
            "When this worker last delivered to the destination endpoint (Unix time).",
            ["destination", "endpoint"],
        )
        initialise(self.delivered, CHANNELS, PRIORITIES)
        initialise(self.failed_attempts, CHANNELS, ("true", "false"))
        initialise(self.instances, CHANNELS, ("sent", "failed"))
        initialise(self.instances_decompressed, ("sent", "failed"))
        initialise(self.webhooks, WEBHOOK_TYPES, WEBHOOK_OUTCOMES)
        initialise(self.delivery_latency, PRIORITIES)
        # The time to send one batch, per channel (handlers.deliver times "send-<channel>").
        initialise(self.handler_duration, ("send-dicomweb", "send-dimse"))

    def attempt_concluded(
        self, destination: str, endpoint: str, channel: str, outcome: str, *, retried: bool
    ) -> None:
        """One attempt at ``endpoint`` of ``destination`` ended in ``outcome`` (one of
        ATTEMPT_OUTCOMES); ``retried``: it came from a retry tier.

        A destination's first attempt creates all its outcome series at once, so that a rate of
        its failures is a zero, not a missing series, while it delivers.
        """
        if outcome not in ATTEMPT_OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(ATTEMPT_OUTCOMES)}")
        labels = (safe_label(destination), safe_label(endpoint))
        initialise(self.destination_attempts, [labels[0]], [labels[1]], [channel], ATTEMPT_OUTCOMES)
        self.destination_attempts.labels(*labels, channel, outcome).inc()
        taken = self.destination_retries_taken.labels(*labels)
        if retried:
            taken.inc()
        if outcome == "delivered":
            self.destination_last_success.labels(*labels).set(time.time())
