-- Study times in their standard form (DICOM TM, "101500"). Until 2026-11-28 ingest passed an
-- ACR-NEMA time ("10:15:00") on as received, and the timeline orders study times as text, in
-- which a colon sorts after every digit: such a study could be listed out of its order. Ingest
-- and the read model now drop the colons (services/ingest/domain/dicom.py, store.snapshot_row);
-- this brings the rows written before into line without a rebuild. Only rows holding a colon
-- are rewritten; a time is the same time without its colons.
UPDATE timeline_sources SET study_time = replace(study_time, ':', '') WHERE study_time LIKE '%:%';
UPDATE timeline_studies SET study_time = replace(study_time, ':', '') WHERE study_time LIKE '%:%';
UPDATE timeline_entries SET study_time = replace(study_time, ':', '') WHERE study_time LIKE '%:%';
