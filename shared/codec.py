"""Event <-> Kafka record: JSON value, schema name and envelope ids in headers, poison detection."""

from __future__ import annotations

import functools
import json
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError, create_model

from shared.errors import FatalError, PoisonEvent
from shared.events import Event, SchemaRegistry
from shared.events import registry as default_registry
from shared.events.base import uuid_text

SCHEMA_HEADER = "schema"
EVENT_ID_HEADER = "event-id"
CORRELATION_HEADER = "correlation-id"
PRODUCER_HEADER = "producer"
CONTENT_TYPE_HEADER = "content-type"
CONTENT_TYPE = b"application/json"

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Record:
    """What goes on the wire for one event."""

    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


def envelope_headers(
    schema_name: str,
    event_id: str,
    correlation_id: str,
    producer: str,
    filters: Iterable[tuple[str, bytes]] = (),
) -> tuple[tuple[str, bytes], ...]:
    """The headers of an event's record: schema name, envelope ids, content type, then the
    event's ``filter_headers``. :meth:`Codec.encode` and the workers' own record writers both
    write them here."""
    return (
        (SCHEMA_HEADER, schema_name.encode()),
        (EVENT_ID_HEADER, event_id.encode()),
        (CORRELATION_HEADER, correlation_id.encode()),
        (PRODUCER_HEADER, producer.encode()),
        (CONTENT_TYPE_HEADER, CONTENT_TYPE),
        *filters,
    )


