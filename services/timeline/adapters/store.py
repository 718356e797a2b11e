"""The timeline read model in PostgreSQL: the projection's writes and the API's TimelineReader.

Write side (the projection, ``services/timeline/entrypoints/projection.py``): a batch of events
is folded into a :class:`ProjectionBatch` and applied by :meth:`PostgresTimeline.apply` in ONE
transaction. Every column group keeps the maximum of a total order over the events that feed
it, so the result does not depend on the order events arrive in (topics interleave differently
on every replay), an event applied twice changes nothing, and a rebuild from the topics yields
identical tables:

- a source (study, sender URA) shows its *snapshot* with the greatest
  ``(version, last_received_at, recipient_ura)`` of any study-received or consent-checked
  (ingest assembles a study per recipient, so two assemblies can share a version number); its
  series, instances and reports are replaced whenever that snapshot advances;
- its *decision* is the timeline consent-checked with the greatest
  ``(snapshot key, deny before permit, decided_by)``; delivery decisions are ignored;
- a revocation is kept per (patient, consent id), earliest ``occurred_at``; deliveries per
  (study, destination, endpoint), greatest version and time;
- the study rows (``timeline_studies``) and the timeline's entries (``timeline_entries``, all a
  search returns, precomputed) of every study the batch touched are derived again from their
  sources, reports and deliveries in the same transaction.

A batch is COPYed into staging tables and applied with a fixed number of set-based statements.

Visibility (the rule :class:`~services.timeline.domain.ports.TimelineReader` promises): a source
is on the timeline exactly when

1. its latest timeline decision is a permit (consent permits the timeline only on an explicit
   consent and a verified BSN, so a source without a pseudonym is never visible),
2. that decision was taken for the very snapshot shown (same version, assembly and patient): a
   newer version waits, invisible, for its own decision, so nothing consent has not seen is
   shown, and
3. the consent it names (``decided_by``) was not revoked for that patient. Revocation is final
   for a consent id (``services/consent/domain/registry.py``), so it withdraws the permit
   whichever of the two is applied first; a later permit, which names a consent in force,
   brings the source back.

A study is visible when its primary source is (visible sources first, then the first received,
then the lowest URA), whose attributes it shows; it lists its visible sources of the same
patient (a Study UID claimed for two patients, a data error, shows only under the first).
Images are one entry per study (none for a study of reports only, though ``entry()`` still
answers for it); each report instance (SR, encapsulated PDF) is an entry of its own, with the
study's accession number, date, description and modalities, listing the visible sources that
hold it. ``series`` and ``instances`` answer for visible studies only, from listed sources, one
row per UID (the first received source's copy).

Search order, newest first: study date, study time, latest received, then Study UID, images
before reports, report UID (a total order, so pages never overlap). Filters: dates on the study
date (an undated study matches no date filter), modalities intersecting the study's, an
institution as a listed source's URA or case-insensitive name, the entry kind.

Projection transactions take one advisory lock, so replicas apply their batches one at a time:
a revocation (keyed by patient) and a decision (keyed by study) consumed by two replicas can
then never both miss each other, and the derived study rows never go stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services.timeline.domain.ports import (
    EntryKey,
    EntryKind,
    InstanceRow,
    SeriesRow,
    Source,
    TimelineEntry,
    TimelinePage,
    TimelineQuery,
)
from shared.errors import FatalError, TransientError
from shared.events import (
    Basis,
    ConsentChecked,
    ConsentRevoked,
    Decision,
    Delivered,
    Event,
    Purpose,
    StudyReceived,
    StudySnapshot,
)

# The tables the projection owns (a rebuild replaces them; never the append-only access_log).
PROJECTION_TABLES = (
    "timeline_sources",
    "timeline_series",
    "timeline_instances",
    "timeline_reports",
    "timeline_deliveries",
    "timeline_revocations",
    "timeline_studies",
    "timeline_entries",
)
# pg_advisory_xact_lock key serialising projection transactions across replicas.
PROJECTION_LOCK = 0x7153_7A11
# DICOM's multi-value separator: it cannot occur inside a CS value such as a modality.
_VM = "\\"

SourceKey = tuple[str, str]
SnapshotKey = tuple[int, datetime, str]
DecisionKey = tuple[int, datetime, str, bool, str]
# (study, sender, version, last_received_at, recipient, patient pseudonym)
SnapshotRef = tuple[str, str, int, datetime, str, str | None]


def snapshot_key(study: StudySnapshot) -> SnapshotKey:
    """The order of a source's snapshots: version, then assembly (its last instance, recipient)."""
    return (study.version, study.last_received_at, study.recipient_ura)


def decision_key(checked: ConsentChecked) -> DecisionKey:
    """The order of a source's timeline decisions: its snapshot's, then deny before permit."""
    return (*snapshot_key(checked.study), checked.decision is Decision.DENY, checked.decided_by)


@dataclass
class ProjectionBatch:
    """A batch of events reduced to what each row keeps: the maxima, per natural key."""

    snapshots: dict[SourceKey, StudySnapshot] = field(default_factory=dict)
    decisions: dict[SourceKey, ConsentChecked] = field(default_factory=dict)
    revocations: dict[tuple[str, str], datetime] = field(default_factory=dict)
    deliveries: dict[tuple[str, str, str], tuple[int, datetime]] = field(default_factory=dict)

    def add(self, event: Event) -> str:
        """Fold one event in; returns "projected", or "ignored" for a delivery decision."""
        if isinstance(event, StudyReceived):
            self._snapshot(event.study)
        elif isinstance(event, ConsentChecked):
            if event.purpose is not Purpose.TIMELINE:
                return "ignored"
            self._snapshot(event.study)
            key = (event.study.study_instance_uid, event.study.sender_ura)
            held = self.decisions.get(key)
            if held is None or decision_key(event) > decision_key(held):
                self.decisions[key] = event
        elif isinstance(event, ConsentRevoked):
            rkey = (event.patient, event.consent_id)
            at = self.revocations.get(rkey)
            self.revocations[rkey] = event.occurred_at if at is None else min(at, event.occurred_at)
        elif isinstance(event, Delivered):
            dkey = (event.study_instance_uid, event.destination_ura, event.endpoint_id)
            version, at = self.deliveries.get(dkey, (event.study_version, event.delivered_at))
            self.deliveries[dkey] = (
                max(version, event.study_version),
                max(at, event.delivered_at),
            )
        else:
            raise TypeError(f"the timeline does not project {type(event).__name__}")
        return "projected"

    def _snapshot(self, study: StudySnapshot) -> None:
        key = (study.study_instance_uid, study.sender_ura)
        held = self.snapshots.get(key)
        if held is None or snapshot_key(study) > snapshot_key(held):
            self.snapshots[key] = study

    def __bool__(self) -> bool:
        return bool(self.snapshots or self.decisions or self.revocations or self.deliveries)


