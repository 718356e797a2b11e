"""The Prometheus rules, the Grafana dashboards and their checks (deploy/observability.py), the
local Prometheus's generated configuration, and the metrics the rules rely on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from deploy import observability
from deploy.grafana import generate
from deploy.local.config import LocalConfig
from deploy.local.prometheus import Prometheus, Target
from deploy.local.services import specs
from deploy.observability import Expression, metric_names, unknown_metrics
from services.consent.metrics import ConsentMetrics, DecisionMetrics
from services.ingest.metrics import IngestMetrics
from services.notify.metrics import NotifyApiMetrics
from services.notify.worker_metrics import NotifyWorkerMetrics
from services.routing.metrics import RoutingMetrics
from services.timeline.entrypoints.projection import ProjectionMetrics
from services.timeline.metrics import TimelineMetrics
from shared.metrics import ServiceMetrics, UnsafeLabel

# The runbook (docs/operations.md) has a section per alert under exactly these names.
ALERTS = {
    "BeeldportaalServiceDown",
    "BeeldportaalDeadLettersGrowing",
    "BeeldportaalDeliveryFailing",
    "BeeldportaalEndToEndLatencyHigh",
    "BeeldportaalConsumerLagHigh",
    "BeeldportaalStreamStalled",
    "BeeldportaalIngestRejectionsHigh",
    "BeeldportaalConsentDenialsSpike",
}
# Every metrics class a service process exports (one per process kind).
METRICS_CLASSES = (
    IngestMetrics,
    ConsentMetrics,
    DecisionMetrics,
    RoutingMetrics,
    NotifyWorkerMetrics,
    NotifyApiMetrics,
    TimelineMetrics,
    ProjectionMetrics,
)
# Series a rule or panel may read that no service defines: Prometheus makes them itself.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "ALERTS"}


def alerts() -> dict[str, dict]:
    found = {}
    for path in observability.rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    found[rule["alert"]] = rule
    return found


def sample_names(metrics: ServiceMetrics) -> set[str]:
    """Every sample name the class's metric families can expose (with or without children)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
        "unknown": ("",),
    }
    names = set()
    for family in metrics.registry.collect():
        names |= {family.name + suffix for suffix in suffixes[family.type]}
        names |= {sample.name for sample in family.samples}
    return names


# --- the rules and the dashboards pass their checks -----------------------------------------------


def test_promtool_passes_every_rule_file_and_every_panel_query_and_the_alerts_keep_the_contract():
    assert observability.check_static() == []


def test_expressions_cover_every_rule_and_every_panel_query_and_name_where_they_come_from():
    found = observability.expressions()
    sources = [e.source for e in found]
    assert len(sources) == len(set(sources))
    assert all(e.expr for e in found)
    rules = [e for e in found if "deploy/prometheus/rules/" in e.source]
    panels = [e for e in found if "deploy/grafana/dashboards/" in e.source]
    assert len(rules) + len(panels) == len(found)
    assert any(s.endswith("alerts.yml: alert BeeldportaalServiceDown") for s in sources)
    assert any("panel 'Destination health' query E" in s for s in sources)
    assert len(panels) >= 40


def test_every_alert_the_runbook_names_exists_with_a_severity_and_its_annotations():
    found = alerts()
    assert set(found) == ALERTS
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert annotations["runbook_url"] == f"docs/operations.md#{name.lower()}"


def test_the_service_down_alert_watches_exactly_the_processes_make_up_starts():
    expr = alerts()["BeeldportaalServiceDown"]["expr"]
    jobs = expr.split('job=~"', 1)[1].split('"', 1)[0].split("|")
    processes = {spec.name for spec in specs(LocalConfig.from_env()) if spec.metrics_url}
    assert set(jobs) == processes
    assert set(generate.PROCESSES) == processes


