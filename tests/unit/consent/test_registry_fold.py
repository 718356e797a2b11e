"""The API view's fold: records decoded with the codec, registries kept per pseudonym."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.consent.adapters.registry_view import RegistryFold, RegistryTopics
from shared.codec import Codec
from shared.errors import PoisonEvent
from shared.events import Event
from shared.events.consent import ConsentRevoked
from tests.factories import (
    make_consent_registered,
    make_pseudonym,
    make_study_received,
    make_treatment_relationship_ended,
    make_treatment_relationship_registered,
)


@dataclass
class Rec:
    value: bytes | None
    headers: list[tuple[str, bytes]]


def record(event: Event) -> Rec:
    encoded = Codec().encode(event)
    return Rec(encoded.value, list(encoded.headers))


def test_events_are_folded_per_patient_and_a_redelivered_one_counts_once() -> None:
    fold = RegistryFold()
    alice, bob = make_pseudonym(), make_pseudonym()
    consent = make_consent_registered(patient=alice, consent_id="c1")
    for event in (consent, consent, make_treatment_relationship_registered(patient=bob)):
        fold.apply_record(record(event))
    assert len(fold) == 2
    registry = fold.get(alice)
    assert registry is not None and registry.version == 1
    assert registry.consent("c1") is not None
    assert fold.get(make_pseudonym()) is None


@pytest.mark.parametrize(
    "bad",
    [
        Rec(b"{}", []),
        Rec(b"not json", [("schema", b"consent.registered.v1")]),
        Rec(None, [("schema", b"consent.registered.v1")]),
    ],
)
def test_an_undecodable_record_is_poison(bad: Rec) -> None:
    with pytest.raises(PoisonEvent):
        RegistryFold().apply_record(bad)


def test_an_event_of_another_family_on_a_registry_topic_is_poison() -> None:
    with pytest.raises(PoisonEvent, match="not a registry event"):
        RegistryFold().apply_record(record(make_study_received()))


def test_each_event_goes_to_its_own_topic_and_overrides_are_honoured() -> None:
    topics = RegistryTopics("a", "b", "c")
    assert topics.names == ("a", "b", "c")
    assert topics.for_event(make_consent_registered()) == "a"
    revoked = ConsentRevoked(
        consent_id="c1", patient=make_pseudonym(), correlation_id="c", producer="t"
    )
    assert topics.for_event(revoked) == "b"
    assert topics.for_event(make_treatment_relationship_registered()) == "c"
    assert topics.for_event(make_treatment_relationship_ended()) == "c"
    assert RegistryTopics().names == (
        "consent-registered",
        "consent-revoked",
        "treatment-relationships",
    )
