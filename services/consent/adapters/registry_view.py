"""The consent API's read model: the registry topics folded per patient pseudonym in memory.

A :class:`~shared.topic_view.TopicView` over ``consent-registered``, ``consent-revoked`` and
``treatment-relationships``, read from offset 0 by every replica. A record that does not decode
to a registry event is poison: skipped and counted, never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.consent.domain.registry import PatientRegistry, RegistryEvent, apply
from shared.codec import Codec
from shared.errors import PoisonEvent
from shared.events.consent import (
    ConsentRegistered,
    ConsentRevoked,
    TreatmentRelationshipEnded,
    TreatmentRelationshipRegistered,
)
from shared.settings import KafkaSettings
from shared.topic_view import TopicView

_REGISTRY_EVENTS = (
    ConsentRegistered,
    ConsentRevoked,
    TreatmentRelationshipRegistered,
    TreatmentRelationshipEnded,
)


@dataclass(frozen=True, slots=True)
class RegistryTopics:
    """Where the registry events live; tests name topics of their own."""

    consent_registered: str = ConsentRegistered.topic
    consent_revoked: str = ConsentRevoked.topic
    treatment_relationships: str = TreatmentRelationshipRegistered.topic

    @property
    def names(self) -> tuple[str, str, str]:
        return (self.consent_registered, self.consent_revoked, self.treatment_relationships)

    def for_event(self, event: RegistryEvent) -> str:
        match event:
            case ConsentRegistered():
                return self.consent_registered
            case ConsentRevoked():
                return self.consent_revoked
            case TreatmentRelationshipRegistered() | TreatmentRelationshipEnded():
                return self.treatment_relationships
        raise TypeError(f"not a registry event: {type(event).__name__}")


class RegistryFold:
    """Per-patient registries built from records; the part of the view without Kafka."""

    def __init__(self, codec: Codec | None = None) -> None:
        self._codec = codec or Codec()
        self._registries: dict[str, PatientRegistry] = {}

    def __len__(self) -> int:
        return len(self._registries)

    def get(self, pseudonym: str) -> PatientRegistry | None:
        return self._registries.get(pseudonym)

    def apply_record(self, record: Any) -> None:
        event = self._codec.decode_record(record)
        if not isinstance(event, _REGISTRY_EVENTS):
            raise PoisonEvent(f"{type(event).schema_name} is not a registry event")
        patient = event.patient
        current = self._registries.get(patient) or PatientRegistry.empty(patient)
        self._registries[patient] = apply(current, event)


class RegistryView(TopicView):
    """Every patient's registry, as far as the view has read the topics."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: RegistryTopics | None = None,
        *,
        codec: Codec | None = None,
        name: str = "consent-registry",
        poll_timeout_ms: int = 200,
    ) -> None:
        self.topics = topics or RegistryTopics()
        self._fold = RegistryFold(codec)
        super().__init__(
            kafka,
            self.topics.names,
            self._fold.apply_record,
            name=name,
            poll_timeout_ms=poll_timeout_ms,
        )

    @property
    def patients(self) -> int:
        return len(self._fold)

    def get(self, pseudonym: str) -> PatientRegistry | None:
        return self._fold.get(pseudonym)
