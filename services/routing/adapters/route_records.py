"""The route-resolved records of a delivery decision, written straight from its routes.

What ``services.consent.adapters.checked_records`` is to consent: building a
:class:`RouteResolved` per endpoint and serialising it through :meth:`Codec.encode` is most of
what routing a decision costs in the worker's own code. This writes the same records from a
:class:`Routes`: the snapshot as its JSON text as received (:meth:`Codec.member`), the parts
that come from the directory entry (destination, excluded SOP classes, coercion, batch limits)
serialised once per entry, each string of the decision through pydantic-core's serialiser, and
the fields in the model's order. ``tests/unit/routing/test_route_records.py`` holds every byte
(value, key, headers) equal to ``Codec.encode(RouteResolved(...), carried)`` over generated
decisions and directory entries; a field added to the model fails it until it is written here.

A snapshot whose text cannot be cut safely is written through the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic_core import to_json

from services.routing.domain.route import PerEntry, ReceiverParts, Routes
from shared.codec import Codec, Record, envelope_headers
from shared.events import ConsentChecked
from shared.events.routing import RouteResolved
from shared.stream import Encoded

_SCHEMA = RouteResolved.schema_name


class _Written:
    """A receiver's parts as JSON: the same for every route to it."""

    __slots__ = ("destinations", "rest")

    def __init__(self, parts: ReceiverParts) -> None:
        self.destinations = {
            endpoint_id: destination.model_dump_json().encode()
            for endpoint_id, destination in parts.destinations.items()
        }
        self.rest = b"".join(
            (b',"excluded_sop_classes":', to_json(parts.excluded),
             b',"coercion":', parts.coercion.model_dump_json().encode(),
             b',"batch_limits":', parts.limits.model_dump_json().encode(), b',"study":')
        )  # fmt: skip


class RouteRecords:
    """Writes the records of :meth:`Routes.events` for a consent-checked record."""

    def __init__(self, codec: Codec, producer: str) -> None:
        self._codec = codec
        self._producer = producer
        self._producer_json = to_json(producer)
        # Per receiver's parts, which ``receiver_parts`` builds once per directory entry.
        self._written = PerEntry(_Written)

    def write(self, record: Any, routes: Routes) -> Sequence[Encoded]:
        """One record per endpoint; ``routes`` were planned from ``record`` decoded."""
        snapshot = self._codec.member(record, ConsentChecked, "study")
        if snapshot is None:
            return [
                Encoded(_SCHEMA, self._codec.encode(event))
                for event in routes.events(self._producer)
            ]
        checked = routes.checked
        written = self._written(routes.parts)
        correlation = checked.correlation_id
        # UIDs are digits and dots (DicomUid): nothing in them is escaped.
        selected = (
            b'["' + '","'.join(routes.selected).encode() + b'"]' if routes.selected else b"[]"
        )
        head = b"".join(
            (b'","occurred_at":', to_json(routes.occurred_at),
             b',"correlation_id":', to_json(correlation),
             b',"producer":', self._producer_json, b',"destination":')
        )  # fmt: skip
        middle = b"".join(
            (b',"priority":"', routes.priority.value.encode(),
             b'","consent_basis":"', checked.basis.value.encode(),
             b'","flagged":', b"true" if checked.flagged else b"false",
             b',"sop_instance_uids":', selected, written.rest, snapshot, b"}")
        )  # fmt: skip
        key = checked.study.study_instance_uid.encode()
        records = []
        for endpoint_id in routes.endpoint_ids:
            event_id = routes.event_id(endpoint_id)
            value = b"".join(
                (b'{"event_id":"', event_id.encode(), head,
                 written.destinations[endpoint_id], middle)
            )  # fmt: skip
            headers = envelope_headers(_SCHEMA, event_id, correlation, self._producer)
            records.append(Encoded(_SCHEMA, Record(RouteResolved.topic, key, value, headers)))
        return records
