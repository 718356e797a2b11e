"""Writes the Grafana dashboards (``deploy/grafana/dashboards/*.json``) from one description.

``python -m deploy.grafana.generate`` rewrites the JSON files (they are committed: Grafana
provisions them as they are, see ``deploy/grafana/provisioning``); ``--check`` exits 1 when a
committed file differs from what this module generates. Every panel query is a plain PromQL
expression without Grafana variables, so ``beeldportaal observability check`` can run each one
through promtool and against a live Prometheus as written.

The panels read the recording rules of ``deploy/prometheus/rules`` where one exists, and the
services' metrics (``shared.metrics``, ``services/*/metrics.py``) otherwise. Consumer groups are
selected by name (``group=~".*notify-retry"``), services by ``job`` only where no group says it,
and the service processes' own metrics (``up``, ``process_*``) by their ``job``: the process
names of ``deploy/local/services.py``, which the compose stack uses as job names too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "beeldportaal-prometheus"}
SCHEMA_VERSION = 39
WIDTH = 24


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    # A table column's header (instant queries in a table panel) and its unit, if not the panel's.
    column: str | None = None
    unit: str | None = None


@dataclass(frozen=True)
class Panel:
    title: str
    queries: Sequence[Query]
    description: str
    kind: str = "timeseries"  # timeseries | stat | table | bargauge
    unit: str = "short"
    width: int = 12
    height: int = 8
    stack: bool = False
    log_scale: bool = False
    mappings: Sequence[dict[str, Any]] = ()
    thresholds: Sequence[tuple[float | None, str]] = ((None, "green"),)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    title: str


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    items: Sequence[Panel | Row]

    @property
    def filename(self) -> str:
        return f"{self.uid}.json"


def _target(query: Query, ref: str, instant: bool) -> dict[str, Any]:
    target: dict[str, Any] = {
        "datasource": DATASOURCE,
        "refId": ref,
        "expr": query.expr,
        "legendFormat": query.legend or "__auto",
        "range": not instant,
        "instant": instant,
    }
    if instant:
        target["format"] = "table"
    return target


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    instant = panel.kind == "table"
    refs = [chr(ord("A") + i) for i in range(len(panel.queries))]
    custom: dict[str, Any] = {}
    if panel.kind == "timeseries":
        custom = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
            "scaleDistribution": {"type": "log", "log": 10}
            if panel.log_scale
            else {"type": "linear"},
        }
    steps = [{"color": color, "value": value} for value, color in panel.thresholds]
    result: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "fieldConfig": {
            "defaults": {
                "unit": panel.unit,
                "custom": custom,
                "mappings": list(panel.mappings),
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [
                {
                    "matcher": {"id": "byName", "options": q.column or q.legend},
                    "properties": [{"id": "unit", "value": q.unit}],
                }
                for q in panel.queries
                if q.unit is not None
            ],
        },
        "options": _options(panel),
        "targets": [_target(q, ref, instant) for q, ref in zip(panel.queries, refs, strict=True)],
    }
    if instant:
        # One row per label set: the instant queries merged on their labels, the values named.
        rename = {
            f"Value #{ref}": q.column or q.legend or ref
            for q, ref in zip(panel.queries, refs, strict=True)
        }
        result["transformations"] = [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True}, "renameByName": rename},
            },
        ]
    return result


def _options(panel: Panel) -> dict[str, Any]:
    if panel.kind == "timeseries":
        options: dict[str, Any] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif panel.kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "value_and_name",
        }
    elif panel.kind == "bargauge":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "displayMode": "basic",
            "orientation": "horizontal",
        }
    else:
        options = {"showHeader": True, "cellHeight": "sm"}
    return {**options, **panel.options}


def render(dashboard: Dashboard) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    x = y = 0
    row_height = 0
    for number, item in enumerate(dashboard.items, start=1):
        if isinstance(item, Row):
            y += row_height
            x, row_height = 0, 0
            panels.append(
                {
                    "id": number,
                    "type": "row",
                    "title": item.title,
                    "collapsed": False,
                    "gridPos": {"x": 0, "y": y, "w": WIDTH, "h": 1},
                    "panels": [],
                }
            )
            y += 1
            continue
        if x + item.width > WIDTH:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel(item, number, x, y))
        x += item.width
        row_height = max(row_height, item.height)
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["beeldportaal"],
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["beeldportaal"],
                "asDropdown": True,
                "title": "beeldportaal",
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "panels": panels,
    }


# --- the dashboards -------------------------------------------------------------------------------

# The service processes, by job (the alert BeeldportaalServiceDown lists the same).
PROCESSES = (
    "ingest", "ingest-assembly", "consent", "consent-decisions", "routing", "routing-worker",
    "notify", "notify-worker", "timeline", "timeline-projection",
)  # fmt: skip
JOBS = f'job=~"{"|".join(PROCESSES)}"'
PER_SECOND = "suffix:/s"
SECONDS = "s"
UP_DOWN = (
    {"type": "value", "options": {"0": {"text": "down", "color": "red", "index": 0}}},
    {"type": "value", "options": {"1": {"text": "up", "color": "green", "index": 1}}},
)
# A hop's retry tiers wait on purpose (10 s .. 2 h): shown apart from the hops that should not.
NOT_RETRY = 'topic!~"delivery-retry-.*"'


def _quantile(q: float, metric: str, by: str, selector: str = "", window: str = "5m") -> str:
    return (
        f"histogram_quantile({q}, sum by (le, {by}) "
        f"(rate({metric}_bucket{{{selector}}}[{window}])))"
    )


FLOW = Dashboard(
    "beeldportaal-flow",
    "beeldportaal — flow and latency",
    "Studies and instances through every hop (ingest, study assembly, consent, routing, "
    "delivery, timeline) and how long each hop and the whole journey take.",
    [
        Row("Flow per hop"),
        Panel(
            "Instances received (ingest)",
            [
                Query("channel:beeldportaal_ingest_instances_stored:rate5m", "stored {{channel}}"),
                Query(
                    "sum by (channel, outcome) (rate(beeldportaal_ingest_instances_received_total"
                    '{outcome!="stored"}[5m]))',
                    "{{outcome}} {{channel}}",
                ),
            ],
            "Instances per second over STOW-RS and C-STORE: stored (new), duplicate (identical "
            "bytes sent again), rejected (refused: a sender's problem), failed (our storage or "
            "Kafka was unavailable; the sender retries).",
            unit=PER_SECOND,
        ),
        Panel(
            "Studies per hop",
            [
                Query(
                    "sum(rate(beeldportaal_ingest_studies_assembled_total[5m]))",
                    "announced (study-received)",
                ),
                Query(
                    'sum(rate(beeldportaal_consent_decisions_total{purpose="delivery"}[5m]))',
                    "consent decided",
                ),
                Query(
                    "sum(rate(beeldportaal_routing_routes_resolved_total[5m]))", "routes resolved"
                ),
                Query("sum(rate(beeldportaal_routing_routes_failed_total[5m]))", "not routed"),
                Query("sum(channel:beeldportaal_notify_deliveries_delivered:rate5m)", "delivered"),
                Query(
                    "sum(rate(beeldportaal_stream_record_latency_seconds_count"
                    '{group=~".*timeline-projection", topic="study-received"}[5m]))',
                    "projected (timeline)",
                ),
            ],
            "Study versions per second at each hop: announced by study assembly, decided by "
            "consent (targeted send), routed (one route per destination endpoint) or not, "
            "delivered into the receiver's PACS, projected into the timeline. In a steady "
            "state the lines lie on each other; a gap is a hop falling behind.",
            unit=PER_SECOND,
        ),
        Panel(
            "Instances delivered",
            [
                Query(
                    "sum by (channel, outcome) (rate(beeldportaal_notify_instances_total[5m]))",
                    "{{outcome}} {{channel}}",
                )
            ],
            "Instances per second sent to receivers (dicomweb = STOW-RS, dimse = C-STORE, "
            "pickup = made available in the portal), and instances that failed.",
            unit=PER_SECOND,
        ),
        Panel(
            "Records handled per consumer group",
            [
                Query(
                    "job_group_topic:beeldportaal_stream_records:rate5m",
                    "{{group}} ← {{topic}}",
                )
            ],
            "Kafka records each consumer group handled per second, by the topic they came "
            "from: the event flow between the services.",
            unit=PER_SECOND,
        ),
        Row("Latency"),
        Panel(
            "End to end: first instance received → delivered",
            [
                Query(
                    "priority:beeldportaal_notify_delivery_latency_seconds:p99_rate15m",
                    "p99 {{priority}}",
                ),
                Query(
                    "priority:beeldportaal_notify_delivery_latency_seconds:p50_rate15m",
                    "p50 {{priority}}",
                ),
            ],
            "From a study's first instance received by ingest to the receiver's "
            "acknowledgement of its delivery, by priority (15-minute window). It includes the "
            "study's stable age (no new instance for that long) and any retries. Alert: p99 "
            "above 5 minutes (urgent, emergency) or 30 minutes (routine).",
            unit=SECONDS,
            log_scale=True,
        ),
        Panel(
            "Latency per hop (p99): appended → handled",
            [
                Query(
                    "group_topic:beeldportaal_stream_record_latency_seconds:p99_rate5m"
                    f"{{{NOT_RETRY}}}",
                    "{{group}} ← {{topic}}",
                )
            ],
            "For each consumer group and topic: from a record's append to the topic to the "
            "end of the batch that handled it (what it caused acknowledged by Kafka). Waiting "
            "and handling of one hop; the retry tiers, which wait on purpose, are left out.",
            unit=SECONDS,
            log_scale=True,
        ),
        Panel(
            "Ingest: request and association duration (p99)",
            [
                Query(
                    _quantile(0.99, "beeldportaal_ingest_request_duration_seconds", "channel"),
                    "{{channel}}",
                )
            ],
            "A STOW-RS request or a C-STORE association, from first byte to answer.",
            unit=SECONDS,
            width=8,
        ),
        Panel(
            "Study assembly: first instance → announced",
            [
                Query(_quantile(0.99, "beeldportaal_ingest_assembly_wait_seconds", "job"), "p99"),
                Query(_quantile(0.5, "beeldportaal_ingest_assembly_wait_seconds", "job"), "p50"),
            ],
            "How long a study waits before study-received: its stable age (no new instance "
            "for that long) after its last instance, or less when the sender marked it complete.",
            unit=SECONDS,
            width=8,
        ),
        Panel(
            "Consent: announced → decided (p99)",
            [
                Query(
                    _quantile(0.99, "beeldportaal_consent_decision_latency_seconds", "job"),
                    "p99",
                )
            ],
            "From study-received to the consent decision.",
            unit=SECONDS,
            width=8,
        ),
        Panel(
            "Routing and delivery: handling time (p99)",
            [
                Query(
                    _quantile(
                        0.99,
                        "beeldportaal_handler_duration_seconds",
                        "handler",
                        'handler=~"route|send-.*"',
                    ),
                    "{{handler}}",
                )
            ],
            "route: deciding the routes of one decision; send-<channel>: sending one batch of "
            "instances to the receiver (its answer included).",
            unit=SECONDS,
        ),
        Panel(
            "Timeline projection: batch applied (p99)",
            [
                Query(
                    _quantile(0.99, "beeldportaal_timeline_projection_batch_seconds", "job"),
                    "p99",
                )
            ],
            "One batch of events applied to PostgreSQL in one transaction.",
            unit=SECONDS,
        ),
    ],
)

DESTINATIONS = Dashboard(
    "beeldportaal-destinations",
    "beeldportaal — destinations and dead letters",
    "Per receiving organisation (URA) and endpoint: last success, failures, retries; the "
    "delivery queues; deliveries notify gave up on.",
    [
        Row("Per destination"),
        Panel(
            "Destination health",
            [
                Query(
                    "time() - max by (destination, endpoint) (max_over_time("
                    "beeldportaal_notify_destination_last_success_timestamp_seconds[7d]))",
                    column="since last success",
                    unit=SECONDS,
                ),
                Query(
                    "sum by (destination, endpoint) (increase("
                    'beeldportaal_notify_destination_attempts_total{outcome="delivered"}[1h]))',
                    column="delivered (1 h)",
                ),
                Query(
                    "sum by (destination, endpoint) (increase("
                    'beeldportaal_notify_destination_attempts_total{outcome="retry"}[1h]))',
                    column="failed, retried (1 h)",
                ),
                Query(
                    "sum by (destination, endpoint) (increase("
                    'beeldportaal_notify_destination_attempts_total{outcome="dead"}[24h]))',
                    column="dead-lettered (24 h)",
                ),
                Query(
                    "clamp_min(sum by (destination, endpoint) (increase("
                    'beeldportaal_notify_destination_attempts_total{outcome="retry"}[3h]))'
                    " - sum by (destination, endpoint) (increase("
                    "beeldportaal_notify_destination_retries_taken_total[3h])), 0)",
                    column="waiting for a retry",
                ),
            ],
            "One row per destination endpoint. Since last success: the newest delivery in the "
            "last 7 days (empty: none). Waiting for a retry: retries scheduled minus retries "
            "taken over 3 hours (longer than the longest retry delay), an estimate of the "
            "destination's queue in the retry tiers.",
            kind="table",
            width=24,
            height=9,
        ),
        Panel(
            "Failed attempts per destination",
            [
                Query(
                    "sum by (destination, endpoint, outcome) (rate("
                    'beeldportaal_notify_destination_attempts_total{outcome!="delivered"}[5m]))',
                    "{{destination}} {{endpoint}} {{outcome}}",
                )
            ],
            "Attempts that failed per second: retry (scheduled again) or dead (given up).",
            unit=PER_SECOND,
        ),
        Panel(
            "Failed share per destination (15 min)",
            [
                Query(
                    "destination_endpoint:beeldportaal_notify_destination_failed:ratio_rate15m",
                    "{{destination}} {{endpoint}}",
                )
            ],
            "The share of a destination's attempts that failed. Alert: above 50 % (and at "
            "least 3 failures) for 10 minutes.",
            unit="percentunit",
        ),
        Panel(
            "Delivery queues: records waiting",
            [
                Query(
                    "sum by (topic) (beeldportaal_consumer_lag"
                    '{topic=~"route-resolved|delivery-(urgent|routine|retry-.*)"})',
                    "{{topic}}",
                )
            ],
            "Records on the delivery queues not yet taken by notify's consumers. The retry "
            "tiers hold their records until they are due.",
        ),
        Panel(
            "Deliveries by priority",
            [
                Query(
                    "sum by (priority) (rate(beeldportaal_notify_deliveries_delivered_total[5m]))",
                    "{{priority}}",
                )
            ],
            "Studies delivered per second, by priority (urgent and emergency have a queue of "
            "their own).",
            unit=PER_SECOND,
        ),
        Row("Dead letters"),
        Panel(
            "Dead letters waiting",
            [Query("max(beeldportaal_notify_dead_letters)", "dead letters")],
            "Deliveries on the dead-letter topic, as the notify API sees them: studies that "
            "did not reach their receiver. `beeldportaal dead-letters list` shows them.",
            kind="stat",
            width=6,
            thresholds=((None, "green"), (1, "red")),
        ),
        Panel(
            "Dead-lettered (15 min)",
            [Query("beeldportaal:notify_dead_lettered:increase15m", "dead-lettered")],
            "Deliveries given up on in the last 15 minutes. Alert: any.",
            width=6,
        ),
        Panel(
            "Dead-lettered and re-driven per hour",
            [
                Query(
                    "sum by (channel) (increase("
                    'beeldportaal_notify_delivery_attempts_failed_total{final="true"}[1h]))',
                    "dead-lettered {{channel}}",
                ),
                Query(
                    "sum by (queue) (increase("
                    "beeldportaal_notify_dead_letters_redriven_total[1h]))",
                    "re-driven to {{queue}}",
                ),
            ],
            "Deliveries dead-lettered per channel, and dead letters an operator put back on a "
            "queue.",
        ),
        Panel(
            "Poison records skipped",
            [
                Query(
                    "sum by (job, topic) (increase("
                    'beeldportaal_events_failed_total{error_class="poison"}[1h]))',
                    "{{job}} ← {{topic}}",
                )
            ],
            "Records a consumer could never handle (they do not decode to the event their "
            "topic carries): logged with their position and skipped.",
        ),
        Panel(
            "Webhooks and portal pickups",
            [
                Query(
                    "sum by (type, outcome) (rate(beeldportaal_notify_webhooks_total[5m]))",
                    "webhook {{type}} {{outcome}}",
                ),
                Query(
                    "sum by (outcome) (rate(beeldportaal_notify_pickup_downloads_total[5m]))",
                    "pickup {{outcome}}",
                ),
            ],
            "Signed webhook notifications to recipients by outcome, and pickup downloads.",
            unit=PER_SECOND,
        ),
    ],
)

CONSENT = Dashboard(
    "beeldportaal-consent",
    "beeldportaal — consent decisions",
    "Every consent decision by purpose and legal basis, the closed question, Mitz "
    "notifications and timeline access decisions.",
    [
        Row("Decisions"),
        Panel(
            "Targeted sends (delivery) by basis",
            [
                Query(
                    "sum by (decision, basis) (purpose_decision_basis:"
                    'beeldportaal_consent_decisions:rate5m{purpose="delivery"})',
                    "{{decision}} {{basis}}",
                )
            ],
            "Presumed consent within the treatment relationship: permitted unless an explicit "
            "objection covers the recipient; emergencies and unverified identities permitted "
            "and flagged.",
            unit=PER_SECOND,
            stack=True,
        ),
        Panel(
            "Timeline inclusion by basis",
            [
                Query(
                    "sum by (decision, basis) (purpose_decision_basis:"
                    'beeldportaal_consent_decisions:rate5m{purpose="timeline"})',
                    "{{decision}} {{basis}}",
                )
            ],
            "Explicit consent and a verified BSN only: no-explicit-consent is the usual answer.",
            unit=PER_SECOND,
            stack=True,
        ),
        Panel(
            "Targeted sends refused",
            [
                Query("beeldportaal:consent_delivery_denied:ratio_rate15m", "last 15 min"),
                Query("beeldportaal:consent_delivery_denied:ratio_rate1d", "last day"),
            ],
            "The share of targeted sends refused on an explicit objection. Alert: above 20 %, "
            "more than three times the day's share, and at least 5 in 15 minutes.",
            unit="percentunit",
        ),
        Panel(
            "Decisions flagged for an operator",
            [
                Query(
                    "sum by (basis) (increase(beeldportaal_consent_decisions_flagged_total[1h]))",
                    "{{basis}}",
                )
            ],
            "Emergency sends and sends on an unverified identity, per hour.",
        ),
        Panel(
            "Decisions in the last 24 hours",
            [
                Query(
                    "sum by (purpose, decision, basis) (increase("
                    "beeldportaal_consent_decisions_total[24h]))",
                    column="decisions",
                )
            ],
            "Count per purpose, decision and basis.",
            kind="table",
        ),
        Panel(
            "Routes not made, by reason",
            [
                Query(
                    "sum by (reason) (increase(beeldportaal_routing_routes_failed_total[1h]))",
                    "{{reason}}",
                )
            ],
            "route-failed per hour: consent-denied (the decision refused), unknown-recipient, "
            "no-endpoint, no-usable-endpoint, nothing-accepted.",
        ),
        Row("Consent registry and timeline access"),
        Panel(
            "Closed question answers (consent API)",
            [
                Query(
                    "sum by (purpose, decision, basis) (rate("
                    "beeldportaal_consent_queries_total[5m]))",
                    "{{purpose}} {{decision}} {{basis}}",
                )
            ],
            "Answers of POST /consent-queries by purpose, decision and basis.",
            unit=PER_SECOND,
            width=8,
        ),
        Panel(
            "Mitz notifications",
            [
                Query(
                    "sum by (outcome) (increase("
                    "beeldportaal_consent_mitz_notifications_total[1h]))",
                    "{{outcome}}",
                )
            ],
            "Consent notifications from Mitz per hour, by outcome.",
            width=8,
        ),
        Panel(
            "Timeline access decisions",
            [
                Query(
                    "sum by (endpoint, outcome) (rate("
                    "beeldportaal_timeline_access_decisions_total[5m]))",
                    "{{endpoint}} {{outcome}}",
                )
            ],
            "Every access check of the timeline API (each one audited, NEN 7513).",
            unit=PER_SECOND,
            width=8,
        ),
    ],
)

PLATFORM = Dashboard(
    "beeldportaal-platform",
    "beeldportaal — platform health",
    "Which service processes are up, how far behind each consumer group is, the read models, "
    "the processes' resources and Prometheus itself.",
    [
        Row("Services"),
        Panel(
            "Service processes",
            [Query(f"min by (job) (up{{{JOBS}}})", "{{job}}")],
            "Each service process Prometheus scrapes: up, or down (not answering /metrics). "
            "Alert: down for a minute.",
            kind="stat",
            width=24,
            height=5,
            mappings=UP_DOWN,
            thresholds=((None, "red"), (1, "green")),
        ),
        Panel(
            "Firing alerts",
            [
                Query(
                    'sum by (alertname, severity) (ALERTS{alertstate="firing"})',
                    "{{alertname}} ({{severity}})",
                )
            ],
            "The alerts of deploy/prometheus/rules that fire now.",
            kind="table",
        ),
        Panel(
            "Consumer lag per service and group",
            [Query("job_group:beeldportaal_consumer_lag:sum", "{{job}} {{group}}")],
            "Records on owned partitions not yet fetched. Alert: above 1000 for 10 minutes "
            "(not for the retry tiers, which wait on purpose).",
        ),
        Panel(
            "Partitions per consumer group",
            [Query("sum by (group) (beeldportaal_consumer_assigned_partitions)", "{{group}}")],
            "Partitions assigned to the group's members: replicas beyond the partition count "
            "get none and idle.",
        ),
        Panel(
            "Read models: records behind",
            [
                Query("max(beeldportaal_consent_registry_view_lag)", "consent registry"),
                Query("max by (view) (beeldportaal_notify_api_view_lag)", "notify {{view}}"),
                Query("max by (view) (beeldportaal_timeline_view_lag)", "timeline {{view}}"),
            ],
            "Records on Kafka the APIs' in-memory read models have not applied yet.",
        ),
        Row("Processes"),
        Panel(
            "Resident memory",
            [
                Query(
                    f"process_resident_memory_bytes{{{JOBS}}}",
                    "{{job}} {{instance}}",
                )
            ],
            "Each service process's resident memory.",
            unit="bytes",
            width=8,
        ),
        Panel(
            "CPU",
            [
                Query(
                    f"rate(process_cpu_seconds_total{{{JOBS}}}[5m])",
                    "{{job}} {{instance}}",
                )
            ],
            "CPU seconds per second per service process.",
            unit="percentunit",
            width=8,
        ),
        Panel(
            "Failures by error class",
            [
                Query(
                    "sum by (job, error_class) (rate(beeldportaal_events_failed_total[5m]))",
                    "{{job}} {{error_class}}",
                )
            ],
            "Events whose handling failed: poison (skipped), transient (retried).",
            unit=PER_SECOND,
            width=8,
        ),
        Panel(
            "STOW-RS answers",
            [
                Query(
                    "sum by (status) (rate(beeldportaal_ingest_requests_total[5m]))",
                    "{{status}}",
                ),
                Query(
                    "sum by (outcome) (rate(beeldportaal_ingest_associations_total[5m]))",
                    "association {{outcome}}",
                ),
            ],
            "STOW-RS requests by HTTP status and DIMSE associations by outcome.",
            unit=PER_SECOND,
        ),
        Panel(
            "Prometheus",
            [
                Query(f"scrape_duration_seconds{{{JOBS}}}", "scrape {{job}} {{instance}}"),
                Query(
                    "sum(increase(prometheus_rule_evaluation_failures_total[1h]))",
                    "rule evaluation failures (1 h)",
                ),
            ],
            "How long scraping each process takes, and rule evaluations that failed.",
        ),
    ],
)

DASHBOARDS = (FLOW, DESTINATIONS, CONSENT, PLATFORM)


def rendered() -> dict[str, str]:
    """Each dashboard's file name and JSON text."""
    return {
        d.filename: json.dumps(render(d), indent=2, ensure_ascii=False) + "\n" for d in DASHBOARDS
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is out of date")
    parser.add_argument("--out", type=Path, default=DASHBOARDS_DIR)
    args = parser.parse_args(argv)
    stale = []
    for name, text in rendered().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)} (python -m deploy.grafana.generate)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