def test_every_metric_a_rule_or_panel_reads_is_defined_by_a_service_or_by_prometheus():
    exported = set().union(*(sample_names(cls()) for cls in METRICS_CLASSES))
    recorded = observability.recording_rules()
    for expression in observability.expressions():
        unknown = unknown_metrics(expression.expr, exported | PROMETHEUS_OWN, recorded)
        # prometheus_* are Prometheus's own metrics (it scrapes itself).
        unknown = [(n, via) for n, via in unknown if not n.startswith("prometheus_")]
        assert unknown == [], expression.source


def test_no_rule_or_panel_groups_or_selects_by_a_label_that_could_hold_patient_data():
    for expression in observability.expressions():
        for label in ("bsn", "patient", "pseudonym", "study_instance_uid", "sop_instance_uid"):
            assert label not in expression.expr.lower(), expression.source


def test_the_committed_dashboards_are_what_the_generator_writes():
    rendered = generate.rendered()
    committed = {p.name: p.read_text() for p in observability.dashboard_files()}
    assert committed == rendered, "run: python -m deploy.grafana.generate"


def test_every_dashboard_panel_queries_the_provisioned_datasource():
    provisioned = yaml.safe_load(
        (
            observability.ROOT / "deploy/grafana/provisioning/datasources/beeldportaal.yml"
        ).read_text()
    )
    uid = provisioned["datasources"][0]["uid"]
    for path in observability.dashboard_files():
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == uid
                assert all(t["datasource"]["uid"] == uid for t in panel["targets"])


# --- the checks find what is wrong ----------------------------------------------------------------


def test_a_panel_query_promtool_refuses_is_reported_with_its_dashboard_and_panel(
    tmp_path: Path,
) -> None:
    dashboard = generate.render(
        generate.Dashboard(
            "broken",
            "broken",
            "",
            [
                generate.Panel("Fine", [generate.Query("sum(rate(up[5m]))")], ""),
                generate.Panel("Unbalanced", [generate.Query("sum(rate(up[5m])")], ""),
            ],
        )
    )
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(dashboard))
    problems = observability.check_static(dashboards=[path])
    assert len(problems) == 1
    assert "broken.json: panel 'Unbalanced' query A: promtool" in problems[0]


def test_a_rule_file_promtool_refuses_and_an_alert_without_its_annotations_are_reported(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "g",
                        "rules": [
                            {"alert": "SomethingWrong", "expr": "up == 0"},
                            {"record": "not a name", "expr": "up"},
                        ],
                    }
                ]
            }
        )
    )
    problems = observability.check_static(rules=[rules])
    assert any(p.startswith("promtool check rules failed") for p in problems)
    for missing in ("no severity label", "no summary annotation", "no runbook_url annotation"):
        assert any(p.endswith(f"alert SomethingWrong: {missing}") for p in problems), missing


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (job, le) (rate(foo_bucket{job="a", le=~"0.5|1"}[5m]))',
            {"foo_bucket"},
        ),
        ("sum(rate(x_total[5m])) by (group, instance)", {"x_total"}),
        ("SUM BY (job) (x) AND ON (job) Y", {"x", "Y"}),
        (
            "rate(x_total[5m] offset 1h) / on (instance) group_left (version) build_info",
            {"x_total", "build_info"},
        ),
        ("a * on (i) group_left b", {"a", "b"}),
        (
            "histogram_quantile(0.99, sum without (instance) (rate(h_bucket[1h:30s])))",
            {"h_bucket"},
        ),
        (
            'label_replace(up{job="x"}, "dst", "$1 sum(fake_metric)", "src", "(.*)")',
            {"up"},
        ),
        ('{__name__="by_name_matcher", job="x"} or {__name__=~"regex_.*"}', {"by_name_matcher"}),
        ('z{a="say \\"hi\\" to not_a_metric", b=`raw"str`}', {"z"}),
        (
            "level:recorded_metric:rate5m > bool 0 unless c or d",
            {"level:recorded_metric:rate5m", "c", "d"},
        ),
        (
            'count_values("value", build_info) + topk(3, m) + quantile(0.9, q)',
            {"build_info", "m", "q"},
        ),
        ("vector(1) + time() - scalar(s) * 1e-3 + Inf - NaN + 0x1F + .5", {"s"}),
        ("max_over_time(g[7d]) @ end() + max_over_time(h[1h] @ 1609746000)", {"g", "h"}),
        ("x # a comment naming fake_metric\n + y", {"x", "y"}),
        ("clamp_min(sum by (destination) (increase(a[3h])) - sum(b), 0)", {"a", "b"}),
    ],
)
def test_metric_names_are_found_past_functions_keywords_labels_strings_and_durations(
    expr: str, names: set[str]
) -> None:
    assert metric_names(expr) == names


