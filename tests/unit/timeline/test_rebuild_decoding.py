"""A rebuild's loader decodes a snapshot it has decoded before only once (``_Decoding``).

A study-received and its timeline decision carry the same snapshot text (consent forwards it as
received); the second of the two is decoded without it. Held here to what the plain path
(``decode_projected`` then ``Loader.add``) gives, row for row, and to its poison: a record the
plain path refuses is refused however its snapshot compares.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from services.timeline.adapters.reload import Loader
from services.timeline.entrypoints import rebuild
from services.timeline.entrypoints.projection import decode_projected
from services.timeline.entrypoints.rebuild import _Decoding
from shared.codec import Codec, Record
from shared.errors import PoisonEvent
from shared.events import Basis, ConsentChecked, Decision, Purpose, StudyReceived
from tests.factories import make_consent_checked, make_study, make_study_received

codec = Codec()


def pipeline(study_count: int = 3) -> list[Record]:
    """Each study's study-received and both decisions, the decisions written as consent writes
    them: the snapshot text of the study-received, last."""
    records = []
    for _ in range(study_count):
        received = codec.encode(make_study_received(study=make_study(4)))
        text = codec.member(received, StudyReceived, "study")
        assert text is not None
        records.append(received)
        study = codec.decode_record(received).study  # type: ignore[attr-defined]
        for purpose in (Purpose.DELIVERY, Purpose.TIMELINE):
            checked = make_consent_checked(
                study=study, purpose=purpose, decision=Decision.PERMIT,
                basis=Basis.EXPLICIT_CONSENT, decided_by="consent-1",
            )  # fmt: skip
            records.append(codec.encode(checked, carried={"study": text}))
    return records


def plain(records: list[Record]) -> dict[str, list[tuple[Any, ...]]]:
    loader = Loader("unused")
    for record in records:
        event = decode_projected(codec, record)
        if event is not None:
            loader.add(event)
    return loader.take()


def decoded(records: list[Record]) -> tuple[dict[str, list[tuple[Any, ...]]], int]:
    loader, decoding = Loader("unused"), _Decoding(codec)
    for record in records:
        decoding.add(record, loader)
    return loader.take(), decoding.shortcuts


@pytest.mark.parametrize("seed", range(5))
def test_the_rows_are_the_plain_paths_in_any_order(seed: int) -> None:
    records = pipeline()
    random.Random(seed).shuffle(records)
    rows, shortcuts = decoded(records)
    assert rows == plain(records)
    assert len(rows["decisions"]) == 3
    assert shortcuts == 3  # one record of each study-received/timeline-decision pair


def test_a_decision_whose_other_members_are_invalid_is_poison_though_its_snapshot_is_known() -> (
    None
):
    received, _, timeline = pipeline(1)
    value = timeline.value.replace(b'"decided_by":"consent-1"', b'"decided_by":""')
    bad = replace(timeline, value=value)
    loader, decoding = Loader("unused"), _Decoding(codec)
    decoding.add(received, loader)
    with pytest.raises(PoisonEvent):
        decoding.add(bad, loader)
    assert decoding.shortcuts == 0
    assert loader.take()["decisions"] == []


def test_an_unknown_member_beside_a_known_snapshot_is_poison() -> None:
    received, _, timeline = pipeline(1)
    extra = replace(timeline, value=timeline.value.replace(b'"flagged"', b'"x":1,"flagged"', 1))
    loader, decoding = Loader("unused"), _Decoding(codec)
    decoding.add(received, loader)
    with pytest.raises(PoisonEvent):
        decoding.add(extra, loader)


def test_a_delivery_decision_is_passed_over_and_a_changed_snapshot_decoded_in_full() -> None:
    received, delivery, timeline = pipeline(1)
    loader, decoding = Loader("unused"), _Decoding(codec)
    decoding.add(received, loader)
    decoding.add(delivery, loader)  # not decoded: it does not take the snapshot's entry
    changed = replace(timeline, value=timeline.value.replace(b'"version":1', b'"version":2', 1))
    decoding.add(changed, loader)
    assert decoding.shortcuts == 0
    rows = loader.take()
    assert [row[2] for row in rows["snapshots"]] == [1, 2]
    assert [row[2] for row in rows["decisions"]] == [2]
    assert isinstance(codec.decode_record(changed), ConsentChecked)


def test_a_snapshot_differing_anywhere_is_decoded_in_full() -> None:
    received, _, timeline = pipeline(1)
    assert timeline.value.index(b'"urgency":"routine"') > len(timeline.value) - 300
    changed = replace(timeline, value=timeline.value.replace(b'"routine"', b'"urgent"', 1))
    loader, decoding = Loader("unused"), _Decoding(codec)
    decoding.add(received, loader)
    decoding.add(changed, loader)
    assert decoding.shortcuts == 0
    assert loader.take() == plain([received, changed])


def test_a_record_of_another_key_or_another_layout_is_decoded_in_full() -> None:
    received, _, timeline = pipeline(1)
    other_key = replace(timeline, key=b"another study")
    spaced = replace(timeline, value=timeline.value.replace(b',"study":', b', "study": ', 1))
    for record in (other_key, spaced):
        loader, decoding = Loader("unused"), _Decoding(codec)
        decoding.add(received, loader)
        decoding.add(record, loader)
        assert decoding.shortcuts == 0
        assert loader.take() == plain([received, record])
    # And the layout it expects is the one the pipeline writes.
    loader, decoding = Loader("unused"), _Decoding(codec)
    decoding.add(received, loader)
    decoding.add(timeline, loader)
    assert decoding.shortcuts == 1


def test_a_delivery_decision_without_its_purpose_header_lends_no_snapshot_to_the_shortcut() -> None:
    # Written before decisions carried their purpose as a header: decoded in full, and its
    # snapshot not loaded, so a later record of the same text must not count on it.
    received, delivery, timeline = pipeline(1)
    bare = replace(delivery, headers=tuple(h for h in delivery.headers if h[0] != "purpose"))
    assert bare.headers != delivery.headers
    records = [bare, received, bare, timeline]
    rows, _ = decoded(records)
    assert rows == plain(records)
    assert len(rows["snapshots"]) == 1 and len(rows["decisions"]) == 1


def test_a_record_whose_last_schema_header_is_unknown_is_poison_though_its_snapshot_is_known() -> (
    None
):
    # Decoding reads the last schema header; so does the shortcut.
    received, _, timeline = pipeline(1)
    twice = replace(timeline, headers=(*timeline.headers, ("schema", b"bogus.v1")))
    with pytest.raises(PoisonEvent):
        plain([twice])
    loader, decoding = Loader("unused"), _Decoding(codec)
    decoding.add(received, loader)
    with pytest.raises(PoisonEvent):
        decoding.add(twice, loader)
    assert loader.take()["decisions"] == []


def test_past_its_budget_a_loader_forgets_the_oldest_snapshots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, _, first_timeline, second, _, second_timeline = pipeline(2)
    text = codec.member(first, StudyReceived, "study")
    assert text is not None
    monkeypatch.setattr(rebuild, "REMEMBERED_BYTES", len(text) * 3 // 2)
    loader, decoding = Loader("unused"), _Decoding(codec)
    records = [first, second, second_timeline, first_timeline]
    for record in records:
        decoding.add(record, loader)
    assert decoding.shortcuts == 1  # the second's decision; the first's snapshot was forgotten
    assert loader.take() == plain(records)
