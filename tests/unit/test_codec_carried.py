"""Carried text: a worker forwards a received member (the study snapshot) as its JSON text.

``Codec.member`` cuts the text of a top-level member out of a record that has just decoded, and
``Codec.encode(..., carried=...)`` writes it back in place of the field (last). The text must be
the value the validator took, or nothing (the field is then serialised again): never a piece of
a neighbouring member or a value the validator dropped, whatever key order, spacing, repeated
keys or string contents the record has.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import replace
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ConfigDict

from shared.codec import SCHEMA_HEADER, Codec, _member_key, without
from shared.events import ConsentChecked, Event, StudyReceived, registry
from shared.events.base import uuid5_text
from shared.events.routing import RouteResolved
from tests.factories import (
    make_consent_checked,
    make_route_resolved,
    make_study,
    make_study_received,
)
from tests.unit.test_codec import studies

codec = Codec()
CARRIERS = [m for m in registry.models() if "study" in m.model_fields]
# The carriers whose snapshot is forwarded as text: their other fields are never objects.
CUT = [StudyReceived, ConsentChecked]
FACTORIES = {
    StudyReceived: make_study_received,
    ConsentChecked: make_consent_checked,
    RouteResolved: make_route_resolved,
}


class Rec:
    """What Codec.member reads of an aiokafka ConsumerRecord."""

    def __init__(self, value: bytes, schema: str, topic: str = "t") -> None:
        self.value = value
        self.headers = [(SCHEMA_HEADER, schema.encode())]
        self.topic = topic


def received(event: Event) -> Rec:
    record = codec.encode(event)
    return Rec(record.value, type(event).schema_name)


def study_json(event: Event) -> Any:
    return json.loads(event.model_dump_json())["study"]


def json_text(event: Event) -> bytes:
    return event.study.model_dump_json().encode()  # type: ignore[attr-defined]


def test_the_snapshot_can_be_cut_from_the_events_that_forward_it_and_no_other() -> None:
    assert {m for m in CARRIERS if _member_key(m, "study") is not None} == set(CUT)
    # A route-resolved also holds destination, coercion and limits: an object could end it.
    assert _member_key(RouteResolved, "study") is None


@pytest.mark.parametrize("model", CUT, ids=[m.schema_name for m in CUT])
def test_the_text_cut_from_a_forwarded_record_is_the_snapshot_and_goes_on_unchanged(
    model: type[Event],
) -> None:
    event = FACTORIES[model]()
    text = json_text(event)
    record = Rec(codec.encode(event, {"study": text}).value, model.schema_name)
    assert codec.member(record, model, "study") == text
    again = codec.encode(event, {"study": text})
    assert codec.decode(again.value, again.headers) == event
    assert again.headers == codec.encode(event).headers


def test_a_study_received_as_ingest_writes_it_is_cut() -> None:
    event = make_study_received()
    text = codec.member(received(event), StudyReceived, "study")  # the snapshot is its last field
    assert text is not None
    assert json.loads(text) == study_json(event)


def test_a_decision_written_in_field_order_is_not_cut() -> None:
    # Its scalar fields follow the snapshot: where the snapshot ends is not told by the end.
    assert codec.member(received(make_consent_checked()), ConsentChecked, "study") is None


def test_a_decision_built_from_a_received_study_carries_its_text_byte_for_byte() -> None:
    source = make_study_received()
    text = codec.member(received(source), StudyReceived, "study")
    assert text is not None
    checked = make_consent_checked(study=source.study)
    value = codec.encode(checked, {"study": text}).value
    assert text in value
    assert codec.decode(value, codec.encode(checked).headers) == checked


def reshaped(value: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """The same JSON object with its members in another order (returned) and other spacing."""
    payload = json.loads(value)
    items = list(payload.items())
    rng.shuffle(items)
    if rng.random() < 0.5:  # last, as Codec.encode writes a carried member
        items.sort(key=lambda item: item[0] == "study")
    separators = rng.choice([(",", ":"), (", ", ": "), (" , ", " : "), (",\n", ":\t")])
    text = json.dumps(dict(items), separators=separators, ensure_ascii=rng.random() < 0.5)
    return text.encode(), [k for k, _ in items]


@settings(max_examples=150, deadline=None)
@given(studies(), st.randoms(use_true_random=False), st.sampled_from(CARRIERS))
def test_whatever_the_order_spacing_or_text_the_cut_is_the_member_or_nothing(
    event: StudyReceived, rng: random.Random, model: type[Event]
) -> None:
    carrier = FACTORIES[model](study=event.study, correlation_id=event.correlation_id)
    value, order = reshaped(codec.encode(carrier).value, rng)
    record = Rec(value, model.schema_name)
    assert codec.decode(value, record.headers) == carrier  # valid, as member() presumes
    text = codec.member(record, model, "study")
    if text is None:
        # Not cut: a model with object fields beside the snapshot, a \u escape (ensure_ascii,
        # a control character), NaN or Infinity anywhere (as text too: Codec.member does not
        # tell them apart), or a member after the snapshot.
        assert (
            model not in CUT
            or b"\\u" in value
            or b"NaN" in value
            or b"Infinity" in value
            or order[-1] != "study"
        )
        return
    assert model in CUT and order[-1] == "study"
    assert json.loads(text) == json.loads(value)["study"]
    forwarded = codec.encode(carrier, {"study": text})
    assert codec.decode(forwarded.value, forwarded.headers) == carrier


def test_nothing_is_cut_where_a_key_could_hide() -> None:
    event = make_study_received()
    value = codec.encode(event).value
    schema = StudyReceived.schema_name
    # A key spelled with an escape could be "study" (or a sibling) without looking like it.
    escaped = value.replace(b'"producer":', b'"pr\\u006fducer":')
    assert codec.decode(escaped, [(SCHEMA_HEADER, schema.encode())]) == event
    assert codec.member(Rec(escaped, schema), StudyReceived, "study") is None


@pytest.mark.parametrize("model", CUT, ids=[m.schema_name for m in CUT])
def test_a_snapshot_given_twice_is_not_cut(model: type[Event]) -> None:
    first, last = make_study(instances=1), make_study(instances=2)
    event = FACTORIES[model](study=last)
    value = codec.encode(event, {"study": json_text(event)}).value
    earlier = b'"study":' + first.model_dump_json().encode() + b","
    twice = value.replace(b'"study":', earlier + b'"study":')
    record = Rec(twice, model.schema_name)
    assert codec.decode(twice, record.headers) == event  # the validator keeps the last one
    assert codec.member(record, model, "study") is None


@pytest.mark.parametrize("model", CUT, ids=[m.schema_name for m in CUT])
def test_a_key_hidden_in_a_dropped_earlier_value_is_not_taken_for_the_snapshot(
    model: type[Event],
) -> None:
    # A repeated key's earlier value is dropped unread, so it may hold anything, a "study"
    # key too (found by review): the snapshot's own earlier "patient", here.
    event = FACTORIES[model](study=make_study(instances=1))
    text = json_text(event)
    masked = text.replace(
        b'{"study_instance_uid"', b'{"patient":{"study":{}},"study_instance_uid"', 1
    )
    value = codec.encode(event, {"study": masked}).value
    record = Rec(value, model.schema_name)
    assert codec.decode(value, record.headers) == event
    assert codec.member(record, model, "study") is None


def test_a_top_level_key_repeated_after_the_snapshot_is_not_cut() -> None:
    event = make_consent_checked()
    value = codec.encode(event, {"study": json_text(event)}).value
    # The earlier "flagged" is dropped; the last member is a scalar: not cut.
    value = value[:-1] + b',"flagged":{"x":{}},"flagged":false}'
    record = Rec(value, ConsentChecked.schema_name)
    assert codec.decode(value, record.headers) == event
    assert codec.member(record, ConsentChecked, "study") is None


def test_a_repeated_key_inside_the_snapshot_goes_on_and_is_read_the_same() -> None:
    event = make_study_received(study=make_study(instances=1))
    text = json_text(event).replace(
        b'{"study_instance_uid"', b'{"version":7,"study_instance_uid"', 1
    )
    value = codec.encode(event, {"study": text}).value
    record = Rec(value, StudyReceived.schema_name)
    cut = codec.member(record, StudyReceived, "study")
    assert cut == text
    forwarded = codec.encode(make_consent_checked(study=event.study), {"study": cut})
    assert codec.decode(forwarded.value, forwarded.headers).study == event.study


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_a_value_with_what_only_pydantic_reads_as_a_number_is_not_cut(constant: bytes) -> None:
    # Found by review: pydantic's parser takes NaN and Infinity; in a dropped value they would
    # go on in the forwarded text, which is then no longer standard JSON.
    event = make_study_received(study=make_study(instances=1))
    repeated = b'{"version":' + constant + b',"study_instance_uid"'
    text = json_text(event).replace(b'{"study_instance_uid"', repeated, 1)
    value = codec.encode(event, {"study": text}).value
    record = Rec(value, StudyReceived.schema_name)
    assert codec.decode(value, record.headers) == event
    assert codec.member(record, StudyReceived, "study") is None


def test_the_schema_header_read_is_the_last_as_decoding_reads_it() -> None:
    record = received(make_study_received())
    record.headers = [(SCHEMA_HEADER, StudyReceived.schema_name.encode()), (SCHEMA_HEADER, b"x.v0")]
    assert codec.member(record, StudyReceived, "study") is None


class WithObject(Event):
    schema_name: ClassVar[str] = "test.with-object.v1"
    topic: ClassVar[str] = "test"
    study: dict[str, str]
    note: dict[str, str] | None = None

    def partition_key(self) -> str:
        return "k"


class Open(Event):
    model_config = ConfigDict(extra="allow")
    schema_name: ClassVar[str] = "test.open.v1"
    topic: ClassVar[str] = "test"
    study: dict[str, str]

    def partition_key(self) -> str:
        return "k"


@pytest.mark.parametrize("model", [WithObject, Open], ids=lambda m: m.__name__)
def test_a_model_that_could_end_with_another_object_is_never_cut(model: type[Event]) -> None:
    assert _member_key(model, "study") is None


def test_a_snapshot_that_is_not_an_object_is_not_cut() -> None:
    event = make_study_received()
    value = codec.encode(event).value
    bad = value.replace(b'"study":{', b'"study":[{', 1)[:-1] + b"]}"
    assert codec.member(Rec(bad, StudyReceived.schema_name), StudyReceived, "study") is None


@settings(max_examples=300)
@given(st.uuids(), st.text())
def test_uuid5_text_is_the_standard_librarys_uuid5(namespace: uuid.UUID, name: str) -> None:
    assert uuid5_text(namespace, name) == str(uuid.uuid5(namespace, name))


def test_an_event_takes_the_text_for_its_id() -> None:
    namespace = uuid.UUID("6c1f0b7e-93d2-4f5a-8e14-2b9d7a3c5e61")
    event = make_consent_checked(event_id=uuid5_text(namespace, "a|1"), study=make_study())
    assert event.event_id == uuid.uuid5(namespace, "a|1")


def test_several_carried_members_are_written_after_the_rest() -> None:
    event = make_route_resolved()
    carried = {
        "study": json_text(event),
        "destination": event.destination.model_dump_json().encode(),
    }
    value = codec.encode(event, carried).value
    assert value.endswith(
        b',"study":' + carried["study"] + b',"destination":' + carried["destination"] + b"}"
    )
    assert codec.decode(value, codec.encode(event).headers) == event


# --- split: a record not yet decoded, as its other members and the member's text --------------


def carried_record(event: Event, name: str = "study") -> Any:
    """``event``'s record as a forwarding worker writes it: ``name``'s text last."""
    text = getattr(event, name).model_dump_json().encode()
    return codec.encode(event, carried={name: text})


@pytest.mark.parametrize("model", CUT)
def test_split_gives_the_other_members_and_the_member_text(model: type[Event]) -> None:
    event = FACTORIES[model](purpose="timeline") if model is ConsentChecked else FACTORIES[model]()
    rest, text = codec.split(carried_record(event), model, "study") or (b"", b"")
    others = without(model, "study").model_validate_json(rest)
    assert type(event.study).model_validate_json(text) == event.study  # type: ignore[attr-defined]
    assert others.model_dump() == event.model_dump(exclude={"study"})
    assert "study" not in json.loads(rest)


def test_split_refuses_what_member_refuses_and_a_record_of_the_member_only() -> None:
    event = make_consent_checked()
    assert codec.split(codec.encode(event), ConsentChecked, "study") is None  # not last
    record = carried_record(event)
    assert codec.split(record, StudyReceived, "study") is None  # another schema
    text = codec.member(record, ConsentChecked, "study") or b""
    only = replace(record, value=b'{"study":' + text + b"}")
    assert codec.split(only, ConsentChecked, "study") is None


@pytest.mark.parametrize("model", CUT)
def test_rest_before_a_known_text_is_what_split_gives(model: type[Event]) -> None:
    event = FACTORIES[model](purpose="timeline") if model is ConsentChecked else FACTORIES[model]()
    record = carried_record(event)
    rest, text = codec.split(record, model, "study") or (b"", b"")
    assert codec.rest_before(record, "study", text) == rest
    # Any other text, or another layout, is not taken apart.
    assert codec.rest_before(record, "study", text[:-1] + b" }") is None
    spaced = replace(record, value=record.value.replace(b',"study":', b', "study":', 1))
    assert codec.rest_before(spaced, "study", text) is None
    assert codec.rest_before(replace(record, value=None), "study", text) is None


def test_split_cuts_a_value_holding_nan_which_member_does_not_forward() -> None:
    record = carried_record(make_consent_checked())
    value = record.value.replace(b'"flagged":false', b'"flagged":false,"flagged":NaN', 1)
    nan = replace(record, value=value)
    assert codec.member(nan, ConsentChecked, "study") is None
    rest, _ = codec.split(nan, ConsentChecked, "study") or (b"", b"")
    # Validated as the whole record is: the repeated key's last value (NaN) is refused.
    with pytest.raises(ValueError):
        without(ConsentChecked, "study").model_validate_json(rest)
    with pytest.raises(ValueError):
        ConsentChecked.model_validate_json(value)


def test_without_refuses_a_model_that_validates_more_than_its_fields() -> None:
    from shared.events.common import PatientRef

    with pytest.raises(TypeError, match="validates more than its fields"):
        without(PatientRef, "pseudonym")  # type: ignore[arg-type]
