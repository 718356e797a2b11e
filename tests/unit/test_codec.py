"""The codec: events to Kafka records and back, upcasting old versions, poison named not guessed."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field, ValidationError

from shared.codec import (
    CONTENT_TYPE,
    CONTENT_TYPE_HEADER,
    CORRELATION_HEADER,
    EVENT_ID_HEADER,
    PRODUCER_HEADER,
    SCHEMA_HEADER,
    Codec,
    Record,
    header,
)
from shared.errors import BeeldportaalError, PoisonEvent
from shared.events import (
    PURPOSE_HEADER,
    AccessLogged,
    BsnStatus,
    DeliveryQueued,
    Event,
    Purpose,
    RouteFailed,
    SchemaRegistry,
    StudyReceived,
    StudySnapshot,
    Urgency,
    registry,
)
from shared.identifiers import contains_bsn
from tests.factories import (
    make_access_logged,
    make_consent_checked,
    make_consent_revoked,
    make_consumer_record,
    make_delivered,
    make_delivery_queued,
    make_instance_ref,
    make_patient,
    make_route_failed,
    make_study,
    make_study_received,
    make_uid,
    sample_event,
)

MODELS = registry.models()
BY_SCHEMA = pytest.mark.parametrize("model", MODELS, ids=[m.schema_name for m in MODELS])
# Passes the 11-proof: what a BSN that leaked into the wrong field would look like.
FAKE_BSN = "123456782"

codec = Codec()


def headers_of(record: Record) -> dict[str, bytes]:
    return dict(record.headers)


def decode_payload(schema: str, payload: Any) -> Event:
    return codec.decode(json.dumps(payload).encode(), [(SCHEMA_HEADER, schema.encode())])


# --- encoding and the round trip -----------------------------------------------------------------


@BY_SCHEMA
def test_every_registered_event_round_trips_through_the_codec_unchanged(model: type[Event]) -> None:
    event = sample_event(model)
    record = codec.encode(event)
    decoded = codec.decode(record.value, record.headers)
    assert decoded == event
    assert type(decoded) is model


@BY_SCHEMA
def test_a_record_goes_to_the_models_topic_keyed_by_its_aggregate(model: type[Event]) -> None:
    event = sample_event(model)
    record = codec.encode(event)
    assert record.topic == model.topic
    assert record.key == event.partition_key().encode()


@BY_SCHEMA
def test_headers_carry_the_schema_name_and_the_envelope_ids(model: type[Event]) -> None:
    event = sample_event(model)
    headers = headers_of(codec.encode(event))
    assert headers[SCHEMA_HEADER] == model.schema_name.encode()
    assert headers[EVENT_ID_HEADER] == str(event.event_id).encode()
    assert headers[CORRELATION_HEADER] == event.correlation_id.encode()
    assert headers[PRODUCER_HEADER] == event.producer.encode()
    assert headers[CONTENT_TYPE_HEADER] == CONTENT_TYPE


@BY_SCHEMA
def test_a_record_is_a_json_object_with_str_header_keys_and_bytes_values(
    model: type[Event],
) -> None:
    record = codec.encode(sample_event(model))
    assert isinstance(json.loads(record.value), dict)
    assert isinstance(record.key, bytes)
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in record.headers)


@BY_SCHEMA
def test_no_python_class_path_travels_on_the_wire(model: type[Event]) -> None:
    record = codec.encode(sample_event(model))
    wire = record.value + b"".join(v for _, v in record.headers)
    assert model.__module__.encode() not in wire
    assert model.__qualname__.encode() not in wire


def test_a_consumer_record_from_aiokafka_decodes() -> None:
    event = make_route_failed()
    consumed = make_consumer_record(event, offset=7)
    assert codec.decode_record(consumed) == event


@pytest.mark.parametrize("purpose", list(Purpose))
def test_a_consent_decision_repeats_its_purpose_in_a_header_to_filter_on(purpose: Purpose) -> None:
    event = make_consent_checked(purpose=purpose)
    record = codec.encode(event)
    assert header(record, PURPOSE_HEADER) == purpose.value.encode()
    assert codec.decode(record.value, record.headers) == event


def test_events_without_filter_headers_carry_only_the_envelope_headers() -> None:
    record = codec.encode(make_study_received())
    assert header(record, PURPOSE_HEADER) is None
    assert [name for name, _ in record.headers] == [
        SCHEMA_HEADER, EVENT_ID_HEADER, CORRELATION_HEADER, PRODUCER_HEADER, CONTENT_TYPE_HEADER
    ]  # fmt: skip


def test_header_order_and_headers_added_by_others_do_not_matter() -> None:
    event = make_consent_revoked()
    record = codec.encode(event)
    headers = [("traceparent", b"00-abc-def-01"), *reversed(record.headers)]
    assert codec.decode(record.value, headers) == event


def test_non_ascii_text_survives_the_round_trip() -> None:
    event = make_study_received(
        study=make_study(
            institution_name="Ziekenhuis Gelderse Vallei — Ede", sender_note="ß 漢字 🙂"
        )
    )
    record = codec.encode(event)
    assert codec.decode(record.value, record.headers) == event


def test_encoding_an_unregistered_event_raises_type_error() -> None:
    class Unregistered(RouteFailed):
        schema_name: ClassVar[str] = "route.failed.unregistered.v1"

    event = Unregistered(**make_route_failed().model_dump())
    with pytest.raises(TypeError, match=r"Unregistered \(route\.failed\.unregistered\.v1\)"):
        codec.encode(event)


def test_a_subclass_reusing_a_registered_schema_name_is_not_encoded_as_its_parent() -> None:
    class Impostor(RouteFailed):
        pass

    with pytest.raises(TypeError, match="not registered"):
        codec.encode(Impostor(**make_route_failed().model_dump()))


def test_a_codec_only_encodes_what_its_own_registry_holds() -> None:
    with pytest.raises(TypeError, match="not registered"):
        Codec(SchemaRegistry()).encode(make_route_failed())


# --- poison --------------------------------------------------------------------------------------

VALID = codec.encode(make_route_failed())
SCHEMA = (SCHEMA_HEADER, RouteFailed.schema_name.encode())


@pytest.mark.parametrize(
    ("value", "headers", "message"),
    [
        pytest.param(VALID.value, [], "record has no 'schema' header", id="no-headers"),
        pytest.param(VALID.value, None, "record has no 'schema' header", id="headers-none"),
        pytest.param(
            VALID.value,
            [(EVENT_ID_HEADER, b"x"), (PRODUCER_HEADER, b"y")],
            "record has no 'schema' header",
            id="missing-schema-header",
        ),
        pytest.param(
            VALID.value, [(SCHEMA_HEADER, b"nope.v9")], "unknown schema 'nope.v9'", id="unknown"
        ),
        pytest.param(
            VALID.value, [(SCHEMA_HEADER, b"\xff\xfe\xfd")], "header is not UTF-8", id="non-utf8"
        ),
        pytest.param(None, [SCHEMA], "route.failed.v1: record has no value (tombstone)", id="none"),
        pytest.param(b"", [SCHEMA], "route.failed.v1: value is not JSON", id="empty"),
        pytest.param(b"not json", [SCHEMA], "route.failed.v1: value is not JSON", id="not-json"),
        pytest.param(b"\xff\xfe\x00{", [SCHEMA], "route.failed.v1: value is not JSON", id="bytes"),
        pytest.param(b"\x80abc", [SCHEMA], "route.failed.v1: value is not JSON", id="non-utf8"),
        pytest.param(b'{"a": 1', [SCHEMA], "route.failed.v1: value is not JSON", id="truncated"),
        pytest.param(b"[]", [SCHEMA], "value is JSON list, not an object", id="array"),
        pytest.param(b'"x"', [SCHEMA], "value is JSON str, not an object", id="string"),
        pytest.param(b"42", [SCHEMA], "value is JSON int, not an object", id="number"),
        pytest.param(b"null", [SCHEMA], "not an object", id="null"),
        pytest.param(b"{}", [SCHEMA], "route.failed.v1: invalid payload: ", id="empty-object"),
    ],
)
def test_a_record_that_can_never_decode_is_poison_with_a_clear_reason(
    value: bytes | None, headers: list[tuple[str, bytes]] | None, message: str
) -> None:
    with pytest.raises(PoisonEvent) as exc:
        codec.decode(value, headers)
    assert message in str(exc.value)
    assert isinstance(exc.value, BeeldportaalError)


def test_a_validation_failure_names_the_schema_the_field_and_the_problem() -> None:
    payload = json.loads(VALID.value) | {"study_version": 0}
    with pytest.raises(PoisonEvent) as exc:
        decode_payload(RouteFailed.schema_name, payload)
    assert str(exc.value) == (
        "route.failed.v1: invalid payload: "
        "study_version: Input should be greater than or equal to 1"
    )


def test_nested_validation_failures_name_the_full_path() -> None:
    payload = make_study_received().model_dump(mode="json")
    payload["study"]["instances"][0]["size"] = -1
    with pytest.raises(PoisonEvent, match=r"study\.instances\.0\.size: "):
        decode_payload(StudyReceived.schema_name, payload)


def test_a_payload_with_many_errors_lists_the_first_five_and_counts_the_rest() -> None:
    with pytest.raises(PoisonEvent) as exc:
        decode_payload(RouteFailed.schema_name, {"a": 1, "b": 2, "c": 3})
    *listed, rest = str(exc.value).removeprefix("route.failed.v1: invalid payload: ").split("; ")
    assert len(listed) == 5
    assert rest == "and 4 more"  # 6 missing fields + 3 unknown ones = 9


def _set(path: str, value: Any) -> Any:
    def mutate(payload: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = payload
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        target[last] = value

    return mutate


LEAKS = [
    (make_route_failed, _set("recipient_ura", FAKE_BSN), "recipient_ura"),
    (make_route_failed, _set("study_instance_uid", FAKE_BSN), "study_instance_uid"),
    (make_route_failed, _set("study_version", FAKE_BSN + "x"), "study_version"),
    (make_route_failed, _set("reason", f"patient {FAKE_BSN} " * 40), "reason"),
    (make_route_failed, _set("event_id", FAKE_BSN), "event_id"),
    (make_route_failed, _set("occurred_at", f"{FAKE_BSN}T"), "occurred_at"),
    (make_route_failed, _set("correlation_id", FAKE_BSN * 20), "correlation_id"),
    (make_consent_revoked, _set("patient", FAKE_BSN), "patient"),
    (make_delivered, _set("channel", FAKE_BSN), "channel"),
    (make_study_received, _set("study.patient.pseudonym", FAKE_BSN), "study.patient"),
    (make_study_received, _set("study.accession_number", FAKE_BSN * 2), "accession_number"),
    (make_study_received, _set("study.instances.0.sha256", FAKE_BSN), "sha256"),
]


@pytest.mark.parametrize(
    ("build", "mutate", "field"),
    [
        pytest.param(*case, id=f"{case[0].__name__.removeprefix('make_')}-{case[2]}")
        for case in LEAKS
    ],
)
def test_a_poison_reason_never_repeats_the_input_values(
    build: Any, mutate: Any, field: str
) -> None:
    # The reason goes to the dead-letter topic and the logs: a BSN in a wrong field must not follow.
    event = build()
    payload = event.model_dump(mode="json")
    mutate(payload)
    with pytest.raises(PoisonEvent) as exc:
        decode_payload(event.schema_name, payload)
    message = str(exc.value)
    assert field in message
    assert FAKE_BSN not in message
    assert not contains_bsn(message)


def test_a_body_that_is_not_json_is_poison_without_repeating_the_body() -> None:
    with pytest.raises(PoisonEvent) as exc:
        codec.decode(f'{{"patient": {FAKE_BSN}'.encode(), [SCHEMA])
    assert FAKE_BSN not in str(exc.value)


def test_a_poison_reason_never_repeats_an_unknown_key() -> None:
    payload = make_route_failed().model_dump(mode="json") | {FAKE_BSN: "x"}
    with pytest.raises(PoisonEvent) as exc:
        decode_payload(RouteFailed.schema_name, payload)
    assert FAKE_BSN not in str(exc.value)


def test_deeply_nested_json_is_poison_not_a_crash() -> None:
    depth = 100_000
    with pytest.raises(PoisonEvent):
        codec.decode(b'{"a": ' + b"[" * depth + b"]" * depth + b"}", [SCHEMA])


def test_a_value_json_cannot_carry_is_refused_when_built_and_a_large_one_decodes_again() -> None:
    # JSON has no infinity: such an event is refused before it reaches the wire.
    with pytest.raises(ValidationError):
        make_delivered(seconds_since_first_received=float("inf"))
    event = make_delivered(seconds_since_first_received=1.7976931348623157e308)
    record = codec.encode(event)
    assert codec.decode(record.value, record.headers) == event


# --- upcasting -----------------------------------------------------------------------------------


class NoteV2(Event):
    """v1 called the text ``body`` and had no author."""

    schema_name: ClassVar[str] = "test.note.v2"
    topic: ClassVar[str] = "test-notes"

    text: str
    author: str = Field(min_length=1)

    def partition_key(self) -> str:
        return self.author


class NoteV3(Event):
    """v3 adds the language, required."""

    schema_name: ClassVar[str] = "test.note.v3"
    topic: ClassVar[str] = "test-notes"

    text: str
    author: str
    lang: str

    def partition_key(self) -> str:
        return self.author


def upcast_note_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    payload = dict(payload)
    payload["text"] = payload.pop("body")
    payload.setdefault("author", "unknown")
    return payload


def upcast_note_v2_v3(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "lang": "nl"}


V1_PAYLOAD = {"correlation_id": "c", "producer": "legacy", "body": "hallo"}


def registry_with(*models: type[Event], upcasters: tuple[tuple[str, str, Any], ...] = ()) -> Codec:
    private = SchemaRegistry()
    for old, new, step in upcasters:
        private.register_upcaster(old, new, step)
    for model in models:
        private.register(model)
    return Codec(private)


def test_a_v1_payload_decodes_into_the_v2_model() -> None:
    notes = registry_with(NoteV2, upcasters=(("test.note.v1", "test.note.v2", upcast_note_v1_v2),))
    decoded = notes.decode(json.dumps(V1_PAYLOAD).encode(), [(SCHEMA_HEADER, b"test.note.v1")])
    assert type(decoded) is NoteV2
    assert (decoded.text, decoded.author, decoded.producer) == ("hallo", "unknown", "legacy")


def test_an_upcast_event_is_encoded_again_under_its_new_schema_name() -> None:
    notes = registry_with(NoteV2, upcasters=(("test.note.v1", "test.note.v2", upcast_note_v1_v2),))
    decoded = notes.decode(json.dumps(V1_PAYLOAD).encode(), [(SCHEMA_HEADER, b"test.note.v1")])
    assert headers_of(notes.encode(decoded))[SCHEMA_HEADER] == b"test.note.v2"


def test_a_current_payload_passes_the_upcasters_by() -> None:
    notes = registry_with(NoteV2, upcasters=(("test.note.v1", "test.note.v2", upcast_note_v1_v2),))
    note = NoteV2(correlation_id="c", producer="p", text="t", author="a")
    record = notes.encode(note)
    assert notes.decode(record.value, record.headers) == note


def test_upcasters_chain_from_v1_through_v2_to_v3() -> None:
    notes = registry_with(
        NoteV3,
        upcasters=(
            ("test.note.v1", "test.note.v2", upcast_note_v1_v2),
            ("test.note.v2", "test.note.v3", upcast_note_v2_v3),
        ),
    )
    from_v1 = notes.decode(json.dumps(V1_PAYLOAD).encode(), [(SCHEMA_HEADER, b"test.note.v1")])
    assert type(from_v1) is NoteV3
    assert (from_v1.text, from_v1.author, from_v1.lang) == ("hallo", "unknown", "nl")
    v2 = {"correlation_id": "c", "producer": "p", "text": "t", "author": "a"}
    from_v2 = notes.decode(json.dumps(v2).encode(), [(SCHEMA_HEADER, b"test.note.v2")])
    assert (type(from_v2), from_v2.lang) == (NoteV3, "nl")


def test_an_upcaster_cycle_is_refused_when_it_is_registered() -> None:
    loop = SchemaRegistry()
    loop.register_upcaster("test.loop.v1", "test.loop.v2", lambda p: p)
    with pytest.raises(ValueError, match=r"upcaster cycle at 'test\.loop\.v2'"):
        loop.register_upcaster("test.loop.v2", "test.loop.v1", lambda p: p)


def test_an_upcaster_onto_itself_is_refused_as_a_cycle() -> None:
    with pytest.raises(ValueError, match="upcaster cycle"):
        SchemaRegistry().register_upcaster("test.self.v1", "test.self.v1", lambda p: p)


def test_a_second_upcaster_for_the_same_old_schema_is_refused() -> None:
    private = SchemaRegistry()
    private.register_upcaster("test.note.v1", "test.note.v2", upcast_note_v1_v2)
    with pytest.raises(ValueError, match="already has an upcaster"):
        private.register_upcaster("test.note.v1", "test.note.v3", upcast_note_v1_v2)


def test_a_chain_that_ends_without_a_model_is_refused_before_any_record_is_read() -> None:
    with pytest.raises(ValueError, match=r"ends at 'test\.note\.v2', which has no model"):
        registry_with(upcasters=(("test.note.v1", "test.note.v2", upcast_note_v1_v2),))


def test_a_v1_payload_the_upcaster_cannot_read_is_poison() -> None:
    notes = registry_with(NoteV2, upcasters=(("test.note.v1", "test.note.v2", upcast_note_v1_v2),))
    with pytest.raises(PoisonEvent, match=r"test\.note\.v1: upcasting failed"):
        notes.decode(b'{"text": "no body"}', [(SCHEMA_HEADER, b"test.note.v1")])


def test_an_upcast_payload_is_validated_against_the_new_model() -> None:
    notes = registry_with(NoteV2, upcasters=(("test.note.v1", "test.note.v2", upcast_note_v1_v2),))
    payload = V1_PAYLOAD | {"author": ""}
    with pytest.raises(PoisonEvent, match=r"^test\.note\.v2: invalid payload: author: "):
        notes.decode(json.dumps(payload).encode(), [(SCHEMA_HEADER, b"test.note.v1")])


def test_a_model_cannot_be_registered_under_a_name_that_is_an_upcast_source() -> None:
    private = SchemaRegistry()
    private.register_upcaster("test.note.v2", "test.note.v3", upcast_note_v2_v3)
    with pytest.raises(ValueError, match="both a model and an upcast source"):
        private.register(NoteV2)
    assert private.model("test.note.v2") is None


def test_an_upcaster_cannot_start_from_a_name_that_still_has_a_model() -> None:
    private = SchemaRegistry()
    private.register(NoteV2)
    with pytest.raises(ValueError, match="still has a model"):
        private.register_upcaster("test.note.v2", "test.note.v3", upcast_note_v2_v3)


def test_two_models_cannot_share_a_schema_name() -> None:
    class OtherNoteV2(NoteV2):
        pass

    private = SchemaRegistry()
    private.register(NoteV2)
    private.register(NoteV2)  # registering the same model again is harmless
    with pytest.raises(ValueError, match="already registered"):
        private.register(OtherNoteV2)


def test_the_registry_knows_upcast_sources_but_has_no_model_for_them() -> None:
    private = SchemaRegistry()
    private.register_upcaster("test.note.v1", "test.note.v2", upcast_note_v1_v2)
    private.register(NoteV2)
    assert "test.note.v1" in private
    assert private.model("test.note.v1") is None
    assert private.names() == ["test.note.v2"]
    assert private.models() == [NoteV2]


def test_the_project_registry_is_untouched_by_private_registries() -> None:
    assert "test.note.v2" not in registry
    assert NoteV2 not in registry.models()


# --- properties ----------------------------------------------------------------------------------

# Valid UIDs only: at most 64 characters (six 13-digit parts would be 83).
uids = (
    st.lists(st.integers(0, 10**12), min_size=2, max_size=6)
    .map(lambda parts: ".".join(map(str, parts)))
    .filter(lambda uid: len(uid) <= 64)
)
uras = st.from_regex(r"[0-9]{8}", fullmatch=True)
# Whole-minute UTC offsets: what ISO 8601 can write and every sender uses.
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
moments = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=offsets
)


def optional_text(max_size: int) -> st.SearchStrategy[str | None]:
    return st.none() | st.text(max_size=max_size)


@st.composite
def studies(draw: st.DrawFn) -> StudyReceived:
    study_uid = draw(uids)
    n = draw(st.integers(0, 50))
    instances = tuple(make_instance_ref(size=draw(st.integers(0, 2**63 - 1))) for _ in range(n))
    first = draw(moments)
    snapshot = make_study(
        instances=0,
        study_instance_uid=study_uid,
        version=draw(st.integers(1, 2**31)),
        sender_ura=draw(uras),
        recipient_ura=draw(uras),
        patient=make_patient(draw(st.sampled_from(BsnStatus))),
        urgency=draw(st.sampled_from(Urgency)),
        accession_number=draw(optional_text(16)),
        study_date=draw(st.none() | st.dates()),
        study_time=draw(optional_text(16)),
        study_description=draw(optional_text(64)),
        institution_name=draw(optional_text(64)),
        sender_note=draw(optional_text(2000)),
        modalities=tuple(draw(st.lists(st.text(max_size=16), max_size=4))),
        first_received_at=first,
        last_received_at=first + draw(st.timedeltas(timedelta(0), timedelta(days=2))),
    )
    # Validated again on the way in: the drawn instances replace the factory's empty tuple.
    snapshot = StudySnapshot(**(snapshot.model_dump() | {"instances": instances}))
    return make_study_received(
        study=snapshot, correlation_id=draw(st.text(min_size=1, max_size=128))
    )


@settings(max_examples=75, deadline=None)
@given(studies())
def test_encode_then_decode_is_the_identity_for_any_valid_study(event: StudyReceived) -> None:
    record = codec.encode(event)
    decoded = codec.decode(record.value, record.headers)
    assert decoded == event
    assert decoded.study.number_of_instances == event.study.number_of_instances
    assert decoded.occurred_at.utcoffset() is not None


@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_finite_durations_survive_the_round_trip_exactly(seconds: float) -> None:
    event = make_delivered(seconds_since_first_received=seconds)
    record = codec.encode(event)
    assert codec.decode(record.value, record.headers) == event


def test_an_access_logged_v1_record_reads_as_v2_that_recorded_no_purpose() -> None:
    # What timeline wrote before the purpose of use was kept: v2's fields but that one.
    record = codec.encode(make_access_logged(purpose_of_use="TREAT"))
    payload = json.loads(record.value)
    del payload["purpose_of_use"]
    headers = {**headers_of(record), SCHEMA_HEADER: b"access.logged.v1"}

    event = codec.decode(json.dumps(payload).encode(), list(headers.items()))

    assert isinstance(event, AccessLogged)
    assert event.purpose_of_use is None
    assert event.model_dump(exclude={"purpose_of_use"}) == AccessLogged.model_validate(
        payload
    ).model_dump(exclude={"purpose_of_use"})


def test_a_delivery_queued_record_written_before_already_present_decodes_with_none() -> None:
    # DeliveryQueued.already_present was added within v1: records on the retry tiers and the
    # dead-letter topic written without it must still decode.
    record = codec.encode(make_delivery_queued(stored=(make_uid(),)))
    payload = json.loads(record.value)
    del payload["already_present"]

    event = codec.decode(json.dumps(payload).encode(), record.headers)

    assert isinstance(event, DeliveryQueued)
    assert event.already_present == ()
    assert event.stored == tuple(payload["stored"])
