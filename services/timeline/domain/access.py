"""May this requester see this patient's timeline? Consent's own rules, asked in-process.

The timeline query ("ongericht bevragen", design.md) needs both (a) an explicit consent of the
patient covering the requester's Mitz provider category and the data category, and (b) an active
treatment relationship between the requester's organisation and the patient. Consent owns those
rules (:func:`services.consent.domain.query.answer_query`); this guard only supplies the facts:
the patient's registry from the registry topics and the requester's provider type from the
provider directory, both read after syncing the views (read-your-writes: a consent registered a
moment ago counts). A view that cannot sync in time raises :class:`AccessCheckUnavailable`, which
the API answers with 503: the guard never decides on a view it knows may be stale.

Before any of that, the token must name the person acting (a UZI number: NEN 7513 records who
looked, not just which organisation) and a purpose of use of treatment: TREAT, or ETREAT for an
emergency. A token for research, marketing or no purpose at all sees nothing.

Break the glass: a token with purpose of use ETREAT plus a stated reason is allowed as
EMERGENCY whatever the registry says (objections included, as for emergency sends), flagged in
the audit with what the normal rules would have answered, so a reviewer sees whether the glass
had to be broken. ETREAT without a reason is refused: an emergency must say why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Final, Protocol

from aiokafka.errors import KafkaError

from services.consent.domain.checks import decision_day, provider_category
from services.consent.domain.query import BASIS_NO_TREATMENT_RELATIONSHIP, answer_query
from services.consent.domain.registry import PatientRegistry
from services.timeline.domain.ports import AccessDecision, AccessOutcome
from shared.auth import EMERGENCY_PURPOSE, TREATMENT_PURPOSE, Principal
from shared.errors import TransientError
from shared.events.consent import Basis, Decision, Purpose
from shared.topic_view import ViewFailed

BASIS_TREATMENT_RELATIONSHIP: Final = "treatment-relationship"
BASIS_EMERGENCY: Final = "emergency"

# What failed, as machine-readable names (OperationOutcome details, metrics labels).
CONDITION_TREATMENT_RELATIONSHIP: Final = "treatment-relationship"
CONDITION_CONSENT: Final = "consent"
CONDITION_OBJECTION: Final = "objection"
CONDITION_REQUESTER_TYPE: Final = "requester-type"
CONDITION_EMERGENCY_REASON: Final = "emergency-reason"
CONDITION_PURPOSE_OF_USE: Final = "purpose-of-use"
CONDITION_USER_IDENTITY: Final = "user-identity"
CONDITIONS: Final = (
    CONDITION_TREATMENT_RELATIONSHIP,
    CONDITION_CONSENT,
    CONDITION_OBJECTION,
    CONDITION_REQUESTER_TYPE,
    CONDITION_EMERGENCY_REASON,
    CONDITION_PURPOSE_OF_USE,
    CONDITION_USER_IDENTITY,
)
# The purposes of use a timeline is shown for (HL7 PurposeOfUse).
TREATMENT_PURPOSES: Final = frozenset({TREATMENT_PURPOSE, EMERGENCY_PURPOSE})

_PROFILE_CHARS: Final = 128


class AccessCheckUnavailable(RuntimeError):
    """The registry or the directory could not be read up to date in time: answer 503."""


class _SyncableView(Protocol):
    @property
    def failed(self) -> bool: ...

    @property
    def is_caught_up(self) -> bool: ...

    async def sync(self, timeout: float) -> None: ...


class RegistrySource(_SyncableView, Protocol):
    """Port: every patient's consent registry (``RegistryView``, or a fake in unit tests)."""

    def get(self, pseudonym: str) -> PatientRegistry | None: ...


class ProviderTypeSource(Protocol):
    """Port: the provider directory's type per URA (``ProviderTypes``, or a fake)."""

    @property
    def view(self) -> _SyncableView: ...

    def type_code(self, ura: str) -> str | None: ...