def number_of_images(study: StudySnapshot) -> int:
    if not study.reports:  # most studies: no walk over the instances
        return len(study.instances)
    reports = {r.sop_instance_uid for r in study.reports}
    return sum(1 for i in study.instances if i.sop_instance_uid not in reports)


# --- write side ---------------------------------------------------------------------------------
#
# A batch is COPYed into per-session staging tables (cleared at commit), then applied with a
# fixed number of set-based statements, whatever the batch size.

STAGING_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS timeline_stage_snapshots (
    u text COLLATE "C", s text COLLATE "C", v int, lra timestamptz, r text COLLATE "C",
    fra timestamptz, p text, acc text, d date, tm text, descr text, inst text, m text, ns int,
    ni int, nim int) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS timeline_stage_series (
    u text, s text, series text, modality text, num int, descr text, n int)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS timeline_stage_instances (
    u text, s text, sop text, series text, cls text, ts text, key text, size bigint, sha text)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS timeline_stage_reports (
    u text, s text, sop text, series text, kind text) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS timeline_stage_decisions (
    u text COLLATE "C", s text COLLATE "C", v int, lra timestamptz, r text COLLATE "C",
    permitted bool, basis text, by text COLLATE "C", p text) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS timeline_stage_revocations (p text, c text, at timestamptz)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS timeline_stage_deliveries (
    u text, dest text, endpoint text, v int, at timestamptz) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS timeline_stage_advanced (u text, s text) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS timeline_stage_touched (u text) ON COMMIT DELETE ROWS;
