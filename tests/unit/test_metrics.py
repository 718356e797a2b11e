"""Service metrics on their own registry, /metrics rendering, and the patient-free label guard."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from shared.identifiers import Pseudonymizer, parse_bsn
from shared.metrics import (
    DURATION_BUCKETS,
    ERROR_CLASSES,
    ServiceMetrics,
    UnsafeLabel,
    render,
    safe_label,
)

VALID_BSN = "123456782"


def make_metrics(
    service: str = "ingest", version: str = "1.2.3", **kwargs: object
) -> ServiceMetrics:
    return ServiceMetrics(service, version, **kwargs)  # type: ignore[arg-type]


def value(metrics: ServiceMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


STUDY_RECEIVED = {"topic": "study-received", "schema": "study.received.v1"}


class TestCommonMetrics:
    def test_consumed_and_produced_events_are_counted_per_label_set(self) -> None:
        metrics = make_metrics()
        metrics.consumed("study-received", "study.received.v1")
        metrics.consumed("study-received", "study.received.v1")
        metrics.consumed("study-received", "study.received.v1", outcome="duplicate")
        metrics.produced("consent-checked", "consent.checked.v1")
        consumed = "beeldportaal_events_consumed_total"
        produced = "beeldportaal_events_produced_total"
        assert value(metrics, consumed, **STUDY_RECEIVED, outcome="ok") == 2
        assert value(metrics, consumed, **STUDY_RECEIVED, outcome="duplicate") == 1
        assert value(metrics, produced, topic="consent-checked", schema="consent.checked.v1") == 1

    @pytest.mark.parametrize("error_class", ERROR_CLASSES)
    def test_failures_are_counted_by_error_class(self, error_class: str) -> None:
        metrics = make_metrics()
        metrics.failed("route-resolved", error_class)  # type: ignore[arg-type]
        failed = "beeldportaal_events_failed_total"
        assert value(metrics, failed, topic="route-resolved", error_class=error_class) == 1

    def test_an_error_class_outside_the_taxonomy_is_refused(self) -> None:
        with pytest.raises(ValueError, match="poison, transient, fatal"):
            make_metrics().failed("route-resolved", "weird")  # type: ignore[arg-type]

    def test_handler_time_is_observed_even_when_the_handler_raises(self) -> None:
        metrics = make_metrics()
        with metrics.time_handler("decide_consent"):
            pass
        with pytest.raises(RuntimeError), metrics.time_handler("decide_consent"):
            raise RuntimeError("boom")
        count = "beeldportaal_handler_duration_seconds_count"
        assert value(metrics, count, handler="decide_consent") == 2

    def test_the_duration_buckets_span_one_millisecond_to_a_minute(self) -> None:
        assert DURATION_BUCKETS[0] == 0.001 and DURATION_BUCKETS[-1] == 60.0
        assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)
        metrics = make_metrics()
        with metrics.time_handler("h"):
            pass
        bucket = "beeldportaal_handler_duration_seconds_bucket"
        assert value(metrics, bucket, handler="h", le="60.0") == 1

    def test_service_info_carries_the_service_and_version(self) -> None:
        metrics = make_metrics(service="routing", version="0.4.0")
        assert value(metrics, "beeldportaal_service_info", service="routing", version="0.4.0") == 1

    def test_a_service_adds_its_own_metrics_with_the_prefix_on_its_registry(self) -> None:
        metrics = make_metrics()
        assembled = metrics.counter("studies_assembled", "Studies declared stable.")
        pending = metrics.gauge("studies_pending", "Studies still receiving instances.")
        assembled.inc()
        pending.set(3)
        assert value(metrics, "beeldportaal_studies_assembled_total") == 1
        assert value(metrics, "beeldportaal_studies_pending") == 3


class TestRegistries:
    def test_two_services_in_one_process_have_independent_registries(self) -> None:
        ingest, notify = make_metrics("ingest"), make_metrics("notify")
        ingest.produced("study-received", "study.received.v1")
        produced = "beeldportaal_events_produced_total"
        assert value(ingest, produced, **STUDY_RECEIVED) == 1
        assert value(notify, produced, **STUDY_RECEIVED) is None

    def test_nothing_is_registered_on_the_global_default_registry(self) -> None:
        before = set(REGISTRY._names_to_collectors)
        make_metrics().consumed("t", "s")
        assert set(REGISTRY._names_to_collectors) == before
        assert not any(name.startswith("beeldportaal_") for name in before)

    def test_a_given_registry_is_used(self) -> None:
        registry = CollectorRegistry()
        metrics = make_metrics(registry=registry, runtime_collectors=False)
        assert metrics.registry is registry
        info = {"service": "ingest", "version": "1.2.3"}
        assert registry.get_sample_value("beeldportaal_service_info", info) == 1

    def test_runtime_collectors_add_process_metrics_and_can_be_left_out(self) -> None:
        names_with = {f.name for f in make_metrics().registry.collect()}
        names_without = {f.name for f in make_metrics(runtime_collectors=False).registry.collect()}
        assert "python_info" in names_with and "python_info" not in names_without


class TestRender:
    def test_the_text_format_holds_every_common_metric(self) -> None:
        metrics = make_metrics()
        metrics.consumed("study-received", "study.received.v1")
        body, content_type = render(metrics.registry)
        assert content_type.startswith("text/plain; version=0.0.4")
        families = {f.name for f in text_string_to_metric_families(body.decode())}
        assert {
            "beeldportaal_events_consumed",
            "beeldportaal_events_produced",
            "beeldportaal_events_failed",
            "beeldportaal_handler_duration_seconds",
            "beeldportaal_service_info",
        } <= families

    def test_an_openmetrics_scraper_gets_openmetrics(self) -> None:
        body, content_type = make_metrics().render(
            accept="application/openmetrics-text; version=1.0.0"
        )
        assert content_type.startswith("application/openmetrics-text")
        assert body.rstrip().endswith(b"# EOF")


class TestSafeLabel:
    @pytest.mark.parametrize(
        "label", ["study-received", "study.received.v1", "poison", "00012345", "123456789", ""]
    )
    def test_ordinary_label_values_pass_unchanged(self, label: str) -> None:
        assert safe_label(label) == label

    @pytest.mark.parametrize("label", [VALID_BSN, f"patient-{VALID_BSN}", "999990019"])
    def test_a_value_holding_a_bsn_is_refused_without_repeating_it(self, label: str) -> None:
        with pytest.raises(UnsafeLabel) as raised:
            safe_label(label)
        assert "BSN" in str(raised.value)
        assert VALID_BSN not in str(raised.value) and "999990019" not in str(raised.value)

    def test_a_refused_value_is_refused_again_however_often_safe_values_repeat(self) -> None:
        for _ in range(3):  # safe values are remembered; a refusal never is
            assert safe_label("study-received") == "study-received"
            with pytest.raises(UnsafeLabel):
                safe_label(VALID_BSN)

    def test_a_pseudonym_is_refused(self) -> None:
        pseudonym = Pseudonymizer(b"k" * 32).pseudonym(parse_bsn(VALID_BSN))
        with pytest.raises(UnsafeLabel, match="pseudonym"):
            safe_label(pseudonym)

    def test_a_non_string_is_refused(self) -> None:
        with pytest.raises(UnsafeLabel):
            safe_label(123456782)  # type: ignore[arg-type]

    def test_recording_helpers_refuse_patient_data_and_record_nothing(self) -> None:
        metrics = make_metrics()
        with pytest.raises(UnsafeLabel):
            metrics.consumed("study-received", "study.received.v1", outcome=VALID_BSN)
        with pytest.raises(UnsafeLabel):
            metrics.produced(VALID_BSN, "study.received.v1")
        with pytest.raises(UnsafeLabel):
            metrics.failed(VALID_BSN, "poison")
        with pytest.raises(UnsafeLabel), metrics.time_handler(VALID_BSN):
            pass
        with pytest.raises(UnsafeLabel):
            make_metrics(service=VALID_BSN)
        body, _ = metrics.render()
        assert VALID_BSN.encode() not in body
