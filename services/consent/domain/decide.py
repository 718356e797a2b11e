"""The consent decision for one study and purpose (design.md, "Two flows, two legal bases").

A *requester* is an organisation (URA) of a Mitz provider category. A consent applies to a
requester when its data category matches, it is in force on the day, and it names no organisation
or the requester's, and no provider category or the requester's. Of the applicable consents the
most specific tier decides (organisation > provider category > general); within a tier an
objection beats a permit, and among equals the lowest consent id decides, so the answer depends
only on the registry's state, never on the order its events arrived in.

When the requester is not fully known the two purposes resolve the unknown in opposite
directions, each towards the safe side of its legal basis:

- DELIVERY (presumed consent, refused only by an objection): the recipient organisation is the
  study's; an unknown ``recipient_category`` could be any category, so the send is refused when an
  objection would decide for *some* category (category-specific objections count as covering,
  category-specific permits do not).
- TIMELINE (explicit consent only): ``requester_ura``/``recipient_category`` left at None ask
  whether the study may enter the timeline at all: permit when *some* requester would be permitted
  by an explicit consent. The timeline asks again with the concrete requester at query time, and
  checks the treatment relationship there (:meth:`PatientRegistry.has_treatment_relationship`).

Emergency: an EMERGENCY send is permitted even over an explicit objection, flagged (break the
glass: design.md, "Emergency sends are allowed and flagged"). An URGENT send is not an emergency
override: an objection still refuses it; without one it is permitted on the emergency basis and
flagged, as the issue asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from itertools import product

from services.consent.domain.registry import Consent, PatientRegistry
from shared.events.common import BsnStatus, StudySnapshot, Urgency
from shared.events.consent import Basis, Decision, Provision, Purpose

RULE_PRESUMED_REFERRAL = "rule:presumed-referral"
RULE_EMERGENCY = "rule:emergency"
RULE_UNVERIFIED_IDENTITY = "rule:unverified-identity"
RULE_NO_EXPLICIT_CONSENT = "rule:no-explicit-consent"

DEFAULT_DATA_CATEGORY = "GGC002"  # Mitz "Behandelgegevens"


@dataclass(frozen=True, slots=True)
class DecisionResult:
    """What ``ConsentChecked`` records about a decision."""

    decision: Decision
    basis: Basis
    # The consent id that decided, or one of the ``RULE_*`` names.
    decided_by: str
    registry_version: int
    flagged: bool = False


def decide(
    study: StudySnapshot,
    purpose: Purpose,
    registry: PatientRegistry | None,
    *,
    recipient_category: str | None,
    data_category: str = DEFAULT_DATA_CATEGORY,
    today: date,
    requester_ura: str | None = None,
) -> DecisionResult:
    """Decide ``purpose`` for ``study`` on ``registry`` (None: nothing registered, version 0).

    ``requester_ura`` is for TIMELINE only; a delivery's requester is the study's recipient.
    """
    pseudonym = study.patient.pseudonym
    if registry is not None and registry.patient != pseudonym:
        raise ValueError("the registry is not the study patient's")
    if purpose is Purpose.DELIVERY and requester_ura is not None:
        raise ValueError("a delivery's requester is the study's recipient, not requester_ura")
    version = 0 if registry is None else registry.version
    verified = study.patient.bsn_status is BsnStatus.VERIFIED
    consents = () if registry is None else registry.consents_in_force(data_category, today)

    if purpose is Purpose.DELIVERY:
        return _decide_delivery(study, consents, recipient_category, verified, version)
    return _decide_timeline(consents, requester_ura, recipient_category, verified, version)


def _decide_delivery(
    study: StudySnapshot,
    consents: tuple[Consent, ...],
    recipient_category: str | None,
    verified: bool,
    version: int,
) -> DecisionResult:
    if study.urgency is Urgency.EMERGENCY:
        return DecisionResult(Decision.PERMIT, Basis.EMERGENCY, RULE_EMERGENCY, version, True)
    if not verified:
        # No verified BSN, so no registry to consult: the referral is presumed, an operator looks.
        return DecisionResult(
            Decision.PERMIT,
            Basis.PRESUMED_UNVERIFIED_IDENTITY,
            RULE_UNVERIFIED_IDENTITY,
            version,
            True,
        )
    categories = (
        [recipient_category] if recipient_category is not None else _named_categories(consents)
    )
    # None last: "a category no consent names", the one that decides whatever the category is.
    deciding = [_resolve(consents, study.recipient_ura, category) for category in categories]
    objection = next((c for c in deciding if c and c.provision is Provision.DENY), None)
    if objection is not None:
        return DecisionResult(
            Decision.DENY, Basis.EXPLICIT_OBJECTION, objection.consent_id, version
        )
    if study.urgency is Urgency.URGENT:
        return DecisionResult(Decision.PERMIT, Basis.EMERGENCY, RULE_EMERGENCY, version, True)
    permit = deciding[-1]
    if permit is not None:
        return DecisionResult(Decision.PERMIT, Basis.EXPLICIT_CONSENT, permit.consent_id, version)
    return DecisionResult(Decision.PERMIT, Basis.PRESUMED_REFERRAL, RULE_PRESUMED_REFERRAL, version)


def _decide_timeline(
    consents: tuple[Consent, ...],
    requester_ura: str | None,
    recipient_category: str | None,
    verified: bool,
    version: int,
) -> DecisionResult:
    if not verified:
        return DecisionResult(
            Decision.DENY, Basis.UNVERIFIED_IDENTITY, RULE_UNVERIFIED_IDENTITY, version
        )
    organisations = [requester_ura] if requester_ura is not None else _named_organisations(consents)
    categories = (
        [recipient_category] if recipient_category is not None else _named_categories(consents)
    )
    deciding = [_resolve(consents, o, c) for o, c in product(organisations, categories)]
    permit = next((c for c in deciding if c and c.provision is Provision.PERMIT), None)
    if permit is not None:
        return DecisionResult(Decision.PERMIT, Basis.EXPLICIT_CONSENT, permit.consent_id, version)
    objection = next((c for c in deciding if c is not None), None)
    if objection is not None:
        return DecisionResult(
            Decision.DENY, Basis.EXPLICIT_OBJECTION, objection.consent_id, version
        )
    return DecisionResult(
        Decision.DENY, Basis.NO_EXPLICIT_CONSENT, RULE_NO_EXPLICIT_CONSENT, version
    )


def _resolve(
    consents: tuple[Consent, ...], organisation: str | None, category: str | None
) -> Consent | None:
    """The consent that decides for one requester; None for "no consent applies".

    ``None`` as organisation or category stands for one that no consent names, so only consents
    without an organisation (or category) apply to it.
    """
    applicable = [
        c
        for c in consents
        if c.organisation_ura in (None, organisation) and c.provider_category in (None, category)
    ]
    if not applicable:
        return None
    top = max(c.specificity for c in applicable)
    tier = [c for c in applicable if c.specificity == top]
    denies = [c for c in tier if c.provision is Provision.DENY]
    return min(denies or tier, key=lambda c: c.consent_id)


def _named_categories(consents: tuple[Consent, ...]) -> list[str | None]:
    named = sorted({c.provider_category for c in consents if c.provider_category is not None})
    return [*named, None]


def _named_organisations(consents: tuple[Consent, ...]) -> list[str | None]:
    named = sorted({c.organisation_ura for c in consents if c.organisation_ura is not None})
    return [*named, None]