"""

_STAGE_COPY = {
    "snapshots": "COPY timeline_stage_snapshots FROM STDIN",
    "series": "COPY timeline_stage_series FROM STDIN",
    "instances": "COPY timeline_stage_instances FROM STDIN",
    "reports": "COPY timeline_stage_reports FROM STDIN",
    "decisions": "COPY timeline_stage_decisions FROM STDIN",
    "revocations": "COPY timeline_stage_revocations FROM STDIN",
    "deliveries": "COPY timeline_stage_deliveries FROM STDIN",
}

_UPSERT_REVOCATIONS = """
INSERT INTO timeline_revocations AS t (patient_pseudonym, consent_id, revoked_at)
SELECT p, c, at FROM timeline_stage_revocations
ON CONFLICT (patient_pseudonym, consent_id) DO UPDATE SET revoked_at = EXCLUDED.revoked_at
WHERE EXCLUDED.revoked_at < t.revoked_at
"""

# A snapshot replaces the source's when its key is greater; the advanced sources are noted.
_UPSERT_SNAPSHOTS = """
WITH advanced AS (
    INSERT INTO timeline_sources AS t (
        study_instance_uid, sender_ura, version, last_received_at, recipient_ura,
        first_received_at, patient_pseudonym, accession_number, study_date, study_time,
        study_description, institution_name, modalities, number_of_series, number_of_instances,
        number_of_images)
    SELECT u, s, v, lra, r, fra, p, acc, d, tm, descr, inst,
           CASE WHEN m = '' THEN '{}'::text[] ELSE string_to_array(m, E'\\\\') END, ns, ni, nim
    FROM timeline_stage_snapshots
    ON CONFLICT (study_instance_uid, sender_ura) DO UPDATE SET
        version = EXCLUDED.version,
        last_received_at = EXCLUDED.last_received_at,
        recipient_ura = EXCLUDED.recipient_ura,
        first_received_at = EXCLUDED.first_received_at,
        patient_pseudonym = EXCLUDED.patient_pseudonym,
        accession_number = EXCLUDED.accession_number,
        study_date = EXCLUDED.study_date,
        study_time = EXCLUDED.study_time,
        study_description = EXCLUDED.study_description,
        institution_name = EXCLUDED.institution_name,
        modalities = EXCLUDED.modalities,
        number_of_series = EXCLUDED.number_of_series,
        number_of_instances = EXCLUDED.number_of_instances,
        number_of_images = EXCLUDED.number_of_images
    WHERE (EXCLUDED.version, EXCLUDED.last_received_at, EXCLUDED.recipient_ura)
        > (t.version, t.last_received_at, t.recipient_ura)
    RETURNING study_instance_uid, sender_ura
)
INSERT INTO timeline_stage_advanced SELECT * FROM advanced
"""

# The children of an advanced source are its new snapshot's.
_REPLACE_CHILDREN = """
DELETE FROM timeline_series t USING timeline_stage_advanced a
WHERE t.study_instance_uid = a.u AND t.sender_ura = a.s;
DELETE FROM timeline_instances t USING timeline_stage_advanced a
WHERE t.study_instance_uid = a.u AND t.sender_ura = a.s;
DELETE FROM timeline_reports t USING timeline_stage_advanced a
WHERE t.study_instance_uid = a.u AND t.sender_ura = a.s;
INSERT INTO timeline_series
SELECT x.* FROM timeline_stage_series x JOIN timeline_stage_advanced a USING (u, s);
INSERT INTO timeline_instances
SELECT x.* FROM timeline_stage_instances x JOIN timeline_stage_advanced a USING (u, s);
INSERT INTO timeline_reports
SELECT x.* FROM timeline_stage_reports x JOIN timeline_stage_advanced a USING (u, s);
INSERT INTO timeline_stage_touched SELECT u FROM timeline_stage_advanced
"""

# A decision replaces the source's when its key is greater; a permit naming a revoked consent
# is withdrawn at once.
_UPDATE_DECISIONS = """
WITH changed AS (
    UPDATE timeline_sources AS t SET
        decision_version = x.v,
        decision_last_received_at = x.lra,
        decision_recipient_ura = x.r,
        permitted = x.permitted,
        basis = x.basis,
        decided_by = x.by,
        decision_patient = x.p,
        withdrawn = x.permitted AND EXISTS (
            SELECT 1 FROM timeline_revocations rv
            WHERE rv.patient_pseudonym = x.p AND rv.consent_id = x.by)
    FROM timeline_stage_decisions x
    WHERE t.study_instance_uid = x.u AND t.sender_ura = x.s
      AND (t.decision_version IS NULL
           OR (x.v, x.lra, x.r, NOT x.permitted, x.by)
              > (t.decision_version, t.decision_last_received_at, t.decision_recipient_ura,
                 NOT t.permitted, t.decided_by))
    RETURNING t.study_instance_uid
)
INSERT INTO timeline_stage_touched SELECT study_instance_uid FROM changed
"""

# A revocation withdraws every permit naming its consent, applied before or in this batch.
_WITHDRAW = """
WITH changed AS (
    UPDATE timeline_sources AS t SET withdrawn = true
    FROM timeline_stage_revocations x
    WHERE t.decision_patient = x.p AND t.decided_by = x.c AND t.permitted AND NOT t.withdrawn
    RETURNING t.study_instance_uid
)
INSERT INTO timeline_stage_touched SELECT study_instance_uid FROM changed
"""

_UPSERT_DELIVERIES = """
WITH changed AS (
    INSERT INTO timeline_deliveries AS t (study_instance_uid, destination_ura, endpoint_id,
                                          study_version, delivered_at)
    SELECT u, dest, endpoint, v, at FROM timeline_stage_deliveries
    ON CONFLICT (study_instance_uid, destination_ura, endpoint_id) DO UPDATE SET
        study_version = GREATEST(t.study_version, EXCLUDED.study_version),
        delivered_at = GREATEST(t.delivered_at, EXCLUDED.delivered_at)
    WHERE EXCLUDED.study_version > t.study_version OR EXCLUDED.delivered_at > t.delivered_at
    RETURNING study_instance_uid
)
INSERT INTO timeline_stage_touched SELECT study_instance_uid FROM changed
"""

# Both refreshes start from the touched Study UIDs and reach every table through its primary
# key (a lateral lookup per UID), so a batch costs what it touches, whatever the tables hold.
# Filtering the tables with ``= ANY(uids)`` instead let the planner scan them whole: during a
# rebuild the freshly filled tables have no statistics, and a scan per batch made the replay
# quadratic (``make bench-timeline``: 180 ms of a 300 ms batch at 10,000 studies).
_TOUCHED_UIDS = "(SELECT DISTINCT u FROM unnest({uids}) AS x(u))"

# The study rows of ``uids`` recomputed from their sources (see the module docstring).
_REFRESH_STUDIES = """
INSERT INTO timeline_studies AS t (
    study_instance_uid, patient_pseudonym, accession_number, study_date, study_time,
    study_description, modalities, received_at, has_images, visible)
SELECT p.study_instance_uid, p.patient_pseudonym, p.accession_number, p.study_date,
       p.study_time, p.study_description, COALESCE(l.modalities, p.modalities),
       COALESCE(l.received_at, p.last_received_at), COALESCE(l.has_images, p.number_of_images > 0),
       p.visible
FROM {touched} AS touched
CROSS JOIN LATERAL (
    SELECT s.*
    FROM timeline_sources s
    WHERE s.study_instance_uid = touched.u
    ORDER BY s.visible DESC, s.first_received_at, s.sender_ura
    LIMIT 1
) p
LEFT JOIN LATERAL (
    SELECT max(s.last_received_at) AS received_at,
           bool_or(s.number_of_images > 0) AS has_images,
           ARRAY(SELECT DISTINCT m COLLATE "C"
                 FROM timeline_sources s2, unnest(s2.modalities) AS m
                 WHERE s2.study_instance_uid = p.study_instance_uid AND s2.visible
                   AND s2.patient_pseudonym = p.patient_pseudonym
                 ORDER BY 1) AS modalities
    FROM timeline_sources s
    WHERE s.study_instance_uid = p.study_instance_uid AND s.visible
      AND s.patient_pseudonym = p.patient_pseudonym
) l ON p.visible
ON CONFLICT (study_instance_uid) DO UPDATE SET
    patient_pseudonym = EXCLUDED.patient_pseudonym,
    accession_number = EXCLUDED.accession_number,
    study_date = EXCLUDED.study_date,
    study_time = EXCLUDED.study_time,
    study_description = EXCLUDED.study_description,
    modalities = EXCLUDED.modalities,
    received_at = EXCLUDED.received_at,
    has_images = EXCLUDED.has_images,
    visible = EXCLUDED.visible
WHERE (t.patient_pseudonym, t.accession_number, t.study_date, t.study_time, t.study_description,
       t.modalities, t.received_at, t.has_images, t.visible)
    IS DISTINCT FROM
      (EXCLUDED.patient_pseudonym, EXCLUDED.accession_number, EXCLUDED.study_date,
       EXCLUDED.study_time, EXCLUDED.study_description, EXCLUDED.modalities,
       EXCLUDED.received_at, EXCLUDED.has_images, EXCLUDED.visible)
