"""Event <-> Kafka record: JSON value, schema name and envelope ids in headers, poison detection."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from shared.errors import PoisonEvent
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
            raise PoisonEvent(f"unknown schema {name!r}")
        if value is None:
            raise PoisonEvent(f"{name}: record has no value (tombstone)")
        try:
            payload: Any = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PoisonEvent(f"{name}: value is not JSON ({exc})") from exc
        if not isinstance(payload, dict):
            raise PoisonEvent(f"{name}: value is JSON {type(payload).__name__}, not an object")
        try:
            current, payload = self._registry.upcast(name, payload)
        except (KeyError, TypeError, ValueError) as exc:
            raise PoisonEvent(f"{name}: upcasting failed ({exc})") from exc
        model = self._registry.model(current)
        if model is None:
            raise PoisonEvent(f"{name}: upcasts to {current!r}, which has no model")
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            raise PoisonEvent(f"{current}: invalid payload: {_summarise(exc)}") from exc

    def decode_record(self, record: Any) -> Event:
        """Decode an aiokafka ``ConsumerRecord`` (or anything with ``value`` and ``headers``)."""
        return self.decode(record.value, record.headers)


def _summarise(exc: ValidationError, limit: int = 5) -> str:
    # Field locations and messages only: input values could hold patient data.
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
