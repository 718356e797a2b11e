"""What the tests of the workers' own record writers share (``CheckedRecords``,
``RouteRecords``): a record as a worker receives it, and texts whose snapshot it can cut."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import strategies as st

from shared.codec import Codec
from shared.events import Event


@dataclass
class Received:
    """A record as a worker gets it from aiokafka (the fields the codec reads)."""

    topic: str
    value: bytes
    headers: list[tuple[str, bytes]]


def received(codec: Codec, event: Event, carried: dict[str, bytes] | None = None) -> Received:
    record = codec.encode(event, carried)
    return Received(record.topic, record.value, list(record.headers))


def _standard(text: str) -> bool:
    return "NaN" not in text and "Infinity" not in text


# Texts a snapshot can be cut around. A control character is written as a \u escape, and a
# value holding one, NaN or Infinity is not cut (each writer's model path, tested on its own).
cuttable = st.characters(blacklist_categories=("Cc", "Cs"))
correlation_ids = st.text(cuttable, min_size=1, max_size=128).filter(_standard)
descriptions = st.none() | st.text(cuttable, max_size=64).filter(_standard)

moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30))]
    ),
)  # fmt: skip
