"""What a route carries for delivery: instances, coercion, filters, batch limits, failure codes."""

from __future__ import annotations

import json

from services.routing.domain.directory import Directory
from services.routing.domain.route import route
from shared.codec import Codec
from shared.events.consent import Basis, Decision
from shared.events.routing import Coercion, RouteFailed, RouteFailureReason, RouteResolved
from tests.factories import make_consent_checked, make_instance_ref, make_route_resolved, make_study
from tests.unit.routing.test_route import DICOMWEB, PICKUP, PS_SOP_CLASS, make_recipient


def test_a_route_names_the_instances_the_receiver_accepts_and_its_preferences() -> None:
    base = make_study(instances=2)
    ps = make_instance_ref(sop_class_uid=PS_SOP_CLASS)
    study = base.model_copy(update={"instances": (*base.instances, ps)})
    recipient = make_recipient(
        DICOMWEB,
        PICKUP,
        preferences={
            "coercion": {"profile": "bsn-as-patient-id"},
            "object_filters": ["presentation-states"],
            "batch_limits": {"max_instances": 10, "max_bytes": 10 * 1024 * 1024},
        },
    )
    routes = route(make_consent_checked(study=study), Directory([recipient]))
    assert isinstance(routes, list) and len(routes) == 2
    for r in routes:
        assert r.sop_instance_uids == tuple(i.sop_instance_uid for i in base.instances)
        assert PS_SOP_CLASS in r.excluded_sop_classes
        assert list(r.excluded_sop_classes) == sorted(r.excluded_sop_classes)
        assert r.coercion == Coercion(
            profile="bsn-as-patient-id",
            issuer_of_patient_id="NLMINBIZA",
            universal_entity_id="2.16.840.1.113883.2.4.6.3",
        )
        assert (r.batch_limits.max_instances, r.batch_limits.max_bytes) == (  # type: ignore[union-attr]
            10,
            10 * 1024 * 1024,
        )


def test_a_version_with_nothing_the_receiver_accepts_routes_an_empty_selection() -> None:
    base = make_study(instances=1)
    ps = make_instance_ref(sop_class_uid=PS_SOP_CLASS)
    study = base.model_copy(
        update={
            "version": 2,
            "instances": (*base.instances, ps),
            "new_sop_instance_uids": (ps.sop_instance_uid,),
        }
    )
    recipient = make_recipient(DICOMWEB, preferences={"object_filters": ["presentation-states"]})
    [r] = route(make_consent_checked(study=study), Directory([recipient]))  # type: ignore[misc]
    assert r.sop_instance_uids == ()
    assert r.coercion == Coercion()


def test_a_study_the_receiver_accepts_nothing_of_is_not_routed_but_failed_with_the_reason() -> None:
    study = make_study(instances=1)
    ps = make_instance_ref(sop_class_uid=PS_SOP_CLASS)
    study = study.model_copy(update={"instances": (ps,)})
    recipient = make_recipient(DICOMWEB, preferences={"object_filters": ["presentation-states"]})

    failed = route(make_consent_checked(study=study), Directory([recipient]))

    assert isinstance(failed, RouteFailed)
    assert failed.reason_code is RouteFailureReason.NOTHING_ACCEPTED
    assert "accepts none of this study's 1 instance(s)" in failed.reason
    # The same receiver without the filter gets the study.
    [routed] = route(make_consent_checked(study=study), Directory([make_recipient(DICOMWEB)]))  # type: ignore[misc]
    assert routed.sop_instance_uids == (ps.sop_instance_uid,)


def test_failures_carry_a_reason_code() -> None:
    denied = make_consent_checked(decision=Decision.DENY, basis=Basis.EXPLICIT_OBJECTION)
    cases = [
        (denied, Directory([make_recipient(DICOMWEB)]), RouteFailureReason.CONSENT_DENIED),
        (make_consent_checked(), Directory(), RouteFailureReason.UNKNOWN_RECIPIENT),
        (make_consent_checked(), Directory([make_recipient()]), RouteFailureReason.NO_ENDPOINT),
        (
            make_consent_checked(),
            Directory([make_recipient({**DICOMWEB, "enabled": False})]),
            RouteFailureReason.NO_USABLE_ENDPOINT,
        ),
    ]
    for checked, directory, code in cases:
        result = route(checked, directory)
        assert isinstance(result, RouteFailed) and result.reason_code is code


def test_a_route_written_before_the_delivery_fields_still_decodes() -> None:
    codec = Codec()
    record = codec.encode(make_route_resolved())
    old = json.loads(record.value)
    for added in ("sop_instance_uids", "excluded_sop_classes", "coercion", "batch_limits"):
        old.pop(added)
    decoded = codec.decode(json.dumps(old).encode(), record.headers)
    assert isinstance(decoded, RouteResolved)
    assert decoded.sop_instance_uids is None  # not stated, unlike an empty selection
    assert decoded.coercion == Coercion() and decoded.batch_limits is None
