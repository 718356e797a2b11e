"""Events: frozen, closed to unknown fields, strict about identifiers, keyed per aggregate."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest
from pydantic import ValidationError

from shared.events import (
    AccessLogged,
    BsnStatus,
    Event,
    PatientRef,
    StudySnapshot,
    registry,
)
from shared.identifiers import is_pseudonym
from tests.factories import (
    FACTORIES,
    TEST_BSN,
    TEST_UID_ROOT,
    make_access_logged,
    make_consent_checked,
    make_consent_registered,
    make_consent_revoked,
    make_delivered,
    make_delivery_failed,
    make_instance_ref,
    make_instance_stored,
    make_pseudonym,
    make_route_failed,
    make_route_resolved,
    make_study,
    make_study_received,
    make_treatment_relationship_ended,
    make_treatment_relationship_registered,
    make_uid,
    sample_event,
)

MODELS = registry.models()
BY_SCHEMA = pytest.mark.parametrize("model", MODELS, ids=[m.schema_name for m in MODELS])
SCHEMA_NAME = re.compile(r"^[a-z][a-z-]*(\.[a-z][a-z-]*)*\.v[1-9][0-9]*$")


def error_types(exc: pytest.ExceptionInfo[ValidationError]) -> set[str]:
    return {e["type"] for e in exc.value.errors()}


def error_locs(exc: pytest.ExceptionInfo[ValidationError]) -> set[tuple[Any, ...]]:
    return {tuple(e["loc"]) for e in exc.value.errors()}


# --- the registry and the factories --------------------------------------------------------------


def test_the_registry_holds_every_event_family() -> None:
    topics = {m.topic for m in MODELS}
    assert {"instance-stored", "study-received", "consent-checked", "route-resolved"} <= topics
    assert {"delivered", "delivery-failed", "consent-registered", "access-logged"} <= topics


@BY_SCHEMA
def test_every_registered_event_has_a_factory_that_builds_exactly_that_class(
    model: type[Event],
) -> None:
    assert model in FACTORIES, f"add a factory for {model.__name__} to tests/factories.py"
    assert type(sample_event(model)) is model


def test_sample_event_refuses_a_class_without_a_factory_and_says_where_to_add_it() -> None:
    class Unregistered(Event):
        schema_name = "unregistered.v1"
        topic = "nowhere"

    with pytest.raises(LookupError, match=r"tests/factories\.py"):
        sample_event(Unregistered)


def test_factory_identifiers_are_fresh_dicom_uids_under_the_test_root() -> None:
    uids = {make_uid() for _ in range(100)}
    assert len(uids) == 100
    for uid in uids:
        assert uid.startswith(f"{TEST_UID_ROOT}.")
        make_instance_ref(sop_instance_uid=uid)  # validates as a DicomUid


def test_factory_studies_agree_with_their_own_series_summaries() -> None:
    study = make_study(instances=7, series=3)
    assert study.number_of_instances == 7
    assert sum(s.number_of_instances for s in study.series) == 7
    assert {i.series_instance_uid for i in study.instances} == {
        s.series_instance_uid for s in study.series
    }
    assert make_study(instances=0).series == ()


def test_factory_pseudonyms_are_real_pseudonyms_not_bsns() -> None:
    assert is_pseudonym(make_pseudonym())
    assert is_pseudonym(make_pseudonym(TEST_BSN))
    assert make_pseudonym(TEST_BSN) == make_pseudonym(TEST_BSN)
    assert make_pseudonym("123456782") != make_pseudonym(TEST_BSN)


def test_factory_samples_are_fresh_aggregates_so_their_keys_spread_over_partitions() -> None:
    for model in MODELS:
        keys = {sample_event(model).partition_key() for _ in range(20)}
        assert len(keys) == 20, model.__name__


# --- schema names, topics, keys ------------------------------------------------------------------


@BY_SCHEMA
def test_every_event_names_a_versioned_schema_and_a_topic(model: type[Event]) -> None:
    assert SCHEMA_NAME.match(model.schema_name), model.schema_name
    assert model.topic
    assert registry.model(model.schema_name) is model


@BY_SCHEMA
def test_every_event_defines_a_non_empty_partition_key(model: type[Event]) -> None:
    key = sample_event(model).partition_key()
    assert isinstance(key, str)
    assert key


def test_the_base_event_refuses_to_guess_a_partition_key() -> None:
    class Keyless(Event):
        schema_name = "keyless.v1"
        topic = "keyless"

    with pytest.raises(NotImplementedError, match="Keyless must define partition_key"):
        Keyless(correlation_id="c", producer="p").partition_key()


def test_every_event_of_one_study_shares_its_key_so_they_stay_ordered() -> None:
    study = make_study()
    uid = study.study_instance_uid
    events: list[Event] = [
        make_instance_stored(study_instance_uid=uid),
        make_study_received(study=study),
        make_consent_checked(study=study),
        make_route_resolved(study=study),
        make_route_failed(study_instance_uid=uid),
        make_delivered(study_instance_uid=uid),
        make_delivery_failed(study_instance_uid=uid),
    ]
    assert {e.partition_key() for e in events} == {uid}


def test_every_registry_event_of_one_patient_shares_the_pseudonym_as_key() -> None:
    patient = make_pseudonym()
    events: list[Event] = [
        make_consent_registered(patient=patient),
        make_consent_revoked(patient=patient),
        make_treatment_relationship_registered(patient=patient),
        make_treatment_relationship_ended(patient=patient),
        make_access_logged(patient=patient),
    ]
    assert {e.partition_key() for e in events} == {patient}


def test_an_access_without_a_known_patient_is_keyed_by_the_organisation() -> None:
    logged = make_access_logged(patient=None, organisation_ura="11223344")
    assert logged.partition_key() == "11223344"


# --- immutability and closed schemas -------------------------------------------------------------


@BY_SCHEMA
def test_events_are_frozen(model: type[Event]) -> None:
    event = sample_event(model)
    with pytest.raises(ValidationError) as exc:
        event.producer = "someone-else"  # type: ignore[misc]
    assert error_types(exc) == {"frozen_instance"}
    assert event.producer == "tests"


def test_values_nested_in_an_event_are_frozen_too() -> None:
    received = make_study_received()
    with pytest.raises(ValidationError):
        received.study.version = 2  # type: ignore[misc]
    with pytest.raises(ValidationError):
        received.study.patient.bsn_status = BsnStatus.ABSENT  # type: ignore[misc]
    with pytest.raises(ValidationError):
        received.study.instances[0].size = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        received.study.instances[0] = received.study.instances[0]  # type: ignore[index]


@BY_SCHEMA
def test_unknown_fields_are_rejected(model: type[Event]) -> None:
    payload = sample_event(model).model_dump(mode="json")
    model.model_validate(payload)  # the sample itself is valid
    with pytest.raises(ValidationError) as exc:
        model.model_validate({**payload, "unexpected": 1})
    assert error_types(exc) == {"extra_forbidden"}
    assert error_locs(exc) == {("unexpected",)}


def test_unknown_fields_deep_inside_a_snapshot_are_rejected() -> None:
    payload = make_study_received().model_dump(mode="json")
    payload["study"]["instances"][0]["bsn"] = "123456782"
    with pytest.raises(ValidationError) as exc:
        type(make_study_received()).model_validate(payload)
    assert error_locs(exc) == {("study", "instances", 0, "bsn")}


def test_a_naive_timestamp_is_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        make_delivered(delivered_at=datetime(2025, 3, 14, 9, 0))
    assert error_types(exc) == {"timezone_aware"}


def test_the_event_envelope_requires_a_correlation_id_and_a_producer() -> None:
    with pytest.raises(ValidationError) as exc:
        make_route_failed(correlation_id="", producer="")
    assert error_locs(exc) == {("correlation_id",), ("producer",)}


def test_two_events_built_alike_still_get_their_own_event_ids() -> None:
    assert make_route_failed().event_id != make_route_failed().event_id


# --- identifiers ---------------------------------------------------------------------------------

BAD_UIDS = [
    pytest.param("", id="empty"),
    pytest.param("1", id="one-component"),
    pytest.param("1.02.3", id="leading-zero"),
    pytest.param("1..2", id="empty-component"),
    pytest.param("1.2.", id="trailing-dot"),
    pytest.param(".1.2", id="leading-dot"),
    pytest.param("1.2.a", id="letter"),
    pytest.param("1.2 ", id="trailing-space"),
    pytest.param("1.2\n", id="trailing-newline"),
    pytest.param("1.2/../3", id="path"),
    pytest.param("1.\uff12", id="fullwidth-digit"),
    pytest.param("1." + "1" * 63, id="65-characters"),
]


@pytest.mark.parametrize("uid", BAD_UIDS)
@pytest.mark.parametrize(
    "field", ["sop_instance_uid", "sop_class_uid", "series_instance_uid", "transfer_syntax_uid"]
)
def test_invalid_dicom_uids_are_rejected(field: str, uid: str) -> None:
    with pytest.raises(ValidationError) as exc:
        make_instance_ref(**{field: uid}, object_key="k.dcm")
    assert error_locs(exc) == {(field,)}


@pytest.mark.parametrize("uid", BAD_UIDS)
def test_an_invalid_study_instance_uid_is_rejected_in_every_study_event(uid: str) -> None:
    with pytest.raises(ValidationError):
        make_study(study_instance_uid=uid, instances=0)
    with pytest.raises(ValidationError):
        make_instance_stored(study_instance_uid=uid, instance=make_instance_ref())
    for factory in (make_route_failed, make_delivered, make_delivery_failed):
        with pytest.raises(ValidationError):
            factory(study_instance_uid=uid)


@pytest.mark.parametrize("uid", ["0.0", "1.2.840.10008.1.2.1", "1." + "1" * 62])
def test_valid_dicom_uids_up_to_64_characters_are_accepted(uid: str) -> None:
    assert make_instance_ref(sop_instance_uid=uid).sop_instance_uid == uid


@pytest.mark.parametrize(
    "ura",
    [
        pytest.param("1234567", id="7-digits"),
        pytest.param("123456789", id="9-digits"),
        pytest.param("1234567a", id="letter"),
        pytest.param(" 12345678", id="space"),
        pytest.param("\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18", id="fullwidth"),
        pytest.param(12345678, id="int"),  # an int lost its leading zeros somewhere
    ],
)
def test_invalid_ura_numbers_are_rejected(ura: object) -> None:
    with pytest.raises(ValidationError) as exc:
        make_route_failed(recipient_ura=ura)
    assert error_locs(exc) == {("recipient_ura",)}
    with pytest.raises(ValidationError):
        make_study(sender_ura=ura)
    with pytest.raises(ValidationError):
        make_access_logged(organisation_ura=ura)


def test_an_uzi_number_must_be_nine_digits() -> None:
    with pytest.raises(ValidationError):
        make_access_logged(user_uzi="12345678")
    with pytest.raises(ValidationError):
        make_instance_stored(sender_user="90000000x")


BAD_PSEUDONYMS = [
    pytest.param("123456782", id="a-clear-bsn"),
    pytest.param("psn1-abc", id="too-short"),
    pytest.param("PSN1-" + "a" * 52, id="uppercase-prefix"),
    pytest.param("psn1-" + "A" * 52, id="uppercase-body"),
    pytest.param("psn2-" + "a" * 52, id="unknown-version"),
    pytest.param("psn1-" + "a" * 129, id="too-long"),
    pytest.param("", id="empty"),
]


@pytest.mark.parametrize("pseudonym", BAD_PSEUDONYMS)
def test_invalid_pseudonyms_are_rejected(pseudonym: str) -> None:
    with pytest.raises(ValidationError):
        make_consent_registered(patient=pseudonym)
    with pytest.raises(ValidationError):
        PatientRef(pseudonym=pseudonym, bsn_status=BsnStatus.VERIFIED)
    with pytest.raises(ValidationError):
        make_access_logged(patient=pseudonym)


@pytest.mark.parametrize(
    "pseudonym",
    [
        pytest.param("psn1-1234567820000000", id="bsn-inside"),
        pytest.param("psn1-" + "0123456789" * 5 + "ab", id="digits-outside-base32"),
    ],
)
def test_a_pseudonym_that_could_carry_a_clear_bsn_is_rejected(pseudonym: str) -> None:
    # Events share shared.identifiers.Pseudonym: base32 has no 0, 1, 8 or 9.
    with pytest.raises(ValidationError):
        make_consent_registered(patient=pseudonym)


@pytest.mark.parametrize(
    "sha256",
    [
        pytest.param("A" * 64, id="uppercase"),
        pytest.param("a" * 63, id="63-chars"),
        pytest.param("a" * 65, id="65-chars"),
        pytest.param("g" * 64, id="not-hex"),
        pytest.param("sha256:" + "a" * 64, id="prefixed"),
        pytest.param("", id="empty"),
    ],
)
def test_invalid_sha256_digests_are_rejected(sha256: str) -> None:
    with pytest.raises(ValidationError) as exc:
        make_instance_ref(sha256=sha256)
    assert error_locs(exc) == {("sha256",)}


def test_an_instance_size_cannot_be_negative() -> None:
    with pytest.raises(ValidationError):
        make_instance_ref(size=-1)


@pytest.mark.parametrize("key", ["", "a b.dcm", "studies/ä.dcm", "x" * 1025, "k?v=1"])
def test_object_keys_outside_the_safe_alphabet_are_rejected(key: str) -> None:
    with pytest.raises(ValidationError):
        make_instance_ref(object_key=key)


# --- the patient reference -----------------------------------------------------------------------


def test_a_verified_patient_carries_a_pseudonym() -> None:
    pseudonym = make_pseudonym()
    assert PatientRef(pseudonym=pseudonym, bsn_status=BsnStatus.VERIFIED).pseudonym == pseudonym


def test_a_verified_patient_without_a_pseudonym_is_rejected() -> None:
    with pytest.raises(ValidationError, match="pseudonym is present exactly when"):
        PatientRef(bsn_status=BsnStatus.VERIFIED)


@pytest.mark.parametrize("status", [s for s in BsnStatus if s is not BsnStatus.VERIFIED])
def test_an_unverified_patient_has_no_pseudonym(status: BsnStatus) -> None:
    assert PatientRef(bsn_status=status).pseudonym is None
    with pytest.raises(ValidationError, match="pseudonym is present exactly when"):
        PatientRef(pseudonym=make_pseudonym(), bsn_status=status)


def test_the_patient_invariant_also_holds_for_payloads_read_from_the_wire() -> None:
    payload = make_study_received().model_dump(mode="json")
    payload["study"]["patient"]["pseudonym"] = None
    with pytest.raises(ValidationError) as exc:
        type(make_study_received()).model_validate(payload)
    assert error_locs(exc) == {("study", "patient")}


# --- the snapshot --------------------------------------------------------------------------------


def test_a_study_version_starts_at_one() -> None:
    assert make_study(version=1).version == 1
    with pytest.raises(ValidationError):
        make_study(version=0)


def test_the_sender_note_is_limited_to_2000_characters() -> None:
    assert make_study(sender_note="é" * 2000).sender_note == "é" * 2000
    with pytest.raises(ValidationError):
        make_study(sender_note="x" * 2001)


def test_a_snapshot_counts_its_instances() -> None:
    assert make_study(instances=4).number_of_instances == 4
    assert StudySnapshot.model_fields.keys().isdisjoint({"number_of_instances"})


def test_access_logged_may_name_no_patient_when_none_was_identified() -> None:
    logged = make_access_logged(patient=None)
    assert isinstance(logged, AccessLogged)
    assert logged.patient is None


def test_an_event_failing_validation_does_not_echo_its_input_in_the_error_text() -> None:
    # A pseudonym without a verified BSN: refused by the model as a whole.
    with pytest.raises(ValidationError) as raised:
        PatientRef.model_validate({"pseudonym": "psn1-" + "a" * 52, "bsn_status": "absent"})
    assert "pseudonym is present exactly when" in str(raised.value)
    assert "psn1-" not in str(raised.value)
