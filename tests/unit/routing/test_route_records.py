"""The routing worker's own writer of route-resolved records against the model's encoding.

``RouteRecords`` writes what ``Codec.encode(RouteResolved(...), carried)`` writes, byte for
byte (value, key, headers), and the records decode to the events ``route`` builds."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.routing.adapters.route_records import RouteRecords
from services.routing.domain.directory import Directory, Provider
from services.routing.domain.route import Routes, plan, route
from shared.codec import Codec
from shared.events import ConsentChecked
from shared.events.common import Urgency
from shared.events.consent import Basis
from shared.events.routing import RouteFailed, RouteFailureReason, RouteResolved
from shared.stream import Encoded
from tests.factories import RECIPIENT_URA, make_consent_checked, make_instance_ref, make_study
from tests.record_writers import Received, correlation_ids, moments, received

CODEC = Codec()
PS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
ENDPOINTS = [
    {"channel": "dicomweb", "id": "pacs-web", "base_url": "https://pacs.example.nl/dw"},
    {"channel": "dimse", "id": "pacs-dimse", "host": "10.0.0.7", "port": 104, "ae_title": "P"},
    {"channel": "pickup", "id": "portaal.ophalen_1"},
]
COERCIONS = [
    {"profile": "none"},
    {"profile": "bsn-as-patient-id"},
    {"profile": "bsn-as-patient-id", "issuer": 'Zïekenhuis "A"', "universal_entity_id": None},
]


def as_received(checked: ConsentChecked) -> Received:
    """As consent writes it: the snapshot last (carried)."""
    return received(CODEC, checked, {"study": checked.study.model_dump_json().encode()})


def recipient(endpoints: list[dict[str, Any]], preferences: dict[str, Any]) -> Directory:
    provider = Provider.model_validate(
        {
            "ura": RECIPIENT_URA,
            "name": "Ontvangend Ziekenhuis",
            "type_code": "V4",
            "city": "Utrecht",
            "endpoints": endpoints,
            "preferences": preferences,
        }
    )
    return Directory([provider])


def expected(record: Received, routes: Routes) -> list[Encoded]:
    """What the model path writes: the events of ``Routes.events``, the snapshot carried."""
    snapshot = CODEC.member(record, ConsentChecked, "study")
    carried = None if snapshot is None else {"study": snapshot}
    return [
        Encoded(RouteResolved.schema_name, CODEC.encode(event, carried))
        for event in routes.events("routing")
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    correlation_id=correlation_ids,
    occurred_at=moments,
    sop_classes=st.lists(st.sampled_from([CT_SOP_CLASS, PS_SOP_CLASS]), max_size=4),
    second_version=st.booleans(),
    urgency=st.sampled_from(Urgency),
    basis=st.sampled_from([Basis.PRESUMED_REFERRAL, Basis.EMERGENCY, Basis.EXPLICIT_CONSENT]),
    flagged=st.booleans(),
    endpoints=st.lists(st.sampled_from(ENDPOINTS), min_size=1, max_size=3, unique_by=str),
    coercion=st.sampled_from(COERCIONS),
    filters=st.sampled_from([(), ("presentation-states",), (PS_SOP_CLASS, "raw-data")]),
    max_instances=st.integers(min_value=1, max_value=10_000),
)
def test_the_records_are_the_models_records_byte_for_byte(
    correlation_id: str,
    occurred_at: datetime,
    sop_classes: list[str],
    second_version: bool,
    urgency: Urgency,
    basis: Basis,
    flagged: bool,
    endpoints: list[dict[str, Any]],
    coercion: dict[str, Any],
    filters: tuple[str, ...],
    max_instances: int,
) -> None:
    study = make_study(0, urgency=urgency, version=2 if second_version else 1)
    instances = tuple(make_instance_ref(sop_class_uid=sop_class) for sop_class in sop_classes)
    new = tuple(i.sop_instance_uid for i in instances[::2]) if second_version else ()
    study = study.model_copy(update={"instances": instances, "new_sop_instance_uids": new})
    checked = make_consent_checked(
        study=study,
        correlation_id=correlation_id,
        occurred_at=occurred_at,
        basis=basis,
        flagged=flagged,
    )
    directory = recipient(
        endpoints,
        {
            "coercion": coercion,
            "object_filters": filters,
            "batch_limits": {"max_instances": max_instances},
        },
    )
    record = as_received(checked)
    assert CODEC.member(record, ConsentChecked, "study") is not None  # the writer's own path
    routes = plan(checked, directory)
    if isinstance(routes, RouteFailed):  # the filters exclude every instance: no records
        assert routes.reason_code is RouteFailureReason.NOTHING_ACCEPTED
        assert instances and filters
        return
    assert isinstance(routes, Routes)

    written = RouteRecords(CODEC, "routing").write(record, routes)

    assert written == expected(record, routes)
    decoded = [CODEC.decode(e.record.value, e.record.headers) for e in written]
    assert decoded == route(checked, directory)


def test_a_snapshot_that_cannot_be_cut_is_written_through_the_model() -> None:
    # A control character is written as a \u escape, and a value holding one is never cut.
    checked = make_consent_checked(study=make_study(2, study_description="line\x01two"))
    record = as_received(checked)
    assert CODEC.member(record, ConsentChecked, "study") is None
    directory = recipient(ENDPOINTS[:2], {})
    routes = plan(checked, directory)
    assert isinstance(routes, Routes)

    written = RouteRecords(CODEC, "routing").write(record, routes)

    assert written == expected(record, routes)
    assert [CODEC.decode(e.record.value, e.record.headers) for e in written] == route(
        checked, directory
    )