class Codec:
    """Encodes registered events and decodes records, upcasting old schema versions on the way.

    Decoding never guesses: a missing or unknown schema header, a body that is not JSON or a
    payload that fails validation raises :class:`PoisonEvent` naming what was wrong, because such
    a record can never succeed however often it is retried.
    """

    def __init__(self, registry: SchemaRegistry = default_registry) -> None:
        registry.check()
        self._registry = registry

    def encode(self, event: Event, carried: Mapping[str, bytes] | None = None) -> Record:
        """The record of ``event``. ``carried`` gives fields by their JSON text, as
        :meth:`member` found it in the record the event was built from: that text is written
        as is, after the other fields, instead of serialising the field again (a worker that
        forwards a study snapshot of 6 KB saves ~20 us per event). The caller vouches that
        each text is the JSON of the event's own value of that field: the member of the record
        that value was decoded from."""
        name = type(event).schema_name
        if self._registry.model(name) is not type(event):
            raise TypeError(f"{type(event).__name__} ({name}) is not registered with this codec")
        headers = envelope_headers(
            name,
            uuid_text(event.event_id.hex),
            event.correlation_id,
            event.producer,
            event.filter_headers(),
        )
        if carried:
            rest = event.model_dump_json(exclude=set(carried)).encode()
            parts = [rest[:-1]]
            separator = b"," if len(rest) > 2 else b""
            for key, text in carried.items():
                parts += (separator, b'"', key.encode(), b'":', text)
                separator = b","
            parts.append(b"}")
            value = b"".join(parts)  # one copy of the carried text, not one per concatenation
        else:
            value = event.model_dump_json().encode()
        return Record(
            topic=type(event).topic,
            key=event.partition_key().encode(),
            value=value,
            headers=headers,
        )

    def member(self, record: Any, model: type[Event], name: str) -> bytes | None:
        """The JSON text of top-level member ``name`` of ``record``'s value, a record that has
        just decoded as ``model``; None where the text cannot be cut out safely (the field is
        then serialised again). For :meth:`encode`'s ``carried``: a worker forwards the text
        it received instead of writing the same value anew.

        Cut only when every one of these holds, which makes the text exactly the value the
        validator took (its last member, written by :meth:`encode` last):

        - the record was written under ``model``'s own schema name (an upcast one holds an
          older shape), and ``model`` forbids unknown fields and has no other field whose
          value can be an object (checked once per model);
        - no ``\\u`` escape anywhere (a key could be spelled with one), and no ``NaN`` or
          ``Infinity`` (pydantic's parser reads them, so a dropped value could hold one, and
          the forwarded text would not be standard JSON);
        - the quoted name followed by a colon occurs once in the whole value. Then it is the
          top-level key: a key nested anywhere, or hidden in a repeated key's earlier value
          (which the validator drops unread, so it can hold anything), would be a second;
        - from that colon to the closing brace the text is one object's braces. The last
          member of a valid object is the last of its name, the one the validator kept; if
          it were another field, its value (not an object) would not end in a brace.

        A repeated key inside the member's value, or a value in a lax form the validator
        accepted (``"version":"5"``), is forwarded as received: every reader of these topics
        decodes with this codec, which reads it the same way again.
        """
        cut = _cut(record, model, name)
        return None if cut is None else cut[1]

    def split(self, record: Any, model: type[Event], name: str) -> tuple[bytes, bytes] | None:
        """``record``'s value as the JSON object of its other members and member ``name``'s
        text, cut as :meth:`member` cuts it (None where it would not), for a record that has
        NOT been decoded: the two are valid only if each is. A caller that knows the member's
        text is valid (identical to one that decoded) validates just the rest, with a model
        of ``model``'s other fields (``without``), and gets what decoding the whole would
        give: the rest holds no member of that name, so the whole is the rest's members and
        that one last."""
        # NaN or Infinity may stand anywhere: the validator reads both parts as it reads the
        # whole (it is forwarding that must not pass them on).
        cut = _cut(record, model, name, standard=False)
        if cut is None:
            return None
        at, text = cut
        rest = record.value[:at].rstrip()
        if not rest.endswith(b","):
            return None  # no other member (or not JSON)
        return rest[:-1] + b"}", text

    def rest_before(self, record: Any, name: str, text: bytes) -> bytes | None:
        """``record``'s value as the JSON object of its other members when it ends with member
        ``name`` holding exactly ``text``, as this codec and the record writers write a
        carried member (``,"name":`` then ``text`` then ``}``); None otherwise. For a caller
        that knows ``text`` is valid as that member (identical to one that decoded): the rest
        validated with ``without``, which refuses unknown members and so another ``name``,
        gives what decoding the whole would, as with :meth:`split`, without searching the
        value for the member (8 us of a 6 KB one)."""
        value = record.value
        key = _compact_key(name)
        at = len(value or b"") - 1 - len(text) - len(key)  # where the comma stands
        if (
            at < 1
            or not value.endswith(b"}")
            or not value.startswith(key, at)
            or not value.startswith(text, at + len(key))
        ):
            return None
        return value[:at] + b"}"

    def decode(self, value: bytes | None, headers: Iterable[tuple[str, bytes]] | None) -> Event:
        header_map = {k: v for k, v in (headers or ())}
        raw_name = header_map.get(SCHEMA_HEADER)
        if raw_name is None:
            raise PoisonEvent(f"record has no {SCHEMA_HEADER!r} header")
        try:
            name = raw_name.decode()
        except UnicodeDecodeError as exc:
            raise PoisonEvent(f"{SCHEMA_HEADER!r} header is not UTF-8") from exc
        if name not in self._registry:
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise PoisonEvent(f"unknown schema {shown!r}")
        if value is None:
            raise PoisonEvent(f"{name}: record has no value (tombstone)")
        current_model = self._registry.model(name)
        if current_model is not None:
            # Hot path: the current version parses straight from bytes (half the cost of
            # json.loads + validate). A failure is explained by the careful path below.
            try:
                return current_model.model_validate_json(value)
            except ValidationError:
                pass
        try:
            payload: Any = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PoisonEvent(f"{name}: value is not JSON ({exc})") from None
        except RecursionError:
            raise PoisonEvent(f"{name}: value nests too deeply") from None
        if not isinstance(payload, dict):
            raise PoisonEvent(f"{name}: value is JSON {type(payload).__name__}, not an object")
        try:
            current, payload = self._registry.upcast(name, payload)
        except Exception as exc:  # an upcaster meeting data it cannot lift: that record is poison
            raise PoisonEvent(f"{name}: upcasting failed ({type(exc).__name__})") from None
        model = self._registry.model(current)
        if model is None:  # registry.check() at start-up rules this out
            raise FatalError(f"{name}: upcasts to {current!r}, which has no model")
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            # `from None`: the chained error's text would repeat input values (patient data).
            raise PoisonEvent(f"{current}: invalid payload: {_summarise(exc)}") from None

    def decode_record(self, record: Any) -> Event:
        """Decode an aiokafka ``ConsumerRecord`` (or anything with ``value`` and ``headers``)."""
        return self.decode(record.value, record.headers)


def header(record: Any, name: str) -> bytes | None:
    """The value of header ``name`` of an aiokafka ``ConsumerRecord`` (the first, if repeated),
    or None; for filtering on an event's ``filter_headers`` before decoding its value."""
    for key, value in record.headers or ():
        if key == name:
            return bytes(value)
    return None