"""


# The holders of each entry of the listed sources (a CTE of both entry derivations): every
# listed source holds its study's images entry, and an entry per report instance it holds.
_HOLDERS = """), holders AS (
    SELECT l.*, 'images'::text AS kind, ''::text AS sop, NULL::text AS report_kind
    FROM listed l
    UNION ALL
    SELECT l.*, 'report'::text, r.sop_instance_uid, r.kind
    FROM listed l JOIN timeline_reports r
      ON r.study_instance_uid = l.study_instance_uid AND r.sender_ura = l.sender_ura
"""

# The entries of ``uids`` recomputed from their study rows, listed sources, reports and
# deliveries; entries of studies no longer visible (or reports no longer held) are deleted.
_REFRESH_ENTRIES = """
WITH listed AS (
    SELECT s.study_instance_uid, s.sender_ura, s.institution_name, s.version,
           s.last_received_at, s.number_of_series, s.number_of_instances, s.first_received_at
    FROM {touched} AS touched
    JOIN timeline_studies st ON st.study_instance_uid = touched.u AND st.visible
    CROSS JOIN LATERAL (
        SELECT s.* FROM timeline_sources s
        WHERE s.study_instance_uid = st.study_instance_uid
          AND s.visible AND s.patient_pseudonym = st.patient_pseudonym
    ) s
{holders}), fresh AS (
    SELECT st.study_instance_uid, h.kind, h.sop AS report_sop_instance_uid,
           min(h.report_kind) AS report_kind, (h.kind = 'report' OR st.has_images) AS searchable,
           st.patient_pseudonym, st.accession_number, st.study_date, st.study_time,
           st.study_description, st.modalities, st.received_at,
           array_agg(h.sender_ura ORDER BY h.first_received_at, h.sender_ura) AS source_uras,
           array_agg(h.institution_name ORDER BY h.first_received_at, h.sender_ura)
               AS source_names,
           array_agg(h.version ORDER BY h.first_received_at, h.sender_ura) AS source_versions,
           array_agg(h.last_received_at ORDER BY h.first_received_at, h.sender_ura)
               AS source_received_at,
           array_agg(h.number_of_series ORDER BY h.first_received_at, h.sender_ura)
               AS source_series,
           array_agg(h.number_of_instances ORDER BY h.first_received_at, h.sender_ura)
               AS source_instances,
           array_agg(h.sender_ura ORDER BY h.first_received_at, h.sender_ura)
               || array_agg(lower(h.institution_name) ORDER BY h.first_received_at, h.sender_ura)
               AS institution_keys,
           ARRAY(SELECT DISTINCT d.destination_ura FROM timeline_deliveries d
                 WHERE d.study_instance_uid = st.study_instance_uid ORDER BY 1) AS delivered_to
    FROM holders h JOIN timeline_studies st ON st.study_instance_uid = h.study_instance_uid
    GROUP BY st.study_instance_uid, h.kind, h.sop
), gone AS (
    DELETE FROM timeline_entries e
    USING {touched} AS touched
    WHERE e.study_instance_uid = touched.u
      AND NOT EXISTS (
          SELECT 1 FROM fresh f
          WHERE f.study_instance_uid = e.study_instance_uid AND f.kind = e.kind
            AND f.report_sop_instance_uid = e.report_sop_instance_uid)
)
INSERT INTO timeline_entries AS t (
    study_instance_uid, kind, report_sop_instance_uid, report_kind, searchable,
    patient_pseudonym, accession_number, study_date, study_time, study_description, modalities,
    received_at, source_uras, source_names, source_versions, source_received_at, source_series,
    source_instances, institution_keys, delivered_to)
SELECT * FROM fresh
ON CONFLICT (study_instance_uid, kind, report_sop_instance_uid) DO UPDATE SET
    report_kind = EXCLUDED.report_kind,
    searchable = EXCLUDED.searchable,
    patient_pseudonym = EXCLUDED.patient_pseudonym,
    accession_number = EXCLUDED.accession_number,
    study_date = EXCLUDED.study_date,
    study_time = EXCLUDED.study_time,
    study_description = EXCLUDED.study_description,
    modalities = EXCLUDED.modalities,
    received_at = EXCLUDED.received_at,
    source_uras = EXCLUDED.source_uras,
    source_names = EXCLUDED.source_names,
    source_versions = EXCLUDED.source_versions,
    source_received_at = EXCLUDED.source_received_at,
    source_series = EXCLUDED.source_series,
    source_instances = EXCLUDED.source_instances,
    institution_keys = EXCLUDED.institution_keys,
    delivered_to = EXCLUDED.delivered_to
WHERE ROW(t.*) IS DISTINCT FROM ROW(EXCLUDED.*)
"""


# For a list of Study UIDs (``%(uids)s``), and for the batch's touched studies.
_GIVEN = _TOUCHED_UIDS.format(uids="%(uids)s::text[]")
REFRESH_STUDIES = _REFRESH_STUDIES.format(touched=_GIVEN)
REFRESH_ENTRIES = _REFRESH_ENTRIES.format(touched=_GIVEN, holders=_HOLDERS)
_STAGED = _TOUCHED_UIDS.format(uids="ARRAY(SELECT u FROM timeline_stage_touched)")
_REFRESH_TOUCHED = ";\n".join(
    (
        _REFRESH_STUDIES.format(touched=_STAGED),
        _REFRESH_ENTRIES.format(touched=_STAGED, holders=_HOLDERS),
    )
)

# The rebuild's derivation of every study at once into the EMPTY derived tables, run in this
# order (entries read the study rows): the rows REFRESH_STUDIES and then REFRESH_ENTRIES give
# for every Study UID of ``timeline_sources``, with whole-table joins, sorts and aggregates
# instead of a lookup per study. ``tests/integration/timeline/test_derive_all.py`` holds the
# two equal; a change to either side's rules must be made to both.
DERIVE_STUDIES = """
INSERT INTO timeline_studies (
    study_instance_uid, patient_pseudonym, accession_number, study_date, study_time,
    study_description, modalities, received_at, has_images, visible)
WITH primaries AS (
    SELECT DISTINCT ON (s.study_instance_uid) s.*
    FROM timeline_sources s
    ORDER BY s.study_instance_uid, s.visible DESC, s.first_received_at, s.sender_ura
), listed AS (
    -- Only a visible primary source has visible sources of its patient.
    SELECT s.study_instance_uid, s.last_received_at, s.number_of_images, s.modalities
    FROM primaries p
    JOIN timeline_sources s ON s.study_instance_uid = p.study_instance_uid
     AND s.visible AND s.patient_pseudonym = p.patient_pseudonym
), aggregated AS (
    SELECT study_instance_uid, max(last_received_at) AS received_at,
           bool_or(number_of_images > 0) AS has_images
    FROM listed GROUP BY study_instance_uid
), modalities AS (
    SELECT l.study_instance_uid,
           array_agg(DISTINCT m COLLATE "C" ORDER BY m COLLATE "C") AS modalities
    FROM listed l, unnest(l.modalities) AS m
    GROUP BY l.study_instance_uid
)
SELECT p.study_instance_uid, p.patient_pseudonym, p.accession_number, p.study_date,
       p.study_time, p.study_description,
       CASE WHEN p.visible THEN COALESCE(mo.modalities, '{}') ELSE p.modalities END,
       COALESCE(a.received_at, p.last_received_at), COALESCE(a.has_images, p.number_of_images > 0),
       p.visible
FROM primaries p
LEFT JOIN aggregated a ON a.study_instance_uid = p.study_instance_uid
LEFT JOIN modalities mo ON mo.study_instance_uid = p.study_instance_uid
"""
DERIVE_ENTRIES = (
    """
INSERT INTO timeline_entries (
    study_instance_uid, kind, report_sop_instance_uid, report_kind, searchable,
    patient_pseudonym, accession_number, study_date, study_time, study_description, modalities,
    received_at, source_uras, source_names, source_versions, source_received_at, source_series,
    source_instances, institution_keys, delivered_to)
WITH listed AS (
    SELECT s.study_instance_uid, s.sender_ura, s.institution_name, s.version,
           s.last_received_at, s.number_of_series, s.number_of_instances, s.first_received_at
    FROM timeline_studies st
    JOIN timeline_sources s ON s.study_instance_uid = st.study_instance_uid
     AND s.visible AND s.patient_pseudonym = st.patient_pseudonym
    WHERE st.visible
"""
    + _HOLDERS
    + """), grouped AS (
    -- One row per entry; a window's aggregates take its rows in the window's order, so the
    -- partition is sorted once rather than once per ordered aggregate (PostgreSQL 15).
    SELECT * FROM (
        SELECT h.study_instance_uid, h.kind, h.sop, row_number() OVER w AS n,
               min(h.report_kind) OVER w AS report_kind,
               array_agg(h.sender_ura) OVER w AS source_uras,
               array_agg(h.institution_name) OVER w AS source_names,
               array_agg(h.version) OVER w AS source_versions,
               array_agg(h.last_received_at) OVER w AS source_received_at,
               array_agg(h.number_of_series) OVER w AS source_series,
               array_agg(h.number_of_instances) OVER w AS source_instances,
               array_agg(lower(h.institution_name)) OVER w AS lower_names
        FROM holders h
        WINDOW w AS (PARTITION BY h.study_instance_uid, h.kind, h.sop
                     ORDER BY h.first_received_at, h.sender_ura
                     ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
    ) entry
    WHERE n = 1
), delivered AS (
    SELECT d.study_instance_uid,
           array_agg(DISTINCT d.destination_ura ORDER BY d.destination_ura) AS delivered_to
    FROM timeline_deliveries d
    GROUP BY d.study_instance_uid
)
SELECT g.study_instance_uid, g.kind, g.sop, g.report_kind, (g.kind = 'report' OR st.has_images),
       st.patient_pseudonym, st.accession_number, st.study_date, st.study_time,
       st.study_description, st.modalities, st.received_at, g.source_uras, g.source_names,
       g.source_versions, g.source_received_at, g.source_series, g.source_instances,
       g.source_uras || g.lower_names, COALESCE(d.delivered_to, '{}')
FROM grouped g
JOIN timeline_studies st ON st.study_instance_uid = g.study_instance_uid
LEFT JOIN delivered d ON d.study_instance_uid = g.study_instance_uid
"""
)


# SQLSTATE classes of the connection's and the server's state (connection exception,
# insufficient resources, operator intervention, system error): their messages quote no data.
_STATE_CLASSES = frozenset({"08", "53", "57", "58"})


def database_error(exc: psycopg.Error) -> str:
    """What an error, a log line or an answer may say of a PostgreSQL error: its kind and
    SQLSTATE, and its message only where that quotes no data (libpq's own, and the classes of
    :data:`_STATE_CLASSES`). The DETAIL and CONTEXT lines, and other messages ('invalid input
    syntax for type date: "..."', 'Failing row contains (...)'), may quote a row's values, a
    patient's among them: raise with ``from None``, so no traceback shows them either."""
    kind, state = type(exc).__name__, exc.sqlstate
    if state is None:  # not the server's: no connection, a broken one, the pool's timeout
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"{kind}: {first}" if first else kind
    if state[:2] in _STATE_CLASSES and exc.diag.message_primary:
        return f"{kind} (SQLSTATE {state}): {exc.diag.message_primary}"
    return f"{kind} (SQLSTATE {state})"


def _stored(text: str | None) -> str | None:
    """``text`` as a PostgreSQL text column can hold it: a NUL character, which events from
    before ingest replaced control characters (2026-11-28) may carry in a description, as a
    space, as ingest now has it."""
    return text.replace("\x00", " ") if text and "\x00" in text else text


def snapshot_row(study: StudySnapshot) -> tuple[Any, ...]:
    """A snapshot's row of the snapshots staging table."""
    return (
        study.study_instance_uid,
        study.sender_ura,
        study.version,
        study.last_received_at,
        study.recipient_ura,
        study.first_received_at,
        study.patient.pseudonym,
        _stored(study.accession_number),
        study.study_date,
        # Ordered as text: in the standard form, as ingest now writes it (events from before
        # 2026-11-28 may carry an ACR-NEMA "10:15:00").
        _stored(study.study_time.replace(":", "")) if study.study_time else None,
        _stored(study.study_description),
        _stored(study.institution_name),
        _stored(_VM.join(study.modalities)),
        len(study.series),
        len(study.instances),
        number_of_images(study),
    )


# --- read side ----------------------------------------------------------------------------------

_ENTRY_COLUMNS = """
kind, study_instance_uid, report_sop_instance_uid, report_kind, accession_number, study_date,
study_time, study_description, modalities, source_uras, source_names, source_versions,
source_received_at, source_series, source_instances, delivered_to
"""

# A patient's timeline, newest first: the index's order (timeline_entries_search), so the scan
# needs no sort. After the patient, each column with its order and its type; NULLs come last in
# each (the descending ones say so; ascending puts them last).
_ORDER_COLUMNS = (
    ("study_date", "DESC NULLS LAST", "date"),
    ("study_time", "DESC NULLS LAST", "text"),
    ("received_at", "DESC", "timestamptz"),  # NOT NULL
    ("study_instance_uid", "", "text"),
    ("kind", "", "text"),
    ("report_sop_instance_uid", "", "text"),
)
_NEWEST_FIRST_OF_PATIENT = ", ".join(f"{c} {order}".strip() for c, order, _ in _ORDER_COLUMNS)
_NEWEST_FIRST = f"patient_pseudonym, {_NEWEST_FIRST_OF_PATIENT}"

_ENTRY = f"""
SELECT {_ENTRY_COLUMNS} FROM timeline_entries
WHERE study_instance_uid = %s AND kind = 'images'
"""

_PATIENT_OF_STUDY = """
SELECT patient_pseudonym FROM timeline_studies WHERE study_instance_uid = %s AND visible
"""

# The listed sources of one visible study (alias ``s``), for series/instances.
_LISTED = """
FROM timeline_studies st
JOIN timeline_sources s ON s.study_instance_uid = st.study_instance_uid
     AND s.visible AND s.patient_pseudonym = st.patient_pseudonym
"""

_SERIES = f"""
WITH listed AS (
    SELECT s.sender_ura, s.first_received_at
    {_LISTED}
    WHERE st.study_instance_uid = %(study)s AND st.visible
), copies AS (
    SELECT DISTINCT i.series_instance_uid, i.sop_instance_uid
    FROM listed l JOIN timeline_instances i
      ON i.study_instance_uid = %(study)s AND i.sender_ura = l.sender_ura
), counted AS (
    SELECT series_instance_uid, count(*) AS n FROM copies GROUP BY series_instance_uid
)
SELECT c.series_instance_uid, se.modality, se.series_number, se.series_description, c.n
FROM counted c
LEFT JOIN LATERAL (
    SELECT se.modality, se.series_number, se.series_description
    FROM listed l JOIN timeline_series se
      ON se.study_instance_uid = %(study)s AND se.sender_ura = l.sender_ura
     AND se.series_instance_uid = c.series_instance_uid
    ORDER BY l.first_received_at, l.sender_ura
    LIMIT 1
) se ON true
ORDER BY se.series_number NULLS LAST, c.series_instance_uid
"""

_INSTANCES = f"""
SELECT * FROM (
    SELECT DISTINCT ON (i.sop_instance_uid)
           i.series_instance_uid, i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid,
           i.object_key, i.size, i.sha256
    {_LISTED}
    JOIN timeline_instances i ON i.study_instance_uid = s.study_instance_uid
         AND i.sender_ura = s.sender_ura
    WHERE st.study_instance_uid = %(study)s AND st.visible {{instance_filters}}
    ORDER BY i.sop_instance_uid, s.first_received_at, s.sender_ura
) one_copy
ORDER BY series_instance_uid, sop_instance_uid
"""


_KINDS = {kind.value: kind for kind in EntryKind}


def _entry(row: tuple[Any, ...]) -> TimelineEntry:
    """A row of ``_ENTRY_COLUMNS`` (tuples: the search is on the hot path)."""
    (kind, uid, report_uid, report_kind, accession, study_date, study_time, description) = row[:8]
    (modalities, uras, names, versions, received, series, instances, delivered) = row[8:16]
    return TimelineEntry(
        kind=_KINDS[kind],
        study_instance_uid=uid,
        accession_number=accession,
        study_date=study_date,
        study_time=study_time,
        description=description,
        modalities=tuple(modalities),
        sources=tuple(map(Source, uras, names, versions, received, series, instances)),
        report_sop_instance_uid=report_uid or None,
        report_kind=report_kind,
        delivered_to=tuple(delivered),
    )


def _after_sql() -> str:
    """The rows strictly after the key ``%(after_<column>)s`` in ``_NEWEST_FIRST``'s order: a
    greater column decides, an equal one (NULL equals NULL) hands on to the next."""
    clause = "false"
    for column, order, cast in reversed(_ORDER_COLUMNS):
        key = f"%(after_{column})s::{cast}"
        beyond = f"{column} {'<' if order.startswith('DESC') else '>'} {key} OR {column} IS NULL"
        clause = (
            f"(({key} IS NOT NULL AND ({beyond})) "
            f"OR ({column} IS NOT DISTINCT FROM {key} AND {clause}))"
        )
    return clause


_AFTER = _after_sql()


def _search_sql(query: TimelineQuery, *, count_only: bool = False) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any] = {"patient": query.patient}
    where = ["patient_pseudonym = %(patient)s", "searchable"]
    if query.date_from is not None:
        where.append("study_date >= %(date_from)s")
        params["date_from"] = query.date_from
    if query.date_to is not None:
        where.append("study_date <= %(date_to)s")
        params["date_to"] = query.date_to
    if query.modalities:
        where.append("modalities && %(modalities)s::text[]")
        params["modalities"] = sorted(query.modalities)
    if query.institution is not None:
        where.append("lower(%(institution)s) = ANY(institution_keys)")
        params["institution"] = query.institution
    if query.kind is not None:
        where.append("kind = %(kind)s")
        params["kind"] = query.kind.value
    condition = " AND ".join(where)
    if count_only:
        return f"SELECT count(*) AS total FROM timeline_entries WHERE {condition}", params
    params["count"] = max(query.count, 0)
    if query.after is not None:
        # The patient's matching entries, all counted, then those after the key (counted
        # too: where the page is now) in order. A patient has tens to hundreds of entries.
        after = query.after
        params.update(
            after_study_date=after.study_date,
            after_study_time=after.study_time,
            after_received_at=after.received_at,
            after_study_instance_uid=after.study_instance_uid,
            after_kind=after.kind.value,
            after_report_sop_instance_uid=after.report_sop_instance_uid,
        )
        text = (
            f"SELECT {_ENTRY_COLUMNS}, total, received_at, count(*) OVER () AS following "
            f"FROM (SELECT {_ENTRY_COLUMNS}, received_at, count(*) OVER () AS total "
            f"      FROM timeline_entries WHERE {condition}) AS matched "
            f"WHERE {_AFTER} ORDER BY {_NEWEST_FIRST_OF_PATIENT} LIMIT %(count)s"
        )
        return text, params
    params["offset"] = max(query.offset, 0)
    text = (
        f"SELECT {_ENTRY_COLUMNS}, count(*) OVER () AS total, received_at FROM timeline_entries "
        f"WHERE {condition} ORDER BY {_NEWEST_FIRST} LIMIT %(count)s OFFSET %(offset)s"
    )
    return text, params


def _key(row: tuple[Any, ...]) -> EntryKey:
    """The order key of a search row (``_ENTRY_COLUMNS``, total, received_at)."""
    kind, uid, report_uid = row[:3]
    return EntryKey(row[5], row[6], row[17], uid, _KINDS[kind], report_uid)


def children_rows(study: StudySnapshot, *extra: Any) -> dict[str, list[tuple[Any, ...]]]:
    """A snapshot's rows of the series, instances and reports staging tables (``extra``
    appended to each row)."""
    uid, sender = study.study_instance_uid, study.sender_ura
    return {
        "series": [
            (uid, sender, s.series_instance_uid, _stored(s.modality), s.series_number,
             _stored(s.series_description), s.number_of_instances, *extra)
            for s in study.series
        ],
        "instances": [
            (uid, sender, i.sop_instance_uid, i.series_instance_uid, i.sop_class_uid,
             i.transfer_syntax_uid, i.object_key, i.size, i.sha256, *extra)
            for i in study.instances
        ],
        "reports": [
            (uid, sender, r.sop_instance_uid, r.series_instance_uid, r.kind.value, *extra)
            for r in study.reports
        ],
    }  # fmt: skip


def decision_row(checked: ConsentChecked) -> tuple[Any, ...]:
    """A timeline decision's row of the decisions staging table."""
    return decision_row_of(
        snapshot_ref(checked.study), checked.decision, checked.basis, checked.decided_by
    )


def snapshot_ref(study: StudySnapshot) -> SnapshotRef:
    """What a decision's row takes from its snapshot: source, snapshot key, patient."""
    return (
        study.study_instance_uid, study.sender_ura, study.version, study.last_received_at,
        study.recipient_ura, study.patient.pseudonym,
    )  # fmt: skip


def decision_row_of(
    study: SnapshotRef, decision: Decision, basis: Basis, decided_by: str
) -> tuple[Any, ...]:
    """A decision's row from its snapshot's ``snapshot_ref`` and its own fields."""
    uid, sender, version, last_received_at, recipient, patient = study
    return (
        uid, sender, version, last_received_at, recipient, decision is Decision.PERMIT,
        basis.value, decided_by, patient,
    )  # fmt: skip


def _staged_rows(batch: ProjectionBatch) -> dict[str, list[tuple[Any, ...]]]:
    """The batch as rows of the staging tables."""
    staged: dict[str, list[tuple[Any, ...]]] = {table: [] for table in _STAGE_COPY}
    for study in batch.snapshots.values():
        staged["snapshots"].append(snapshot_row(study))
        for table, rows in children_rows(study).items():
            staged[table] += rows
    staged["decisions"] = [decision_row(c) for c in batch.decisions.values()]
    staged["revocations"] = [(p, c, at) for (p, c), at in batch.revocations.items()]
    staged["deliveries"] = [(*key, v, at) for key, (v, at) in batch.deliveries.items()]
    return staged


async def apply_staged(
    conn: psycopg.AsyncConnection[Any],
    *,
    revocations: bool,
    snapshots: bool,
    decisions: bool,
    deliveries: bool,
) -> None:
    """Apply what the staging tables hold (at most one row per natural key) to the projection's
    tables and refresh the studies it touched; the caller's transaction holds
    ``PROJECTION_LOCK``. The flags say which staging tables hold rows."""
    if revocations:
        await conn.execute(_UPSERT_REVOCATIONS)
    if snapshots:
        await conn.execute(_UPSERT_SNAPSHOTS)
        await conn.execute(_REPLACE_CHILDREN)
    if decisions:
        await conn.execute(_UPDATE_DECISIONS)
    if revocations:
        await conn.execute(_WITHDRAW)
    if deliveries:
        await conn.execute(_UPSERT_DELIVERIES)
    await conn.execute(_REFRESH_TOUCHED)


async def configure_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    # Every statement here is a key lookup or a batch's worth of them, done in milliseconds;
    # the planner's estimates for the projection's statements (freshly filled tables during a
    # rebuild) crossed jit_above_cost, and compiling them took 50-150 ms per statement.
    await conn.execute("SET jit = off")


class PostgresTimeline:
    """The timeline read model on one pool of connections: written by the projection, read by
    the API (``TimelineReader``).

    ``PostgresTimeline(settings.postgres.conninfo, pool_size=settings.pool_size)``, then
    ``await open()`` (or ``async with``); ``start``/``stop`` are the same, so a
    :class:`shared.stream.Worker` can hold it as a view.
    """

    def __init__(self, conninfo: str, *, pool_size: int = 4, name: str = "timeline") -> None:
        self._pool = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=max(pool_size, 1),
            open=False,
            name=name,
            kwargs={"autocommit": True},
            configure=configure_connection,
        )

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self, timeout: float = 30.0) -> None:
        try:
            await self._pool.open(wait=True, timeout=timeout)
        except PoolTimeout as exc:
            raise TransientError(f"PostgreSQL unavailable: {database_error(exc)}") from None

    async def close(self) -> None:
        await self._pool.close()

    start, stop = open, close

    async def __aenter__(self) -> PostgresTimeline:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def ready(self) -> bool:
        """The database answers and the timeline schema is there (``/readyz``)."""
        try:
            async with self._pool.connection(timeout=2.0) as conn:
                row = await (
                    await conn.execute("SELECT to_regclass('timeline_studies') IS NOT NULL")
                ).fetchone()
            return bool(row and row[0])
        except (psycopg.Error, PoolTimeout):
            return False

    # --- write side -----------------------------------------------------------------------------

    async def apply(self, batch: ProjectionBatch) -> None:
        """Apply a batch in one transaction; raises TransientError when PostgreSQL is away (or
        the transaction lost a deadlock): the caller applies the same batch again."""
        if not batch:
            return
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PROJECTION_LOCK,))
                await conn.execute(STAGING_TABLES)
                await self._stage(conn, batch)
                await apply_staged(
                    conn,
                    revocations=bool(batch.revocations),
                    snapshots=bool(batch.snapshots),
                    decisions=bool(batch.decisions),
                    deliveries=bool(batch.deliveries),
                )
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise TransientError(
                f"applying the timeline batch failed: {database_error(exc)}"
            ) from None
        except psycopg.Error as exc:
            # One the server will refuse again (a constraint, a value it cannot store): the
            # worker stops, and its log says which kind, never the row's values.
            raise FatalError(f"the timeline batch was refused: {database_error(exc)}") from None

    async def truncate(self) -> None:
        """Empty the projection's tables (a rebuild); the access log is not one of them."""
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                sql.SQL("TRUNCATE {}").format(
                    sql.SQL(", ").join(sql.Identifier(t) for t in PROJECTION_TABLES)
                )
            )

    async def _stage(self, conn: psycopg.AsyncConnection, batch: ProjectionBatch) -> None:
        cursor = conn.cursor()
        for table, rows in _staged_rows(batch).items():
            if rows:
                async with cursor.copy(_STAGE_COPY[table]) as copy:
                    for row in rows:
                        await copy.write_row(row)

    # --- read side (TimelineReader) -------------------------------------------------------------

    async def search(self, query: TimelineQuery) -> TimelinePage:
        text, params = _search_sql(query)
        rows = await self._fetch(text, params)
        if rows:
            total = int(rows[0][16])
            offset = total - int(rows[0][18]) if query.after is not None else query.offset
            return TimelinePage([_entry(r) for r in rows], total, offset, _key(rows[-1]))
        if query.offset <= 0 and query.after is None and query.count > 0:
            return TimelinePage([], 0)
        # A page past the end (or of no entries: a count only) still says how many there are.
        text, params = _search_sql(query, count_only=True)
        counted = await self._fetch(text, params)
        total = int(counted[0][0]) if counted else 0
        return TimelinePage([], total, total if query.after is not None else query.offset)

    async def patient_of_study(self, study_instance_uid: str) -> str | None:
        rows = await self._fetch(_PATIENT_OF_STUDY, (study_instance_uid,))
        return rows[0][0] if rows else None

    async def entry(self, study_instance_uid: str) -> TimelineEntry | None:
        # The study's images entry, also for a study that holds reports only (QIDO study level).
        rows = await self._fetch(_ENTRY, (study_instance_uid,))
        return _entry(rows[0]) if rows else None

    async def series(self, study_instance_uid: str) -> list[SeriesRow]:
        rows = await self._fetch(_SERIES, {"study": study_instance_uid})
        return [
            SeriesRow(study_instance_uid, uid, modality, number, description, int(n))
            for uid, modality, number, description, n in rows
        ]

    async def instances(
        self,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[InstanceRow]:
        filters = ""
        params: dict[str, Any] = {"study": study_instance_uid}
        if series_instance_uid is not None:
            filters += " AND i.series_instance_uid = %(series)s"
            params["series"] = series_instance_uid
        if sop_instance_uid is not None:
            filters += " AND i.sop_instance_uid = %(sop)s"
            params["sop"] = sop_instance_uid
        text = _INSTANCES.format(instance_filters=filters)
        rows = await self._fetch(text, params)
        return [
            InstanceRow(study_instance_uid, series, sop, cls, syntax, key, int(size), sha256)
            for series, sop, cls, syntax, key, size, sha256 in rows
        ]

    async def _fetch(self, query: Any, params: Any) -> list[tuple[Any, ...]]:
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(query, params)
                return await cursor.fetchall()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise TransientError(
                f"the timeline database is unavailable: {database_error(exc)}"
            ) from None
