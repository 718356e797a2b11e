"""The consent check of one study version: both purposes decided once, remembered, announced.

Every ``study-received`` (each version) gets two ``consent-checked`` events, one per purpose.
The decision worker remembers what it decided per study version (a :class:`StudyDecisions`
row), so a redelivered ``study-received`` — at-least-once, after a crash or a rebalance — is
answered with the *same* decisions and the same events, even when the registry changed in
between: a study version is decided once, never twice differently.

Event ids are uuid5 over (study, version, sender, recipient, purpose) and ``occurred_at`` is the
moment of the first decision, so the repeated events are byte-for-byte the same events.

The day a decision is taken on is the study's announcement day in the Netherlands (consent
periods are calendar days), which also makes a replay of the topics decide the same.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from services.consent.domain.decide import DecisionResult, decide
from services.consent.domain.registry import PatientRegistry
from shared.events.base import uuid5_text
from shared.events.common import StudySnapshot
from shared.events.consent import Basis, ConsentChecked, Decision, Purpose
from shared.events.ingest import StudyReceived

PRODUCER = "consent"
CONSENT_CHECKED_NAMESPACE = uuid.UUID("6c1f0b7e-93d2-4f5a-8e14-2b9d7a3c5e61")
NETHERLANDS = ZoneInfo("Europe/Amsterdam")

# Provider type (code system 2.16.840.1.113883.2.4.15.1060, as in the provider directory) to the
# Mitz requesting-provider category a consent names. A type without a category is decided as
# "any category": an objection for some category then refuses the send (the safe side).
DEFAULT_PROVIDER_CATEGORIES: Mapping[str, str] = {"V4": "RPZAC104"}  # ziekenhuis -> hospitals


@dataclass(frozen=True, slots=True)
class StudyDecisions:
    """What was decided for one study version, for both purposes, and when."""

    delivery: DecisionResult
    timeline: DecisionResult
    decided_at: datetime

    def for_purpose(self, purpose: Purpose) -> DecisionResult:
        return self.delivery if purpose is Purpose.DELIVERY else self.timeline

    def to_row(self) -> bytes:
        return json.dumps(
            {
                "decided_at": self.decided_at.isoformat(),
                "delivery": _result_row(self.delivery),
                "timeline": _result_row(self.timeline),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_row(cls, row: bytes) -> StudyDecisions:
        data = json.loads(row)
        return cls(
            delivery=_result(data["delivery"]),
            timeline=_result(data["timeline"]),
            decided_at=datetime.fromisoformat(data["decided_at"]),
        )


def study_key(study: StudySnapshot) -> bytes:
    """One study version as ingest assembles it: per (study, sender, recipient)."""
    return (
        f"{study.study_instance_uid}|{study.version}|{study.sender_ura}|{study.recipient_ura}"
    ).encode()


def decision_day(moment: datetime) -> date:
    return moment.astimezone(NETHERLANDS).date()


def provider_category(type_code: str | None, categories: Mapping[str, str]) -> str | None:
    return None if type_code is None else categories.get(type_code)


def decide_study(
    received: StudyReceived,
    registry: PatientRegistry | None,
    *,
    recipient_category: str | None,
    data_category: str,
) -> StudyDecisions:
    """Both purposes for one study version, on the registry as it is now."""
    study = received.study
    today = decision_day(received.occurred_at)
    common = {"recipient_category": recipient_category, "data_category": data_category}
    return StudyDecisions(
        delivery=decide(study, Purpose.DELIVERY, registry, today=today, **common),
        # Whether the study may enter the timeline at all; the timeline asks again, for the
        # concrete requester and its treatment relationship, when someone looks.
        timeline=decide(study, Purpose.TIMELINE, registry, today=today, data_category=data_category,
                        recipient_category=None),
        decided_at=received.occurred_at,
    )  # fmt: skip


def checked_events(
    received: StudyReceived, decisions: StudyDecisions, *, producer: str = PRODUCER
) -> list[ConsentChecked]:
    """The two consent-checked events of a study version (delivery first)."""
    key = study_key(received.study).decode()
    return [
        ConsentChecked(
            event_id=checked_event_id(key, purpose),
            occurred_at=decisions.decided_at,
            correlation_id=received.correlation_id,
            producer=producer,
            study=received.study,
            purpose=purpose,
            decision=result.decision,
            basis=result.basis,
            decided_by=result.decided_by,
            registry_version=result.registry_version,
            flagged=result.flagged,
        )
        for purpose in (Purpose.DELIVERY, Purpose.TIMELINE)
        for result in (decisions.for_purpose(purpose),)
    ]


def checked_event_id(key: str, purpose: Purpose) -> str:
    """The id of a study version's consent-checked event for ``purpose`` (``key``: its
    :func:`study_key`)."""
    return uuid5_text(CONSENT_CHECKED_NAMESPACE, f"{key}|{purpose.value}")


def _result_row(result: DecisionResult) -> dict[str, object]:
    return {
        "decision": result.decision.value,
        "basis": result.basis.value,
        "decided_by": result.decided_by,
        "registry_version": result.registry_version,
        "flagged": result.flagged,
    }


def _result(row: dict[str, object]) -> DecisionResult:
    return DecisionResult(
        decision=Decision(row["decision"]),
        basis=Basis(row["basis"]),
        decided_by=str(row["decided_by"]),
        registry_version=int(row["registry_version"]),  # type: ignore[call-overload]
        flagged=bool(row["flagged"]),
    )