def last_header(record: Any, name: str) -> bytes | None:
    """The value of header ``name`` as :meth:`Codec.decode` reads the schema header: the last,
    if repeated; None if absent."""
    found = None
    for key, value in record.headers or ():
        if key == name:
            found = value
    return None if found is None else bytes(found)


_JSON_SPACE = (b" ", b"\t", b"\n", b"\r")


def _cut(
    record: Any, model: type[Event], name: str, *, standard: bool = True
) -> tuple[int, bytes] | None:
    """Where member ``name``'s key stands in ``record``'s value, and its text (see
    :meth:`Codec.member` for when it is cut); ``standard=False`` cuts values holding ``NaN``
    or ``Infinity`` too (checking costs up to ~8 us for a 6 KB value)."""
    value = record.value
    if not value or last_header(record, SCHEMA_HEADER) != model.schema_name.encode():
        return None
    key = _member_key(model, name)
    if key is None or _holds(value, b"\\u"):
        return None
    if standard and (_holds(value, b"NaN") or _holds(value, b"Infinity")):
        return None
    at = _key_at(value, key, 0)
    if at < 0 or _key_at(value, key, at + len(key)) >= 0:
        return None
    text = value[value.index(b":", at + len(key)) + 1 :].rstrip()
    if not text.endswith(b"}"):
        return None
    text = text[:-1].strip()
    if not (text.startswith(b"{") and text.endswith(b"}")):
        return None
    return at, text


def _holds(value: bytes, token: bytes) -> bool:
    """``token in value``, its first byte looked for first: a one-byte search is a memchr, and
    most snapshots hold no backslash, capital N or I at all, where the whole token's search
    takes ~3.5 us per 6 KB."""
    return value.find(token[:1]) >= 0 and value.find(token) >= 0


@functools.cache
def without(model: type[Event], name: str) -> type[BaseModel]:
    """A model of ``model``'s fields but ``name``, with its configuration (for
    :meth:`Codec.split`); refused for a model whose validity is more than its fields'."""
    decorators = model.__pydantic_decorators__
    if (
        decorators.model_validators
        or decorators.field_validators
        or model.model_post_init is not BaseModel.model_post_init
    ):
        raise TypeError(f"{model.__name__} validates more than its fields one by one")
    fields: Any = {k: (f.annotation, f) for k, f in model.model_fields.items() if k != name}
    return create_model(
        f"{model.__name__}Without{name.title()}", __config__=model.model_config, **fields
    )


def _key_at(value: bytes, key: bytes, start: int) -> int:
    """Where ``key`` (quoted) first stands as a key, followed by a colon, from ``start``; -1."""
    at = value.find(key, start)
    while at >= 0:
        after = at + len(key)
        while value[after : after + 1] in _JSON_SPACE:
            after += 1
        if value[after : after + 1] == b":":
            return at
        at = value.find(key, at + 1)
    return -1


@functools.cache
def _compact_key(name: str) -> bytes:
    return f',"{name}":'.encode()


@functools.cache
def _member_key(model: type[Event], name: str) -> bytes | None:
    """Member ``name``'s quoted key, or None when ``model`` could end with another member whose
    value is an object (see :meth:`Codec.member`)."""
    if name not in model.model_fields or model.model_config.get("extra") != "forbid":
        return None
    if any(_can_be_object(f.annotation) for k, f in model.model_fields.items() if k != name):
        return None
    return f'"{name}"'.encode()


def _can_be_object(annotation: Any) -> bool:
    """Whether a field's JSON value can be an object (a model or a mapping), not a scalar or
    an array."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _can_be_object(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_can_be_object(arg) for arg in typing.get_args(annotation))
    if origin in (tuple, list, set, frozenset, typing.Literal):
        return False
    if origin is None and isinstance(annotation, type):
        return issubclass(annotation, BaseModel | dict | Mapping)
    return True  # a mapping, Any, or something not understood: counted as one


def _summarise(exc: ValidationError, limit: int = 5) -> str:
    # Field locations and messages only: input values could hold patient data.
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:limit]:
        loc = err["loc"]
        if err["type"] == "extra_forbidden":
            # The location of an unknown field is the key itself, which is input: not repeated.
            loc = (*loc[:-1], "<unknown field>")
        where = ".".join(str(p) for p in loc) or "<root>"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
