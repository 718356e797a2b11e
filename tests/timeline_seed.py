"""Seeding the PostgreSQL timeline read model with scenarios, as production fills it.

A :class:`~tests.contracts.timeline_reader.Study` goes in as the events ingest and consent send
(study-received, then consent's delivery and timeline decisions on it, a revocation after),
folded into a ProjectionBatch and applied by :class:`PostgresTimeline`, so the projection's own
visibility rules decide what the reader answers. Used by the reader contract on PostgreSQL and
by the timeline API's integration suite.
"""

from __future__ import annotations

from services.timeline.adapters.store import PostgresTimeline, ProjectionBatch
from services.timeline.domain.ports import TimelineReader
from shared.events import (
    Basis,
    BsnStatus,
    Decision,
    Event,
    PatientRef,
    Purpose,
    ReportKind,
    ReportRef,
    SeriesSummary,
    StudySnapshot,
)
from tests.contracts.timeline_reader import Sender, Study
from tests.factories import (
    make_consent_checked,
    make_consent_revoked,
    make_instance_ref,
    make_study,
    make_study_received,
)


def snapshot(study: Study, sender: Sender) -> StudySnapshot:
    """The study as ingest assembled it from ``sender`` (first and last received at once)."""
    assembled = make_study(
        instances=0,
        study_instance_uid=study.uid,
        version=sender.version,
        sender_ura=sender.ura,
        institution_name=sender.institution,
        patient=PatientRef(pseudonym=study.patient, bsn_status=BsnStatus.VERIFIED),
        accession_number=study.accession,
        study_date=study.study_date,
        study_time=study.study_time,
        study_description=study.description,
        modalities=study.modalities,
        new_sop_instance_uids=tuple(i.sop_instance_uid for i in study.instances),
        reports=tuple(
            ReportRef(
                sop_instance_uid=r.sop_instance_uid,
                series_instance_uid=r.series_instance_uid,
                kind=ReportKind(r.kind),
            )
            for r in study.reports
        ),
        first_received_at=sender.received_at,
        last_received_at=sender.received_at,
    )
    # make_study's ``series`` and ``instances`` are counts: the scenario's rows go in here.
    return assembled.model_copy(
        update={
            "series": tuple(
                SeriesSummary(
                    series_instance_uid=s.series_instance_uid,
                    modality=s.modality,
                    series_number=s.series_number,
                    series_description=s.series_description,
                    number_of_instances=s.number_of_instances,
                )
                for s in study.series
            ),
            "instances": tuple(
                make_instance_ref(
                    series_instance_uid=i.series_instance_uid,
                    sop_instance_uid=i.sop_instance_uid,
                    sop_class_uid=i.sop_class_uid,
                    transfer_syntax_uid=i.transfer_syntax_uid,
                    object_key=i.object_key,
                    size=i.size,
                    sha256=i.sha256,
                )
                for i in study.instances
            ),
        }
    )


def consent_of(study: Study) -> str:
    """Each study's permit names a consent of its own, so revoking it touches that study only."""
    return f"consent-{study.uid}"


def announced(study: Study) -> list[Event]:
    """Per sender: study-received, then consent's delivery and timeline decisions on it."""
    events: list[Event] = []
    for sender in study.senders:
        snap = snapshot(study, sender)
        received = make_study_received(study=snap)
        common = {"study": snap, "occurred_at": received.occurred_at}
        if study.permitted:
            timeline = {
                "decision": Decision.PERMIT,
                "basis": Basis.EXPLICIT_CONSENT,
                "decided_by": consent_of(study),
            }
        else:
            timeline = {
                "decision": Decision.DENY,
                "basis": Basis.NO_EXPLICIT_CONSENT,
                "decided_by": "rule:no-explicit-consent",
            }
        events += [
            received,
            make_consent_checked(purpose=Purpose.DELIVERY, **common),
            make_consent_checked(purpose=Purpose.TIMELINE, **timeline, **common),
        ]
    return events


class ProjectedTimeline:
    """Seeds by applying the scenarios' events, revocations in a later batch (as they come)."""

    def __init__(self, store: PostgresTimeline) -> None:
        self.store = store

    @property
    def reader(self) -> TimelineReader:
        return self.store

    async def seed(self, *studies: Study) -> None:
        decisions = ProjectionBatch()
        for event in (e for study in studies for e in announced(study)):
            decisions.add(event)
        await self.store.apply(decisions)
        revocations = ProjectionBatch()
        for study in studies:
            if study.revoked:
                revocations.add(
                    make_consent_revoked(patient=study.patient, consent_id=consent_of(study))
                )
        await self.store.apply(revocations)
