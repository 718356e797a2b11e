"""What the timeline's API needs from its read model and its audit trail: the ports.

The projection (``services/timeline/adapters/store.py``, PostgreSQL) implements
:class:`TimelineReader`; the API (FHIR search, DICOMweb QIDO/WADO) only ever reads through it.
Visibility is the reader's job, so no endpoint can forget it: a study is on the timeline only
when a source's version of it was permitted for the timeline by consent (``consent-checked``,
purpose ``timeline``: an explicit consent and a verified BSN) and that consent has not been
revoked since. Whether *this requester* may see the patient's timeline at all (treatment
relationship, consent covering the requester's category, emergency access) is the access
check's job (:class:`AccessGuard`), asked before the reader.

Everything is keyed by the patient's pseudonym: a BSN never reaches this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from typing import Protocol

from shared.auth import Principal
from shared.events import AccessLogged


class EntryKind(StrEnum):
    IMAGES = "images"
    REPORT = "report"


@dataclass(frozen=True, slots=True)
class Source:
    """An institution that holds the study (sent it through beeldportaal), at its latest version."""

    sender_ura: str
    institution_name: str | None
    version: int
    received_at: datetime
    number_of_series: int
    number_of_instances: int


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """One row of the timeline: a study's images, or one report (linked by accession number)."""

    kind: EntryKind
    study_instance_uid: str
    accession_number: str | None
    study_date: date | None
    study_time: str | None
    description: str | None
    modalities: tuple[str, ...]
    sources: tuple[Source, ...]
    # Reports only: the report instance and its kind (``shared.events.common.ReportKind``).
    report_sop_instance_uid: str | None = None
    report_kind: str | None = None
    # Organisations (URA) the study was delivered to, where it is retrievable as well.
    delivered_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EntryKey:
    """Where an entry sits in the timeline's order: study date, study time and latest received
    (newest first, undated last), then Study Instance UID, kind (images before reports) and
    report UID ("" for images). A next page starts after the last entry of the one before."""

    study_date: date | None
    study_time: str | None
    received_at: datetime
    study_instance_uid: str
    kind: EntryKind
    report_sop_instance_uid: str


@dataclass(frozen=True, slots=True)
class TimelineQuery:
    """A search of one patient's timeline; newest first (study date/time, then received).

    A page is ``count`` entries from ``offset``, or, with ``after``, the ``count`` entries
    that follow that entry's place: so a study that arrives (or leaves) before it while the
    requester pages does not shift the next page, which would show an entry twice (or skip
    one). ``offset`` is ignored then."""

    patient: str  # pseudonym
    date_from: date | None = None
    date_to: date | None = None
    modalities: frozenset[str] = frozenset()
    institution: str | None = None  # a source's URA, or a case-insensitive institution name
    kind: EntryKind | None = None
    count: int = 50
    offset: int = 0
    after: EntryKey | None = None


@dataclass(frozen=True, slots=True)
class TimelinePage:
    entries: list[TimelineEntry]
    total: int
    # The place of the first entry among all ``total`` (``query.offset``, or where ``after``
    # is now), and the key of the last entry, where a next page starts.
    offset: int = 0
    last: EntryKey | None = None


@dataclass(frozen=True, slots=True)
class SeriesRow:
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    number_of_instances: int


@dataclass(frozen=True, slots=True)
class InstanceRow:
    """An instance as stored (claim check): where its exact received bytes are, their hash."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    object_key: str
    size: int
    sha256: str


class TimelineReader(Protocol):
    async def search(self, query: TimelineQuery) -> TimelinePage:
        """Visible entries of the patient, newest first, ``count`` from ``offset`` (or after
        ``after``)."""
        ...

    async def patient_of_study(self, study_instance_uid: str) -> str | None:
        """The pseudonym of a *visible* study's patient; None when it is not on any timeline."""
        ...

    async def entry(self, study_instance_uid: str) -> TimelineEntry | None:
        """The images entry of a visible study (QIDO-RS study level)."""
        ...

    async def series(self, study_instance_uid: str) -> list[SeriesRow]:
        """The series of a visible study (every source's, one row per series UID)."""
        ...

    async def instances(
        self,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[InstanceRow]:
        """Instances of a visible study, one per SOP Instance UID (any source's copy)."""
        ...


class AccessOutcome(StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"
    EMERGENCY = "emergency"


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """Whether a requester may see a patient's timeline, and on what basis (for the audit)."""

    outcome: AccessOutcome
    # e.g. "treatment-relationship" or "emergency"; None when denied before any basis.
    authorisation_basis: str | None
    # The consent that allowed it (its id) or the rule that refused it.
    consent_profile: str | None
    # For a denial: which conditions failed, in words, for the audit record.
    reason: str | None = None
    failed_conditions: tuple[str, ...] = field(default=())
    # What the requester is told of a denial when that is less (None: the above): a requester
    # without a treatment relationship learns nothing of the patient's consent, whether they
    # objected or never consented being the patient's own business.
    disclosed_reason: str | None = None
    disclosed_conditions: tuple[str, ...] | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome is not AccessOutcome.DENIED

    @property
    def told(self) -> tuple[str, tuple[str, ...]]:
        """The reason and failed conditions the requester's OperationOutcome names."""
        reason = self.disclosed_reason or self.reason or "access refused"
        conditions = self.disclosed_conditions
        return reason, self.failed_conditions if conditions is None else conditions


class AccessGuard(Protocol):
    async def check_requester(
        self, principal: Principal, *, emergency_reason: str | None = None
    ) -> AccessDecision | None:
        """The refusal that holds for ``principal`` whichever patient they ask about (None:
        none does), decided without a patient: DICOMweb asks it before looking a study up."""
        ...

    async def check(
        self,
        principal: Principal,
        patient: str,
        *,
        emergency_reason: str | None = None,
        requester_checked: bool = False,
    ) -> AccessDecision:
        """May ``principal`` see ``patient``'s (pseudonym) timeline now? ``requester_checked``:
        :meth:`check_requester` allowed this request already."""
        ...


class AuditTrail(Protocol):
    async def record(self, event: AccessLogged) -> None:
        """Append one NEN 7513 record (Kafka ``access-logged`` and PostgreSQL) before answering."""
        ...

    async def search(
        self, patient: str, since: datetime | None, until: datetime | None, limit: int
    ) -> tuple[list[AccessLogged], int]:
        """Who accessed this patient's data, newest first: at most ``limit`` records, and how
        many there are in the period."""
        ...
