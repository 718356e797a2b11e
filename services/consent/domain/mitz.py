"""Read a Mitz consent notification (a FHIR R4 Bundle as parsed JSON) into a registry fact.

The Bundle must hold exactly one ``Consent``, one ``Patient`` (with a BSN) and one
``Organization`` (with a URA), and nothing else. Every problem found is collected and raised
together as :class:`InvalidNotification`, each one shaped like a FHIR OperationOutcome issue;
nothing is returned unless the whole notification is valid. Diagnostics never quote input
values (a BSN could hide in any field), only paths, counts and the expected form.

Mapping (choices of this project, until the official Mitz profiles are adopted):

- ``Consent.status``: ``active`` registers; ``inactive`` revokes; ``entered-in-error`` revokes too
  (the consent should never have been in force). Any other status is refused.
- ``Consent.provision.type`` (``permit``/``deny``) is required to register; for a revocation it
  is optional.
- Data category: the ``Consent.category`` coding that is not LOINC (FHIR's generic
  ``59284-0`` "Patient Consent" category may stand beside it), e.g. ``GGC002``.
- Provider category: the ``Consent`` extension :data:`PROVIDER_CATEGORY_EXTENSION` with a
  ``valueCoding`` (or ``valueCode``), e.g. ``RPZAC104``. Absent = every provider category. This URL
  is the project's own, not an official Mitz or Nictiz one: change it here when Mitz's is known.
- Period: ``Consent.provision.period`` (dates; a date-time counts by its own calendar date; a
  partial date such as ``2025`` or ``2025-03`` covers the whole year or month).
- The ``Organization`` is the custodian of the notification (FHIR ``Consent.organization``), not a
  scope of the consent: Mitz consent options are per provider category, so the registered
  consent names no organisation. Its URA is returned for the caller to check and audit.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from typing import Any

from services.consent.domain.checks import NETHERLANDS
from shared.events.consent import ConsentRegistered, ConsentRevoked, Provision
from shared.identifiers import BSN_SYSTEM, URA_SYSTEM, Bsn, InvalidBsn

PROVIDER_CATEGORY_EXTENSION = (
    "https://beeldportaal.nl/fhir/StructureDefinition/consent-provider-category"
)
LOINC_SYSTEM = "http://loinc.org"
MITZ_SOURCE = "mitz"

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# Mitz category codes such as GGC002 and RPZAC104; the event fields allow at most 32 characters.
_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
_URA = re.compile(r"[0-9]{8}")
# FHIR date or dateTime: a time needs seconds and a zone (FHIR R4 dateTime).
_FHIR_DATE = re.compile(
    r"([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2})"
    r"(T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?(?:Z|[+-][0-9]{2}:[0-9]{2}))?)?)?"
)


# Python reads at most microseconds; FHIR allows any precision.
_MICROSECONDS = re.compile(r"(\.[0-9]{6})[0-9]+")


class Severity(StrEnum):
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem, as a FHIR OperationOutcome.issue (severity, code, diagnostics, expression)."""

    code: str  # FHIR IssueType: structure, required, value, code-invalid, invariant, ...
    diagnostics: str
    expression: str
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        return f"{self.expression}: {self.diagnostics}"

    def to_fhir(self) -> dict[str, Any]:
        return {
            "severity": str(self.severity),
            "code": self.code,
            "diagnostics": self.diagnostics,
            "expression": [self.expression],
        }


