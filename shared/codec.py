"""Event <-> Kafka record: JSON value, schema name and envelope ids in headers, poison detection."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from shared.errors import FatalError, PoisonEvent
from shared.events import Event, SchemaRegistry
from shared.events import registry as default_registry

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


class Codec:
    """Encodes registered events and decodes records, upcasting old schema versions on the way.

    Decoding never guesses: a missing or unknown schema header, a body that is not JSON or a
    payload that fails validation raises :class:`PoisonEvent` naming what was wrong, because such
    a record can never succeed however often it is retried.
    """

    def __init__(self, registry: SchemaRegistry = default_registry) -> None:
        registry.check()
        self._registry = registry

    def encode(self, event: Event) -> Record:
        name = type(event).schema_name
        if self._registry.model(name) is not type(event):
            raise TypeError(f"{type(event).__name__} ({name}) is not registered with this codec")
        headers = (
            (SCHEMA_HEADER, name.encode()),
            (EVENT_ID_HEADER, str(event.event_id).encode()),
            (CORRELATION_HEADER, event.correlation_id.encode()),
            (PRODUCER_HEADER, event.producer.encode()),
            (CONTENT_TYPE_HEADER, CONTENT_TYPE),
            *event.filter_headers(),
        )
        return Record(
            topic=type(event).topic,
            key=event.partition_key().encode(),
            value=event.model_dump_json().encode(),
            headers=headers,
        )

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