def today_in_the_netherlands() -> date:
    return decision_day(datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class _Normal:
    """What the normal rules answer, before any emergency."""

    allowed: bool
    consent_profile: str | None
    failed: tuple[str, ...]
    reason: str | None
    # What a requester is told when that is less (see AccessDecision.disclosed_reason).
    disclosed_failed: tuple[str, ...] | None = None
    disclosed_reason: str | None = None


def _refused_token(principal: Principal) -> AccessDecision | None:
    """The token's own shortcomings: no person named, or a purpose other than treatment."""
    failed = []
    reasons = []
    if principal.user_uzi is None:
        failed.append(CONDITION_USER_IDENTITY)
        reasons.append("the token names no person (UZI number): every access is audited per user")
    if principal.purpose_of_use not in TREATMENT_PURPOSES:
        failed.append(CONDITION_PURPOSE_OF_USE)
        reasons.append(
            f"the token's purpose of use is not {TREATMENT_PURPOSE} or {EMERGENCY_PURPOSE}: the "
            "timeline is shown for treatment only"
        )
    if not failed:
        return None
    return AccessDecision(
        AccessOutcome.DENIED,
        authorisation_basis=None,
        consent_profile=None,
        reason="; ".join(reasons),
        failed_conditions=tuple(failed),
    )


def _before_registry(principal: Principal, emergency_reason: str | None) -> AccessDecision | None:
    """The refusals decided before reading anything: they do not depend on the registry."""
    refused = _refused_token(principal)
    if refused is not None:
        return refused
    if principal.is_emergency and emergency_reason is None:
        return AccessDecision(
            AccessOutcome.DENIED,
            authorisation_basis=None,
            consent_profile=None,
            reason="emergency access (purpose ETREAT) needs a stated reason in the "
            "X-Break-The-Glass header",
            failed_conditions=(CONDITION_EMERGENCY_REASON,),
        )
    return None


def _denied(normal: _Normal, emergency_reason: str | None) -> AccessDecision:
    """What the normal rules refused, with a hint for a break-the-glass reason sent with a
    token that does not state the emergency purpose."""
    why, told = normal.reason or "access refused", normal.disclosed_reason
    if emergency_reason is not None:
        hint = f"; break-the-glass needs a token with purpose of use {EMERGENCY_PURPOSE}"
        why += hint
        told = told + hint if told is not None else None
    return AccessDecision(
        AccessOutcome.DENIED,
        authorisation_basis=None,
        consent_profile=normal.consent_profile,
        reason=why,
        failed_conditions=normal.failed,
        disclosed_reason=told,
        disclosed_conditions=normal.disclosed_failed,
    )


class ConsentAccessGuard:
    """The :class:`~services.timeline.domain.ports.AccessGuard` on consent's registry."""

    def __init__(
        self,
        registry: RegistrySource,
        providers: ProviderTypeSource,
        data_category: str,
        provider_categories: Mapping[str, str],
        *,
        sync_timeout: float = 10.0,
        today: Callable[[], date] = today_in_the_netherlands,
    ) -> None:
        if sync_timeout <= 0:
            raise ValueError("sync_timeout must be positive")
        self._registry = registry
        self._providers = providers
        self._data_category = data_category
        self._categories = dict(provider_categories)
        self._sync_timeout = sync_timeout
        self._today = today

    async def check_requester(
        self, principal: Principal, *, emergency_reason: str | None = None
    ) -> AccessDecision | None:
        """The refusal that holds whichever patient is asked about (the token, a missing
        emergency reason, a requester of no known provider type); None when there is none.

        DICOMweb asks this before it looks a study up, so that a requester refused for what
        they are learns nothing about the study they named."""
        reason = (emergency_reason or "").strip() or None
        refused = _before_registry(principal, reason)
        if refused is not None:
            return refused
        await self._sync()
        unknown = self._unknown_requester(principal)
        if unknown is None or principal.is_emergency:
            return None  # an emergency is allowed whatever the requester's type (audited)
        return _denied(unknown, reason)

    async def check(
        self,
        principal: Principal,
        patient: str,
        *,
        emergency_reason: str | None = None,
        requester_checked: bool = False,
    ) -> AccessDecision:
        """``requester_checked``: :meth:`check_requester` allowed this request a moment ago
        (the views synced then): neither is done again, so a study of a patient the requester
        does not treat costs no more time than an unknown one."""
        reason = (emergency_reason or "").strip() or None
        if not requester_checked:
            refused = _before_registry(principal, reason)
            if refused is not None:
                return refused
            await self._sync()
        normal = self._normal(principal, patient)
        if principal.is_emergency:
            # Break the glass: allowed, and the audit shows what the normal rules said.
            verdict = "allowed" if normal.allowed else "denied: " + (normal.reason or "")
            profile = normal.consent_profile or ""
            return AccessDecision(
                AccessOutcome.EMERGENCY,
                authorisation_basis=BASIS_EMERGENCY,
                consent_profile=_clip(f"emergency; normal rules {verdict}; {profile}".rstrip("; ")),
                reason=reason,
            )
        if normal.allowed:
            return AccessDecision(
                AccessOutcome.ALLOWED,
                authorisation_basis=BASIS_TREATMENT_RELATIONSHIP,
                consent_profile=normal.consent_profile,
            )
        return _denied(normal, reason)

    async def _sync(self) -> None:
        views = (self._registry, self._providers.view)
        if any(view.failed for view in views):
            raise AccessCheckUnavailable("a consent view stopped; the service needs a restart")
        if not all(view.is_caught_up for view in views):
            raise AccessCheckUnavailable("the consent views are still reading their topics")
        try:
            async with asyncio.timeout(self._sync_timeout):
                await asyncio.gather(*(view.sync(self._sync_timeout) for view in views))
        except (TimeoutError, TransientError, KafkaError, ViewFailed) as exc:
            raise AccessCheckUnavailable(
                "the consent registry could not be read up to date in time"
            ) from exc

    def _unknown_requester(self, principal: Principal) -> _Normal | None:
        """The refusal of a requester whose organisation has no Mitz provider category."""
        type_code = self._providers.type_code(principal.organisation_ura)
        if provider_category(type_code, self._categories) is not None:
            return None
        detail = (
            "the requesting organisation is not in the provider directory"
            if type_code is None
            else f"the requester's provider type {type_code} has no Mitz provider category"
        )
        return _Normal(
            False, None, (CONDITION_REQUESTER_TYPE,), f"unknown requester type: {detail}"
        )

    def _normal(self, principal: Principal, patient: str) -> _Normal:
        ura = principal.organisation_ura
        type_code = self._providers.type_code(ura)
        category = provider_category(type_code, self._categories)
        if category is None:
            unknown = self._unknown_requester(principal)
            assert unknown is not None
            return unknown
        answer = answer_query(
            self._registry.get(patient),
            patient=patient,
            purpose=Purpose.TIMELINE,
            requester_ura=ura,
            provider_category=category,
            today=self._today(),
            data_category=self._data_category,
        )
        profile = _clip(f"{self._data_category}/{category}:{answer.decided_by}")
        if answer.decision is Decision.PERMIT:
            return _Normal(True, profile, (), None)
        failed: list[str] = []
        reasons: list[str] = []
        no_relationship = "no active treatment relationship with the patient"
        if not answer.treatment_relationship:
            failed.append(CONDITION_TREATMENT_RELATIONSHIP)
            reasons.append(no_relationship)
        if answer.basis == Basis.EXPLICIT_OBJECTION:
            failed.append(CONDITION_OBJECTION)
            reasons.append(f"the patient objected to sharing {self._data_category} with {category}")
        elif answer.basis != BASIS_NO_TREATMENT_RELATIONSHIP:
            failed.append(CONDITION_CONSENT)
            reasons.append(
                f"no explicit consent of the patient covers {self._data_category} for {category}"
            )
        if answer.treatment_relationship or len(failed) == 1:
            return _Normal(False, profile, tuple(failed), "; ".join(reasons))
        # Not treating the patient: told that alone, the consent's state only audited.
        return _Normal(
            False,
            profile,
            tuple(failed),
            "; ".join(reasons),
            disclosed_failed=(CONDITION_TREATMENT_RELATIONSHIP,),
            disclosed_reason=no_relationship,
        )


def _clip(text: str) -> str:
    return text[:_PROFILE_CHARS]
