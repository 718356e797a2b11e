"""What the notify delivery worker exports on /metrics: deliveries, failed attempts and
instances by channel, and the end-to-end latency by priority. Labels are closed sets only
(channel, priority, final): never a URA, a study UID or an endpoint URL."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from shared.metrics import ServiceMetrics

# End to end: from the first instance received to the receiver's last acknowledgement.
LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 10, 30, 60, 120, 300, 900, 3600, 4 * 3600)


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