def test_a_recorded_series_counts_as_known_only_when_the_metrics_its_rule_reads_exist():
    recorded = {
        "job:good:rate5m": "sum by (job) (rate(good_total[5m]))",
        "job:bad:rate5m": "sum by (job) (rate(misspelt_total[5m]))",
        "level:on_recorded:ratio": "job:bad:rate5m / job:good:rate5m",
        "loop:a": "loop:a + 1",
    }
    known = {"good_total", "up"}
    assert unknown_metrics("job:good:rate5m > 0", known, recorded) == []
    assert unknown_metrics("job:bad:rate5m > 0", known, recorded) == [
        ("misspelt_total", "job:bad:rate5m")
    ]
    assert unknown_metrics("level:on_recorded:ratio", known, recorded) == [
        ("misspelt_total", "level:on_recorded:ratio")
    ]
    assert unknown_metrics("rate(nope_total[5m]) + up", known, recorded) == [("nope_total", None)]
    assert unknown_metrics("loop:a", known, recorded) == [("loop:a", "loop:a")]


def test_check_live_reports_an_unreachable_prometheus_instead_of_raising():
    problems = observability.check_live(
        "http://127.0.0.1:9", checked=[Expression("x", "up")], timeout=2
    )
    assert len(problems) == 1 and "not reachable" in problems[0]


# --- the local Prometheus -------------------------------------------------------------------------


def test_the_generated_configuration_passes_promtool_and_scrapes_every_service_process(
    tmp_path: Path,
) -> None:
    config = dataclasses.replace(LocalConfig.from_env(), state_dir=tmp_path, prometheus_port=19999)
    prometheus = Prometheus(config)
    path = prometheus.write_config()
    assert "SUCCESS" in prometheus.check_config()
    document = yaml.safe_load(path.read_text())
    assert document["rule_files"] == [str(observability.RULES_DIR / "*.yml")]
    assert document["global"]["scrape_interval"] == "5s"
    groups = json.loads((prometheus.targets_dir / "services.json").read_text())
    by_job = {g["labels"]["job"]: g for g in groups}
    expected = {s.name: s.metrics_url for s in specs(config) if s.metrics_url}
    assert set(by_job) == set(expected) and len(groups) == len(expected)
    for job, url in expected.items():
        group = by_job[job]
        assert f"http://{group['targets'][0]}{group['labels']['__metrics_path__']}" == url


def test_a_target_is_a_file_sd_group_with_its_job_scheme_and_path():
    group = Target("notify-worker", "https://10.0.0.5:8094/probe/metrics", {"zone": "a"}).group()
    assert group == {
        "targets": ["10.0.0.5:8094"],
        "labels": {
            "zone": "a",
            "job": "notify-worker",
            "__scheme__": "https",
            "__metrics_path__": "/probe/metrics",
        },
    }
    with pytest.raises(ValueError, match="absolute"):
        Target("x", "/metrics").group()


# --- the metrics the rules need exist from start-up -----------------------------------------------


