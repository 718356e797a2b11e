"""The closed question ("may this requester see this patient's data for this purpose?").

:func:`decide` answers for a study; a closed question has none, so it is asked about a routine
study of the patient addressed to the requester (decide reads only the study's patient,
recipient and urgency). For a TIMELINE question the requester is concrete, so the treatment
relationship is checked here as well (design.md: explicit consent *and* a treatment
relationship): an explicit-consent permit without an active relationship is answered as a deny
on :data:`BASIS_NO_TREATMENT_RELATIONSHIP`. A DELIVERY question reports the relationship but is
decided on presumed consent alone, exactly as the decision worker decides a targeted send.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time

from services.consent.domain.decide import DEFAULT_DATA_CATEGORY, decide
from services.consent.domain.registry import PatientRegistry
from shared.events.common import BsnStatus, PatientRef, StudySnapshot
from shared.events.consent import Decision, Purpose

RULE_NO_TREATMENT_RELATIONSHIP = "rule:no-treatment-relationship"
# Not a consent basis (shared.events.consent.Basis), so a value of the API's own.
BASIS_NO_TREATMENT_RELATIONSHIP = "no-treatment-relationship"

# A UID that names no study (2.25 is the UUID root; UUID 0 is never generated).
_QUESTION_STUDY_UID = "2.25.0"


@dataclass(frozen=True, slots=True)
class QueryAnswer:
    decision: Decision
    # A shared.events.consent.Basis value, or BASIS_NO_TREATMENT_RELATIONSHIP.
    basis: str
    decided_by: str
    registry_version: int
    treatment_relationship: bool


def answer_query(
    registry: PatientRegistry | None,
    *,
    patient: str,
    purpose: Purpose,
    requester_ura: str,
    provider_category: str | None,
    today: date,
    data_category: str = DEFAULT_DATA_CATEGORY,
) -> QueryAnswer:
    """Answer for ``patient`` (a pseudonym of a verified BSN) on ``registry`` (None: empty).

    A TIMELINE question needs the requester's ``provider_category``: without it decide() would
    answer whether *some* category may see the data, which is no answer for this requester.
    """
    if purpose is Purpose.TIMELINE and provider_category is None:
        raise ValueError("a timeline question needs the requester's provider category")
    moment = datetime.combine(today, time(), tzinfo=UTC)
    study = StudySnapshot(
        study_instance_uid=_QUESTION_STUDY_UID,
        version=1,
        sender_ura=requester_ura,
        recipient_ura=requester_ura,
        patient=PatientRef(pseudonym=patient, bsn_status=BsnStatus.VERIFIED),
        first_received_at=moment,
        last_received_at=moment,
    )
    result = decide(
        study,
        purpose,
        registry,
        recipient_category=provider_category,
        data_category=data_category,
        today=today,
        requester_ura=requester_ura if purpose is Purpose.TIMELINE else None,
    )
    related = registry is not None and registry.has_treatment_relationship(requester_ura, today)
    if purpose is Purpose.TIMELINE and result.decision is Decision.PERMIT and not related:
        return QueryAnswer(
            Decision.DENY,
            BASIS_NO_TREATMENT_RELATIONSHIP,
            RULE_NO_TREATMENT_RELATIONSHIP,
            result.registry_version,
            False,
        )
    return QueryAnswer(
        result.decision,
        result.basis.value,
        result.decided_by,
        result.registry_version,
        related,
    )
