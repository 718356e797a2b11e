"""The decision worker's own writer of consent-checked records against the model's encoding.

``CheckedRecords`` writes what ``Codec.encode(ConsentChecked(...), carried)`` writes, byte for
byte (value, key, headers), and the records decode to the events ``checked_events`` builds."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.consent.adapters.checked_records import CheckedRecords
from services.consent.domain.checks import StudyDecisions, checked_events
from services.consent.domain.decide import DecisionResult
from shared.codec import Codec
from shared.events import ConsentChecked, StudyReceived
from shared.events.common import Urgency
from shared.events.consent import Basis, Decision
from shared.stream import Encoded
from tests.factories import make_study, make_study_received
from tests.record_writers import Received, correlation_ids, descriptions, moments
from tests.record_writers import received as received_record

CODEC = Codec()
WRITER = CheckedRecords(CODEC, "consent")


def as_received(study_received: StudyReceived) -> Received:
    return received_record(CODEC, study_received)


def expected(received: StudyReceived, decisions: StudyDecisions) -> list[Encoded]:
    """What the model path writes: the events of ``checked_events``, the snapshot carried."""
    snapshot = CODEC.member(as_received(received), StudyReceived, "study")
    carried = None if snapshot is None else {"study": snapshot}
    return [
        Encoded(ConsentChecked.schema_name, CODEC.encode(event, carried))
        for event in checked_events(received, decisions, producer="consent")
    ]


results = st.builds(
    DecisionResult,
    decision=st.sampled_from(Decision),
    basis=st.sampled_from(Basis),
    decided_by=st.text(min_size=1, max_size=128),  # any character: not in the snapshot
    registry_version=st.integers(min_value=0, max_value=2**53),
    flagged=st.booleans(),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    correlation_id=correlation_ids,
    occurred_at=moments,
    description=descriptions,
    instances=st.integers(min_value=0, max_value=4),
    version=st.integers(min_value=1, max_value=10**6),
    urgency=st.sampled_from(Urgency),
    delivery=results,
    timeline=results,
)
def test_the_records_are_the_models_records_byte_for_byte(
    correlation_id: str,
    occurred_at: datetime,
    description: str | None,
    instances: int,
    version: int,
    urgency: Urgency,
    delivery: DecisionResult,
    timeline: DecisionResult,
) -> None:
    study = make_study(instances, version=version, urgency=urgency, study_description=description)
    received = make_study_received(
        study=study, correlation_id=correlation_id, occurred_at=occurred_at
    )
    decisions = StudyDecisions(delivery=delivery, timeline=timeline, decided_at=occurred_at)
    record = as_received(received)
    assert CODEC.member(record, StudyReceived, "study") is not None  # the writer's own path

    written = WRITER.write(record, received, decisions)

    assert written == expected(received, decisions)
    decoded = [CODEC.decode(e.record.value, e.record.headers) for e in written]
    assert decoded == checked_events(received, decisions, producer="consent")


def test_a_snapshot_that_cannot_be_cut_is_written_through_the_model() -> None:
    # A control character is written as a \u escape, and a value holding one is never cut.
    received = make_study_received(study=make_study(2, study_description="line\x01two"))
    record = as_received(received)
    assert CODEC.member(record, StudyReceived, "study") is None
    decisions = StudyDecisions(
        delivery=DecisionResult(Decision.PERMIT, Basis.PRESUMED_REFERRAL, "rule:x", 0),
        timeline=DecisionResult(Decision.DENY, Basis.NO_EXPLICIT_CONSENT, "rule:y", 0),
        decided_at=received.occurred_at,
    )

    written = WRITER.write(record, received, decisions)

    assert written == expected(received, decisions)
    assert [CODEC.decode(e.record.value, e.record.headers) for e in written] == checked_events(
        received, decisions, producer="consent"
    )


@pytest.mark.parametrize("decided_by", ["", "x" * 129])
def test_a_decided_by_the_model_refuses_is_refused_not_written(decided_by: str) -> None:
    received = make_study_received(study=make_study(1))
    decisions = StudyDecisions(
        delivery=DecisionResult(Decision.PERMIT, Basis.EXPLICIT_CONSENT, decided_by, 1),
        timeline=DecisionResult(Decision.DENY, Basis.NO_EXPLICIT_CONSENT, "rule:y", 1),
        decided_at=received.occurred_at,
    )

    with pytest.raises(ValidationError):
        WRITER.write(as_received(received), received, decisions)