class InvalidNotification(ValueError):
    """The notification cannot be read; ``issues`` lists every problem found."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = tuple(issues)
        super().__init__("; ".join(str(i) for i in issues))

    def to_operation_outcome(self) -> dict[str, Any]:
        return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in self.issues]}


class NotificationKind(StrEnum):
    REGISTERED = "registered"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class MitzNotification:
    """A valid notification. ``bsn`` masks itself; pseudonymise it before it goes anywhere."""

    kind: NotificationKind
    consent_id: str
    bsn: Bsn
    organisation_ura: str
    provision: Provision | None = None
    data_category: str | None = None
    provider_category: str | None = None
    period_start: date | None = None
    period_end: date | None = None

    def to_event(
        self, patient: str, *, correlation_id: str, producer: str
    ) -> ConsentRegistered | ConsentRevoked:
        """The registry event for ``patient`` (the pseudonym of :attr:`bsn`)."""
        if self.kind is NotificationKind.REVOKED:
            return ConsentRevoked(
                consent_id=self.consent_id,
                patient=patient,
                reason="inactive in Mitz",
                correlation_id=correlation_id,
                producer=producer,
            )
        if self.provision is None or self.data_category is None:
            raise ValueError("a registration needs a provision and a data category")
        return ConsentRegistered(
            consent_id=self.consent_id,
            patient=patient,
            provision=self.provision,
            data_category=self.data_category,
            provider_category=self.provider_category,
            period_start=self.period_start,
            period_end=self.period_end,
            source=MITZ_SOURCE,
            correlation_id=correlation_id,
            producer=producer,
        )


_STATUSES = {
    "active": NotificationKind.REGISTERED,
    "inactive": NotificationKind.REVOKED,
    "entered-in-error": NotificationKind.REVOKED,
}
_KNOWN_TYPES = ("Consent", "Patient", "Organization")


@dataclass
class _Reader:
    issues: list[Issue] = field(default_factory=list)

    def issue(self, code: str, diagnostics: str, expression: str) -> None:
        self.issues.append(Issue(code, diagnostics, expression))

    def read(self, bundle: object) -> MitzNotification:
        resources = self._resources(bundle)
        consent = self._single(resources, "Consent")
        patient = self._single(resources, "Patient")
        organisation = self._single(resources, "Organization")
        bsn = self._bsn(*patient) if patient else None
        ura = self._ura(*organisation) if organisation else None
        fields = self._consent(*consent) if consent else None
        if consent and patient:
            self._check_reference(consent, "patient", patient)
        if consent and organisation:
            self._check_reference(consent, "organization", organisation)
        if self.issues:
            raise InvalidNotification(self.issues)
        if bsn is None or ura is None or fields is None:  # each would have left an issue
            raise InvalidNotification([Issue("exception", "unreadable notification", "Bundle")])
        return MitzNotification(bsn=bsn, organisation_ura=ura, **fields)

    # --- bundle ----------------------------------------------------------------------------------

    def _resources(self, bundle: object) -> dict[str, list[tuple[str, dict[str, Any], str]]]:
        """resourceType -> [(path, resource, fullUrl)] for the known types."""
        found: dict[str, list[tuple[str, dict[str, Any], str]]] = {t: [] for t in _KNOWN_TYPES}
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            self.issue("structure", "expected a FHIR Bundle", "Bundle")
            return found
        entries = bundle.get("entry")
        if not isinstance(entries, list) or not entries:
            self.issue("required", "the Bundle has no entries", "Bundle.entry")
            return found
        for i, entry in enumerate(entries):
            path = f"Bundle.entry[{i}]"
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                self.issue("structure", "the entry holds no resource", f"{path}.resource")
                continue
            kind = resource.get("resourceType")
            if kind not in _KNOWN_TYPES:
                self.issue(
                    "not-supported",
                    "only Consent, Patient and Organization resources are expected",
                    f"{path}.resource.resourceType",
                )
                continue
            full_url = entry.get("fullUrl")
            full_url = full_url if isinstance(full_url, str) else ""
            found[kind].append((f"{path}.resource", resource, full_url))
        return found

    def _single(
        self, resources: dict[str, list[tuple[str, dict[str, Any], str]]], kind: str
    ) -> tuple[str, dict[str, Any], str] | None:
        matches = resources[kind]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            self.issue("required", f"the Bundle holds no {kind}", "Bundle.entry")
        else:
            self.issue(
                "multiple-matches",
                f"the Bundle holds {len(matches)} {kind} resources; expected one",
                "Bundle.entry",
            )
        return None

    def _check_reference(
        self,
        consent: tuple[str, dict[str, Any], str],
        element: str,
        target: tuple[str, dict[str, Any], str],
    ) -> None:
        """A reference the Consent makes must point at the resource in this Bundle."""
        path, resource, _ = consent
        value = resource.get(element)
        refs = value if isinstance(value, list) else [value] if value is not None else []
        _, target_resource, full_url = target
        target_type = target_resource["resourceType"]
        accepted = {full_url} if full_url else set()
        if isinstance(target_resource.get("id"), str):
            accepted.add(f"{target_type}/{target_resource['id']}")
        for i, ref in enumerate(refs):
            where = f"{path}.{element}" + (f"[{i}]" if isinstance(value, list) else "")
            reference = ref.get("reference") if isinstance(ref, dict) else None
            if reference is not None and not isinstance(reference, str):
                self.issue("structure", "a reference must be a string", f"{where}.reference")
            elif reference is not None and reference not in accepted:
                self.issue(
                    "invariant",
                    f"the reference does not point at the Bundle's {target_type}",
                    f"{where}.reference",
                )

    # --- patient and organisation ------------------------------------------------------------

    def _identifier_values(self, path: str, resource: dict[str, Any], system: str) -> list[str]:
        identifiers = resource.get("identifier")
        if not isinstance(identifiers, list):
            return []
        values = []
        for i, identifier in enumerate(identifiers):
            if not isinstance(identifier, dict) or identifier.get("system") != system:
                continue
            value = identifier.get("value")
            if not isinstance(value, str):
                self.issue("required", "the identifier has no value", f"{path}.identifier[{i}]")
                continue
            values.append(value)
        return values

    def _single_identifier(
        self, path: str, resource: dict[str, Any], system: str, owner: str, what: str
    ) -> str | None:
        """The one identifier value of ``system``, or None with the problem reported."""
        values = self._identifier_values(path, resource, system)
        if not values:
            self.issue(
                "required",
                f"the {owner} has no identifier of system {system}",
                f"{path}.identifier",
            )
            return None
        if len(set(values)) > 1:
            self.issue(
                "multiple-matches", f"the {owner} has more than one {what}", f"{path}.identifier"
            )
            return None
        return values[0]

    def _bsn(self, path: str, resource: dict[str, Any], _url: str) -> Bsn | None:
        value = self._single_identifier(path, resource, BSN_SYSTEM, "Patient", "BSN")
        if value is None:
            return None
        try:
            return Bsn(value)
        except InvalidBsn as exc:  # its message describes the problem, never the number
            self.issue("value", f"invalid BSN: {exc}", f"{path}.identifier")
            return None

    def _ura(self, path: str, resource: dict[str, Any], _url: str) -> str | None:
        value = self._single_identifier(path, resource, URA_SYSTEM, "Organization", "URA")
        if value is None:
            return None
        if not _URA.fullmatch(value):
            self.issue("value", "a URA is exactly 8 digits", f"{path}.identifier")
            return None
        return value

    # --- consent ---------------------------------------------------------------------------------

    def _consent(self, path: str, resource: dict[str, Any], _url: str) -> dict[str, Any] | None:
        before = len(self.issues)
        consent_id = resource.get("id")
        if not isinstance(consent_id, str) or not _FHIR_ID.fullmatch(consent_id):
            self.issue(
                "required", "the Consent needs a FHIR id (1-64 of A-Z a-z 0-9 - .)", f"{path}.id"
            )
        status = resource.get("status")
        kind = _STATUSES.get(status) if isinstance(status, str) else None
        if kind is None:
            self.issue(
                "code-invalid",
                "status must be active, inactive or entered-in-error",
                f"{path}.status",
            )
        provision = self._provision(path, resource, required=kind is NotificationKind.REGISTERED)
        data_category = self._data_category(path, resource, required=kind is not None)
        provider_category = self._provider_category(path, resource)
        start, end = self._period(path, resource)
        if len(self.issues) > before:
            return None
        return {
            "kind": kind,
            "consent_id": consent_id,
            "provision": provision,
            "data_category": data_category,
            "provider_category": provider_category,
            "period_start": start,
            "period_end": end,
        }

    def _provision(
        self, path: str, resource: dict[str, Any], *, required: bool
    ) -> Provision | None:
        provision = resource.get("provision")
        kind = provision.get("type") if isinstance(provision, dict) else None
        if kind is None:
            if required:
                self.issue(
                    "required", "an active Consent needs provision.type", f"{path}.provision.type"
                )
            return None
        if kind not in ("permit", "deny"):
            self.issue(
                "code-invalid", "provision.type must be permit or deny", f"{path}.provision.type"
            )
            return None
        return Provision(kind)

    def _data_category(self, path: str, resource: dict[str, Any], *, required: bool) -> str | None:
        where = f"{path}.category"
        categories = resource.get("category")
        codes: set[str] = set()
        for concept in categories if isinstance(categories, list) else []:
            codings = concept.get("coding") if isinstance(concept, dict) else None
            for coding in codings if isinstance(codings, list) else []:
                if not isinstance(coding, dict) or coding.get("system") == LOINC_SYSTEM:
                    continue
                code = coding.get("code")
                if not isinstance(code, str) or not _CODE.fullmatch(code):
                    self.issue("code-invalid", "a category coding has no valid code", where)
                    return None
                codes.add(code)
        if len(codes) > 1:
            self.issue("multiple-matches", "the Consent names more than one data category", where)
            return None
        if not codes:
            if required:
                self.issue("required", "the Consent names no data category", where)
            return None
        return codes.pop()

    def _provider_category(self, path: str, resource: dict[str, Any]) -> str | None:
        extensions = resource.get("extension")
        matches = [
            e
            for e in (extensions if isinstance(extensions, list) else [])
            if isinstance(e, dict) and e.get("url") == PROVIDER_CATEGORY_EXTENSION
        ]
        where = f"{path}.extension('{PROVIDER_CATEGORY_EXTENSION}')"
        if not matches:
            return None
        if len(matches) > 1:
            self.issue("multiple-matches", "more than one provider category extension", where)
            return None
        extension = matches[0]
        code = extension.get("valueCode")
        coding = extension.get("valueCoding")
        if code is None and isinstance(coding, dict):
            code = coding.get("code")
        if not isinstance(code, str) or not _CODE.fullmatch(code):
            self.issue("code-invalid", "the provider category needs a valid code", where)
            return None
        return code

    def _period(self, path: str, resource: dict[str, Any]) -> tuple[date | None, date | None]:
        provision = resource.get("provision")
        period = provision.get("period") if isinstance(provision, dict) else None
        if period is None:
            return None, None
        where = f"{path}.provision.period"
        if not isinstance(period, dict):
            self.issue("structure", "the period must be a FHIR Period", where)
            return None, None
        start = self._date(period.get("start"), f"{where}.start", last=False)
        end = self._date(period.get("end"), f"{where}.end", last=True)
        if start and end and end < start:
            self.issue("invariant", "the period ends before it starts", where)
        return start, end

    def _date(self, value: object, where: str, *, last: bool) -> date | None:
        if value is None:
            return None
        match = _FHIR_DATE.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            self.issue("value", "expected a FHIR date or dateTime", where)
            return None
        year, month, day, time = int(match[1]), match[2], match[3], match[4]
        try:
            if time is not None:
                # The day it is in the Netherlands then: 2025-03-31T23:30:00Z is 1 April there.
                moment = datetime.fromisoformat(_MICROSECONDS.sub(r"\1", value))
                try:
                    return moment.astimezone(NETHERLANDS).date()
                except OverflowError:  # past the calendar's end there: "for ever" (or since)
                    return date.max if moment.year == date.max.year else date.min
            if day is not None:
                return date(year, int(month), int(day))
            if month is not None:
                m = int(month)
                return date(year, m, calendar.monthrange(year, m)[1] if last else 1)
            return date(year, 12, 31) if last else date(year, 1, 1)
        except ValueError:
            self.issue("value", "the date does not exist", where)
            return None


def parse_notification(bundle: object) -> MitzNotification:
    """Read a Mitz notification Bundle; raise :class:`InvalidNotification` listing every issue."""
    return _Reader().read(bundle)
