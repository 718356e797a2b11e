"""Carried text: a worker forwards a received member (the study snapshot) as its JSON text.

``Codec.member`` cuts the text of a top-level member out of a record that has just decoded, and
``Codec.encode(..., carried=...)`` writes it back in place of the field. The text must be the
member's value exactly, or nothing (the field is then serialised again): never a piece of a
neighbouring member, whatever key order, spacing or string contents the record has.
"""

from __future__ import annotations

import json
import random
import uuid
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict

from shared.codec import SCHEMA_HEADER, Codec, _can_be_object, _member_keys
from shared.events import ConsentChecked, Event, StudyReceived, registry
from shared.events.base import Model, uuid5_text
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


@pytest.mark.parametrize("model", CARRIERS, ids=[m.schema_name for m in CARRIERS])
def test_every_event_carrying_a_snapshot_can_have_it_cut_out(model: type[Event]) -> None:
    assert _member_keys(model, "study") is not None


@pytest.mark.parametrize(
    "event",
    [make_study_received(), make_consent_checked(), make_route_resolved()],
    ids=lambda e: type(e).schema_name,
)
def test_the_text_cut_from_our_own_record_is_the_snapshot_and_goes_back_unchanged(
    event: Event,
) -> None:
    record = received(event)
    text = codec.member(record, type(event), "study")
    if isinstance(event, ConsentChecked):
        # Written in field order, the snapshot is followed by the decision's scalar fields,
        # which are not looked for: not cut. A consent-checked forwarding a snapshot has it last.
        assert text is None
        text = codec.member(Rec(codec.encode(event, {"study": json_text(event)}).value,
                                ConsentChecked.schema_name), ConsentChecked, "study")  # fmt: skip
    assert text is not None
    assert json.loads(text) == study_json(event)
    again = codec.encode(event, {"study": text})
    assert codec.decode(again.value, again.headers) == event
    assert again.headers == codec.encode(event).headers
    # Written last, it is cut out again at the next hop.
    assert codec.member(Rec(again.value, type(event).schema_name), type(event), "study") == text


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
    factories = {
        StudyReceived: make_study_received,
        ConsentChecked: make_consent_checked,
        RouteResolved: make_route_resolved,
    }
    carrier = factories[model](study=event.study, correlation_id=event.correlation_id)
    value, order = reshaped(codec.encode(carrier).value, rng)
    record = Rec(value, model.schema_name)
    assert codec.decode(value, record.headers) == carrier  # valid, as member() presumes
    text = codec.member(record, model, "study")
    after = order[order.index("study") + 1 :]
    # Where a member follows, the cut ends at the next one that can hold an object (by type).
    objects = {
        k for k, f in model.model_fields.items() if k != "study" and _can_be_object(f.annotation)
    }
    cuttable = not after or after[0] in objects
    if text is None:
        # A \u escape (ensure_ascii, or a control character) stops the cut, and so does a
        # scalar member after it: where the text ends is then not told by a key looked for.
        assert b"\\u" in value or not cuttable
        return
    assert cuttable
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


@pytest.mark.parametrize("model", CARRIERS, ids=[m.schema_name for m in CARRIERS])
def test_a_member_given_twice_is_cut_as_the_validator_read_it_the_last_one(
    model: type[Event],
) -> None:
    factories = {
        StudyReceived: make_study_received,
        ConsentChecked: make_consent_checked,
        RouteResolved: make_route_resolved,
    }
    first, last = make_study(instances=1), make_study(instances=2)
    event = factories[model](study=last)
    text = json_text(event)
    value = codec.encode(event, {"study": text}).value
    twice = value.replace(
        b'"study":', b'"study":' + first.model_dump_json().encode() + b',"study":'
    )
    record = Rec(twice, model.schema_name)
    # pydantic's JSON parser keeps the last of repeated keys; Codec.member relies on it.
    assert codec.decode(twice, record.headers) == event
    assert codec.member(record, model, "study") == text


def test_the_schema_header_read_is_the_last_as_decoding_reads_it() -> None:
    record = received(make_study_received())
    record.headers = [(SCHEMA_HEADER, StudyReceived.schema_name.encode()), (SCHEMA_HEADER, b"x.v0")]
    assert codec.member(record, StudyReceived, "study") is None


def test_a_record_of_another_schema_is_not_cut() -> None:
    value = codec.encode(make_study_received()).value
    # An upcast record holds an older shape; another model's field names are not ours.
    assert codec.member(Rec(value, "study.received.v0"), StudyReceived, "study") is None
    assert codec.member(Rec(value, ConsentChecked.schema_name), StudyReceived, "study") is None


class Inner(Model):
    note: str
    producer: str  # the same name as a field of the envelope


class Shadowing(Event):
    schema_name: ClassVar[str] = "test.shadowing.v1"
    topic: ClassVar[str] = "test"
    study: Inner

    def partition_key(self) -> str:
        return "k"


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")
    note: str


class Open(Event):
    schema_name: ClassVar[str] = "test.open.v1"
    topic: ClassVar[str] = "test"
    study: Loose

    def partition_key(self) -> str:
        return "k"


class Mapped(Event):
    schema_name: ClassVar[str] = "test.mapped.v1"
    topic: ClassVar[str] = "test"
    study: dict[str, str]

    def partition_key(self) -> str:
        return "k"


@pytest.mark.parametrize("model", [Shadowing, Open, Mapped], ids=lambda m: m.__name__)
def test_a_model_whose_nested_keys_could_pass_for_its_own_is_never_cut(
    model: type[Event],
) -> None:
    # A nested "producer" key, or any key at all, could end the member too early.
    assert _member_keys(model, "study") is None


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
