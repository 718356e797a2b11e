-- Study times in their standard form (DICOM TM, "101500"). Until 2026-11-28 ingest passed an
-- ACR-NEMA time ("10:15:00") on as received, and the timeline orders study times as text, in
-- which a colon sorts after every digit: such a study could be listed out of its order. Ingest
-- and the read model now drop the colons (services/ingest/domain/dicom.py, store.snapshot_row);
-- this brings the rows written before into line without a rebuild. Only rows holding a colon
-- are rewritten; a time is the same time without its colons.
--
-- Under the projection's lock (store.PROJECTION_LOCK, 0x71537A11): a projection worker still
-- running applies its batches before or after this, never interleaved with it (which could
-- deadlock on the rows both update). Each table is read whole once; on a large timeline the
-- entries' search index grows by the rows rewritten until vacuumed.
SELECT pg_advisory_xact_lock(1901296145);
UPDATE timeline_sources SET study_time = replace(study_time, ':', '') WHERE study_time LIKE '%:%';
UPDATE timeline_studies SET study_time = replace(study_time, ':', '') WHERE study_time LIKE '%:%';
UPDATE timeline_entries SET study_time = replace(study_time, ':', '') WHERE study_time LIKE '%:%';
