"""The two consent-checked records of a study version, written straight from its decisions.

The decision worker announces every study version twice (delivery, timeline), each event
carrying the study snapshot. Building two :class:`ConsentChecked` models and serialising them
through :meth:`Codec.encode` cost about half of what handling a study-received costs in the
worker's own code (models, ids, serialisation, cutting the snapshot once per event). This writes
the same records from the few values a decision has: the snapshot as its JSON text as received
(:meth:`Codec.member`), each string through pydantic-core's own serialiser, the fields in the
model's order. ``tests/unit/consent/test_checked_records.py`` holds every byte (value, key,
headers) equal to ``Codec.encode(ConsentChecked(...), carried)`` over generated decisions, so the
model stays the schema and this only its fast writer; a field added to the model fails that
test until it is written here too.

Where the fast writer does not apply, the model path is taken, whose validation then speaks:
a snapshot whose text cannot be cut safely (:meth:`Codec.member` says when) or a
``decided_by`` outside the model's bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic_core import to_json

from services.consent.domain.checks import (
    StudyDecisions,
    checked_event_id,
    checked_events,
    study_key,
)
from services.consent.domain.decide import DecisionResult
from shared.codec import Codec, Record, envelope_headers
from shared.events import ConsentChecked, StudyReceived
from shared.events.consent import PURPOSE_HEADER, Purpose
from shared.stream import Encoded

_SCHEMA = ConsentChecked.schema_name
_DECIDED_BY_LENGTH = range(1, 129)  # ConsentChecked.decided_by: min_length 1, max_length 128


class CheckedRecords:
    """Writes the records of :func:`checked_events` for a study-received record."""

    def __init__(self, codec: Codec, producer: str) -> None:
        self._codec = codec
        self._producer = producer
        self._producer_json = to_json(producer)

    def write(
        self, record: Any, received: StudyReceived, decisions: StudyDecisions
    ) -> Sequence[Encoded]:
        """Both records, delivery first; ``received`` is ``record`` decoded."""
        snapshot = self._codec.member(record, StudyReceived, "study")
        if snapshot is None or not all(
            len(d.decided_by) in _DECIDED_BY_LENGTH
            for d in (decisions.delivery, decisions.timeline)
        ):
            return self._through_the_model(received, decisions, snapshot)
        key = study_key(received.study).decode()
        uid = received.study.study_instance_uid.encode()
        correlation = received.correlation_id
        # What both records share: the envelope's head and tail around the decision's fields.
        head = b"".join(
            (b'","occurred_at":', to_json(decisions.decided_at), b',"correlation_id":',
             to_json(correlation), b',"producer":', self._producer_json, b',"purpose":"')
        )  # fmt: skip
        tail = b',"study":' + snapshot + b"}"
        return [
            self._one(key, uid, head, tail, correlation, purpose, decisions.for_purpose(purpose))
            for purpose in (Purpose.DELIVERY, Purpose.TIMELINE)
        ]

    def _one(
        self,
        key: str,
        uid: bytes,
        head: bytes,
        tail: bytes,
        correlation: str,
        purpose: Purpose,
        result: DecisionResult,
    ) -> Encoded:
        event_id = checked_event_id(key, purpose)
        value = b"".join(
            (b'{"event_id":"', event_id.encode(), head, purpose.value.encode(),
             b'","decision":"', result.decision.value.encode(),
             b'","basis":"', result.basis.value.encode(),
             b'","decided_by":', to_json(result.decided_by),
             b',"registry_version":', str(result.registry_version).encode(),
             b',"flagged":', b"true" if result.flagged else b"false", tail)
        )  # fmt: skip
        purpose_header = ((PURPOSE_HEADER, purpose.value.encode()),)
        headers = envelope_headers(_SCHEMA, event_id, correlation, self._producer, purpose_header)
        record = Record(topic=ConsentChecked.topic, key=uid, value=value, headers=headers)
        return Encoded(_SCHEMA, record)

    def _through_the_model(
        self, received: StudyReceived, decisions: StudyDecisions, snapshot: bytes | None
    ) -> Sequence[Encoded]:
        carried = None if snapshot is None else {"study": snapshot}
        return [
            Encoded(_SCHEMA, self._codec.encode(event, carried))
            for event in checked_events(received, decisions, producer=self._producer)
        ]