def value(metrics: ServiceMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_closed_label_sets_are_at_zero_before_anything_happened():
    worker = NotifyWorkerMetrics(registry=CollectorRegistry())
    for final in ("true", "false"):
        assert value(
            worker, "beeldportaal_notify_delivery_attempts_failed_total", channel="dimse",
            final=final,
        ) == 0  # fmt: skip
    assert (
        value(worker, "beeldportaal_notify_delivery_latency_seconds_count", priority="urgent") == 0
    )
    decisions = DecisionMetrics(registry=CollectorRegistry())
    denied = {"purpose": "delivery", "decision": "deny", "basis": "explicit-objection"}
    assert value(decisions, "beeldportaal_consent_decisions_total", **denied) == 0
    # Only combinations a decision can have: a permit never rests on an objection.
    permit = {**denied, "decision": "permit"}
    assert value(decisions, "beeldportaal_consent_decisions_total", **permit) is None
    ingest = IngestMetrics(registry=CollectorRegistry())
    for channel in ("stow-rs", "c-store"):
        for outcome in ("stored", "duplicate", "rejected", "failed"):
            assert value(
                ingest, "beeldportaal_ingest_instances_received_total", channel=channel,
                outcome=outcome,
            ) == 0  # fmt: skip
    routing = RoutingMetrics(registry=CollectorRegistry())
    assert value(routing, "beeldportaal_routing_routes_failed_total", reason="consent-denied") == 0


def test_a_stream_workers_series_exist_for_its_group_and_topics_before_its_first_record():
    metrics = ServiceMetrics("test", "0", registry=CollectorRegistry(), runtime_collectors=False)
    metrics.expect_stream("beeldportaal-routing", ["consent-checked"])
    labels = {"group": "beeldportaal-routing", "topic": "consent-checked"}
    assert value(metrics, "beeldportaal_stream_record_latency_seconds_count", **labels) == 0
    assert (
        value(metrics, "beeldportaal_consumer_assigned_partitions", group="beeldportaal-routing")
        == 0
    )
    for error_class in ("poison", "transient", "fatal"):
        assert (
            value(
                metrics,
                "beeldportaal_events_failed_total",
                topic="consent-checked",
                error_class=error_class,
            )
            == 0
        )


def test_a_destinations_attempts_are_counted_by_outcome_with_its_last_success_and_retries():
    metrics = NotifyWorkerMetrics(registry=CollectorRegistry())
    where = {"destination": "00000101", "endpoint": "oost-pacs-dicomweb"}
    attempts = "beeldportaal_notify_destination_attempts_total"
    metrics.attempt_concluded(*where.values(), "dicomweb", "retry", retried=False)
    # The first attempt made every outcome of the destination: a zero, not a missing series.
    assert value(metrics, attempts, **where, channel="dicomweb", outcome="dead") == 0
    assert value(metrics, attempts, **where, channel="dicomweb", outcome="retry") == 1
    last = "beeldportaal_notify_destination_last_success_timestamp_seconds"
    assert value(metrics, last, **where) is None
    metrics.attempt_concluded(*where.values(), "dicomweb", "delivered", retried=True)
    assert value(metrics, attempts, **where, channel="dicomweb", outcome="delivered") == 1
    assert value(metrics, "beeldportaal_notify_destination_retries_taken_total", **where) == 1
    assert value(metrics, last, **where) > 1_700_000_000
    with pytest.raises(ValueError, match="delivered, retry, dead"):
        metrics.attempt_concluded(*where.values(), "dicomweb", "lost", retried=False)


def test_a_destination_label_that_looks_like_a_bsn_is_refused():
    metrics = NotifyWorkerMetrics(registry=CollectorRegistry())
    with pytest.raises(UnsafeLabel):
        metrics.attempt_concluded("123456782", "endpoint", "dimse", "retry", retried=False)


def test_a_decision_counts_under_its_labels_and_as_flagged_only_when_flagged():
    decisions = DecisionMetrics(registry=CollectorRegistry())
    permit = {"purpose": "delivery", "decision": "permit", "basis": "emergency"}
    deny = {"purpose": "timeline", "decision": "deny", "basis": "no-explicit-consent"}
    for _ in range(2):
        decisions.decided(*permit.values(), flagged=True)
    decisions.decided(*deny.values(), flagged=False)
    assert value(decisions, "beeldportaal_consent_decisions_total", **permit) == 2
    assert value(decisions, "beeldportaal_consent_decisions_total", **deny) == 1
    flagged = "beeldportaal_consent_decisions_flagged_total"
    assert value(decisions, flagged, basis="emergency") == 2
    assert value(decisions, flagged, basis="no-explicit-consent") is None
